"""SECURITY.md class 18 at the process level: resource exhaustion is contained.

Each attack is also bounded by the probe itself (a maximum number of forks, MiB,
files), so a broken limit fails the test without taking the machine down. After
each attack the host must still be responsive, a new sandbox must still work, and
no process of the sandbox may be left behind. Limits that need cgroups are enforced
when silo runs as root; on this machine (cgroup v1) the unprivileged user must get a
clear LimitUnavailable error instead of a silently unlimited sandbox.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from silo import LimitUnavailable

FLOOD_MIB = 512
ALLOWED_OUTPUT = 64 << 20  # silo's documented cap on captured output per stream


def assert_host_fine(sb: Any, leftovers: Callable[[str], list[tuple[int, str]]], marker: str) -> None:
    """The host answers, a fresh sandbox works, nothing of the attack survived."""
    deadline = time.monotonic() + 10
    while leftovers(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(marker) == [], f"sandbox processes left behind: {leftovers(marker)[:5]}"
    start = time.monotonic()
    subprocess.run(["/bin/true"], check=True, timeout=10)
    assert time.monotonic() - start < 2, "the host is sluggish after the attack"
    result = sb.run(["/bin/echo", "still-fine"], timeout=30)
    assert (result.exit_code, result.stdout) == (0, b"still-fine\n"), result


# --------------------------------------------------------------------------------------
# cgroup-backed limits: root enforces them, the unprivileged user is told they are unavailable
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [{"pids": 64}, {"memory": "64M"}, {"cpus": 0.5}])
def test_18_unprivileged_limits_are_refused_clearly(sb: Any, limit: dict[str, Any]) -> None:
    if sb.mode == "root":
        pytest.skip("root can use cgroups: the limits are enforced (tests below)")
    with pytest.raises(LimitUnavailable) as info:
        sb.run(["/bin/true"], **limit)
    assert info.value.message and "\n" not in info.value.message, info.value.message


def test_18_fork_bomb_is_contained_by_pids(sb: Any, marker: str, leftovers: Any) -> None:
    params = {"max": 2000, "child_sleep": 30, "marker": marker}
    if sb.mode != "root":
        with pytest.raises(LimitUnavailable):
            sb.run(sb.argv("forkbomb", params=params), pids=64, timeout=60)
        return
    result = sb.run(sb.argv("forkbomb", params=params), pids=64, timeout=60)
    out = result.stdout.decode("utf-8", "replace").strip().splitlines()
    if result.limit != "pids":
        # Not killed for it: then fork itself must have been refused below the limit.
        assert out, (result.exit_code, result.limit, result.stderr[-2000:])
        bomb = json.loads(out[0])["forkbomb"]
        assert bomb["error"] == "EAGAIN" and bomb["forked"] < 64, bomb
    assert_host_fine(sb, leftovers, marker)


def test_18_memory_balloon_is_killed_by_memory_limit(sb: Any, marker: str, leftovers: Any) -> None:
    params = {"max_mb": 1024, "marker": marker}
    if sb.mode != "root":
        with pytest.raises(LimitUnavailable):
            sb.run(sb.argv("balloon", params=params), memory="64M", timeout=60)
        return
    result = sb.run(sb.argv("balloon", params=params), memory="64M", timeout=60)
    assert result.limit == "memory", (result.exit_code, result.limit, result.stdout[-500:], result.stderr[-2000:])
    assert result.exit_code != 0 and b"allocated_mb" not in result.stdout, result
    assert_host_fine(sb, leftovers, marker)


def test_18_cpu_quota_is_applied(sb: Any, marker: str) -> None:
    if sb.mode != "root":
        pytest.skip("covered by test_18_unprivileged_limits_are_refused_clearly")
    code = ("import time,sys\nw=time.monotonic();c=time.process_time()\n"
            "while time.monotonic()-w<2: pass\n"
            "print(round((time.process_time()-c)/(time.monotonic()-w),2))")
    result = sb.run(["/usr/bin/python3", "-c", code, marker], cpus=0.25, timeout=30)
    assert result.exit_code == 0, result
    share = float(result.stdout)
    assert share < 0.45, f"a 0.25-CPU sandbox got {share} of a CPU"


# --------------------------------------------------------------------------------------
# limits that need no cgroup: both ways
# --------------------------------------------------------------------------------------


def test_18_cpu_spin_is_killed_by_timeout(sb: Any, marker: str, leftovers: Any) -> None:
    start = time.monotonic()
    result = sb.run(sb.argv("spin", params={"marker": marker}), timeout=2)
    elapsed = time.monotonic() - start
    assert result.limit == "timeout", (result.exit_code, result.limit, result.stderr[-2000:])
    assert result.exit_code != 0 and result.stdout == b"spinning\n", result
    assert elapsed < 12, f"a 2 s timeout took {elapsed:.1f} s"
    assert_host_fine(sb, leftovers, marker)


@pytest.mark.parametrize("directory", ["/tmp", "/var/tmp", "/"])
def test_18_filling_the_writable_layers_is_bounded(sb: Any, marker: str, leftovers: Any, directory: str) -> None:
    params = {"dir": directory, "max_mb": 4096, "marker": marker}
    f = sb.probe("fill", params=params, timeout=300)["fill"]
    # Refused outright (read-only) or stopped by a full filesystem, well before 4 GiB.
    assert f["error"] in {"ENOSPC", "EDQUOT", "EROFS", "EACCES"}, f
    if f["error"] in {"ENOSPC", "EDQUOT"}:
        assert f["written"] <= f["fs_size"] <= (1 << 30) + (1 << 20), f
    assert_host_fine(sb, leftovers, marker)


def test_18_stdout_flood_is_capped(sb: Any, marker: str, leftovers: Any) -> None:
    start = time.monotonic()
    result = sb.run(sb.argv("flood", params={"mb": FLOOD_MIB, "marker": marker}), timeout=120)
    assert result.exit_code == 0, (result.exit_code, result.limit, result.stderr[-2000:])
    assert len(result.stdout) <= ALLOWED_OUTPUT, f"captured {len(result.stdout) >> 20} MiB of a flood"
    assert set(result.stdout[:1024]) == {ord("F")}, result.stdout[:100]
    if hasattr(result, "truncated"):
        assert result.truncated is True, result
    assert time.monotonic() - start < 120
    assert_host_fine(sb, leftovers, marker)


def test_18_fd_exhaustion_is_bounded_by_rlimit(sb: Any, marker: str, leftovers: Any) -> None:
    f = sb.probe("fdexhaust", params={"marker": marker}, timeout=120)["fdexhaust"]
    assert f["error_at_soft"] == "EMFILE" and f["opened_at_soft"] < f["soft"], f
    assert f["error_at_hard"] == "EMFILE" and f["opened_at_hard"] < f["hard"], f
    # The hard limit cannot be raised from inside (no CAP_SYS_RESOURCE), and it is
    # a real bound, not the kernel's maximum.
    assert f["raise_hard"] == "EPERM", f
    assert f["hard"] <= 1 << 20, f
    assert_host_fine(sb, leftovers, marker)
