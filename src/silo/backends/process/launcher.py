"""Parent side of starting a process-level (or app-level) sandbox.

Owns the ordering between parent and child: the child is cloned into its new
namespaces and execs silo-setup, which blocks on a pipe until the parent has written
its id maps and put it in its cgroup. Called from the spawner's single thread (a precondition of
:func:`silo.sys.kernel.spawn`).
"""

from __future__ import annotations

import os
import select
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from silo.backends.process import script
from silo.model import plan as p
from silo.model.errors import SiloError
from silo.sys import kernel as sysk
from silo.sys.cgroups_common import write_file


class CgroupLike(Protocol):
    def add(self, pid: int) -> None: ...
    def destroy(self) -> None: ...


@dataclass
class Started:
    pid: int
    pidfd: int
    err_fd: int  # SEQPACKET: an optional pty master (SCM_RIGHTS), then EOF at exec or an error


def _write_maps(pid: int, plan: p.Plan) -> None:
    # SECURITY: the maps come from the planner, which never maps host id 0 for a
    # root-run sandbox (SECURITY.md #16).
    # (one write(2) each: the kernel takes a map in a single write, as cgroupfs a value)
    if not plan.process.setgroups:
        write_file(f"/proc/{pid}/setgroups", "deny")
    write_file(f"/proc/{pid}/uid_map", "".join(f"{m.inside} {m.outside} {m.count}\n" for m in plan.uid_map))
    write_file(f"/proc/{pid}/gid_map", "".join(f"{m.inside} {m.outside} {m.count}\n" for m in plan.gid_map))


def _early_error(err_r: int) -> SiloError | None:
    """The error silo-setup reported before it was released, if any."""
    try:
        data = os.read(err_r, 4096) if select.select([err_r], [], [], 0)[0] else b""
    except OSError:
        return None
    return script.native_error(data)


def _send_layers(pid: int, layers: list[str], err_r: int) -> None:
    """Idmapped clones of the overlays' lower layers, for silo-setup to attach (root only)."""
    userns = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    fds: list[int] = []
    try:
        for path in layers:
            fds.append(sysk.idmapped_tree(path, userns))
        sock = socket.socket(fileno=os.dup(err_r))
        try:
            socket.send_fds(sock, [b"layers"], fds)
        finally:
            sock.close()
    finally:
        os.close(userns)
        for fd in fds:
            os.close(fd)


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return fd


def start(plan: p.Plan, stdio: tuple[int, int, int], init_fd: int, setup_fd: int, bpf: bytes | None,
          cgroup: CgroupLike | None, netns_fd: int | None = None, warm: bool = False,
          on_cloned: Callable[[int], None] | None = None) -> Started:
    """Clone and release the sandbox's first process. On failure nothing is left running.

    The child execs silo-setup (the sealed memfd ``setup_fd``) at once; it builds the
    sandbox from the plan's script (:mod:`silo.backends.process.script`) and execs
    silo-init from ``init_fd``. A ``warm`` sandbox is built and then waits for its
    command on ``err_fd``; ``stdio`` is then only what it holds meanwhile.
    ``on_cloned(pid)`` runs once the child's id maps are written, before it is
    released (a rootless network attaches there: :mod:`silo.net.rootless`).
    """
    flags = 0
    for name in plan.namespaces:
        if name != "cgroup":  # unshared by the child once it is in its cgroup
            flags |= sysk.NAMESPACE_FLAGS[name]
    if netns_fd is not None:
        flags &= ~sysk.CLONE_NEWNET
    script_fd = _memfd("silo-setup-script", script.encode(plan, bpf))
    sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
    err_sock_r, err_sock_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    err_r, err_w = err_sock_r.detach(), err_sock_w.detach()
    orig_net = None
    if netns_fd is not None:
        orig_net = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        sysk.setns(netns_fd, sysk.CLONE_NEWNET)
    fds = (sync_r, err_w, *stdio, init_fd, script_fd)
    argv = [b"silo-setup", *(b"%d" % fd for fd in fds)]
    if warm:
        argv.append(b"--warm")
    try:
        # The id maps do not exist yet, so the exec would drop the capabilities the new
        # user namespace gave the child; raise_caps carries them across it.
        pid = sysk.spawn(flags, setup_fd, argv, fds, bool(flags & sysk.CLONE_NEWUSER))
    except OSError:
        for fd in (script_fd, sync_r, sync_w, err_r, err_w):
            os.close(fd)
        raise
    finally:
        if orig_net is not None:
            sysk.setns(orig_net, sysk.CLONE_NEWNET)
            os.close(orig_net)
    os.close(script_fd)
    os.close(sync_r)
    os.close(err_w)
    try:
        if "user" in plan.namespaces:
            _write_maps(pid, plan)
        layers = script.idmapped_layers(plan)
        if layers:
            _send_layers(pid, layers, err_r)
        if cgroup is not None:
            cgroup.add(pid)
        if on_cloned is not None:
            on_cloned(pid)
        pidfd = os.pidfd_open(pid)
        os.write(sync_w, b"g")
    except BaseException as e:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        why = _early_error(err_r)  # e.g. a silo-setup of another version refused the script
        os.close(err_r)
        if why is not None and isinstance(e, OSError):
            raise why from None
        raise
    finally:
        os.close(sync_w)
    return Started(pid, pidfd, err_r)


def join(target: int, plan: p.Plan, stdio: tuple[int, int, int], init_fd: int, setup_fd: int, bpf: bytes | None,
         cgroup: CgroupLike | None) -> Started:
    """Start ``plan``'s command inside the running workspace whose init's pidfd is ``target``.

    ``plan`` comes from :func:`silo.engine.planner.plan_join` (no operations). silo-setup
    enters every namespace of the workspace (``--join``), takes the command's identity
    and hardening, and execs ``silo-init --run`` outside the workspace's pid namespace,
    which forks the command into it and relays its status and signals. The returned
    pid is that relay's; ``err_fd`` works as for :func:`start`.
    """
    script_fd = _memfd("silo-setup-script", script.encode(plan, bpf))
    sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
    err_sock_r, err_sock_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    err_r, err_w = err_sock_r.detach(), err_sock_w.detach()
    fds = (sync_r, err_w, *stdio, init_fd, script_fd, target)
    argv = [b"silo-setup", *(b"%d" % fd for fd in fds[:-1]), b"--join", b"%d" % target]
    try:
        pid = sysk.spawn(0, setup_fd, argv, fds, False)
    except OSError:
        for fd in (script_fd, sync_r, sync_w, err_r, err_w):
            os.close(fd)
        raise
    os.close(script_fd)
    os.close(sync_r)
    os.close(err_w)
    try:
        if cgroup is not None:
            cgroup.add(pid)
        pidfd = os.pidfd_open(pid)
        os.write(sync_w, b"g")
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(err_r)
        raise
    finally:
        os.close(sync_w)
    return Started(pid, pidfd, err_r)
