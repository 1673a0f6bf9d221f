"""Resource limits for sandboxes: cgroup v1 and v2 behind one interface.

Owns: detecting which cgroup hierarchy can carry silo's limits (memory, cpu, pids),
creating one cgroup per sandbox with those limits, moving pids in, reporting and reacting
to limit hits, and removing the cgroups again (plus leftovers of a crashed spawner).

Must not: block the spawner's event loop (no sleeping beyond a ~31 ms bounded ``rmdir``
retry in :meth:`Cgroup.destroy`); touch cgroups outside the ``silo`` directory it creates;
create controllers for limits that were not asked for.

Use::

    mgr = open_manager()                        # once per process; detection is cached
    cg = mgr.create("sbx-1234", memory=256 << 20, cpus=0.5, pids=64)
    cg.add(child_pid)
    for fd in cg.event_fds():
        selector.register(fd, selectors.EVENT_READ, cg)
    ...  # on readiness: cg.limit_hit() -> "memory" | "pids" | None (drains the fds);
    ...  # on "memory" under v1 (no oom.group) kill the rest: cg.kill()
    cg.kill(); <reap>; selector.unregister(fd) ...; cg.destroy()
    mgr.sweep()                                 # at spawner start: a crashed one's leftovers

Contracts the caller relies on: ``create`` is ~0.5 ms and never sleeps (the first call
on v1 with a pids limit also runs a ~3 ms probe that forks once); ``add`` raises
``OSError`` (ESRCH) if the pid is gone; ``kill`` never waits; ``destroy`` waits at most
~31 ms for a cgroup to empty, then leaves it for ``sweep`` (and a later ``destroy``).
Unregister the event fds from the selector before ``destroy`` closes them.

Placement and per-version details are in :mod:`silo.sys.cgroups_v1` and
:mod:`silo.sys.cgroups_v2`. ``create`` raises :class:`LimitUnavailable` (one line: the
controller, why, the fix) when a limit cannot be enforced, after undoing its own work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from silo.model.errors import LimitUnavailable
from silo.sys import cgroups_common as _c
from silo.sys.cgroups_v1 import V1Cgroup, V1Manager
from silo.sys.cgroups_v2 import V2Cgroup, V2Manager, choose_base

__all__ = [
    "Cgroup",
    "CgroupManager",
    "LimitUnavailable",
    "NoCgroupManager",
    "V1Cgroup",
    "V1Manager",
    "V2Cgroup",
    "V2Manager",
    "detect",
    "open_manager",
]

LIMIT_CONTROLLERS = ("memory", "cpu", "pids")


class Cgroup(Protocol):
    """One sandbox's cgroup (one directory per hierarchy on v1)."""

    def add(self, pid: int) -> None:
        """Move ``pid`` into the cgroup (into every hierarchy on v1)."""

    def event_fds(self) -> list[int]:
        """Fds that become readable when a limit is hit; register them with ``selectors``."""
        ...

    def limit_hit(self) -> str | None:
        """``"memory"`` (OOM kill), ``"pids"`` (fork refused) or None, read from counters."""
        ...

    def kill(self) -> None:
        """SIGKILL every process in the cgroup; does not wait for them to exit."""

    def memory_bytes(self) -> int | None:
        """The memory its processes use now (page cache included), or None when unknown."""
        ...

    def destroy(self) -> None:
        """Close fds and remove the cgroup; idempotent; never raises for ENOENT."""

    @property
    def removed(self) -> bool:
        """True once :meth:`destroy` removed it (it may stay busy while processes leave)."""


class CgroupManager(Protocol):
    """Creates sandbox cgroups; one per process, chosen by :func:`open_manager`."""

    version: str  # "v1", "v2", or "none" when no cgroup filesystem is mounted

    def create(self, name: str, memory: int | None, cpus: float | None, pids: int | None) -> Cgroup:
        """A new cgroup ``name`` with these limits, or :class:`LimitUnavailable`."""
        ...

    def sweep(self) -> int:
        """Remove empty leftover silo cgroups (a crashed spawner's); returns the count."""
        ...

    def reclaim(self, name: str) -> None:
        """Kill every process in cgroup ``name`` and remove it, if it exists (its owner
        crashed and is about to reuse the name); never raises for a missing one."""


class NoCgroupManager:
    """Stand-in when no cgroup filesystem is mounted: every ``create`` refuses."""

    version = "none"

    def create(self, name: str, memory: int | None, cpus: float | None, pids: int | None) -> Cgroup:
        ctls = _c.wanted(memory, cpus, pids)
        raise _c.unavailable(
            ctls[0] if ctls else "resources",
            "no cgroup filesystem is mounted",
            "mount cgroup2 at /sys/fs/cgroup (mount -t cgroup2 none /sys/fs/cgroup)",
        )

    def sweep(self) -> int:
        return 0

    def reclaim(self, name: str) -> None:
        pass


# ---------------------------------------------------------------- detection


@dataclass(frozen=True)
class Mounts:
    """cgroup mounts found in a mountinfo text."""

    unified: str | None
    v1: dict[str, str]  # controller -> mount point


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` for space and friends)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> Mounts:
    """Find the cgroup2 mount and the v1 mounts of memory, cpu and pids.

    For each, the first mount of the hierarchy's root (``/``) wins; a bind mount of a
    sub-cgroup (containers) is used only if nothing better exists.
    """
    unified: tuple[bool, str] | None = None
    v1: dict[str, tuple[bool, str]] = {}
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        at_root, point = fields[3] == "/", _unescape(fields[4])
        fstype = tail[0]
        if fstype == "cgroup2":
            if unified is None or (at_root and not unified[0]):
                unified = (at_root, point)
        elif fstype == "cgroup":
            for opt in tail[2].split(","):
                if opt in LIMIT_CONTROLLERS:
                    have = v1.get(opt)
                    if have is None or (at_root and not have[0]):
                        v1[opt] = (at_root, point)
    return Mounts(unified[1] if unified else None, {k: v[1] for k, v in v1.items()})


def _read(path: str) -> str:
    try:
        return _c.read_file(path)
    except OSError:
        return ""


def detect(
    mountinfo: str, proc_self_cgroup: str, uid: int, fs: _c.CgroupFs = _c.REAL_FS
) -> V1Manager | V2Manager | NoCgroupManager:
    """Choose the manager for this system (pure given its inputs; reads cgroup.controllers).

    The hierarchy that holds more of memory/cpu/pids wins; a tie goes to v2. Hybrid
    systems whose cgroup2 mount has no controllers (Debian 11/12 default) get v1.
    """
    mounts = parse_mountinfo(mountinfo)
    v2_ctls: set[str] = set()
    if mounts.unified is not None:
        v2_ctls = set(_read(f"{mounts.unified}/cgroup.controllers").split())
    v2_score = len(v2_ctls.intersection(LIMIT_CONTROLLERS))
    v1_score = len(mounts.v1)
    if mounts.unified is not None and v2_score >= v1_score:
        base, why_not = choose_base(mounts.unified, proc_self_cgroup, uid)
        return V2Manager(mounts.unified, base, uid=uid, why_not=why_not, fs=fs)
    if mounts.v1:
        return V1Manager(mounts.v1, uid=uid, fs=fs)
    return NoCgroupManager()


_manager: V1Manager | V2Manager | NoCgroupManager | None = None


def open_manager() -> CgroupManager:
    """The process's cgroup manager (detected on first call, then cached)."""
    global _manager
    if _manager is None:
        _manager = detect(_read("/proc/self/mountinfo"), _read("/proc/self/cgroup"), os.geteuid())
    return _manager


def reset_manager() -> None:
    """Forget the cached manager (after ``setuid`` in a forked child, and in tests)."""
    global _manager
    _manager = None


if TYPE_CHECKING:  # the concrete classes satisfy the protocols (checked by mypy)

    def _conforms(
        a: V1Manager, b: V2Manager, n: NoCgroupManager, x: V1Cgroup, y: V2Cgroup
    ) -> tuple[CgroupManager, CgroupManager, CgroupManager, Cgroup, Cgroup]:
        return (a, b, n, x, y)
