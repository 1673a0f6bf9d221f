"""The spawner: a long-lived, single-threaded process that forks sandboxes.

It exists so that neither a fresh interpreter nor a multi-threaded caller pays for,
or endangers, a sandbox's start: it clones from a small, warm, single-threaded
process. One event loop (``selectors``) serves connections, reaps sandboxes through
pidfds, enforces wall-clock timeouts, and watches cgroup limit events.

Owns: tini's sealed memfd, the compiled seccomp programs, the network-namespace
pool, and every job's cleanup (cgroup, fds). Must not: block in a handler, run
user code, or keep an fd that a job's sandbox was given once the sandbox started.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import itertools
import marshal
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from silo.backends.process import launcher
from silo.model import plan as p
from silo.model.errors import InternalError, ProtocolError, SiloError, error_from_wire
from silo.spawner import protocol
from silo.sys import kernel as sysk

TINI_PATHS = ("/usr/bin/tini-static", "/usr/bin/tini")
NETNS_POOL = 4

Handler = Callable[["Connection", tuple[Any, ...], list[int]], None]


def _sealed_tini() -> int:
    for path in TINI_PATHS:
        try:
            with open(path, "rb") as f:
                data = f.read()
            break
        except OSError:
            continue
    else:
        raise InternalError("tini is not installed: run 'make install' (Debian package tini)")
    fd = os.memfd_create("tini", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    # SECURITY: sealed, so nobody - least of all a sandbox through /proc/1/exe - can
    # rewrite the init every sandbox runs (CVE-2019-5736).
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK
                | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    return fd


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
        self.tini_fd = _sealed_tini()
        self.handlers: dict[str, Handler] = {
            "run": self._on_run, "signal": self._on_signal, "attach": self._on_attach,
        }
        self.connections: list[Connection] = []
        self.jobs: dict[int, Job] = {}
        self.timers: list[tuple[float, int, int]] = []  # (deadline, pid, seq)
        self._seq = itertools.count()
        self._bpf: dict[str, bytes] = {}
        self._cgroups: Any = None
        self._netns: list[int] = []
        self.is_root = os.geteuid() == 0
        self.last_activity = time.monotonic()
        self.running = True
        self.retired = False  # a server that stopped taking clients (see cli.server)
        self.extra_dispatch: dict[str, Callable[[Any], None]] = {}  # selector kinds of subclasses

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
        if job is not None and isinstance(signum, int) and 0 < signum < 65:
            self._kill(job, signum)

    def _on_run(self, conn: Connection, message: tuple[Any, ...], fds: list[int]) -> None:
        if len(message) != 3 or not isinstance(message[1], int):
            raise ProtocolError("malformed run request")
        plan = p.Plan.from_wire(message[2])
        self.run_job(conn, message[1], plan, fds)

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
        return self._cgroups

    def run_job(self, conn: Connection, job_id: int, plan: p.Plan, fds: list[int]) -> None:
        """Start ``plan`` with ``fds`` as its stdio; replies come on ``conn``."""
        if len(fds) != 3:
            raise ProtocolError("run needs three stdio fds")
        if job_id in conn.jobs:
            raise ProtocolError(f"job {job_id} is already running")
        proc = plan.process
        bpf = self._seccomp(proc.seccomp) if proc.harden and proc.seccomp != "unconfined" else None
        job = Job(conn, job_id)
        if plan.memory is not None or plan.cpus is not None or plan.pids is not None:
            job.cgroup = self._cgroup_manager().create(
                f"job-{os.getpid()}-{next(self._seq)}", plan.memory, plan.cpus, plan.pids)
        # A pooled netns belongs to the host's user namespace: a sandbox that keeps a
        # capability (e.g. NET_BIND_SERVICE) needs one its own user namespace owns.
        use_pool = self._netns and "net" in plan.namespaces and not proc.caps
        netns = self._netns.pop() if use_pool else None
        try:
            started = launcher.start(plan, (fds[0], fds[1], fds[2]), self.tini_fd, bpf, job.cgroup, netns)
        except OSError as e:
            if job.cgroup is not None:
                job.cgroup.destroy()
            raise InternalError(f"cannot start the sandbox: {e}") from None
        except BaseException:
            if job.cgroup is not None:
                job.cgroup.destroy()
            raise
        finally:
            if netns is not None:
                os.close(netns)
        job.pid, job.pidfd, job.err_fd = started.pid, started.pidfd, started.err_fd
        conn.jobs[job_id] = job
        self.jobs[job.pid] = job
        self.sel.register(job.pidfd, selectors.EVENT_READ, ("exit", job))
        self.sel.register(job.err_fd, selectors.EVENT_READ, ("err", job))
        if job.cgroup is not None:
            for fd in job.cgroup.event_fds():
                self.sel.register(fd, selectors.EVENT_READ, ("limit", job))
                job.watch_fds.append(fd)
        if plan.timeout is not None:
            heapq.heappush(self.timers, (time.monotonic() + plan.timeout, job.pid, next(self._seq)))
        conn.reply(("started", job_id, job.pid))

    def _kill(self, job: Job, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(job.pidfd, signum)
        if signum == signal.SIGKILL and job.cgroup is not None:
            with contextlib.suppress(OSError):
                job.cgroup.kill()

    def _on_err(self, job: Job) -> None:
        data = b""
        fds: list[int] = []
        sock = socket.socket(fileno=os.dup(job.err_fd))
        try:
            data, fds, _, _ = socket.recv_fds(sock, 65536, 2)
        except OSError:
            pass
        finally:
            sock.close()
        if data == b"pty" and len(fds) == 1:
            # The pty master from the sandbox's own devpts, for the client to drive.
            if not job.conn.closed:
                with contextlib.suppress(OSError):
                    protocol.send(job.conn.sock, ("pty", job.id), fds)
            os.close(fds[0])
            return
        for fd in fds:
            os.close(fd)
        if data:
            try:
                job.error = error_from_wire(marshal.loads(data))  # noqa: S302 - our own child
            except (ValueError, EOFError, TypeError):
                job.error = InternalError("sandbox setup failed")
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
        if job.err_fd != -1:
            self._on_err(job)
        self.sel.unregister(job.pidfd)
        os.close(job.pidfd)
        for fd in job.watch_fds:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(fd)
        code = os.waitstatus_to_exitcode(status)
        if code < 0:
            code = 128 - code
        if job.cgroup is not None:
            if job.reason is None:
                job.reason = job.cgroup.limit_hit()
            job.cgroup.destroy()
        del self.jobs[job.pid]
        job.conn.jobs.pop(job.id, None)
        self.last_activity = time.monotonic()
        if job.error is not None:
            job.conn.reply(("error", job.id, job.error.to_wire()))
        else:
            job.conn.reply(("exit", job.id, code, job.reason))

    def _fire_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, pid, _ = heapq.heappop(self.timers)
            job = self.jobs.get(pid)
            if job is not None and job.reason is None:
                job.reason = "timeout"
                self._kill(job, signal.SIGKILL)

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
            sysk.LibcKernel().unshare(sysk.CLONE_NEWNET)
            try:
                sysk.LibcKernel().loopback_up()
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
        }
        dispatch.update(self.extra_dispatch)
        while self.running:
            timeout: float | None = None
            if self.timers:
                timeout = max(0.0, self.timers[0][0] - time.monotonic())
            refill = self.is_root and len(self._netns) < NETNS_POOL
            if refill:
                # Refill while a sandbox runs (we only wait then), or after a quiet spell,
                # never between a reply and the request that usually follows it.
                wait = 0.0 if self.jobs else 0.05
                timeout = wait if timeout is None else min(timeout, wait)
            if idle_exit is not None and not self.jobs:
                remaining = self.last_activity + idle_exit - time.monotonic()
                if remaining <= 0:
                    break
                timeout = remaining if timeout is None else min(timeout, remaining)
            try:
                events = self.sel.select(timeout)
            except InterruptedError:
                continue
            for key, _ in events:
                kind, obj = key.data
                dispatch[kind](obj)
            self._fire_timers()
            if not events and refill:
                self._refill_netns()
            if stop_when_no_connections and not self.connections and not self.jobs:
                break
            if self.retired and not self.jobs:
                break
        self.shutdown()

    def shutdown(self) -> None:
        for job in list(self.jobs.values()):
            self._kill(job, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.jobs and time.monotonic() < deadline:
            for key, _ in self.sel.select(0.1):
                kind, obj = key.data
                if kind == "exit":
                    self._on_exit(obj)
                elif kind == "err":
                    self._on_err(obj)
        for conn in list(self.connections):
            self.drop(conn)
        for fd in self._netns:
            os.close(fd)
        self._netns.clear()


def serve_socketpair(fd: int) -> None:
    """The SDK's per-process spawner: serve one connected socket until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the SDK process's to handle
    spawner = Spawner()
    spawner.add_connection(socket.socket(fileno=fd))
    spawner.fill_netns_pool()
    try:
        spawner.loop(stop_when_no_connections=True)
    except OSError as e:
        if e.errno != errno.EBADF:
            raise
