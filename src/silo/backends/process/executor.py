"""Executes a plan's mount operations through a :class:`~silo.sys.kernel.Kernel`.

The vocabulary is fixed: one function per operation class of
:mod:`silo.model.plan`. Runs in the sandbox's freshly cloned child, inside its new
user and mount namespaces, before ``pivot_root``; the recording fake runs the same
code in unit tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from silo.model import plan as p
from silo.sys.kernel import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    Kernel,
)

_ST_TO_MS = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
             (os.ST_NOATIME, 1024), (os.ST_NODIRATIME, 2048), (os.ST_RELATIME, 1 << 21))


def _fdpath(fd: int) -> bytes:
    return b"/proc/self/fd/%d" % fd


def _b(path: str) -> bytes:
    return os.fsencode(path)


def _locked_flags(path: bytes) -> int:
    """Flags a remount inside a user namespace must keep (the kernel locks them)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return sum(ms for st_flag, ms in _ST_TO_MS if st.f_flag & st_flag)


def _remount_readonly(k: Kernel, path: bytes) -> None:
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | _locked_flags(path)
    k.mount(None, path, None, flags, None)


def _overlay_escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def make_private(k: Kernel, op: p.MakePrivate) -> None:
    # SECURITY: no mount event crosses between the sandbox and the host (SECURITY.md #15).
    k.mount(None, b"/", None, MS_REC | MS_PRIVATE, None)


def tmpfs(k: Kernel, op: p.Tmpfs) -> None:
    flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if op.readonly else 0)
    k.mount(b"tmpfs", _b(op.target), b"tmpfs", flags, _b(op.options))


def mkdir(k: Kernel, op: p.Mkdir) -> None:
    k.mkdir(_b(op.path), op.mode)
    if op.uid != -1 or op.gid != -1:
        k.chown(_b(op.path), op.uid, op.gid)


def symlink(k: Kernel, op: p.Symlink) -> None:
    k.symlink(_b(op.target), _b(op.path))


def write_file(k: Kernel, op: p.WriteFile) -> None:
    k.write_file(_b(op.path), op.data, op.mode)


def overlay(k: Kernel, op: p.Overlay) -> None:
    data = (f"lowerdir={':'.join(_overlay_escape(d) for d in op.lower)},"
            f"upperdir={_overlay_escape(op.upper)},workdir={_overlay_escape(op.work)}")
    if op.userxattr:
        data += ",userxattr"
    k.mount(b"overlay", _b(op.target), b"overlay", MS_NOSUID | MS_NODEV, _b(data))


def bind(k: Kernel, op: p.Bind) -> None:
    # SECURITY: the target is resolved inside `within` by openat2(RESOLVE_IN_ROOT), and
    # both ends are mounted through /proc/self/fd, so a symlink swapped into the path
    # cannot send the mount outside the sandbox's root (CVE-2021-30465).
    src_fd = k.open_path(_b(op.source))
    try:
        rel = _b(op.target)
        dst_fd = k.open_in_root(_b(op.within), rel, op.create)
        try:
            k.mount(_fdpath(src_fd), _fdpath(dst_fd), None, MS_BIND | (MS_REC if op.recursive else 0), None)
        finally:
            k.close(dst_fd)
        if op.readonly:
            top_fd = k.open_in_root(_b(op.within), rel, op.create)
            try:
                _remount_readonly(k, _fdpath(top_fd))
            finally:
                k.close(top_fd)
    finally:
        k.close(src_fd)


def dev_node(k: Kernel, op: p.DevNode) -> None:
    # The target lives in the tmpfs this sandbox just mounted on its /dev: nothing
    # untrusted can have put a symlink there, so a plain path is safe.
    target = _b(op.target)
    k.write_file(target, b"", 0o666)
    k.mount(_b(op.source), target, None, MS_BIND, None)


def proc(k: Kernel, op: p.Proc) -> None:
    k.mount(b"proc", _b(op.target), b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)


def devpts(k: Kernel, op: p.Devpts) -> None:
    k.mount(b"devpts", _b(op.target), b"devpts", MS_NOSUID | MS_NOEXEC,
            b"newinstance,ptmxmode=0666,mode=0620")


def mask(k: Kernel, op: p.Mask) -> None:
    path = _b(op.path)
    try:
        if k.is_dir(path):
            k.mount(b"tmpfs", path, b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                    b"size=0,mode=0555")
        else:
            k.mount(b"/dev/null", path, None, MS_BIND, None)
    except FileNotFoundError:
        pass  # nothing to hide on this kernel


def read_only(k: Kernel, op: p.ReadOnly) -> None:
    path = _b(op.path)
    try:
        k.mount(path, path, None, MS_BIND | MS_REC, None)
    except FileNotFoundError:
        return
    _remount_readonly(k, path)


def unmount(k: Kernel, op: p.Unmount) -> None:
    k.umount(_b(op.path), MNT_DETACH)


def pivot_root(k: Kernel, op: p.PivotRoot) -> None:
    k.pivot_root(_b(op.new_root))


def hostname(k: Kernel, op: p.Hostname) -> None:
    k.sethostname(op.hostname.encode())


def loopback_up(k: Kernel, op: p.LoopbackUp) -> None:
    k.loopback_up()


_EXECUTORS: dict[type[Any], Callable[[Kernel, Any], None]] = {
    p.MakePrivate: make_private, p.Tmpfs: tmpfs, p.Mkdir: mkdir, p.Symlink: symlink,
    p.WriteFile: write_file, p.Overlay: overlay, p.Bind: bind, p.DevNode: dev_node, p.Proc: proc, p.Devpts: devpts,
    p.Mask: mask, p.ReadOnly: read_only, p.Unmount: unmount, p.PivotRoot: pivot_root, p.Hostname: hostname,
    p.LoopbackUp: loopback_up,
}


class SetupError(Exception):
    """An operation failed; carries the operation for a precise message."""

    def __init__(self, op: p.Op, error: OSError) -> None:
        super().__init__(f"{op.name}: {error}")
        self.op = op
        self.error = error


def execute(k: Kernel, ops: Sequence[p.Op]) -> None:
    for op in ops:
        try:
            _EXECUTORS[type(op)](k, op)
        except OSError as e:
            raise SetupError(op, e) from None
