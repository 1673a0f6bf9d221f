"""A sandbox's user database: the ``/etc/passwd`` and ``/etc/group`` it is given.

root, the sandbox's user (``user``, home ``/home/user``) when it is not root, nobody;
and, when asked, the host's system accounts between them (those whose name or id the
others take left out). The process level writes them into the sandbox's overlay
(silo.engine.planner); the vm level sends them to the guest's agent (USERS).
"""

from __future__ import annotations

from collections.abc import Sequence

Account = tuple[str, int, int, str, str, str]  # name, uid, gid, gecos, home, shell
Group = tuple[str, int, Sequence[str]]  # name, gid, members


def passwd(uid: int, gid: int, system: Sequence[Account] = ()) -> bytes:
    lines = ["root:x:0:0:root:/root:/bin/bash"]
    ours = [("user", uid)] if uid != 0 else []
    if uid != 0:
        lines.append(f"user:x:{uid}:{gid}:sandbox user:/home/user:/bin/bash")
    taken = {"root", "nobody", *(n for n, _ in ours)}, {0, 65534, *(i for _, i in ours)}
    lines += [f"{name}:x:{u}:{g}:{gecos}:{home}:{shell}" for name, u, g, gecos, home, shell
              in system if name not in taken[0] and u not in taken[1]]
    lines.append("nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin")
    return ("\n".join(lines) + "\n").encode()


def group(uid: int, gid: int, system: Sequence[Group] = ()) -> bytes:
    lines = ["root:x:0:", "tty:x:5:"]
    ours = [("user", gid)] if gid not in (0, 5, 65534) else []
    lines += [f"{name}:x:{g}:" for name, g in ours]
    taken = {"root", "tty", "nogroup", *(n for n, _ in ours)}, {0, 5, 65534, *(g for _, g in ours)}
    lines += [f"{name}:x:{g}:{','.join(members)}" for name, g, members
              in system if name not in taken[0] and g not in taken[1]]
    lines.append("nogroup:x:65534:")
    return ("\n".join(lines) + "\n").encode()
