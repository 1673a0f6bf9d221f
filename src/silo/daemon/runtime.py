"""The daemon's side of running process-level workspaces: start an init, join it, wait.

Everything here runs on the daemon's event-loop thread. That is a requirement, not a
style: a workspace's init and every exec relay are children of the thread that spawned
them, and ``PR_SET_PDEATHSIG`` fires when that *thread* exits. The loop thread lives as
long as the daemon, so the workspaces die with the daemon (and only then); a worker
thread of a pool would take them down when the pool shrinks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from dataclasses import dataclass, field
from typing import Any

from silo import native
from silo.backends.process import launcher, script
from silo.model import plan as p
from silo.model.errors import InternalError, SiloError

DEVNULL = os.devnull


@dataclass
class Process:
    """A started init or exec relay: its pid, pidfd and silo-setup's error channel."""

    pid: int
    pidfd: int
    err_fd: int
    cgroup: Any = None
    pty: int | None = None
    status: int | None = None
    exited: asyncio.Future[int] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def signal(self, sig: int) -> None:
        if self.status is None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self.pidfd, sig)

    def close(self) -> None:
        for fd in (self.err_fd, self.pty):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.err_fd = -1
        self.pty = None


class Runtime:
    """Sealed helper programs, compiled seccomp programs and the cgroup manager.

    ``tag`` sets this daemon's workspaces' cgroups apart (``ws-TAG-NAME``) from those of
    another daemon on the host (another user's, or one with another state directory), so
    reclaiming a crashed run's cgroup never touches a workspace someone else runs."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.init_fd = native.sealed("silo-init")
        self.setup_fd = native.sealed("silo-setup")
        self._bpf: dict[str, bytes] = {}
        self._cgroups: Any = None

    def close(self) -> None:
        for fd in (self.init_fd, self.setup_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def bpf(self, proc: p.Process) -> bytes | None:
        if not proc.harden or proc.seccomp == "unconfined":
            return None
        cached = self._bpf.get(proc.seccomp)
        if cached is None:
            from silo.sys import seccomp

            cached = seccomp.compile_profile(proc.seccomp)
            if proc.seccomp == "default":
                self._bpf[proc.seccomp] = cached
        return cached

    def cgroups(self) -> Any:
        if self._cgroups is None:
            from silo.sys import cgroups

            self._cgroups = cgroups.open_manager()
        return self._cgroups

    def cgroup_name(self, name: str) -> str:
        return f"ws-{self.tag}-{name}"

    def reclaim_cgroup(self, name: str) -> None:
        """Kill and remove workspace ``name``'s cgroup if one is left (by a crashed daemon,
        or a stop that could not remove it); a workspace without limits has none."""
        self.cgroups().reclaim(self.cgroup_name(name))

    def cgroup_for(self, name: str, plan: p.Plan) -> Any:
        if plan.memory is None and plan.cpus is None and plan.pids is None:
            return None
        self.reclaim_cgroup(name)
        return self.cgroups().create(self.cgroup_name(name), plan.memory, plan.cpus, plan.pids)

    # -- starting ------------------------------------------------------------------------

    async def start_init(self, name: str, plan: p.Plan, log_fd: int, network: Any = None) -> Process:
        """Build the workspace's sandbox (in the network of ``network``, its keeper's
        :class:`silo.net.keeper.KeeperClient`, if given) and wait until its init is up
        (or failed)."""
        cgroup = self.cgroup_for(name, plan)
        null = os.open(DEVNULL, os.O_RDONLY | os.O_CLOEXEC)
        try:
            started = launcher.start(plan, (null, log_fd, log_fd), self.init_fd, self.setup_fd,
                                     self.bpf(plan.process), cgroup,
                                     network.netns_fd if network is not None else None,
                                     on_cloned=network.attach if network is not None else None)
        except OSError as e:
            if cgroup is not None:
                cgroup.destroy()
            raise InternalError(f"cannot start the workspace: {e}") from None
        except BaseException:
            if cgroup is not None:
                cgroup.destroy()
            raise
        finally:
            os.close(null)
        return await self._running(started, cgroup)

    async def join(self, target: Process, plan: p.Plan, stdio: tuple[int, int, int]) -> Process:
        """Start ``plan``'s command in the workspace whose init is ``target``; returns
        once the command runs (or raises why it cannot)."""
        try:
            started = launcher.join(target.pidfd, plan, stdio, self.init_fd, self.setup_fd,
                                    self.bpf(plan.process), target.cgroup)
        except OSError as e:
            raise InternalError(f"cannot start the command: {e}") from None
        return await self._running(started, None)

    async def _running(self, started: launcher.Started, cgroup: Any) -> Process:
        """Watch ``started`` and return once its command runs; killed if it cannot."""
        proc = self._watch(started, cgroup)
        try:
            await self._until_running(proc)
        except BaseException:
            await self.kill(proc)
            raise
        return proc

    def _watch(self, started: launcher.Started, cgroup: Any) -> Process:
        proc = Process(started.pid, started.pidfd, started.err_fd, cgroup)
        loop = asyncio.get_running_loop()

        def reap() -> None:
            loop.remove_reader(proc.pidfd)
            try:
                _, status = os.waitpid(proc.pid, 0)
                code = os.waitstatus_to_exitcode(status)
                code = 128 - code if code < 0 else code
            except ChildProcessError:
                code = 125
            proc.status = code
            with contextlib.suppress(OSError):
                os.close(proc.pidfd)
            if not proc.exited.done():
                proc.exited.set_result(code)

        loop.add_reader(proc.pidfd, reap)
        return proc

    async def _until_running(self, proc: Process) -> None:
        """Read silo-setup's channel until its end (the command runs) or an error; a tty
        command's pty master arrives on it first."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(fileno=os.dup(proc.err_fd))
        sock.setblocking(False)
        try:
            while True:
                ready: asyncio.Future[None] = loop.create_future()
                loop.add_reader(sock.fileno(), settle, ready)
                try:
                    await ready
                finally:
                    loop.remove_reader(sock.fileno())
                try:
                    data, fds, _, _ = socket.recv_fds(sock, 4096, 4)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                if fds:
                    if data == b"pty" and proc.pty is None:
                        proc.pty, fds = fds[0], fds[1:]
                    for fd in fds:
                        os.close(fd)
                    continue
                if not data:
                    return
                error = script.native_error(data)
                if error is not None:
                    raise error
                raise InternalError(f"unexpected message from the workspace: {data[:80]!r}")
        finally:
            sock.close()

    async def kill(self, proc: Process) -> int:
        proc.signal(signal.SIGKILL)
        code = await proc.exited
        proc.close()
        return code

    async def stop(self, proc: Process, timeout: float) -> int:
        """SIGTERM (silo-init passes it to every process of the workspace), then SIGKILL."""
        proc.signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(asyncio.shield(proc.exited), timeout)
        except TimeoutError:
            code = await self.kill(proc)
        proc.close()
        if proc.cgroup is not None:
            proc.cgroup.kill()
            proc.cgroup.destroy()
        return code


def settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def error_of(exc: BaseException) -> SiloError:
    return exc if isinstance(exc, SiloError) else InternalError(str(exc))
