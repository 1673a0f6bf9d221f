"""Shared plumbing for the cgroup v1 and v2 managers (see :mod:`silo.sys.cgroups`).

Owns: small unbuffered reads and writes of cgroupfs files, the inotify binding (ctypes),
limit validation, the signal loop used when ``cgroup.kill`` is missing, the bounded
``rmdir`` retry and the leftover sweep. Must not: decide placement or know which cgroup
version is in use; sleep for more than a few milliseconds (the spawner is a
single-threaded event loop).

Directory creation and removal go through :class:`CgroupFs` so that unit tests can swap in
a fake tree that populates interface files the way the kernel does.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import signal
import time
from collections.abc import Iterable

from silo.model.errors import LimitUnavailable

log = logging.getLogger(__name__)

#: Directory under each hierarchy's base that holds one child cgroup per sandbox.
SILO_DIR = "silo"
#: CFS period used for CPU limits (microseconds), on both versions.
CPU_PERIOD_US = 100_000
#: Smallest quota the kernel accepts (microseconds).
CPU_MIN_QUOTA_US = 1_000

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_EPERM_SET = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})

# Waits between rmdir attempts while a cgroup empties (seconds, ~31 ms in total).
_RMDIR_BACKOFF = (0.001, 0.002, 0.004, 0.008, 0.016)
# Rounds of the procs-list kill loop before giving up (each round is two reads).
_KILL_ROUNDS = 64


class CgroupFs:
    """Creation and removal of cgroup directories; the seam unit tests replace.

    On a real cgroupfs ``mkdir`` makes the kernel populate interface files, ``rmdir``
    removes a cgroup with its files, and writes to ``cgroup.subtree_control``,
    ``cgroup.procs`` and ``cgroup.kill`` are commands, which a plain directory tree cannot
    imitate. Reads go straight to the files.
    """

    def mkdir(self, path: str) -> None:
        # SECURITY: mode 0o755 — a sandbox's cgroup is writable only by its creator
        # (root or the delegated user), never by the sandbox's unprivileged uid.
        os.mkdir(path, 0o755)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def write(self, path: str, value: str) -> None:
        write_file(path, value)


REAL_FS = CgroupFs()


# ---------------------------------------------------------------- validation


def check_name(name: str) -> None:
    """Refuse names that are not one plain path component (they become directory names)."""
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid cgroup name {name!r}: use 1-128 of [A-Za-z0-9_.-]")


def check_limits(memory: int | None, cpus: float | None, pids: int | None) -> None:
    """Refuse nonsensical limits (specs validate them first; this guards the seam)."""
    if memory is not None and memory <= 0:
        raise ValueError(f"memory limit must be positive, got {memory}")
    if cpus is not None and not cpus > 0:
        raise ValueError(f"cpu limit must be positive, got {cpus}")
    if pids is not None and pids < 1:
        raise ValueError(f"pids limit must be at least 1, got {pids}")


def cpu_quota_us(cpus: float) -> int:
    """CFS quota for ``cpus`` CPUs over :data:`CPU_PERIOD_US`."""
    return max(CPU_MIN_QUOTA_US, round(cpus * CPU_PERIOD_US))


def wanted(memory: int | None, cpus: float | None, pids: int | None) -> list[str]:
    """Controllers needed for the limits asked for, in creation order."""
    out = []
    if memory is not None:
        out.append("memory")
    if cpus is not None:
        out.append("cpu")
    if pids is not None:
        out.append("pids")
    return out


def is_permission(exc: OSError) -> bool:
    return exc.errno in _EPERM_SET


def unavailable(controller: str, why: str, fix: str) -> LimitUnavailable:
    """The one-line error: which limit, why it cannot be set, what to do."""
    return LimitUnavailable(f"cannot limit {controller}: {why}; {fix}")


# ---------------------------------------------------------------- file I/O


def write_file(path: str, value: str) -> None:
    """Write ``value`` in one ``write(2)`` (cgroupfs parses each write separately)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def read_file(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


def read_keyed(path: str) -> dict[str, int]:
    """Parse a flat keyed file (``key value`` per line: memory.events, pids.events, ...)."""
    out: dict[str, int] = {}
    try:
        text = read_file(path)
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            out[key] = int(value)
        except ValueError:
            continue
    return out


def read_pids(procs_path: str) -> list[int]:
    """PIDs listed in a ``cgroup.procs`` file; empty when the cgroup is gone."""
    try:
        text = read_file(procs_path)
    except FileNotFoundError:
        return []
    return [int(x) for x in text.split()]


# ---------------------------------------------------------------- inotify (ctypes)

IN_MODIFY = 0x00000002
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def inotify_watch(paths: Iterable[str]) -> int:
    """A non-blocking inotify fd with an ``IN_MODIFY`` watch on each of ``paths``.

    cgroupfs reports changes to event files (``memory.events``, ``pids.events``) as
    ``IN_MODIFY`` through ``kernfs_notify``; the fd becomes readable for ``selectors``.
    """
    libc = _c()
    fd = int(libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"inotify_init1: {os.strerror(err)}")
    try:
        for path in paths:
            wd = int(libc.inotify_add_watch(fd, os.fsencode(path), IN_MODIFY))
            if wd < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"inotify_add_watch: {os.strerror(err)}", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def drain(fd: int) -> bool:
    """Read whatever is pending on a non-blocking eventfd/inotify fd; True if anything was."""
    got = False
    while True:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return got
        except OSError:
            return got
        if not data:
            return got
        got = True


def close_fds(fds: list[int]) -> None:
    while fds:
        fd = fds.pop()
        try:
            os.close(fd)
        except OSError:
            pass


# ---------------------------------------------------------------- kill and removal


def kill_procs(procs_path: str) -> None:
    """SIGKILL every process listed in ``procs_path`` until no new ones appear.

    For kernels or versions without ``cgroup.kill``. Race handling: each pid is pinned
    with a pidfd and only signalled if it is *still* listed in the cgroup after the pidfd
    was opened, so a pid that exited and was reused by a process outside the cgroup is
    never signalled. Bounded (no sleeping): it stops when a round lists only pids already
    signalled; a process that forks while being killed is caught by the next round.
    """
    signalled: set[int] = set()
    for _ in range(_KILL_ROUNDS):
        listed = read_pids(procs_path)
        if not listed or signalled.issuperset(listed):
            return
        pinned: dict[int, int] = {}
        try:
            for pid in listed:
                try:
                    pinned[pid] = os.pidfd_open(pid)
                except ProcessLookupError:
                    continue
            still = set(read_pids(procs_path))
            for pid, pidfd in pinned.items():
                if pid not in still:
                    continue
                try:
                    # SECURITY: the pidfd was opened before the membership re-check, so
                    # the signal can only reach a process that is in this cgroup.
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                signalled.add(pid)
        finally:
            for pidfd in pinned.values():
                os.close(pidfd)
    log.warning("cgroup %s still had new processes after %d kill rounds", procs_path, _KILL_ROUNDS)


def _rmdir_tree(fs: CgroupFs, path: str) -> None:
    """``rmdir`` a cgroup, removing child cgroups (bottom-up) if it has any."""
    try:
        fs.rmdir(path)
        return
    except OSError as exc:
        if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
            raise
    try:
        children = [e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return
    for child in children:
        _rmdir_tree(fs, child)
    fs.rmdir(path)


def remove_cgroup(fs: CgroupFs, path: str, *, wait: bool) -> bool:
    """Remove a cgroup directory; True when it is gone (ENOENT counts as gone).

    With ``wait`` it retries for ~31 ms while the cgroup empties (killed processes take a
    moment to leave); without, one attempt. Never raises for a busy or missing cgroup.
    """
    delays = _RMDIR_BACKOFF if wait else ()
    for attempt in range(len(delays) + 1):
        try:
            _rmdir_tree(fs, path)
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                log.warning("cannot remove cgroup %s: %s", path, exc)
                return False
        if attempt < len(delays):
            time.sleep(delays[attempt])
    return False


def reclaim_dirs(fs: CgroupFs, paths: Iterable[str]) -> None:
    """Kill whatever runs in each cgroup of ``paths`` and remove it (a crashed daemon's
    cgroup of a name it is about to use again); missing ones are fine."""
    for path in paths:
        if os.path.isdir(path):
            kill_procs(f"{path}/cgroup.procs")
            remove_cgroup(fs, path, wait=True)


def sweep_dirs(fs: CgroupFs, parents: Iterable[str], live: set[str], min_age: float) -> int:
    """Remove empty sandbox cgroups under each of ``parents``; returns distinct names removed.

    Skips names in ``live`` (this process's own cgroups) and cgroups younger than
    ``min_age`` seconds, which may belong to another spawner that has created but not yet
    filled them. Busy cgroups (still running processes) are left alone.
    """
    now = time.time()
    removed: set[str] = set()
    for parent in parents:
        try:
            entries = list(os.scandir(parent))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.name in live or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime < min_age:
                    continue
            except FileNotFoundError:
                continue
            if remove_cgroup(fs, entry.path, wait=False):
                removed.add(entry.name)
    return len(removed)
