"""Measurements: start->exit latency, parallel throughput, memory per idle sandbox.

Stdlib only. Every spawned command gets /dev/null as stdin/stdout/stderr and is
started with ``posix_spawn`` so the harness adds as little as it can; the plain
``/bin/true`` row shows what the harness itself costs.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from peers import Command, Unavailable

Runner = Callable[[int], None]

_DEVNULL_ACTIONS = [
    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
    (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
]


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no output"


def spawn(argv: list[str]) -> int:
    """Run argv to completion, output discarded; returns its exit code."""
    pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=_DEVNULL_ACTIONS)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def check_command(argv: list[str]) -> None:
    """Run argv once with its output captured; raise with its last stderr line on failure."""
    proc = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
    if proc.returncode != 0:
        detail = last_line(proc.stderr.decode(errors="replace"))
        raise RuntimeError(f"exit code {proc.returncode}: {detail}")


def command_runner(cmd: Command) -> Runner:
    check_command(cmd.for_run(1_000_000))

    def run(i: int) -> None:
        code = spawn(cmd.for_run(i))
        if code != 0:
            raise RuntimeError(f"exit code {code} on run {i}")

    return run


# --- the SDK ------------------------------------------------------------------------

def open_sandbox(stack: contextlib.ExitStack, **spec: Any) -> Any:
    """``silo.Sandbox(**spec)``, entered as a context manager when it is one."""
    from silo import Sandbox

    sb = Sandbox(**spec)
    if hasattr(sb, "__enter__"):
        sb = stack.enter_context(sb)
    elif hasattr(sb, "close"):
        stack.callback(sb.close)
    return sb


def sdk_runner(stack: contextlib.ExitStack) -> Runner:
    sb = open_sandbox(stack)
    argv = ["/bin/true"]

    def run(i: int) -> None:
        result = sb.run(argv)
        if result.exit_code != 0:
            raise RuntimeError(f"exit code {result.exit_code} on run {i}: {result.stderr!r:.120}")

    run(-1)
    return run


# --- latency -----------------------------------------------------------------------

@dataclass
class Case:
    """One row of the latency table."""

    key: str
    label: str
    shown: str  # the command as shown in the report
    iterations: int
    prepare: Callable[[contextlib.ExitStack], Runner]
    samples: list[float] = field(default_factory=list)
    status: str = "ok"
    runner: Runner | None = None
    pause: float = 0.0  # seconds of idle before each timed call (not timed)

    @property
    def ok(self) -> bool:
        return self.status == "ok" and bool(self.samples)

    def median(self) -> float | None:
        return statistics.median(self.samples) if self.ok else None

    def p90(self) -> float | None:
        if not self.ok:
            return None
        ordered = sorted(self.samples)
        return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def prepare_cases(cases: list[Case], stack: contextlib.ExitStack, warmup: int) -> None:
    for case in cases:
        try:
            runner = case.prepare(stack)
            for i in range(warmup):
                runner(-2 - i)
            case.runner = runner
        except Unavailable:
            case.status = "not installed"
        except Exception as e:
            case.status = f"error: {one_line(e)}"


def run_latency(cases: list[Case], rounds: int, progress: Callable[[str], None]) -> None:
    """Interleave the cases in ``rounds`` so that drift of the machine hits all alike."""
    counter = 0
    for r in range(rounds):
        for case in cases:
            if case.runner is None or case.status != "ok":
                continue
            share = case.iterations // rounds + (1 if r < case.iterations % rounds else 0)
            try:
                for _ in range(share):
                    counter += 1
                    if case.pause:
                        time.sleep(case.pause)
                    t0 = time.perf_counter()
                    case.runner(counter)
                    case.samples.append(time.perf_counter() - t0)
            except Exception as e:
                case.status = f"error: {one_line(e)}"
        progress(f"round {r + 1}/{rounds} done")


# --- throughput --------------------------------------------------------------------

def threads_rate(make_worker: Callable[[contextlib.ExitStack], Callable[[], None]],
                 workers: int, seconds: float) -> float:
    """Runs/s of ``workers`` threads, each calling its own worker in a loop."""
    barrier = threading.Barrier(workers + 1)
    counts = [0] * workers
    errors: list[BaseException] = []
    stop_at = [math.inf]  # set for real once every worker is ready

    def body(idx: int) -> None:
        with contextlib.ExitStack() as stack:
            try:
                work = make_worker(stack)
                work()
            except BaseException as e:
                errors.append(e)
                barrier.abort()
                return
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                return
            try:
                while time.perf_counter() < stop_at[0]:
                    work()
                    counts[idx] += 1
            except BaseException as e:
                errors.append(e)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    try:
        barrier.wait(timeout=120)
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    for t in threads:
        t.join(timeout=seconds + 120)
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(one_line(errors[0]))
    return sum(counts) / elapsed


def spawn_worker(cmd: Command) -> Callable[[contextlib.ExitStack], Callable[[], None]]:
    check_command(cmd.argv)

    def make(_stack: contextlib.ExitStack) -> Callable[[], None]:
        def work() -> None:
            code = spawn(cmd.argv)
            if code != 0:
                raise RuntimeError(f"exit code {code}")
        return work
    return make


def sdk_thread_worker(stack: contextlib.ExitStack) -> Callable[[], None]:
    sb = open_sandbox(stack)

    def work() -> None:
        result = sb.run(["/bin/true"])
        if result.exit_code != 0:
            raise RuntimeError(f"exit code {result.exit_code}")

    return work


_SDK_PROCESS_WORKER = r"""
import contextlib, sys, time
sys.path.insert(0, sys.argv[2])
from measure import open_sandbox
with contextlib.ExitStack() as stack:
    sb = open_sandbox(stack)
    assert sb.run(["/bin/true"]).exit_code == 0
    print("ready", flush=True)
    sys.stdin.readline()
    n, t0 = 0, time.perf_counter()
    deadline = t0 + float(sys.argv[1])
    while time.perf_counter() < deadline:
        r = sb.run(["/bin/true"])
        if r.exit_code != 0:
            raise SystemExit(f"exit code {r.exit_code}")
        n += 1
    print(n, time.perf_counter() - t0, flush=True)
"""


def sdk_processes_rate(workers: int, seconds: float) -> float:
    """Runs/s of ``workers`` processes, each with its own SDK (and so its own spawner)."""
    here = os.path.dirname(os.path.abspath(__file__))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SDK_PROCESS_WORKER, str(seconds), here],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(workers)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                p.wait(timeout=30)
                raise RuntimeError(last_line(p.stderr.read() if p.stderr else ""))
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        total, longest = 0, 0.0
        for p in procs:
            out, err = p.communicate(timeout=seconds + 120)
            if p.returncode != 0:
                raise RuntimeError(last_line(err))
            n, elapsed = out.split()
            total += int(n)
            longest = max(longest, float(elapsed))
        return total / longest
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# --- memory --------------------------------------------------------------------------

def mem_available() -> int:
    """MemAvailable in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _steady_mem_available(settle: float) -> int:
    time.sleep(settle)
    return int(statistics.median(mem_available() for _ in range(3)))


def count_processes(comm: str) -> int:
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == comm:
                        n += 1
    return n


@contextlib.contextmanager
def _plain_sleeps(n: int) -> Iterator[None]:
    procs = [subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


@contextlib.contextmanager
def _silo_sleeps(n: int) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        handles = []
        try:
            for _ in range(n):
                sb = open_sandbox(stack)
                handles.append(sb.start(["sleep", "60"]))
            yield
        finally:
            for h in handles:
                with contextlib.suppress(Exception):
                    h.kill()
            for h in handles:
                with contextlib.suppress(Exception):
                    h.wait()


def sdk_has_start() -> bool:
    from silo import Sandbox

    return callable(getattr(Sandbox, "start", None))


@dataclass
class Density:
    n: int
    plain_drop: float  # bytes, for n plain sleeps
    silo_drop: float  # bytes, for n sandboxes
    alive: int  # sandboxed sleeps seen alive on the host

    @property
    def overhead_each(self) -> float:
        return (self.silo_drop - self.plain_drop) / self.n


def density(n: int, repeats: int, settle: float) -> Density:
    """Host memory per idle sandbox: MemAvailable drop, minus that of plain processes."""
    plain, silo, alive = [], [], []
    for _ in range(repeats):
        base_sleeps = count_processes("sleep")
        before = _steady_mem_available(settle)
        with _plain_sleeps(n):
            plain.append(before - _steady_mem_available(settle))
        before = _steady_mem_available(settle)
        with _silo_sleeps(n):
            silo.append(before - _steady_mem_available(settle))
            alive.append(count_processes("sleep") - base_sleeps)
    return Density(n, statistics.median(plain), statistics.median(silo), min(alive))
