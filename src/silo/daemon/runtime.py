"""The daemon's side of running workspaces: start an init, join it, wait.

A process-level workspace's init is silo-init in its namespaces; a vm workspace's is its
machine's supervisor (silo.backends.vm.workspace), and a command "joins" it by asking
over the control socket (:class:`Machine`), so both look the same to the manager: a
:class:`Process` with a pid, an ``exited`` future, ``signal`` and a pty.

Everything here runs on the daemon's event-loop thread. That is a requirement, not a
style: a workspace's init and every exec relay are children of the thread that spawned
them, and ``PR_SET_PDEATHSIG`` fires when that *thread* exits. The loop thread lives as
long as the daemon, so the workspaces die with the daemon (and only then); a worker
thread of a pool would take them down when the pool shrinks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import marshal
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from silo import native
from silo.backends.process import launcher, script
from silo.model import errors
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
    machine: Machine | None = None  # a vm workspace's init: its supervisor's control socket
    # A command in a gvisor workspace: its relay runs 'runsc exec', which passes no
    # signal on, so this sends them to the command inside ('runsc kill --pid').
    inside: Callable[[int], None] | None = None

    def signal(self, sig: int) -> None:
        if self.status is None:
            if self.inside is not None:
                self.inside(sig)
                if sig != signal.SIGKILL:  # SIGKILL ends the relay too, at once
                    return
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self.pidfd, sig)

    def close(self) -> None:
        for fd in (self.err_fd, self.pty):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.err_fd = -1
        self.pty = None


VM_STOP_EXTRA = 30.0  # seconds past a vm workspace's grace for its guest to sync and power off
GVISOR_START = 60.0  # seconds for a gvisor workspace's sandbox to come up (the ptrace platform is slow to start)


class Command(Process):
    """A command in a vm workspace: its pid is the guest's, its signals go through the machine."""

    def __init__(self, machine: Machine, ident: int) -> None:
        super().__init__(pid=0, pidfd=-1, err_fd=-1)
        self.target = machine
        self.ident = ident
        self.running: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def signal(self, sig: int) -> None:
        if self.status is None:
            self.target.send(("signal", self.ident, sig))


class Machine:
    """silod's end of a vm workspace's control socket (protocol: silo.backends.vm.workspace)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.commands: dict[int, Command] = {}
        self.ids = itertools.count(1)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.down: tuple[bool, str] | None = None  # (broken, reason), once the machine said so
        self.memory: dict[str, int] = {}  # the guest's last memory report (silo.backends.vm.workspace)

    def send(self, message: tuple[Any, ...], fds: list[int] | None = None, *, strict: bool = False) -> None:
        """Send one message (waiting up to 5 s for room); a failure raises when ``strict``,
        else the message is dropped (a signal or stop for a machine that is going anyway)."""
        try:
            if fds:
                socket.send_fds(self.sock, [marshal.dumps(message)], fds)
            else:
                self.sock.send(marshal.dumps(message))
        except OSError as e:
            if strict:
                raise InternalError(f"cannot reach the VM's supervisor: {e.strerror or e}") from None

    def listen(self) -> None:
        self.sock.settimeout(5)  # sends wait for room; reads happen only when readable
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._on_message)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        self._end_all("the VM stopped")

    def _end_all(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(InternalError(f"the VM did not start: {why}"))
            self.ready.exception()
        for command in list(self.commands.values()):
            self._ended(command, 137)

    def _ended(self, command: Command, code: int) -> None:
        self.commands.pop(command.ident, None)
        command.status = code
        if not command.running.done():
            command.running.set_exception(InternalError("the VM stopped before the command started"))
            command.running.exception()
        if not command.exited.done():
            command.exited.set_result(code)

    def _on_message(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, 1 << 20, 1)
        except (BlockingIOError, TimeoutError):
            return
        except OSError:
            data, fds = b"", []
        if not data:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self._end_all(self.down[1] if self.down else "its supervisor ended")
            return
        try:
            message = marshal.loads(data)  # noqa: S302 - our own supervisor, same uid
        except (ValueError, EOFError, TypeError):
            message = ("?",)
        kind = message[0]
        if kind == "ready" and not self.ready.done():
            self.ready.set_result(None)
        elif kind == "failed" and not self.ready.done():
            self.ready.set_exception(_error(message[1], message[2]))
            self.ready.exception()
        elif kind == "down":
            self.down = (bool(message[1]), str(message[2]))
        elif kind == "memory" and isinstance(message[1], dict):
            self.memory = {str(k): int(v) for k, v in message[1].items() if isinstance(v, int)}
        elif kind in ("started", "exit", "error"):
            command = self.commands.get(message[1])
            if command is not None:
                if kind == "started":
                    command.pid = int(message[2])
                    if fds:
                        command.pty, fds = fds[0], fds[1:]
                    if not command.running.done():
                        command.running.set_result(None)
                elif kind == "exit":
                    self._ended(command, int(message[2]))
                else:
                    if not command.running.done():
                        command.running.set_exception(_error(message[2], message[3]))
                        command.running.exception()
                    self._ended(command, 125)
        for fd in fds:
            os.close(fd)

    async def run(self, plan: p.Plan, stdio: tuple[int, int, int]) -> Command:
        proc = plan.process
        command = Command(self, next(self.ids))
        self.commands[command.ident] = command
        rows, cols = proc.winsize
        try:
            self.send(("exec", command.ident, list(proc.argv), list(proc.env), proc.cwd, proc.uid, proc.gid,
                       proc.tty, rows, cols), list(stdio), strict=True)
            await command.running
        except BaseException:
            self.commands.pop(command.ident, None)
            if not command.exited.done():
                command.signal(signal.SIGKILL)
            raise
        return command


def _kill_group(proc: Process) -> None:
    """SIGKILL the process group of a joined command: its relay (silo-init ``--run``,
    outside the workspace's pid namespace) made its one child the leader of a group of
    its own, whose id in the host's numbering is that child's host pid. What the command
    put in the background of a shell is in that group (what it made a session or group
    of its own is not). A gvisor command's group is inside the Sentry, out of reach:
    there the relay's child is ``runsc exec``."""
    if proc.machine is not None or proc.status is not None:
        return
    try:
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            children = [int(pid) for pid in f.read().split()]
    except (OSError, ValueError):
        return
    for child in children:
        with contextlib.suppress(OSError):
            os.killpg(child, signal.SIGKILL)


def _forget_exec(target: Process, plan: p.Plan) -> None:
    """Remove the files a ``runsc exec`` of ``plan`` leaves in the gvisor workspace
    whose init is ``target`` (its process file and pid file), once it has ended."""
    from silo.backends.gvisor import runsc

    if plan.gvisor is None or not plan.gvisor.pid_file:
        return
    for path in (plan.gvisor.pid_file, runsc.process_file(plan.gvisor.pid_file)):
        with contextlib.suppress(OSError):
            os.unlink(f"/proc/{target.pid}/root{path}")


def _error(cls: str, message: str) -> SiloError:
    kind = getattr(errors, str(cls), None)
    if isinstance(kind, type) and issubclass(kind, SiloError):
        return kind(str(message))
    return InternalError(str(message))


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
        proc = await self._running(started, cgroup)
        if plan.gvisor is not None:
            try:
                await self._sandbox_up(proc, plan)
            except BaseException:
                await self.kill(proc)
                if cgroup is not None:
                    cgroup.destroy()
                raise
        return proc

    @staticmethod
    async def _sandbox_up(proc: Process, plan: p.Plan) -> None:
        """Wait until runsc says the workspace's container runs (its state file, read in
        the workspace's mount namespace), so a command may join it."""
        from silo.backends.gvisor import runsc

        state = f"/proc/{proc.pid}/root{runsc.global_flags(plan.process.argv)[2]}/{runsc.STATE_FILE}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GVISOR_START
        while not proc.exited.done():
            with contextlib.suppress(OSError):
                with open(state, "rb") as f:
                    if b'"status":"running"' in f.read():
                        return
            if loop.time() > deadline:
                raise InternalError(f"gVisor's sandbox did not come up in {GVISOR_START:.0f} s; see 'silo logs'")
            await asyncio.sleep(0.02)
        raise InternalError(f"gVisor's sandbox ended as it started (runsc exited with {proc.exited.result()}); "
                            "see 'silo logs'")

    async def start_vm(self, name: str, plan: p.Plan, log_fd: int, network: Any = None) -> Process:
        """Start a vm workspace's machine (its supervisor, in the workspace's cgroup with
        the guest's memory and QEMU's own) and wait until its guest is up (or failed).
        ``network``: its keeper's :class:`silo.net.keeper.KeeperClient`, whose tap the
        guest's NIC is."""
        from silo.backends.vm import machine

        assert plan.vm is not None
        self.reclaim_cgroup(name)
        cgroup = self.cgroups().create(self.cgroup_name(name), (plan.vm.memory << 20) + machine.VM_OVERHEAD,
                                       None, machine.VM_PIDS)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        null = os.open(DEVNULL, os.O_RDONLY | os.O_CLOEXEC)
        try:
            pid = os.posix_spawn(sys.executable, [sys.executable, "-I", "-m", "silo.backends.vm.workspace"],
                                 os.environ, setsid=True,
                                 file_actions=[(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, log_fd, 1),
                                               (os.POSIX_SPAWN_DUP2, log_fd, 2),
                                               (os.POSIX_SPAWN_DUP2, theirs.fileno(), 3)])
        except OSError as e:
            cgroup.destroy()
            mine.close()
            raise InternalError(f"cannot start the VM's supervisor: {e}") from None
        finally:
            os.close(null)
            theirs.close()
        proc = self._watch(launcher.Started(pid, os.pidfd_open(pid), os.dup(mine.fileno())), cgroup)
        proc.machine = Machine(mine)
        try:
            cgroup.add(pid)
            proc.machine.send(("plan", plan.to_wire()), [network.tap_fd] if network is not None else None)
            proc.machine.listen()
            either: list[asyncio.Future[Any]] = [proc.machine.ready, proc.exited]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not proc.machine.ready.done():
                raise InternalError("the VM's supervisor ended before its machine was up; see 'silo logs'")
            proc.machine.ready.result()
        except BaseException:
            await self.kill(proc)
            proc.machine.close()
            cgroup.kill()
            cgroup.destroy()
            raise
        return proc

    async def join(self, target: Process, plan: p.Plan, stdio: tuple[int, int, int]) -> Process:
        """Start ``plan``'s command in the workspace whose init is ``target``; returns
        once the command runs (or raises why it cannot)."""
        if target.machine is not None:
            return await target.machine.run(plan, stdio)
        try:
            started = launcher.join(target.pidfd, plan, stdio, self.init_fd, self.setup_fd,
                                    self.bpf(plan.process), target.cgroup)
        except OSError as e:
            raise InternalError(f"cannot start the command: {e}") from None
        try:
            proc = await self._running(started, None)
        except BaseException:
            _forget_exec(target, plan)
            raise
        if plan.gvisor is not None and plan.gvisor.pid_file:
            self._relay_signals(proc, target, plan)
        return proc

    def _relay_signals(self, proc: Process, target: Process, plan: p.Plan) -> None:
        """Signals for the command ``proc`` runs in a gvisor workspace (``runsc exec``
        passes none on) go to the command inside with ``runsc kill --pid``, spawned
        into the workspace like a command; the pid inside is in the file ``runsc exec``
        writes, read through the workspace's mount namespace (and removed at its end)."""
        from silo.backends.gvisor import runsc
        from silo.engine import planner

        assert plan.gvisor is not None
        pid_file = f"/proc/{target.pid}/root{plan.gvisor.pid_file}"
        loop = asyncio.get_running_loop()

        def send(sig: int, tries: int = 100) -> None:
            if proc.status is not None or target.status is not None:
                return
            try:
                with open(pid_file) as f:
                    inside = int(f.read().strip())
            except (OSError, ValueError):
                if tries > 0:  # not started inside yet: the signal waits for it
                    loop.call_later(0.02, send, sig, tries - 1)
                return
            kill = planner.plan_runsc(plan, runsc.kill_argv(plan.process.argv, inside, sig))
            null = os.open(DEVNULL, os.O_RDWR | os.O_CLOEXEC)
            try:
                started = launcher.join(target.pidfd, kill, (null, null, null), self.init_fd, self.setup_fd,
                                        None, target.cgroup)
            except OSError:
                return
            finally:
                os.close(null)
            relay = self._watch(started, None)
            relay.exited.add_done_callback(lambda _: relay.close())

        proc.inside = send
        proc.exited.add_done_callback(lambda _: _forget_exec(target, plan))

    async def run_joined(self, target: Process, plan: p.Plan, timeout: float) -> tuple[int, bytes]:
        """Run ``plan`` (a join plan: planner.plan_join or plan_runsc) in the workspace
        whose init is ``target`` to its end; killed after ``timeout`` seconds. Returns
        its exit status and its output (stdout and stderr, the first MiB)."""
        null = os.open(DEVNULL, os.O_RDONLY | os.O_CLOEXEC)
        out = os.memfd_create("joined-output", os.MFD_CLOEXEC)
        try:
            try:
                started = launcher.join(target.pidfd, plan, (null, out, out), self.init_fd, self.setup_fd,
                                        None, target.cgroup)
            except OSError as e:
                raise InternalError(f"cannot start {plan.process.argv[0]} in the workspace: {e}") from None
            finally:
                os.close(null)
            proc = self._watch(started, None)
            try:
                code = await asyncio.wait_for(asyncio.shield(proc.exited), timeout)
            except TimeoutError:
                code = await self.kill(proc)
            finally:
                proc.close()
                _forget_exec(target, plan)
            return code, os.pread(out, 1 << 20, 0)
        finally:
            os.close(out)

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

    async def kill(self, proc: Process, group: bool = False) -> int:
        """SIGKILL ``proc`` and wait for its status. With ``group`` (a joined command's
        timeout) what the command started in its own process group dies with it too."""
        if group:
            _kill_group(proc)
        proc.signal(signal.SIGKILL)
        code = await proc.exited
        proc.close()
        return code

    async def stop(self, proc: Process, timeout: float) -> int:
        """SIGTERM (silo-init passes it to every process of the workspace), then SIGKILL.
        A vm workspace's guest does the same inside, then syncs its disk and powers off:
        it gets :data:`VM_STOP_EXTRA` beyond ``timeout`` for that."""
        if proc.machine is not None:
            proc.machine.send(("stop", int(timeout * 1000)))
            timeout += VM_STOP_EXTRA
        else:
            proc.signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(asyncio.shield(proc.exited), timeout)
        except TimeoutError:
            code = await self.kill(proc)
        proc.close()
        if proc.machine is not None:
            proc.machine.close()
        if proc.cgroup is not None:
            proc.cgroup.kill()
            proc.cgroup.destroy()
        return code


def settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def error_of(exc: BaseException) -> SiloError:
    return exc if isinstance(exc, SiloError) else InternalError(str(exc))
