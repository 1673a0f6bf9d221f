"""The one seam between silo and the kernel's raw system calls.

Everything that mounts, unshares, pivots, drops capabilities or sets identities
goes through a :class:`Kernel`. :class:`LibcKernel` makes the real calls through
ctypes; :class:`RecordingKernel` records them so mount logic is unit-tested without
root (after youki's syscall interface). Backends receive a Kernel; they never call
libc themselves.

Contract for callers: methods raise :class:`OSError` (with ``errno`` set) on failure
and take ``bytes`` paths. LibcKernel is used in freshly forked children right
before ``execve``, so its methods avoid allocations and imports beyond ctypes.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Protocol

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

# mount flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

# prctl
PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4

# openat2 resolve flags
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10

_SYS_CLONE = 56
_SYS_PIVOT_ROOT = 155
_SYS_CAPSET = 126
_SYS_OPENAT2 = 437
_SYS_CLOSE_RANGE = 436
_SYS_EXECVEAT = 322
CLOSE_RANGE_CLOEXEC = 4
AT_EMPTY_PATH = 0x1000
TIOCSCTTY = 0x540E
TIOCSPTLCK = 0x40045431  # unlockpt
TIOCGPTN = 0x80045430  # ptsname's number
LAST_CAP = 40


class Kernel(Protocol):
    """Every privileged operation the backends need. Paths are bytes."""

    def mount(self, source: bytes | None, target: bytes, fstype: bytes | None, flags: int,
              data: bytes | None) -> None: ...
    def umount(self, target: bytes, flags: int) -> None: ...
    def mkdir(self, path: bytes, mode: int) -> None: ...
    def chown(self, path: bytes, uid: int, gid: int) -> None: ...
    def symlink(self, target: bytes, path: bytes) -> None: ...
    def write_file(self, path: bytes, data: bytes, mode: int) -> None: ...
    def open_in_root(self, root: bytes, path: bytes, create: str) -> int: ...
    def open_path(self, path: bytes) -> int: ...
    def is_dir(self, path: bytes) -> bool: ...
    def close(self, fd: int) -> None: ...
    def pivot_root(self, new_root: bytes) -> None: ...
    def sethostname(self, name: bytes) -> None: ...
    def loopback_up(self) -> None: ...
    def unshare(self, flags: int) -> None: ...


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
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


def drop_bounding_except(keep: int) -> None:
    """Drop every capability not in the ``keep`` bitmask from the bounding set."""
    for cap in range(LAST_CAP + 1):
        if not keep & (1 << cap) and _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0:
            err = ctypes.get_errno()
            if err != 22:  # EINVAL: cap unknown to this kernel
                raise _fail("drop capability")


def set_capabilities(keep: int) -> None:
    """Set effective, permitted and inheritable to ``keep``; raise the ambient set to it."""
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    for i in range(2):
        word = (keep >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = data[i].inheritable = word
    # SECURITY: capabilities outside `keep` are gone from every set before the
    # sandbox's code runs; ambient holds only what the spec added with --cap.
    if _libc.syscall(_SYS_CAPSET, ctypes.byref(header), ctypes.byref(data)) < 0:
        raise _fail("capset")
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    for cap in range(LAST_CAP + 1):
        if keep & (1 << cap):
            prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)


def close_range_cloexec(first: int) -> None:
    """Mark every fd >= first close-on-exec (SECURITY.md #2: no leaked fds)."""
    if _libc.syscall(_SYS_CLOSE_RANGE, first, ctypes.c_uint(0xFFFFFFFF), CLOSE_RANGE_CLOEXEC) < 0:
        raise _fail("close_range")


def execveat_fd(fd: int, argv: list[bytes], envp: list[bytes]) -> None:
    """execve the program behind ``fd`` (a sealed memfd); returns only on failure."""
    c_argv = (ctypes.c_char_p * (len(argv) + 1))(*argv, None)
    c_envp = (ctypes.c_char_p * (len(envp) + 1))(*envp, None)
    _libc.syscall(_SYS_EXECVEAT, fd, b"", c_argv, c_envp, AT_EMPTY_PATH)
    raise _fail("execveat")


class _KSigaction(ctypes.Structure):
    _fields_ = [("handler", ctypes.c_void_p), ("flags", ctypes.c_ulong), ("restorer", ctypes.c_void_p),
                ("mask", ctypes.c_uint64)]


def default_signal(signum: int) -> None:
    """SIG_DFL for ``signum`` through rt_sigaction(2) itself: glibc refuses the signals it
    reserves (32, 33), which a parent may still have left ignored."""
    act = _KSigaction(None, 0, None, 0)
    if _libc.syscall(13, signum, ctypes.byref(act), None, 8) < 0:  # rt_sigaction
        raise _fail("rt_sigaction")


def set_controlling_tty(fd: int) -> None:
    import fcntl

    fcntl.ioctl(fd, TIOCSCTTY, 0)


class LibcKernel:
    """The real thing, through ctypes."""

    def mount(self, source: bytes | None, target: bytes, fstype: bytes | None, flags: int,
              data: bytes | None) -> None:
        if _libc.mount(source, target, fstype, flags, data) < 0:
            raise _fail(f"mount {fstype.decode() if fstype else 'bind'}", target)

    def umount(self, target: bytes, flags: int) -> None:
        if _libc.umount2(target, flags) < 0:
            raise _fail("umount", target)

    def mkdir(self, path: bytes, mode: int) -> None:
        os.mkdir(path, mode)
        if mode & 0o7022:  # umask would have eaten sticky/group/other-write bits
            os.chmod(path, mode)

    def chown(self, path: bytes, uid: int, gid: int) -> None:
        os.chown(path, uid, gid, follow_symlinks=False)

    def symlink(self, target: bytes, path: bytes) -> None:
        os.symlink(target, path)

    def write_file(self, path: bytes, data: bytes, mode: int) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def open_in_root(self, root: bytes, path: bytes, create: str) -> int:
        """O_PATH fd of ``root/path`` resolved without leaving ``root``.

        Symlinks met on the way resolve as if ``root`` were ``/`` (openat2
        RESOLVE_IN_ROOT), so a hostile ``/dst -> /`` lands inside the root
        (CVE-2021-30465). Missing components are created as directories, the last
        one as ``create`` ("dir" or "file").
        """
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            parts = [p for p in path.split(b"/") if p]
            for i in range(len(parts)):
                sub = b"/".join(parts[: i + 1])
                try:
                    fd = self._openat2(root_fd, sub, os.O_PATH)
                except FileNotFoundError:
                    parent = self._openat2(root_fd, b"/".join(parts[:i]) or b".", os.O_PATH | os.O_DIRECTORY)
                    try:
                        last = i == len(parts) - 1
                        if last and create == "file":
                            os.close(os.open(parts[i], os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW
                                             | os.O_CLOEXEC, 0o644, dir_fd=parent))
                        else:
                            os.mkdir(parts[i], 0o755, dir_fd=parent)
                    finally:
                        os.close(parent)
                    fd = self._openat2(root_fd, sub, os.O_PATH)
                if i < len(parts) - 1:
                    os.close(fd)
                else:
                    return fd
            return os.dup(root_fd)
        finally:
            os.close(root_fd)

    @staticmethod
    def _openat2(dirfd: int, path: bytes, flags: int) -> int:
        how = _OpenHow(flags | os.O_CLOEXEC, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
        fd = _libc.syscall(_SYS_OPENAT2, dirfd, path, ctypes.byref(how), ctypes.sizeof(how))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), os.fsdecode(path))
        return int(fd)

    def open_path(self, path: bytes) -> int:
        return os.open(path, os.O_PATH | os.O_CLOEXEC)

    def is_dir(self, path: bytes) -> bool:
        return os.path.isdir(path)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pivot_root(self, new_root: bytes) -> None:
        # pivot_root(".", ".") then detach the old root: no put_old directory
        # is left inside the sandbox (the runc technique).
        os.chdir(new_root)
        if _libc.syscall(_SYS_PIVOT_ROOT, b".", b".") < 0:
            raise _fail("pivot_root", new_root)
        self.umount(b".", MNT_DETACH)
        os.chdir(b"/")

    def sethostname(self, name: bytes) -> None:
        if _libc.sethostname(name, len(name)) < 0:
            raise _fail("sethostname")

    def loopback_up(self) -> None:
        import fcntl
        import socket
        import struct

        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, 0)
        try:
            got = fcntl.ioctl(s.fileno(), 0x8913, struct.pack("16sH22x", b"lo", 0))  # SIOCGIFFLAGS
            if struct.unpack("16sH22x", got)[1] & 0x1:
                return  # already up (a namespace from the spawner's pool)
            ifreq = struct.pack("16sH22x", b"lo", 0x1 | 0x40)  # IFF_UP | IFF_RUNNING
            fcntl.ioctl(s.fileno(), 0x8914, ifreq)  # SIOCSIFFLAGS
        finally:
            s.close()

    def unshare(self, flags: int) -> None:
        if _libc.unshare(flags) < 0:
            raise _fail("unshare")


class RecordingKernel:
    """A fake Kernel that records every call; for unit tests without root."""

    def __init__(self, existing_dirs: set[bytes] | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.existing_dirs = existing_dirs or set()
        self._next_fd = 100

    def _fd(self) -> int:
        self._next_fd += 1
        return self._next_fd

    def mount(self, source: bytes | None, target: bytes, fstype: bytes | None, flags: int,
              data: bytes | None) -> None:
        self.calls.append(("mount", source, target, fstype, flags, data))

    def umount(self, target: bytes, flags: int) -> None:
        self.calls.append(("umount", target, flags))

    def mkdir(self, path: bytes, mode: int) -> None:
        self.calls.append(("mkdir", path, mode))

    def chown(self, path: bytes, uid: int, gid: int) -> None:
        self.calls.append(("chown", path, uid, gid))

    def symlink(self, target: bytes, path: bytes) -> None:
        self.calls.append(("symlink", target, path))

    def write_file(self, path: bytes, data: bytes, mode: int) -> None:
        self.calls.append(("write_file", path, data, mode))

    def open_in_root(self, root: bytes, path: bytes, create: str) -> int:
        fd = self._fd()
        self.calls.append(("open_in_root", root, path, create, fd))
        return fd

    def open_path(self, path: bytes) -> int:
        fd = self._fd()
        self.calls.append(("open_path", path, fd))
        return fd

    def is_dir(self, path: bytes) -> bool:
        return path in self.existing_dirs

    def close(self, fd: int) -> None:
        self.calls.append(("close", fd))

    def pivot_root(self, new_root: bytes) -> None:
        self.calls.append(("pivot_root", new_root))

    def sethostname(self, name: bytes) -> None:
        self.calls.append(("sethostname", name))

    def loopback_up(self) -> None:
        self.calls.append(("loopback_up",))

    def unshare(self, flags: int) -> None:
        self.calls.append(("unshare", flags))
