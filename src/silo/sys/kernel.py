"""The Python side of silo's seam to the kernel's raw system calls.

The sandbox itself is built by ``silo-setup`` (``src/silo/native/setup.c``), which
makes its mount, identity and capability calls in C and has a ``--trace`` mode that
prints them instead (the recording fake the unit tests use). What remains here is what
the spawner itself needs before and around that exec: clone with namespace flags,
setns, the ambient capabilities that carry the new user namespace's capabilities
across the exec, execveat of a sealed memfd, and the loopback-only network namespaces
of the spawner's pool.

Contract for callers: functions raise :class:`OSError` (with ``errno`` set) on failure.
``raise_all_ambient`` and ``execveat_fd`` run in a freshly cloned child right before
``execve``, so they allocate little and import nothing.
"""

from __future__ import annotations

import ctypes
import os

# clone/unshare flags
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACE_FLAGS = {
    "mnt": CLONE_NEWNS, "cgroup": CLONE_NEWCGROUP, "uts": CLONE_NEWUTS, "ipc": CLONE_NEWIPC,
    "user": CLONE_NEWUSER, "pid": CLONE_NEWPID, "net": CLONE_NEWNET,
}

PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2

_SYS_CLONE = 56
_SYS_CAPGET = 125
_SYS_CAPSET = 126
_SYS_EXECVEAT = 322
AT_EMPTY_PATH = 0x1000
LAST_CAP = 40


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
# clone goes through PyDLL: the GIL stays held across the call, so the child starts
# with a consistent interpreter state (then PyOS_AfterFork_Child runs).
_pylibc = ctypes.PyDLL(None, use_errno=True)
_pylibc.syscall.restype = ctypes.c_long


def _fail(what: str, path: bytes | None = None) -> OSError:
    err = ctypes.get_errno()
    if path is not None:
        return OSError(err, f"{what}: {os.strerror(err)}", os.fsdecode(path))
    return OSError(err, f"{what}: {os.strerror(err)}")


def clone(flags: int) -> int:
    """fork(2) with namespace flags: returns 0 in the child, the pid in the parent.

    Precondition: the calling process is single-threaded (the spawner is). The
    child must only exec or ``os._exit``: Python's at-fork handlers do not run.
    """
    pid = _pylibc.syscall(_SYS_CLONE, ctypes.c_ulong(flags | 17), None, None, None, None)  # 17: SIGCHLD
    if pid < 0:
        raise _fail("clone")
    return int(pid)


def setns(fd: int, nstype: int) -> None:
    """Join the namespace behind ``fd`` (os.setns exists only from Python 3.12)."""
    if _libc.setns(fd, nstype) < 0:
        raise _fail("setns")


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    if _libc.prctl(option, arg2, arg3, 0, 0) < 0:
        raise _fail(f"prctl({option})")


def raise_all_ambient() -> None:
    """Raise every permitted capability into the inheritable and ambient sets, so an
    execve keeps them whatever the caller's uid (used right before exec'ing silo-setup,
    which lowers all sets again)."""
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    if _libc.syscall(_SYS_CAPGET, ctypes.byref(header), ctypes.byref(data)) < 0:
        raise _fail("capget")
    permitted = 0
    for i in range(2):
        data[i].inheritable = data[i].permitted
        permitted |= data[i].permitted << (32 * i)
    if _libc.syscall(_SYS_CAPSET, ctypes.byref(header), ctypes.byref(data)) < 0:
        raise _fail("capset")
    for cap in range(LAST_CAP + 1):
        if permitted >> cap & 1:
            prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)


def execveat_fd(fd: int, argv: list[bytes], envp: list[bytes]) -> None:
    """execve the program behind ``fd`` (a sealed memfd); returns only on failure."""
    c_argv = (ctypes.c_char_p * (len(argv) + 1))(*argv, None)
    c_envp = (ctypes.c_char_p * (len(envp) + 1))(*envp, None)
    _libc.syscall(_SYS_EXECVEAT, fd, b"", c_argv, c_envp, AT_EMPTY_PATH)
    raise _fail("execveat")


def unshare(flags: int) -> None:
    if _libc.unshare(flags) < 0:
        raise _fail("unshare")


def loopback_up() -> None:
    """Bring up ``lo`` in the calling thread's network namespace (if it is not up)."""
    import fcntl
    import socket
    import struct

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, 0)
    try:
        got = fcntl.ioctl(s.fileno(), 0x8913, struct.pack("16sH22x", b"lo", 0))  # SIOCGIFFLAGS
        if struct.unpack("16sH22x", got)[1] & 0x1:
            return
        fcntl.ioctl(s.fileno(), 0x8914, struct.pack("16sH22x", b"lo", 0x1 | 0x40))  # SIOCSIFFLAGS: UP|RUNNING
    finally:
        s.close()
