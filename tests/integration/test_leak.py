"""Leak test: 500 sandboxes through one ``Sandbox`` leave the spawner as they found it.

After the runs (450 plain ``/bin/true``, 50 under a memory limit, plus a few killed and
failed ones): no new host mounts, no child process of the spawner left, the spawner's
open fd count back to its baseline, no cgroup directory of the spawner's jobs left
under ``/sys/fs/cgroup/*/silo/``, nothing in the scratch directory, and this process's
own fd count unchanged.

The spawner is the SDK's per-process helper: a child of this test process whose command
line runs ``silo.spawner``.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import children, comm, sdk_spawner, settle

from silo import CommandNotFound, Sandbox
from silo.engine import host as hostmod

pytestmark = [pytest.mark.root, pytest.mark.slow]

if os.geteuid() != 0:
    pytest.skip("the leak test runs as root", allow_module_level=True)

def _fds(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(f"{fd}->{os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except OSError:
            continue
    return sorted(out)


def _mounts() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {" ".join(line.split()[3:5]) for line in f}


def _cgroups(spawner: int) -> list[str]:
    pattern = f"job-{spawner}-*"
    return sorted(glob.glob(f"/sys/fs/cgroup/*/silo/{pattern}") + glob.glob(f"/sys/fs/cgroup/silo/{pattern}"))


def test_500_runs_leave_nothing_behind() -> None:
    with Sandbox() as sb, Sandbox(memory="64M") as limited:
        # warm up: the spawner is started, both connections exist and sit idle
        assert sb.run(["/bin/true"]).exit_code == 0
        assert limited.run(["/bin/true"]).exit_code == 0
        spawner = sdk_spawner()
        time.sleep(0.5)  # the spawner refills its network-namespace pool when idle
        fds_before = _fds(spawner)
        own_fds_before = len(os.listdir("/proc/self/fd"))
        mounts_before = _mounts()

        start = time.monotonic()
        for _ in range(450):
            r = sb.run(["/bin/true"])
            assert r.exit_code == 0, r.stderr
        for _ in range(50):
            r = limited.run(["/bin/true"])
            assert r.exit_code == 0, r.stderr
        # and some that end badly
        for _ in range(5):
            assert sb.run(["sleep", "5"], timeout=0.05).exit_code == 137
            with pytest.raises(CommandNotFound):
                sb.run(["no-such-command"])
            proc = limited.start(["sleep", "30"])
            proc.kill()
            assert proc.wait(timeout=10).exit_code == 137
        elapsed = time.monotonic() - start
        assert elapsed < 120, f"500 runs took {elapsed:.1f}s"

        # what stays while the Sandboxes are open: one parked warm sandbox per plan
        warm = settle(lambda: children(spawner),
                       lambda v: len(v) <= 2 and all(comm(pid) == "silo-warm" for pid in v))
        assert len(warm) <= 2 and all(comm(pid) == "silo-warm" for pid in warm), [
            (pid, comm(pid), os.readlink(f"/proc/{pid}/exe") if os.path.exists(f"/proc/{pid}") else "gone")
            for pid in warm]
    # closing the Sandboxes drops their warm sandboxes: nothing is left
    assert settle(lambda: children(spawner), lambda v: not v) == [], "processes left under the spawner"
    assert settle(lambda: _cgroups(spawner), lambda v: not v) == [], "cgroups left behind"
    fds_after = settle(lambda: _fds(spawner), lambda v: len(v) <= len(fds_before))
    assert len(fds_after) <= len(fds_before), sorted(set(fds_after) - set(fds_before))
    assert _mounts() - mounts_before == set()
    assert os.listdir(hostmod.host().scratch) == []
    assert len(os.listdir("/proc/self/fd")) <= own_fds_before


_BACK_TO_BACK = r"""
import sys
sys.path.insert(0, sys.argv[1])
from silo import Sandbox
with Sandbox() as sb:
    for _ in range(int(sys.argv[2])):
        r = sb.run(["/bin/true"])
        assert r.exit_code == 0, r
print("ok")
"""


def test_two_processes_running_back_to_back_both_finish() -> None:
    """Each process has its own spawner, warm sandboxes hand over and exit in the same
    event batches; a spawner that mishandled a batch (a closed fd used again) dropped
    its clients here."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    procs = [subprocess.Popen([sys.executable, "-c", _BACK_TO_BACK, src, "400"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out == b"ok\n", err.decode()[-2000:]
