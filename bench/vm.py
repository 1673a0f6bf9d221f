"""VM benchmarks (issue 5): a cold ``silo run --isolation vm -- /bin/true`` beside raw QEMU
booting the same kernel, the first output of a run from the warm pool (``silo pool``), and
the host memory of an idle VM beyond the guest's used pages.

Root only (the vm level needs it). The raw peer is the floor for any VM here: the same
QEMU (microvm, the same accelerator, memory and kernel options) and the same kernel,
with an initramfs of busybox whose init powers off at once: a boot to user space and
back, with no virtio-fs, agent or command. Interleaved in rounds, like the other rows.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

from measure import one_line
from report import REPO, table

SILO = str(REPO / ".venv" / "bin" / "silo")

# Budgets of issue 5, requirement 9.
COLD_TCG = 1.5
COLD_KVM = 0.2
POOL_FIRST_OUTPUT = 0.06
IDLE_OVERHEAD = 64 << 20


def _raw_qemu(tmp: str) -> list[str]:
    from silo.backends.vm import accel, initramfs, kernel, machine
    from silo.engine import host as hostmod

    h = hostmod.host()
    k = kernel.find("auto", h.cache_dir)
    image = kernel.bootable(k.image, h.cache_dir)
    cpio = initramfs.Cpio()
    for d in ("bin", "dev", "proc"):
        cpio.add(d, 0o040755)
    cpio.add("bin/busybox", 0o100755, open(initramfs.busybox(), "rb").read())
    cpio.add("init", 0o100755, b"#!/bin/busybox sh\n/bin/busybox poweroff -f\n")
    path = os.path.join(tmp, "poweroff.cpio")
    with open(path, "wb") as f:
        f.write(cpio.finish())
    ird = initramfs.build(__import__("pathlib").Path(k.modules), h.cache_dir, k.release)
    tcg = accel.choose(image, ird, h.cache_dir) == "tcg"
    khz = machine.tsc_khz() if tcg else None
    append = machine.CMDLINE + (f" tsc_early_khz={khz}" if khz else "")
    return [machine.QEMU, "-nodefaults", "-no-user-config", "-nographic", "-M", "microvm",
            "-accel", "tcg,thread=multi" if tcg else "kvm", "-cpu", machine.TCG_CPU if tcg else "host",
            "-m", "512M", "-kernel", image, "-initrd", path, "-append", append, "-serial", "none",
            "-no-reboot"]


def _timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, timeout=120)
    return time.perf_counter() - start


def _rss(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) << 10
    return 0


def _pss_anon(pid: int) -> int:
    """``pid``'s anonymous memory, each page shared copy-on-write counted once across
    its sharers (the supervisor is a fork of the server)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss_Anon:"):
                return int(line.split()[1]) << 10
    return 0


def _idle_memory() -> tuple[int, int, dict[str, int]]:
    """(the host's memory beyond the guest's pages, see below; the guest's used memory;
    QEMU's RSS by kind, the supervisor's, the total RSS) of a VM idling in ``sleep``
    after its command printed the guest's meminfo."""
    proc = subprocess.Popen([SILO, "run", "--isolation", "vm", "--", "sh", "-c",
                             "sleep 3; cat /proc/meminfo; echo done; exec sleep 60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        meminfo = {}
        for line in proc.stdout:
            if line.strip() == "done":
                break
            name, value = line.split(":", 1)
            meminfo[name] = int(value.split()[0]) << 10
        guest_used = meminfo["MemTotal"] - meminfo["MemFree"]
        time.sleep(2)
        out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
        pids = [int(line.split()[0]) for line in out.splitlines()[1:]
                if "qemu-system" in line or "virtiofsd" in line]
        qemu = next(pid for pid in pids if "qemu-system" in open(f"/proc/{pid}/cmdline").read())
        supervisor = int(open(f"/proc/{qemu}/stat").read().rsplit(")", 1)[1].split()[1])
        ours = {*pids, supervisor}
        # What the VM costs the host beyond the guest's own pages: the anonymous memory
        # (proportional: pages shared copy-on-write counted once) of QEMU (heap, TCG's
        # code cache), virtiofsd and the supervisor. Left out: the
        # guest's RAM (QEMU's shmem: the guest's pages) and file pages (QEMU's binary and
        # libraries, shared with every other VM and the host).
        host = sum(_pss_anon(pid) for pid in ours)
        parts = {k: _rss(qemu, k) for k in ("RssAnon", "RssFile", "RssShmem")}
        parts["supervisor"] = _rss(supervisor, "RssAnon")
        parts["rss"] = sum(_rss(pid) for pid in ours)
        return host, guest_used, parts
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def _first_output(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(seconds to the first byte of stdout, seconds to the exit) of ``argv``."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    t_first = time.perf_counter() - start
    proc.communicate(timeout=120)
    t_end = time.perf_counter() - start
    if not first or proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode})")
    return t_first, t_end


def _pool_status(env: dict[str, str]) -> str:
    return subprocess.run([SILO, "pool"], env=env, capture_output=True, text=True, check=True, timeout=60).stdout


def _wait_ready(env: dict[str, str]) -> None:
    deadline = time.monotonic() + 120
    while "1 ready, 0 booting" not in _pool_status(env):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pool did not fill: {_pool_status(env).strip()}")
        time.sleep(0.1)


def _pool_rounds(tmp: str, rounds: int) -> tuple[list[float], list[float], list[float]]:
    """First output of ``silo run --isolation vm -- echo hi`` from a pool of one (a private
    server, refilled before each round so no boot competes with the run), and cold."""
    run_dir = os.path.join(tmp, "run")
    os.mkdir(run_dir, 0o700)
    env = {**os.environ, "SILO_RUNTIME_DIR": run_dir, "SILO_STATE_DIR": os.path.join(tmp, "state")}
    argv = [SILO, "run", "--isolation", "vm", "--", "echo", "hi"]
    cold = [_first_output(argv)[0] for _ in range(min(rounds, 5))]  # the default server: no pool
    subprocess.run([SILO, "pool", "set", "--isolation", "vm", "--size", "1"], env=env, check=True,
                   capture_output=True, timeout=120)
    first, end = [], []
    try:
        for _ in range(rounds):
            _wait_ready(env)
            time.sleep(0.5)
            a, b = _first_output(argv, env)
            first.append(a)
            end.append(b)
    finally:
        subprocess.run([SILO, "pool", "set", "--isolation", "vm", "--size", "0"], env=env, capture_output=True,
                       timeout=120, check=False)
        subprocess.run([SILO, "server", "stop"], env=env, capture_output=True, check=False)
    return first, end, cold


def run(progress: Callable[[str], None], quick: bool) -> tuple[list[str], list[tuple[str, str, str, str]]]:
    """(report sections, budgets as (what, measured, limit, verdict))."""
    budgets: list[tuple[str, str, str, str]] = []
    if os.geteuid() != 0:
        return [], [("vm: cold silo run --isolation vm -- /bin/true", "—", "≤ 1.5 s (TCG)",
                     "not measured: the vm level needs root")]
    rounds = 5 if quick else 15
    with tempfile.TemporaryDirectory(prefix="silo-bench-vm-") as tmp:
        try:
            raw = _raw_qemu(tmp)
            tcg = "tcg" in raw[raw.index("-accel") + 1]
            silo_argv = [SILO, "run", "--isolation", "vm", "--", "/bin/true"]
            _timed(silo_argv)  # the server, the initramfs and the probe verdict: not in the numbers
            _timed(raw)
            progress(f"vm: silo run --isolation vm -- /bin/true beside raw QEMU ({rounds} rounds)")
            silo_t, raw_t = [], []
            for _ in range(rounds):
                silo_t.append(_timed(silo_argv))
                raw_t.append(_timed(raw))
        except Exception as e:
            return [], [("vm: cold silo run --isolation vm -- /bin/true", "—", "≤ 1.5 s (TCG)",
                         f"not measured: {one_line(e)}")]
    m_silo, m_raw = statistics.median(silo_t), statistics.median(raw_t)
    accel = "TCG" if tcg else "KVM"
    limit = COLD_TCG if tcg else COLD_KVM
    budgets.append((f"vm: cold silo run --isolation vm -- /bin/true ({accel})", f"{m_silo:.2f} s",
                    f"≤ {limit:g} s", "PASS" if m_silo <= limit else "FAIL"))
    if tcg:
        budgets.append(("vm: cold run where KVM works", "—", "≤ 0.2 s",
                        "not measured: KVM guests do not run on this machine (the probe chose TCG)"))
    sections = [
        "## VM level: a cold run beside raw QEMU\n\n"
        f"`silo run --isolation vm -- /bin/true` (boot, virtio-fs root, agent, the command, power-off) "
        f"beside raw QEMU booting the same kernel with a busybox initramfs that powers off at once; "
        f"{accel}, 1 vCPU, 512 MiB, {rounds} rounds interleaved.\n\n"
        + table(["", "median", "min", "max", "ratio to raw QEMU"], [
            ["silo run --isolation vm", f"{m_silo:.2f} s", f"{min(silo_t):.2f} s", f"{max(silo_t):.2f} s",
             f"{m_silo / m_raw:.2f}"],
            ["raw QEMU, same kernel", f"{m_raw:.2f} s", f"{min(raw_t):.2f} s", f"{max(raw_t):.2f} s", "1.00"],
        ])]
    progress(f"vm: first output from the warm pool ({rounds} rounds)")
    try:
        with tempfile.TemporaryDirectory(prefix="silo-bench-pool-") as tmp:
            first, end, cold = _pool_rounds(tmp, rounds)
        m_first = statistics.median(first)
        budgets.append(("vm: first output from the warm pool", f"{m_first * 1000:.0f} ms", "≤ 60 ms",
                        "PASS" if m_first <= POOL_FIRST_OUTPUT else "FAIL"))
        m_cold = statistics.median(cold)
        sections.append(
            "## VM level: a run from the warm pool\n\n"
            "`silo run --isolation vm -- echo hi` with `silo pool set --isolation vm --size 1`: the time to "
            "the first byte of output and to the exit, the pool refilled (a booted, warmed-up VM waiting) "
            f"before each of {rounds} rounds; beside the same command booting its own VM "
            f"({len(cold)} rounds). {accel}, 1 vCPU, 512 MiB.\n\n"
            + table(["", "first output (median)", "min", "max", "exit (median)", "ratio to cold"], [
                ["from the pool", f"{m_first * 1000:.0f} ms", f"{min(first) * 1000:.0f} ms",
                 f"{max(first) * 1000:.0f} ms", f"{statistics.median(end) * 1000:.0f} ms",
                 f"{m_first / m_cold:.2f}"],
                ["cold (own boot)", f"{m_cold * 1000:.0f} ms", f"{min(cold) * 1000:.0f} ms",
                 f"{max(cold) * 1000:.0f} ms", "—", "1.00"],
            ]))
    except Exception as e:
        budgets.append(("vm: first output from the warm pool", "—", "≤ 60 ms", f"not measured: {one_line(e)}"))
    progress("vm: idle memory")
    try:
        over, guest, parts = _idle_memory()
        budgets.append(("vm: idle VM host memory beyond the guest's used pages", f"{over / (1 << 20):.0f} MiB",
                        "≤ 64 MiB", "PASS" if over <= IDLE_OVERHEAD else "FAIL"))
        sections.append(
            "## VM level: idle memory\n\n"
            "A VM idling in `sleep` (512 MiB guest). Beyond the guest's pages: the anonymous memory "
            "(proportional set size: a page shared copy-on-write counted once) of QEMU, virtiofsd "
            "and the supervisor. The guest's RAM that QEMU holds "
            "(its shmem) is the guest's own pages. File pages (QEMU's binary and libraries) are shared "
            "with every other VM and the host, so they are left out; the total RSS, which counts them, "
            "is shown beside.\n\n"
            + table(["beyond the guest's pages", "guest used (MemTotal - MemFree)", "QEMU: guest RAM held (shmem)",
                     "QEMU: anonymous (TCG code cache, heap)", "supervisor: anonymous (Python)",
                     "QEMU: files (shared)", "total RSS"],
                    [[f"{over / (1 << 20):.0f} MiB", f"{guest / (1 << 20):.0f} MiB",
                      *(f"{parts[k] / (1 << 20):.0f} MiB" for k in ("RssShmem", "RssAnon", "supervisor", "RssFile",
                                                                     "rss"))]]))
    except Exception as e:
        budgets.append(("vm: idle VM host memory beyond the guest's used pages", "—", "≤ 64 MiB",
                        f"not measured: {one_line(e)}"))
    return sections, budgets
