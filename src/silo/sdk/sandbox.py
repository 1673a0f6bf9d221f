"""``silo.Sandbox``: one-shot sandboxes from Python, through this process's spawner.

A :class:`Sandbox` holds a validated spec. Every :meth:`Sandbox.run` (or
:meth:`Sandbox.start`) creates a fresh sandbox from it, runs the command and tears
the sandbox down: nothing persists between runs except what mapped folders keep.
Persistent environments are workspaces (``silo.Client``), not sandboxes.

Thread-safety: a Sandbox may be used from several threads; each run takes its own
connection to the spawner.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import selectors
import signal as _signal
import socket
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from silo.engine import planner
from silo.model import plan as p
from silo.model.errors import InternalError, ProtocolError, SpecError, error_from_wire
from silo.model.spec import Isolation, Spec, build_spec, coerce_duration, parse_env_entry
from silo.spawner import client, protocol

DEFAULT_MAX_OUTPUT = 64 << 20
_job_ids = itertools.count(1)


@dataclass(frozen=True)
class Result:
    """What a finished command left: exit code (128+N if killed by signal N), output,
    and which limit killed it (``"memory"``, ``"pids"``, ``"timeout"``) if one did."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    limit: str | None = None
    duration: float = 0.0
    truncated: bool = False


@dataclass(frozen=True)
class PoolStatus:
    """A VM pool of this process's spawner (:meth:`Sandbox.pool`): how many VMs it keeps,
    how many are booted and waiting for a run, how many still boot, and why the last
    boot failed (empty when it did not)."""

    size: int
    ready: int
    booting: int
    error: str = ""


class _Job:
    """One sandbox started on a private spawner connection."""

    def __init__(self, sock: socket.socket, plan: p.Plan, stdio: Sequence[int]) -> None:
        self.sock = sock
        self.id = next(_job_ids)
        self.pid = 0
        self.started = time.monotonic()
        protocol.send(sock, ("run", self.id, plan.to_wire()), list(stdio))

    def handle(self) -> tuple[Any, ...] | None:
        """Read one reply; returns ("exit", code, reason) when done, None otherwise."""
        try:
            got = protocol.recv(self.sock)
        except OSError as e:
            raise InternalError(f"silo's spawner failed ({e}); see its log above") from None
        if got is None:
            raise InternalError("silo's spawner closed the connection")
        message, fds = got
        for fd in fds:
            os.close(fd)
        kind = message[0]
        if kind == "started":
            self.pid = int(message[2])
            return None
        if kind == "exit":
            return ("exit", int(message[2]), message[3])
        if kind == "error":
            raise error_from_wire(message[2])
        raise ProtocolError(f"unexpected reply {kind!r} from the spawner")

    def signal(self, signum: int) -> None:
        protocol.send(self.sock, ("signal", self.id, int(signum)))


class Process:
    """A sandbox started with :meth:`Sandbox.start`; its output goes where it was sent."""

    def __init__(self, sandbox: Sandbox, job: _Job, sock: socket.socket) -> None:
        self._sandbox = sandbox
        self._job = job
        self._sock = sock
        self._result: Result | None = None
        while job.pid == 0:
            job.handle()

    @property
    def pid(self) -> int:
        """The sandbox's init as seen from the host."""
        return self._job.pid

    def send_signal(self, signum: int) -> None:
        if self._result is None:
            self._job.signal(signum)

    def kill(self) -> None:
        self.send_signal(_signal.SIGKILL)

    def close(self) -> None:
        """Kill the sandbox if it still runs and drop the connection (the spawner reaps it)."""
        if self._result is None:
            self._result = Result(-1, b"", b"", None, time.monotonic() - self._job.started)
            client.release(self._sock)  # the spawner kills a disconnected client's sandboxes

    def wait(self, timeout: float | None = None) -> Result:
        if self._result is not None:
            return self._result
        self._sock.settimeout(timeout)
        try:
            while True:
                done = self._job.handle()
                if done is not None:
                    break
        finally:
            self._sock.settimeout(None)
        self._result = Result(done[1], b"", b"", done[2], time.monotonic() - self._job.started)
        client.release(self._sock)
        return self._result


class Sandbox:
    """A validated spec from which each :meth:`run` makes a fresh, isolated sandbox.

    ``Sandbox(isolation="process", memory="256M", mounts=["/data:/data:ro"])``; every
    argument is checked here and a bad one raises :class:`silo.SpecError`. The
    ``app`` isolation is NOT a security boundary: it only keeps writes off your files.
    """

    def __init__(self, **spec: Any) -> None:
        self.spec: Spec = spec.pop("_spec", None) or build_spec(**spec)
        self._lock = threading.Lock()
        self._idle: list[socket.socket] = []
        self._closed = False
        self._base: p.Plan | None = None
        self._started: weakref.WeakSet[Process] = weakref.WeakSet()
        self._pooled = False

    # context management ---------------------------------------------------------

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Release spawner connections; sandboxes still running from :meth:`start` are killed."""
        if self._pooled:
            with contextlib.suppress(SpecError, InternalError):
                self.pool(0)
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            started = list(self._started)
        for sock in idle:
            client.release(sock)
        for process in started:
            process.close()

    # planning --------------------------------------------------------------------

    def plan(self, argv: Sequence[str], *, timeout: float | str | None = None,
             env: Mapping[str, str] | None = None, workdir: str | None = None) -> p.Plan:
        """The plan a run of ``argv`` would execute (nothing is started)."""
        argv = [os.fspath(a) for a in argv]
        if not argv:
            raise SpecError("no command given: pass the command as a list, like ['ls', '-l']")
        for i, arg in enumerate(argv):
            if "\0" in arg:
                raise SpecError(f"argument {i} of the command contains a NUL byte, which no "
                                "command can receive: remove it")
        if self.spec.isolation is Isolation.GVISOR:
            # The command, its environment and directory are in runsc's bundle, which
            # the plan's operations write: a plan of its own for each command (the
            # plan's process is runsc itself, never the command).
            spec = self.spec
            if env:
                spec = dataclasses.replace(spec, env=(*spec.env, *(parse_env_entry(f"{k}={v}")
                                                                   for k, v in env.items())))
            if workdir is not None:
                spec = dataclasses.replace(spec, workdir=workdir)
            plan = planner.plan(spec, argv)
        else:
            if self._base is None or self.spec.isolation is Isolation.APP:
                self._base = planner.plan(self.spec, argv)
            proc = self._base.process
            changes: dict[str, Any] = {"argv": tuple(argv)}
            if env:
                merged = dict(proc.env)
                merged.update(parse_env_entry(f"{k}={v}") for k, v in env.items())
                changes["env"] = tuple(merged.items())
            if workdir is not None:
                changes["cwd"] = Spec(workdir=workdir).workdir
            plan = dataclasses.replace(self._base, process=dataclasses.replace(proc, **changes))
        t = coerce_duration(timeout, "timeout")
        return plan if t is None else dataclasses.replace(plan, timeout=t)

    # the warm pool ---------------------------------------------------------------------

    def pool(self, size: int, *, wait: float | None = None) -> PoolStatus:
        """Keep ``size`` booted VMs of this (vm-level) sandbox's machine ready in this
        process's spawner, so a :meth:`run` costs an exec instead of a boot; 0 drops
        the pool. Each VM serves one run and is replaced in the background. A run with a
        network, rlimits or a pty boots its own VM. ``wait``: up to that many seconds
        for the pool's VMs to be booted; the status is returned either way, so check its
        ``ready``. The pool lasts until :meth:`close` or the process ends.
        """
        plan = self.plan(["true"])
        if plan.vm is None:
            raise SpecError(f"pools are for the vm level, and this sandbox is at isolation "
                            f"{self.spec.isolation.value!r}: use Sandbox(isolation='vm')")
        if not isinstance(size, int) or isinstance(size, bool):
            raise SpecError(f"bad pool size {size!r}: give a whole number")
        wire = plan.to_wire()
        status = self._pool_request(wire, size)
        self._pooled = size > 0
        deadline = time.monotonic() + (wait or 0)
        while status.ready < status.size and time.monotonic() < deadline:
            time.sleep(0.05)
            status = self._pool_request(wire, None)
        return status

    def _pool_request(self, wire: tuple[Any, ...], size: int | None) -> PoolStatus:
        """Set (``size``) or read (None) the pool of ``wire``'s machine."""
        sock = self._conn()
        ok = False
        try:
            protocol.send(sock, ("pool", next(_job_ids), "plan", wire, size))
            got = protocol.recv(sock)
            if got is None:
                raise InternalError("silo's spawner closed the connection")
            message, fds = got
            for fd in fds:
                os.close(fd)
            if message[0] == "error":
                raise error_from_wire(message[2])
            if message[0] != "pools":
                raise ProtocolError(f"unexpected reply {message[0]!r} from the spawner")
            ok = True
        finally:
            self._done(sock, ok)
        if not message[2]:  # no pool of that machine
            return PoolStatus(0, 0, 0)
        _, kept, ready, booting, error = message[2][0]
        return PoolStatus(kept, ready, booting, error)

    # running -----------------------------------------------------------------------

    def _conn(self) -> socket.socket:
        with self._lock:
            if self._closed:
                raise SpecError("this Sandbox is closed: make a new one")
            if self._idle:
                return self._idle.pop()
        return client.connect()

    def _done(self, sock: socket.socket, reusable: bool) -> None:
        with self._lock:
            if reusable and not self._closed:
                self._idle.append(sock)
                return
        client.release(sock)

    def run(self, argv: Sequence[str], *, input: bytes | None = None, timeout: float | str | None = None,
            env: Mapping[str, str] | None = None, workdir: str | None = None,
            max_output: int = DEFAULT_MAX_OUTPUT) -> Result:
        """Run ``argv`` in a fresh sandbox; capture its output; return when it is gone."""
        plan = self.plan(argv, timeout=timeout, env=env, workdir=workdir)
        sock = self._conn()
        ok = False
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        if input is not None:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
        else:
            in_r, in_w = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), -1
        try:
            try:
                job = _Job(sock, plan, (in_r, out_w, err_w))
            finally:
                os.close(in_r)
                os.close(out_w)
                os.close(err_w)
            result = self._collect(job, sock, out_r, err_r, in_w, input or b"", max_output)
            ok = True
            return result
        finally:
            for fd in (out_r, err_r, in_w):
                if fd != -1:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._done(sock, ok)

    def _collect(self, job: _Job, sock: socket.socket, out_r: int, err_r: int, in_w: int,
                 data: bytes, max_output: int) -> Result:
        out: list[bytes] = []
        err: list[bytes] = []
        sizes = {out_r: 0, err_r: 0}
        truncated = False
        done: tuple[Any, ...] | None = None
        with selectors.DefaultSelector() as sel:
            sel.register(out_r, selectors.EVENT_READ, out)
            sel.register(err_r, selectors.EVENT_READ, err)
            sel.register(sock, selectors.EVENT_READ, None)
            if in_w != -1:
                os.set_blocking(in_w, False)
                if data:
                    sel.register(in_w, selectors.EVENT_WRITE, "in")
                else:
                    os.close(in_w)
                    in_w = -1
            view = memoryview(data)
            open_pipes = 2
            while open_pipes or done is None:
                for key, _ in sel.select():
                    if key.data is None:
                        done = job.handle() or done
                        if done is not None:
                            sel.unregister(sock)
                    elif key.data == "in":
                        try:
                            n = os.write(in_w, view[:65536])
                        except BrokenPipeError:
                            n = len(view)
                        view = view[n:]
                        if not view:
                            sel.unregister(in_w)
                            os.close(in_w)
                            in_w = -1
                    else:
                        chunk = os.read(key.fd, 65536)
                        if not chunk:
                            sel.unregister(key.fd)
                            open_pipes -= 1
                            continue
                        if sizes[key.fd] < max_output:
                            key.data.append(chunk[: max_output - sizes[key.fd]])
                        else:
                            truncated = True
                        sizes[key.fd] += len(chunk)
        if in_w != -1:
            os.close(in_w)
        return Result(done[1], b"".join(out), b"".join(err), done[2],
                      time.monotonic() - job.started, truncated)

    def start(self, argv: Sequence[str], *, stdin: int | None = None, stdout: int | None = None,
              stderr: int | None = None, timeout: float | str | None = None,
              env: Mapping[str, str] | None = None, workdir: str | None = None) -> Process:
        """Start ``argv`` in a fresh sandbox and return at once; stdio defaults to /dev/null."""
        plan = self.plan(argv, timeout=timeout, env=env, workdir=workdir)
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            sock = self._conn()
            fds = [null if fd is None else fd for fd in (stdin, stdout, stderr)]
            try:
                job = _Job(sock, plan, fds)
                process = Process(self, job, sock)
                with self._lock:
                    self._started.add(process)
                return process
            except BaseException:
                client.release(sock)
                raise
        finally:
            os.close(null)
