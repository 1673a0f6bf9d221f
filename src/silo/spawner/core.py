"""The spawner: a long-lived, single-threaded process that forks sandboxes.

It exists so that neither a fresh interpreter nor a multi-threaded caller pays for,
or endangers, a sandbox's start: it clones from a small, warm, single-threaded
process. One event loop (``selectors``) serves connections, reaps sandboxes through
pidfds, enforces wall-clock timeouts, and watches cgroup limit events.

Owns: silo-init's sealed memfd, the compiled seccomp programs, the network-namespace
pool, the warm sandboxes, and every job's cleanup (cgroup, fds). Must not: block in
a handler, run user code, or keep an fd that a job's sandbox was given once the
sandbox started.

Warm sandboxes: after a run of a plan, the spawner builds the next sandbox of the
same plan while the first one runs -- namespaces, mounts, identity, capabilities,
no_new_privs and the default seccomp filter all in place -- and parks it, blocked
before exec. The next run of that plan only sends it argv, env and stdio, so the
work left on the caller's clock is the exec. Pool key: the plan's wire form without
argv and env (everything else -- mounts, ids, limits, cwd, tty -- must match).
One per key, at most ``WARM_MAX`` keys, dropped after ``WARM_IDLE`` seconds, with
the connection that caused them (the SDK), or with the server (the CLI).

VM pools (``silo pool set``): booted VMs of one machine shape, as many as asked, kept
ready until a run of that shape takes one; the loop boots a replacement at once. A
pooled VM runs one command and dies with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import heapq
import itertools
import json
import marshal
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass, field, replace
from typing import Any

from silo import native
from silo.backends.process import launcher, script
from silo.model import plan as p
from silo.model.errors import (
    InternalError,
    ProtocolError,
    SiloError,
    SpecError,
)
from silo.spawner import protocol
from silo.sys import kernel as sysk

NETNS_POOL = 4
WARM_MAX = 4
WARM_IDLE = 30.0  # SILO_WARM_IDLE overrides; 0 turns warm sandboxes off
EAGER_GAP = 0.005  # a run this soon after the last one of its plan is "back to back"

Handler = Callable[["Connection", tuple[Any, ...], list[int]], None]


def _env_seconds(name: str, default: float) -> float:
    try:
        return max(0.0, float(os.environ.get(name, default)))
    except ValueError:
        return default


def _has_cap_sys_nice() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 23 & 1)
    except OSError:
        pass
    return False


@dataclass
class Job:
    conn: Connection
    id: int
    pid: int = 0
    pidfd: int = -1
    err_fd: int = -1
    cgroup: Any = None
    reason: str | None = None
    error: SiloError | None = None
    watch_fds: list[int] = field(default_factory=list)
    # A run handed to a warm sandbox keeps its plan and copies of its stdio until the
    # sandbox acknowledges it; if it dies first, the run starts cold from these.
    plan: p.Plan | None = None
    spare: list[int] = field(default_factory=list)
    key: bytes | None = None  # the plan's warm-pool key
    warm_later: bytes | None = None  # build the next warm sandbox when this run ends
    pool: VmPool | None = None  # the VM pool whose VM took this run


@dataclass
class Warm:
    """A built sandbox blocked before exec, waiting for a run of its plan."""

    key: bytes
    owner: Connection | None
    started: launcher.Started
    cgroup: Any
    since: float


VM_READY = b"ready"  # a pooled VM's supervisor booted it (silo.backends.vm.supervisor)
POOL_MAX = 16  # VMs in all pools together
DYING_RETRY = 0.1  # seconds between attempts to remove a cgroup whose processes are still leaving
# A pool's replacement boots this long after a hand-over, or when the run ends if that
# is sooner: a boot is a whole CPU under TCG, and started at once it competed with the
# run it was handed to (2 CPUs here: first output 45-79 ms against 34-52 ms).
POOL_REFILL_DELAY = 1.0
POOL_BACKOFF = 60.0  # at most this long between boots of a pool whose VMs keep failing


@dataclass
class VmPool:
    """Booted VMs of one machine shape for runs of that shape (``silo pool set``)."""

    key: bytes
    plan: p.Plan  # a plan of that shape (its command is never run)
    size: int
    options: tuple[str, ...]  # the options that asked for it, as the user gave them
    vms: list[Warm] = field(default_factory=list)  # booting or ready, oldest first
    ready: set[int] = field(default_factory=set)  # pids of the VMs that booted
    failures: int = 0  # boots in a row that failed
    retry_at: float = 0.0
    refill_at: float = 0.0  # after a hand-over: not before (see POOL_REFILL_DELAY)
    last_error: str = ""


def vm_key(plan: p.Plan) -> bytes:
    """The pool key of a vm-level plan: its machine, less what each run sets (the
    command, its identity and the hostname, sent with the hand-over)."""
    assert plan.vm is not None
    return marshal.dumps(astuple(replace(plan.vm, hostname="")))


def _pool_row(pool: VmPool) -> tuple[tuple[str, ...], int, int, int, str]:
    return pool.options, pool.size, len(pool.ready), len(pool.vms) - len(pool.ready), pool.last_error


def check_pool_size(size: int) -> None:
    if not 0 <= size <= POOL_MAX:
        raise SpecError(f"bad pool size {size}: give 0 (no pool) to {POOL_MAX}")


def _remove(cgroup: Any) -> bool:
    """Kill what is left in ``cgroup`` and remove it; False while it is still busy."""
    cgroup.kill()
    cgroup.destroy()
    return bool(cgroup.removed)


def warm_key(plan: p.Plan, wire: tuple[Any, ...]) -> bytes | None:
    """The pool key of a plan (its wire form without argv and env), or None when
    runs of it are not pooled: the app level (a fresh upper per run), no init, a pty."""
    proc = plan.process
    if plan.isolation != "process" or not proc.harden or not proc.init or proc.tty or plan.network is not None:
        return None
    if proc.seccomp not in ("default", "unconfined"):
        return None  # silo-init would have to load it after the command arrives
    return marshal.dumps((wire[:5], tuple(wire[5])[2:], wire[6:9]))


class Connection:
    def __init__(self, spawner: Spawner, sock: socket.socket) -> None:
        self.spawner = spawner
        self.sock = sock
        self.jobs: dict[int, Job] = {}
        self.closed = False

    def reply(self, message: tuple[Any, ...]) -> None:
        if self.closed:
            return
        try:
            protocol.send(self.sock, message)
        except OSError:
            self.spawner.drop(self)


class Spawner:
    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.init_fd = native.sealed("silo-init")
        self.setup_fd = native.sealed("silo-setup")
        self.handlers: dict[str, Handler] = {
            "run": self._on_run, "signal": self._on_signal, "attach": self._on_attach,
            "pool": self.on_pool,
        }
        self.connections: list[Connection] = []
        self.jobs: dict[int, Job] = {}
        self.timers: list[tuple[float, int, int]] = []  # (deadline, pid, seq)
        self._seq = itertools.count()
        self._bpf: dict[str, bytes] = {}
        self._cgroups: Any = None
        self._netns: list[int] = []
        self._keepers: dict[int, Any] = {}  # pid -> the KeeperClient of a sandbox with a network
        self.is_root = os.geteuid() == 0
        self.last_activity = time.monotonic()
        self.running = True
        self.retired = False  # a server that stopped taking clients (see cli.server)
        self.extra_dispatch: dict[str, Callable[[Any], None]] = {}  # selector kinds of subclasses
        self.warm_shared = False  # warm sandboxes outlive the connection (the CLI server)
        self.warm_idle = _env_seconds("SILO_WARM_IDLE", WARM_IDLE)
        # Warm sandboxes are built on idle CPU only (SCHED_IDLE) so they never slow the
        # run that asked for them -- where we can give them normal scheduling back
        # before their own run (CAP_SYS_NICE); otherwise at normal priority.
        self._renice = _has_cap_sys_nice()
        self._warm: dict[bytes, Warm] = {}
        self._to_warm: dict[bytes, tuple[p.Plan, Connection]] = {}
        self._last_end: dict[bytes, float] = {}  # when the last run of a key ended
        self._devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.pools: dict[bytes, VmPool] = {}
        self._dying: list[Any] = []  # cgroups whose processes had not left yet

    # connections -------------------------------------------------------------

    def add_connection(self, sock: socket.socket) -> Connection:
        uid = protocol.peer_uid(sock)
        if uid not in (os.geteuid(), 0):
            sock.close()
            raise PermissionError(f"peer uid {uid} refused")
        sock.setblocking(True)
        conn = Connection(self, sock)
        self.connections.append(conn)
        self.sel.register(sock, selectors.EVENT_READ, ("conn", conn))
        return conn

    def drop(self, conn: Connection) -> None:
        """The client went away: its sandboxes die with it."""
        if conn.closed:
            return
        conn.closed = True
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn.sock)
        conn.sock.close()
        self.connections.remove(conn)
        for job in list(conn.jobs.values()):
            self._kill(job, signal.SIGKILL)
        for warm in list(self._warm.values()):
            if warm.owner is conn:
                self._drop_warm(warm)
        for key, (_, owner) in list(self._to_warm.items()):
            if owner is conn and not self.warm_shared:
                del self._to_warm[key]

    def _on_conn(self, conn: Connection) -> None:
        self.last_activity = time.monotonic()
        try:
            got = protocol.recv(conn.sock)
        except (OSError, ValueError, EOFError):
            got = None
        if got is None:
            self.drop(conn)
            return
        message, fds = got
        try:
            if not isinstance(message, tuple) or not message or message[0] not in self.handlers:
                raise ProtocolError(f"unknown request {str(message)[:80]}")
            self.handlers[message[0]](conn, message, fds)
        except SiloError as e:
            job_id = message[1] if isinstance(message, tuple) and len(message) > 1 else 0
            conn.reply(("error", job_id, e.to_wire()))
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _on_attach(self, conn: Connection, message: tuple[Any, ...], fds: list[int]) -> None:
        if len(fds) != 1:
            raise ProtocolError("attach needs one socket")
        sock = socket.socket(fileno=os.dup(fds[0]))
        self.add_connection(sock)

    def _on_signal(self, conn: Connection, message: tuple[Any, ...], fds: list[int]) -> None:
        _, job_id, signum = message
        job = conn.jobs.get(job_id)
        if job is None or not isinstance(signum, int) or not 0 < signum < 65:
            return
        if job.plan is not None and job.plan.isolation == "gvisor" and signum != signal.SIGKILL and job.pidfd >= 0:
            self._signal_inside(job, signum)
        else:
            self._kill(job, signum)

    def _signal_inside(self, job: Job, signum: int) -> None:
        """A gvisor run's signal goes to its command inside: ``runsc kill`` of the
        container (whose PID 1, silo-init, passes it to the command's group), joined into
        the run's namespaces like a workspace's command. ``runsc run`` itself passes no
        signal on: it would die of it, and the sandbox with it. If ``runsc kill`` fails
        (the container is not up yet, or gone), the signal goes to the run's init as at
        the process level: the run ends, as the signal asked."""
        from silo.backends.gvisor import runsc
        from silo.engine import planner

        assert job.plan is not None
        relay = planner.plan_runsc(job.plan, runsc.signal_argv(job.plan.process.argv, signum))
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            started = launcher.join(job.pidfd, relay, (null, null, null), self.init_fd, self.setup_fd, None,
                                    job.cgroup)
        except (OSError, SiloError):
            return  # the run is ending: nothing left to signal
        finally:
            os.close(null)
        os.close(started.err_fd)
        self.sel.register(started.pidfd, selectors.EVENT_READ, ("relay", (started, job, signum)))

    def _on_relay_exit(self, relay: tuple[launcher.Started, Job, int]) -> None:
        started, job, signum = relay
        self.sel.unregister(started.pidfd)
        status = 0
        with contextlib.suppress(ChildProcessError):
            _, status = os.waitpid(started.pid, 0)
        os.close(started.pidfd)
        if status != 0 and self.jobs.get(job.pid) is job:
            self._kill(job, signum)

    def _on_run(self, conn: Connection, message: tuple[Any, ...], fds: list[int]) -> None:
        if len(message) != 3 or not isinstance(message[1], int):
            raise ProtocolError("malformed run request")
        plan = p.Plan.from_wire(message[2])
        self.run_job(conn, message[1], plan, fds, message[2])

    # jobs ----------------------------------------------------------------------

    def _seccomp(self, source: str) -> bytes:
        bpf = self._bpf.get(source)
        if bpf is None:
            from silo.sys import seccomp

            bpf = seccomp.compile_profile(source)
            if source == "default":
                self._bpf[source] = bpf  # files are cached by the compiler on (mtime, size)
        return bpf

    def _cgroup_manager(self) -> Any:
        if self._cgroups is None:
            from silo.sys import cgroups

            self._cgroups = cgroups.open_manager()
            # a killed spawner's leftovers (e.g. a VM's cgroup whose QEMU outlived its
            # shutdown's wait): empty ones only, older than a few seconds
            with contextlib.suppress(OSError):
                self._cgroups.sweep()
        return self._cgroups

    def _launch(self, plan: p.Plan, stdio: tuple[int, int, int], warm: bool) -> tuple[launcher.Started, Any]:
        """Clone a sandbox of ``plan`` (in its own cgroup when it has limits)."""
        if plan.vm is not None:
            return self._launch_vm(plan, stdio, warm)
        proc = plan.process
        bpf = self._seccomp(proc.seccomp) if proc.harden and proc.seccomp != "unconfined" else None
        cgroup = None
        if plan.memory is not None or plan.cpus is not None or plan.pids is not None:
            cgroup = self._cgroup_manager().create(
                f"job-{os.getpid()}-{next(self._seq)}", plan.memory, plan.cpus, plan.pids)
        # A pooled netns belongs to the host's user namespace: a sandbox that keeps a
        # capability (e.g. NET_BIND_SERVICE) needs one its own user namespace owns.
        use_pool = self._netns and "net" in plan.namespaces and not proc.caps and plan.network is None
        netns = self._netns.pop() if use_pool else None
        keeper = None
        try:
            if plan.network is not None:
                # A network of its own: a keeper process holds it (silo.net.keeper).
                from silo.model.network import policy_from_dict
                from silo.net.keeper import KeeperClient

                keeper = KeeperClient.start(policy_from_dict(json.loads(plan.network)),
                                            f"run-{os.getpid()}-{next(self._seq)}",
                                            gvisor=plan.isolation == "gvisor")
            started = launcher.start(plan, stdio, self.init_fd, self.setup_fd, bpf, cgroup,
                                     keeper.netns_fd if keeper is not None else netns, warm,
                                     keeper.attach if keeper is not None else None)
        except BaseException as e:
            if cgroup is not None:
                cgroup.destroy()
            if keeper is not None:
                keeper.close()
            if isinstance(e, OSError):
                raise InternalError(f"cannot start the sandbox: {e}") from None
            raise
        finally:
            if netns is not None:
                os.close(netns)
        if keeper is not None:
            self._keepers[started.pid] = keeper
        return started, cgroup

    def _launch_vm(self, plan: p.Plan, stdio: tuple[int, int, int], warm: bool = False) -> tuple[launcher.Started, Any]:
        """Fork the VM's supervisor (silo.backends.vm.supervisor): the process tracked as
        the sandbox, whose exit code is the command's. It, QEMU and virtiofsd share a
        cgroup: the guest's memory plus ``machine.VM_OVERHEAD`` for the two processes.
        ``warm``: a pooled VM, which boots and then waits for its run. A plan with a
        network gets its keeper first; the guest's NIC is a tap in its namespace."""
        if plan.network is None:
            return self._fork_vm(plan, stdio, warm, None)
        from silo.model.network import policy_from_dict
        from silo.net.keeper import KeeperClient

        keeper = KeeperClient.start(policy_from_dict(json.loads(plan.network)),
                                    f"run-{os.getpid()}-{next(self._seq)}", vm=True)
        try:
            started, cgroup = self._fork_vm(plan, stdio, warm, keeper.tap_fd)
        except BaseException:
            keeper.close()
            raise
        self._keepers[started.pid] = keeper
        return started, cgroup

    def _fork_vm(self, plan: p.Plan, stdio: tuple[int, int, int], warm: bool,
                 tap_fd: int | None) -> tuple[launcher.Started, Any]:
        # Imported here, before the fork, so every VM's supervisor shares these modules'
        # pages with us instead of holding its own copy (~2 MiB of PSS each).
        from silo.backends.vm import machine, supervisor

        assert plan.vm is not None
        cgroup = self._cgroup_manager().create(f"vm-{os.getpid()}-{next(self._seq)}",
                                               (plan.vm.memory << 20) + machine.VM_OVERHEAD, None,
                                               machine.VM_PIDS)
        go_r, go_w = os.pipe2(os.O_CLOEXEC)  # the child waits until it is in the cgroup
        err_r, err_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            pid = os.fork()
        except OSError as e:
            cgroup.destroy()
            os.close(go_r)
            os.close(go_w)
            raise InternalError(f"cannot start the VM: {e}") from None
        if pid == 0:  # pragma: no cover - the child
            code = 125
            try:
                os.close(go_w)
                if os.read(go_r, 1) != b"1":
                    os._exit(125)
                for target, fd in enumerate(stdio):
                    os.dup2(fd, target)
                # the tap out of the way of the dup2s first
                tap = -1 if tap_fd is None else fcntl.fcntl(tap_fd, fcntl.F_DUPFD, 100)
                err = err_w.detach()
                os.dup2(err, 3)
                net = -1
                if tap >= 0:
                    os.dup2(tap, 4)
                    net = 4
                os.closerange(5 if net >= 0 else 4, 65536)
                for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGPIPE):
                    signal.signal(sig, signal.SIG_DFL)
                code = supervisor.run(plan, (0, 1, 2), 3, warm, net)
            finally:
                os._exit(code)
        os.close(go_r)
        err_w.close()
        try:
            cgroup.add(pid)
            os.write(go_w, b"1")
        except OSError as e:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            cgroup.destroy()
            err_r.close()
            raise InternalError(f"cannot put the VM in its cgroup: {e}") from None
        finally:
            os.close(go_w)
        return launcher.Started(pid, os.pidfd_open(pid), err_r.detach()), cgroup

    def run_job(self, conn: Connection, job_id: int, plan: p.Plan, fds: list[int],
                wire: tuple[Any, ...] | None = None) -> None:
        """Start ``plan`` with ``fds`` as its stdio; replies come on ``conn``.

        ``wire`` is the plan's wire form when the caller has it (saves encoding it
        again for the warm-pool key).
        """
        if len(fds) != 3:
            raise ProtocolError("run needs three stdio fds")
        if job_id in conn.jobs:
            raise ProtocolError(f"job {job_id} is already running")
        stdio = (fds[0], fds[1], fds[2])
        key = warm_key(plan, wire if wire is not None else plan.to_wire())
        job = Job(conn, job_id, plan=plan, key=key)
        got: tuple[launcher.Started, Any] | None = None
        if plan.vm is not None:
            pooled = self._go_vm(plan, stdio) if self.pools else None
            if pooled is not None:
                got, job.pool = pooled[:2], pooled[2]
        else:
            got = self._go(key, plan, stdio) if key is not None else None
        if got is not None:
            job.spare = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in stdio]
        started, job.cgroup = got if got is not None else self._launch(plan, stdio, warm=False)
        if key is not None and self.warm_idle > 0 and self.running and not self.retired:
            # Back to back (the last run of this plan ended moments ago), build the next
            # one now, beside this run; otherwise after it, on CPU it no longer wants.
            if time.monotonic() - self._last_end.get(key, -1.0) < EAGER_GAP:
                self._to_warm[key] = (plan, conn)
            else:
                job.warm_later = key
        conn.jobs[job_id] = job
        self._track(job, started)

    def _track(self, job: Job, started: launcher.Started) -> None:
        job.pid, job.pidfd, job.err_fd = started.pid, started.pidfd, started.err_fd
        self.jobs[job.pid] = job
        self.sel.register(job.pidfd, selectors.EVENT_READ, ("exit", job))
        self.sel.register(job.err_fd, selectors.EVENT_READ, ("err", job))
        if job.cgroup is not None:
            for fd in job.cgroup.event_fds():
                self.sel.register(fd, selectors.EVENT_READ, ("limit", job))
                job.watch_fds.append(fd)
        if job.spare:
            return  # "started" once the warm sandbox took the run (see _on_err)
        assert job.plan is not None
        if job.plan.timeout is not None:
            heapq.heappush(self.timers, (time.monotonic() + job.plan.timeout, job.pid, next(self._seq)))
        job.conn.reply(("started", job.id, job.pid))

    def _taken(self, job: Job) -> None:
        """A warm sandbox acknowledged its run: the run is really started."""
        for fd in job.spare:
            os.close(fd)
        job.spare = []
        assert job.plan is not None
        if job.plan.timeout is not None:
            heapq.heappush(self.timers, (time.monotonic() + job.plan.timeout, job.pid, next(self._seq)))
        job.conn.reply(("started", job.id, job.pid))

    def _restart_cold(self, job: Job) -> None:
        """The warm sandbox died before it took the run: run it from scratch instead."""
        stdio, job.spare = job.spare, []
        assert job.plan is not None
        try:
            started, job.cgroup = self._launch(job.plan, (stdio[0], stdio[1], stdio[2]), warm=False)
        except SiloError as e:
            job.conn.jobs.pop(job.id, None)
            job.conn.reply(("error", job.id, e.to_wire()))
            return
        finally:
            for fd in stdio:
                os.close(fd)
        job.reason, job.error, job.watch_fds = None, None, []
        self._track(job, started)

    # warm sandboxes -------------------------------------------------------------------

    def _go(self, key: bytes, plan: p.Plan, stdio: tuple[int, int, int]) -> tuple[launcher.Started, Any] | None:
        """Hand a run to the warm sandbox of ``key``; None when there is none (or it died)."""
        warm = self._warm.get(key)
        if warm is None:
            return None
        proc = plan.process
        if any("\0" in s for s in proc.argv) or any("\0" in k + v for k, v in proc.env):
            return None  # NUL-separated framing: the cold path reports such a command
        message = script.go_message(proc.argv, proc.env)
        if len(message) > script.GO_MAX:
            return None
        del self._warm[key]
        self.sel.unregister(warm.started.pidfd)
        if self._renice:
            with contextlib.suppress(OSError):
                os.sched_setscheduler(warm.started.pid, os.SCHED_OTHER, os.sched_param(0))
        sock = socket.socket(fileno=os.dup(warm.started.err_fd))
        try:
            socket.send_fds(sock, [message], list(stdio))
        except OSError:
            self._reap_warm(warm)  # it died before it saw the run: start cold
            return None
        finally:
            sock.close()
        return warm.started, warm.cgroup

    def _prestart(self) -> None:
        """Build the warm sandboxes the last runs asked for."""
        while self._to_warm:
            key, (plan, owner) = self._to_warm.popitem()
            if key in self._warm or (owner.closed and not self.warm_shared):
                continue
            if len(self._warm) >= WARM_MAX:
                oldest = min(self._warm.values(), key=lambda w: w.since)
                self._drop_warm(oldest)
            null = self._devnull
            try:
                started, cgroup = self._launch(plan, (null, null, null), warm=True)
            except SiloError:
                continue  # the run itself reports why this plan cannot start
            if self._renice:
                with contextlib.suppress(OSError):
                    os.sched_setscheduler(started.pid, os.SCHED_IDLE, os.sched_param(0))
            warm = Warm(key, None if self.warm_shared else owner, started, cgroup, time.monotonic())
            self._warm[key] = warm
            self.sel.register(started.pidfd, selectors.EVENT_READ, ("warm", warm))

    def _drop_warm(self, warm: Warm) -> None:
        """Forget a parked sandbox, kill it if it still lives, reap it. Also the handler
        of its pidfd: a parked sandbox that died (a setup error, a kill) is dropped."""
        if self._warm.get(warm.key) is warm:
            del self._warm[warm.key]
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(warm.started.pidfd)
        self._reap_warm(warm)

    def _reap_warm(self, warm: Warm) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(warm.started.pidfd, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(warm.started.pid, 0)
        os.close(warm.started.pidfd)
        os.close(warm.started.err_fd)
        if warm.cgroup is not None:
            self._release_cgroup(warm.cgroup)

    def _release_cgroup(self, cgroup: Any) -> None:
        """Kill what is left in a finished sandbox's cgroup and remove it. A VM's QEMU
        and virtiofsd die a moment after their supervisor (parent-death signal) and
        free guest memory for a while: a cgroup still busy is retried by the loop."""
        if not _remove(cgroup):
            self._dying.append(cgroup)

    def _retry_dying(self) -> None:
        self._dying = [cgroup for cgroup in self._dying if not _remove(cgroup)]

    def _expire_warm(self) -> float | None:
        """Drop warm sandboxes idle for WARM_IDLE; seconds until the next expiry."""
        now = time.monotonic()
        for warm in list(self._warm.values()):
            if now - warm.since >= self.warm_idle:
                self._drop_warm(warm)
        if not self._warm:
            return None
        return max(0.0, min(w.since for w in self._warm.values()) + self.warm_idle - now)

    def _kill(self, job: Job, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(job.pidfd, signum)
        if signum == signal.SIGKILL and job.cgroup is not None:
            with contextlib.suppress(OSError):
                job.cgroup.kill()

    def _on_err(self, job: Job) -> None:
        if job.err_fd == -1:
            return
        data = b""
        fds: list[int] = []
        sock = socket.socket(fileno=os.dup(job.err_fd))
        try:
            data, fds, _, _ = socket.recv_fds(sock, 65536, 2)
        except OSError:
            pass
        finally:
            sock.close()
        if data == script.TAKEN and not fds and job.spare:
            self._taken(job)
            return
        if data == VM_READY and not fds and job.spare:
            return  # a pooled VM still booting when its run came: "taken" follows
        if data == b"pty" and len(fds) == 1 and job.plan is not None and job.plan.process.tty:
            # The pty master from the sandbox's own devpts, for the client to drive.
            if not job.conn.closed:
                with contextlib.suppress(OSError):
                    protocol.send(job.conn.sock, ("pty", job.id), fds)
            os.close(fds[0])
            return
        for fd in fds:
            os.close(fd)
        if data:
            # silo-setup and silo-init send only their text errors; anything else did not
            # come from them.
            job.error = script.native_error(data) or InternalError(
                "sandbox setup failed: an unexpected message from the sandbox")
        self.sel.unregister(job.err_fd)
        os.close(job.err_fd)
        job.err_fd = -1

    def _on_limit(self, job: Job) -> None:
        hit = job.cgroup.limit_hit() if job.cgroup is not None else None  # also drains the fds
        if not hit:
            return  # e.g. memory.events changed by reclaim, not by an OOM kill: keep watching
        if job.reason is None:
            job.reason = hit
            self._kill(job, signal.SIGKILL)
        for fd in job.watch_fds:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(fd)
        job.watch_fds.clear()

    def _on_exit(self, job: Job) -> None:
        try:
            _, status = os.waitpid(job.pid, os.WNOHANG)
        except ChildProcessError:
            status = 0
        while job.err_fd != -1:
            self._on_err(job)  # an acknowledgement, an error, then end of stream
        self.sel.unregister(job.pidfd)
        os.close(job.pidfd)
        for fd in job.watch_fds:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(fd)
        if job.spare:  # a warm sandbox that died before it took the run
            if job.cgroup is not None:
                self._release_cgroup(job.cgroup)
            del self.jobs[job.pid]
            self._restart_cold(job)
            return
        code = os.waitstatus_to_exitcode(status)
        if code < 0:
            code = 128 - code
        keeper = self._keepers.pop(job.pid, None)
        if keeper is not None:
            keeper.close()
        if job.cgroup is not None:
            if job.reason is None:
                job.reason = job.cgroup.limit_hit()
            self._release_cgroup(job.cgroup)
        del self.jobs[job.pid]
        job.conn.jobs.pop(job.id, None)
        self.last_activity = time.monotonic()
        if job.error is not None:
            job.conn.reply(("error", job.id, job.error.to_wire()))
        else:
            job.conn.reply(("exit", job.id, code, job.reason))
        if job.pool is not None:
            job.pool.refill_at = 0.0
        if job.warm_later is not None:
            assert job.plan is not None
            self._to_warm[job.warm_later] = (job.plan, job.conn)
        if job.key is not None:
            if len(self._last_end) >= 64 and job.key not in self._last_end:
                self._last_end.clear()
            self._last_end[job.key] = time.monotonic()

    def _fire_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, pid, _ = heapq.heappop(self.timers)
            job = self.jobs.get(pid)
            if job is not None and job.reason is None:
                job.reason = "timeout"
                self._kill(job, signal.SIGKILL)

    # VM pools ---------------------------------------------------------------------

    def set_pool(self, plan: p.Plan, size: int, options: tuple[str, ...]) -> VmPool | None:
        """Keep ``size`` booted VMs of ``plan``'s machine (0 drops the pool); the loop boots
        what is missing. Returns the pool (None once dropped)."""
        assert plan.vm is not None
        key = vm_key(plan)
        pool = self.pools.get(key)
        others = sum(q.size for k, q in self.pools.items() if k != key)
        if size and others + size > POOL_MAX:
            raise SpecError(f"pools hold at most {POOL_MAX} VMs together ({others} are taken by other "
                            "pools): ask for fewer")
        if pool is None:
            if not size:
                return None
            pool = self.pools[key] = VmPool(key, plan, size, options)
        pool.size, pool.options, pool.failures, pool.retry_at = size, options, 0, 0.0
        # Fewer: drop the ones still booting first, then the youngest.
        extra = sorted(pool.vms, key=lambda w: (w.started.pid in pool.ready, -w.since))
        for warm in extra[:max(0, len(pool.vms) - size)]:
            self._drop_pooled(pool, warm)
        if not size:
            del self.pools[key]
            return None
        return pool

    def on_pool(self, conn: Connection, message: tuple[Any, ...], fds: list[int]) -> None:
        """``("pool", job, "show")``: every pool, or ``("pool", job, "plan", wire, size)``
        (the SDK's ``Sandbox.pool``): keep ``size`` VMs of the plan's machine (None: only
        look) and answer with that pool alone. The reply is ``("pools", job, [(options,
        size, ready, booting, error), ...])``."""
        if len(message) == 5 and message[2] == "plan":
            _, job_id, _, wire, size = message
            if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
                raise ProtocolError("malformed pool request")
            plan = p.Plan.from_wire(wire)
            if plan.vm is None:
                raise SpecError("pools are for the vm level (the process level keeps a warm sandbox by "
                                "itself): use isolation 'vm'")
            if size is not None:
                check_pool_size(size)
                self.set_pool(plan, size, ())
                self._refill_pools()
            pool = self.pools.get(vm_key(plan))
            rows = [] if pool is None else [_pool_row(pool)]
        elif len(message) == 3 and message[2] == "show":
            job_id, rows = message[1], self.pool_status()
        else:
            raise ProtocolError("malformed pool request")
        conn.reply(("pools", job_id, [list(row) for row in rows]))

    def pool_status(self) -> list[tuple[tuple[str, ...], int, int, int, str]]:
        """``(options, size, ready, booting, last error)`` of each pool."""
        return [_pool_row(q) for q in self.pools.values()]

    def _refill_pools(self) -> float | None:
        """Boot what the pools miss; the seconds until a pool in back-off may boot again."""
        if self.retired or not self.running:
            return None
        now = time.monotonic()
        wait = None
        for pool in self.pools.values():
            while len(pool.vms) < pool.size:
                if now < max(pool.retry_at, pool.refill_at):
                    wait = min(wait or POOL_BACKOFF, max(pool.retry_at, pool.refill_at) - now)
                    break
                null = self._devnull
                try:
                    started, cgroup = self._launch_vm(pool.plan, (null, null, null), warm=True)
                except SiloError as e:
                    self._pool_failed(pool, e.message)
                    continue
                warm = Warm(pool.key, None, started, cgroup, now)
                pool.vms.append(warm)
                self.sel.register(started.pidfd, selectors.EVENT_READ, ("pooldead", (pool, warm)))
                self.sel.register(started.err_fd, selectors.EVENT_READ, ("poolmsg", (pool, warm)))
        return wait

    def _pool_failed(self, pool: VmPool, why: str) -> None:
        pool.failures += 1
        pool.last_error = why
        pool.retry_at = time.monotonic() + min(POOL_BACKOFF, 2.0 ** pool.failures)

    def _on_pool_msg(self, item: tuple[VmPool, Warm]) -> None:
        """A pooled VM booted (``ready``), or reported why it could not (then it exits)."""
        pool, warm = item
        data = b""
        sock = socket.socket(fileno=os.dup(warm.started.err_fd))
        try:
            data, fds, _, _ = socket.recv_fds(sock, 65536, 1)
            for fd in fds:
                os.close(fd)
        except OSError:
            pass
        finally:
            sock.close()
        if data == VM_READY:
            pool.ready.add(warm.started.pid)
            pool.failures, pool.last_error = 0, ""
            return
        if data:
            err = script.native_error(data)
            pool.last_error = err.message if err is not None else "the VM could not boot"
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(warm.started.err_fd)

    def _on_pool_dead(self, item: tuple[VmPool, Warm]) -> None:
        """A pooled VM ended before any run took it: a failed boot, or a kill."""
        pool, warm = item
        was_ready = warm.started.pid in pool.ready
        self._drop_pooled(pool, warm)
        if was_ready:  # a booted one that died (killed) is replaced at once
            pool.last_error = ""
        else:
            self._pool_failed(pool, pool.last_error or "the VM stopped while it booted")

    def _unwatch_pooled(self, pool: VmPool, warm: Warm) -> None:
        with contextlib.suppress(ValueError):
            pool.vms.remove(warm)
        pool.ready.discard(warm.started.pid)
        for fd in (warm.started.pidfd, warm.started.err_fd):
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(fd)

    def _drop_pooled(self, pool: VmPool, warm: Warm) -> None:
        self._unwatch_pooled(pool, warm)
        self._reap_warm(warm)

    def drop_pools(self) -> None:
        for pool in list(self.pools.values()):
            for warm in list(pool.vms):
                self._drop_pooled(pool, warm)
        self.pools.clear()

    def _go_vm(self, plan: p.Plan, stdio: tuple[int, int, int]) -> tuple[launcher.Started, Any, VmPool] | None:
        """Hand a run to a pooled VM of its machine (a booted one first); None when the
        pool is empty or the hand-over failed (the run then boots its own VM)."""
        pool = self.pools.get(vm_key(plan))
        # a pooled VM has no NIC; its hand-over carries no rlimits and no pty
        if pool is None or not pool.vms or plan.network is not None or plan.process.rlimits or plan.process.tty:
            return None
        proc = plan.process
        if any("\0" in s for s in (*proc.argv, proc.cwd)) or any("\0" in k + v for k, v in proc.env):
            return None  # the cold path reports such a command
        from silo.backends.vm.supervisor import handover

        assert plan.vm is not None
        warm = min(pool.vms, key=lambda w: (w.started.pid not in pool.ready, w.since))
        self._unwatch_pooled(pool, warm)
        sock = socket.socket(fileno=os.dup(warm.started.err_fd))
        try:
            socket.send_fds(sock, [handover(proc.argv, proc.env, proc.cwd, proc.uid, proc.gid,
                                            plan.vm.hostname)], list(stdio))
        except OSError:
            self._reap_warm(warm)
            return None
        finally:
            sock.close()
        pool.refill_at = time.monotonic() + POOL_REFILL_DELAY
        return warm.started, warm.cgroup, pool

    # network namespace pool ------------------------------------------------------

    def _refill_netns(self) -> None:
        """Make one loopback-only network namespace ahead of need (root only).

        Created by the spawner in the host's user namespace, so the sandbox holds no
        capability over it and cannot reconfigure its own network.
        """
        if not self.is_root or len(self._netns) >= NETNS_POOL:
            return
        orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            sysk.unshare(sysk.CLONE_NEWNET)
            try:
                sysk.loopback_up()
                self._netns.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
            finally:
                sysk.setns(orig, sysk.CLONE_NEWNET)
        except OSError:
            self.is_root = False  # cannot pool here; sandboxes make their own
        finally:
            os.close(orig)

    def fill_netns_pool(self) -> None:
        """Fill the pool at start-up, before the first client waits on it."""
        for _ in range(NETNS_POOL):
            self._refill_netns()

    # loop ---------------------------------------------------------------------------

    def loop(self, idle_exit: float | None = None, stop_when_no_connections: bool = False) -> None:
        dispatch: dict[str, Callable[[Any], None]] = {
            "conn": self._on_conn, "exit": self._on_exit, "err": self._on_err, "limit": self._on_limit,
            "warm": self._drop_warm, "poolmsg": self._on_pool_msg, "pooldead": self._on_pool_dead,
            "relay": self._on_relay_exit,
        }
        dispatch.update(self.extra_dispatch)
        # Everything alive now (modules, code, caches) lives as long as we do: keep the
        # collector off it, so a collection in a cloned child does not write to (and so
        # copy) pages shared with us.
        gc.freeze()
        while self.running:
            timeout = self._expire_warm()
            if self.pools:
                wait = self._refill_pools()
                if wait is not None:
                    timeout = wait if timeout is None else min(timeout, wait)
            if self._dying:
                self._retry_dying()
                timeout = DYING_RETRY if timeout is None else min(timeout, DYING_RETRY)
            if self.timers:
                until = max(0.0, self.timers[0][0] - time.monotonic())
                timeout = until if timeout is None else min(timeout, until)
            refill = self.is_root and len(self._netns) < NETNS_POOL
            if refill:
                # Refill while a sandbox runs (we only wait then), or after a quiet spell,
                # never between a reply and the request that usually follows it.
                wait = 0.0 if self.jobs else 0.05
                timeout = wait if timeout is None else min(timeout, wait)
            if idle_exit is not None and not self.jobs and not self.pools:
                remaining = self.last_activity + idle_exit - time.monotonic()
                if remaining <= 0:
                    break
                timeout = remaining if timeout is None else min(timeout, remaining)
            try:
                events = self.sel.select(timeout)
            except InterruptedError:
                continue
            registered = self.sel.get_map()
            for key, _ in events:
                # A handler earlier in this batch may have closed or re-registered
                # this fd (a job's exit drains and closes its error channel).
                if registered.get(key.fd) is not key:
                    continue
                kind, obj = key.data
                dispatch[kind](obj)
            self._fire_timers()
            if self._to_warm and self.running and not self.retired:
                self._prestart()
            if not events and refill:
                self._refill_netns()
            if stop_when_no_connections and not self.connections and not self.jobs:
                break
            if self.retired and not self.jobs:
                break
        self.shutdown()

    def shutdown(self) -> None:
        self._to_warm.clear()
        self.drop_pools()
        for warm in list(self._warm.values()):
            self._drop_warm(warm)
        for job in list(self.jobs.values()):
            self._kill(job, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.jobs and time.monotonic() < deadline:
            events = self.sel.select(0.1)
            registered = self.sel.get_map()
            for key, _ in events:
                if registered.get(key.fd) is not key:
                    continue
                kind, obj = key.data
                if kind == "exit":
                    self._on_exit(obj)
                elif kind == "err":
                    self._on_err(obj)
        for conn in list(self.connections):
            self.drop(conn)
        deadline = time.monotonic() + 5
        while self._dying and time.monotonic() < deadline:
            time.sleep(DYING_RETRY)
            self._retry_dying()
        for fd in self._netns:
            os.close(fd)
        self._netns.clear()


def serve_socketpair(fd: int) -> None:
    """The SDK's per-process spawner: serve one connected socket until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the SDK process's to handle
    os.set_inheritable(fd, False)  # inherited from the SDK; nothing of ours crosses an exec
    spawner = Spawner()
    spawner.add_connection(socket.socket(fileno=fd))
    spawner.fill_netns_pool()
    spawner.loop(stop_when_no_connections=True)
