"""Machine facts and the Markdown report that `make bench` prints and writes."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

from peers import version

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    cells: list[str]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    except OSError:
        pass
    return "unknown"


def cgroup_layout() -> str:
    """``v2`` (unified), ``hybrid`` (v1 controllers + cgroup2) or ``v1``."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return "unknown"
    by_target = {m[1]: m[2] for m in mounts if len(m) > 2}
    if by_target.get("/sys/fs/cgroup") == "cgroup2":
        return "v2"
    has_v1 = any(m[2] == "cgroup" for m in mounts if len(m) > 2)
    has_v2 = any(m[2] == "cgroup2" for m in mounts if len(m) > 2)
    if has_v1 and has_v2:
        return "hybrid (v1 controllers, cgroup2 without controllers)"
    return "v1" if has_v1 else "none"


def _os_release() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return "unknown"


def _silo_version() -> str:
    try:
        import silo

        v = str(silo.__version__)
    except Exception as e:  # the package may be mid-change; say so, do not crash
        v = f"unimportable ({type(e).__name__})"
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if rev:
            v += f" (git {rev}{', src/ modified' if dirty else ''})"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return v


def machine_facts() -> list[tuple[str, str]]:
    try:
        cpus_usable = len(os.sched_getaffinity(0))
    except OSError:
        cpus_usable = os.cpu_count() or 0
    return [
        ("date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("os", _os_release()),
        ("kernel", platform.release()),
        ("cpu", f"{_cpu_model()}, {os.cpu_count()} logical CPUs ({cpus_usable} usable)"),
        ("memory", _mem_total()),
        ("cgroups", cgroup_layout()),
        ("load average at start", " ".join(f"{x:.2f}" for x in os.getloadavg())),
        ("running as", "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"),
        ("python", platform.python_version()),
        ("silo", _silo_version()),
        ("bubblewrap", version("bwrap")),
        ("runc", version("runc")),
        ("runsc", version("runsc")),
        ("firejail", version("firejail")),
    ]


def table(header: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    """A Markdown table, padded so it also reads well on a terminal."""
    right = right or set()
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w)
               for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "| " + " | ".join(out) + " |"

    sep = ["-" * (w - 1) + (":" if i in right else "-") for i, w in enumerate(widths)]
    return "\n".join([fmt(header), "| " + " | ".join(sep) + " |", *(fmt(r) for r in rows)])


def ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.2f}"


def mib(n: float) -> str:
    return f"{n / (1 << 20):.2f} MiB"
