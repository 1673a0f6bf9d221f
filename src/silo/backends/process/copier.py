"""``silo cp`` inside a workspace: a short-lived helper that joins it and reads or writes a tar stream.

The daemon runs ``python -I -m silo.backends.process.copier get|put PATH UID GID PIDFD``,
PIDFD being an inherited pidfd of the workspace's init. The helper imports everything it will use, then
enters the workspace's user and mount namespaces and becomes the workspace's user. From
then on ``/`` is the workspace's root: every path, ``..`` and symlink resolves inside
it, so no path can lead out (SECURITY.md #3, #19), and files are read and written with
the workspace user's rights, never the daemon's (a root daemon must not read a host file
for a user through a folder mapped into their workspace). It does not enter the pid
namespace, so nothing in the workspace can see or signal it, and it loads nothing from
the workspace: no imports after the join, no name-service lookups (tarfile's ``pwd``
and ``grp`` are switched off: NSS would dlopen the workspace's libraries).

``get`` writes an uncompressed tar of PATH to stdout, its top entry named after PATH's
last component; symlinks are stored as links, never followed. ``put`` reads a tar from
stdin: when PATH is an existing directory its entries land inside it, otherwise the top
entry is renamed to PATH. Device nodes, fifos, hard links, absolute names and ``..`` are
refused (the sender is the user, but the rules are the same as for any archive).
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import stat
import sys
import tarfile
from typing import Any

from silo.model import plan as p
from silo.model.errors import NotFoundError, PermissionDenied, SiloError, UserError
from silo.sys import kernel as sysk

JOIN_FLAGS = sysk.CLONE_NEWUSER | sysk.CLONE_NEWNS
# The helper's exit codes that say more than "failed" (2): the daemon picks its error class by them.
EXIT_MISSING = 3
EXIT_DENIED = 4


class CopyError(Exception):
    pass


def _refuse(message: str) -> None:
    raise CopyError(message)


def _check_member(member: tarfile.TarInfo, links: set[str]) -> str:
    name = posixpath.normpath(member.name)
    if member.name.startswith("/") or name == ".." or name.startswith("../") or "\0" in member.name:
        _refuse(f"archive member {member.name!r} leads outside the destination")
    parts = name.split("/")
    for i in range(1, len(parts)):
        if "/".join(parts[:i]) in links:
            _refuse(f"archive member {member.name!r} goes through a symlink")
    if not (member.isreg() or member.isdir() or member.issym()):
        _refuse(f"archive member {member.name!r} is not a file, directory or symlink")
    if member.issym():
        links.add(name)
    return name


def put(dest: str, src: Any) -> None:
    if os.path.isdir(dest):
        into, rename = dest, None
    else:
        into, rename = posixpath.dirname(dest) or "/", posixpath.basename(dest)
        if not os.path.isdir(into):
            _refuse(f"{into} is not a directory in the workspace")
    links: set[str] = set()
    top: str | None = None
    with tarfile.open(fileobj=src, mode="r|") as tar:
        for member in tar:
            name = _check_member(member, links)
            head = name.split("/")[0]
            if top is None:
                top = head
            elif head != top:
                _refuse("the archive has more than one top entry")
            if rename is not None:
                name = posixpath.join(rename, *name.split("/")[1:]) if "/" in name else rename
            target = posixpath.join(into, name)
            if member.isdir():
                os.makedirs(target, mode=member.mode & 0o7777 | 0o700, exist_ok=True)
                continue
            if os.path.lexists(target) and not os.path.isdir(target):
                os.unlink(target)
            if member.issym():
                os.symlink(member.linkname, target)
                continue
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         member.mode & 0o777)
            with open(fd, "wb") as out:
                data = tar.extractfile(member)
                assert data is not None
                while chunk := data.read(1 << 20):
                    out.write(chunk)
                out.flush()
                os.fchmod(out.fileno(), member.mode & 0o7777)
                os.utime(out.fileno(), (member.mtime, member.mtime))


def get(path: str, out: Any) -> None:
    st = os.lstat(path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        _refuse(f"{path} is not a file, directory or symlink")
    name = posixpath.basename(path.rstrip("/")) or "root"

    def only_plain(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        info.uname = info.gname = ""
        return info if info.isreg() or info.isdir() or info.issym() else None

    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        tar.add(path, arcname=name, recursive=True, filter=only_plain)


def main(argv: list[str]) -> int:
    mode, path, uid, gid, pidfd = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    tarfile.pwd = None  # type: ignore[attr-defined]  # no NSS (see the module docstring)
    tarfile.grp = None  # type: ignore[attr-defined]
    try:
        sysk.setns(pidfd, JOIN_FLAGS)
        os.close(pidfd)
        os.chdir("/")
        try:
            os.setgroups([])
        except PermissionError:
            pass  # rootless: setgroups is denied in the workspace's user namespace
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        if mode == "put":
            put(path, sys.stdin.buffer)
        elif mode == "get":
            get(path, sys.stdout.buffer)
            sys.stdout.buffer.flush()
        else:
            _refuse(f"unknown mode {mode!r}")
    except (CopyError, tarfile.TarError) as e:
        print(f"{e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        print(f"{e.strerror}{where}", file=sys.stderr)
        return EXIT_MISSING if isinstance(e, FileNotFoundError) else EXIT_DENIED if isinstance(
            e, PermissionError) else 2
    except Exception as e:  # one line for the user, never a traceback
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


# -- the daemon's side ------------------------------------------------------------------


def error_of(code: int, message: str) -> SiloError:
    """The error a helper's exit ``code`` and its stderr line stand for."""
    kind = {EXIT_MISSING: NotFoundError, EXIT_DENIED: PermissionDenied}.get(code, UserError)
    return kind(message)


async def start(mode: str, path: str, target: Any, plan: p.Plan, runtime: Any) -> tuple[Any, Any]:
    """Start the helper joined to ``target`` (a running init), or to a temporary init
    of ``plan`` when the workspace is not running; returns (helper, temporary init)."""
    temp = None
    if target is None:
        null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        try:
            temp = await runtime.start_init(f"cp-{os.getpid()}", plan, null)
        finally:
            os.close(null)
        target = temp
    uid, gid = plan.process.uid, plan.process.gid
    if len(plan.uid_map) == 1 and plan.uid_map[0].count == 1:
        uid, gid = plan.uid_map[0].inside, plan.gid_map[0].inside
    pidfd = os.dup(target.pidfd)
    try:
        helper = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-m", "silo.backends.process.copier", mode, path, str(uid), str(gid),
            str(pidfd), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, pass_fds=(pidfd,))
    except BaseException:
        if temp is not None:
            await runtime.stop(temp, 0)
        raise
    finally:
        os.close(pidfd)
    return helper, temp


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
