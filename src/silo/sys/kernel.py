"""The Python side of silo's seam to the kernel's raw system calls.

The sandbox itself is built by ``silo-setup`` (``src/silo/native/setup.c``), which
makes its mount, identity and capability calls in C and has a ``--trace`` mode that
prints them instead (the recording fake the unit tests use). What remains here is what
the spawner needs around it: :func:`spawn` (clone into new namespaces and exec
silo-setup, through silo's small C library), ``setns``, idmapped clones of the
overlays' lower layers, and the loopback-only network namespaces of the spawner's pool.

Contract for callers: functions raise :class:`OSError` (with ``errno`` set) on failure.
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

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


def _fail(what: str, path: bytes | None = None) -> OSError:
    err = ctypes.get_errno()
    if path is not None:
        return OSError(err, f"{what}: {os.strerror(err)}", os.fsdecode(path))
    return OSError(err, f"{what}: {os.strerror(err)}")


_spawn_lib: ctypes.CDLL | None = None


def spawn(flags: int, exe_fd: int, argv: list[bytes], keep: tuple[int, ...], raise_caps: bool) -> int:
    """Clone a child with namespace ``flags`` that execs the memfd ``exe_fd`` at once,
    vfork-style: the caller's memory is neither copied nor shared past the exec (see
    ``src/silo/native/spawn.c``). ``keep`` are the only fds the program inherits, and
    ``raise_caps`` carries a new user namespace's capabilities across the exec. Returns
    the child's pid; raises OSError naming the step that failed (nothing is left)."""
    global _spawn_lib
    if _spawn_lib is None:
        from silo import native

        lib = ctypes.CDLL(native.built("libsilo-spawn.so"), use_errno=True)
        lib.silo_spawn.restype = ctypes.c_int
        lib.silo_spawn.argtypes = [ctypes.c_ulong, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p),
                                   ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int,
                                   ctypes.POINTER(ctypes.c_char_p)]
        _spawn_lib = lib
    c_argv = (ctypes.c_char_p * (len(argv) + 1))(*argv, None)
    c_keep = (ctypes.c_int * len(keep))(*keep)
    what = ctypes.c_char_p()
    pid = _spawn_lib.silo_spawn(flags, exe_fd, c_argv, c_keep, len(keep), int(raise_caps), ctypes.byref(what))
    if pid < 0:
        raise _fail((what.value or b"clone").decode())
    return int(pid)


def setns(fd: int, nstype: int) -> None:
    """Join the namespace behind ``fd`` (os.setns exists only from Python 3.12)."""
    if _libc.setns(fd, nstype) < 0:
        raise _fail("setns")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


_SYS_OPEN_TREE, _SYS_MOUNT_SETATTR = 428, 442
_OPEN_TREE_CLONE, _OPEN_TREE_CLOEXEC, _AT_RECURSIVE, _AT_EMPTY_PATH = 1, 0o2000000, 0x8000, 0x1000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV, _MOUNT_ATTR_IDMAP = 0x1, 0x2, 0x4, 0x100000


def idmapped_tree(path: str, userns_fd: int) -> int:
    """A detached, read-only, nosuid, nodev clone of the mount tree at ``path`` whose
    files' owners are mapped through the user namespace ``userns_fd`` (host id N shows
    as the id that namespace maps to N). Needs CAP_SYS_ADMIN over the filesystem (root).

    A filesystem that cannot be idmapped yields the same clone without the idmapping:
    the sandbox then sees what it would have seen on the path itself.
    """
    fd = int(_libc.syscall(_SYS_OPEN_TREE, -100, os.fsencode(path),
                           ctypes.c_uint(_OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_RECURSIVE)))
    if fd < 0:
        raise _fail("open_tree", os.fsencode(path))
    base = _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV
    attr = _MountAttr(base | _MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
    flags = ctypes.c_uint(_AT_EMPTY_PATH | _AT_RECURSIVE)
    if _libc.syscall(_SYS_MOUNT_SETATTR, fd, b"", flags, ctypes.byref(attr), ctypes.sizeof(attr)) < 0:
        attr = _MountAttr(base, 0, 0, 0)
        if _libc.syscall(_SYS_MOUNT_SETATTR, fd, b"", flags, ctypes.byref(attr), ctypes.sizeof(attr)) < 0:
            err = _fail("mount_setattr", os.fsencode(path))
            os.close(fd)
            raise err
    return fd


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


MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    """mount(2); callers use it only in a mount namespace of their own."""
    enc = [None if v is None else os.fsencode(v) for v in (source, target, fstype, data)]
    if _libc.mount(enc[0], enc[1], enc[2], flags, enc[3]) < 0:
        raise _fail("mount", enc[1])


def bind_readonly(source: str, target: str) -> None:
    """``source`` at ``target``, read-only (also nosuid, nodev), with its submounts."""
    mount(source, target, None, MS_BIND | MS_REC)
    mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
