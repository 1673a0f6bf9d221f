"""Real cgroup v1 limits as root (this machine's hybrid layout).

Each test uses its own placement directory (``silo-test-<pid>-<n>`` instead of ``silo``)
so that sweeping here never touches cgroups of sandboxes that other code is running.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import signal
import time
from collections.abc import Iterator

import pytest

from silo.model.errors import LimitUnavailable
from silo.sys import cgroups
from silo.sys.cgroups import V1Manager

pytestmark = pytest.mark.root

MiB = 1 << 20
_counter = itertools.count()


def _v1_mounts() -> dict[str, str]:
    with open("/proc/self/mountinfo") as f:
        return cgroups.parse_mountinfo(f.read()).v1


if os.geteuid() != 0:
    pytest.skip("cgroup integration tests need root", allow_module_level=True)
if set(_v1_mounts()) != {"memory", "cpu", "pids"}:
    pytest.skip("needs cgroup v1 memory, cpu and pids hierarchies", allow_module_level=True)


def _remove_tree(path: str) -> None:
    if not os.path.isdir(path):
        return
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            _remove_tree(entry.path)
    with contextlib.suppress(OSError):
        os.rmdir(path)


@pytest.fixture
def mgr() -> Iterator[V1Manager]:
    sub = f"silo-test-{os.getpid()}-{next(_counter)}"
    m = V1Manager(_v1_mounts(), subdir=sub)
    yield m
    for mount in m.mounts.values():
        base = f"{mount}/{sub}"
        if os.path.isdir(base):
            for entry in os.scandir(base):
                if entry.is_dir(follow_symlinks=False):
                    _kill_all(f"{entry.path}/cgroup.procs")
        _remove_tree(base)


def _kill_all(procs: str) -> None:
    with contextlib.suppress(OSError), open(procs) as f:
        for pid in f.read().split():
            with contextlib.suppress(OSError):
                os.kill(int(pid), signal.SIGKILL)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _wait_empty(procs: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(procs) or not _read(procs):
            return True
        time.sleep(0.01)
    return False


class Child:
    """A forked child that waits on a pipe, then runs ``body`` and exits."""

    def __init__(self, body: object) -> None:
        r, w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # child
            code = 0
            try:
                os.close(w)
                os.read(r, 1)
                body()  # type: ignore[operator]
            except BaseException:
                code = 1
            os._exit(code)
        os.close(r)
        self._go = w

    def go(self) -> None:
        os.write(self._go, b"x")
        os.close(self._go)

    def wait(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return status
            time.sleep(0.01)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("child did not exit in time")


def _balloon() -> None:
    chunks = []
    while True:
        chunks.append(bytearray(MiB))  # zero-filled, so every page is touched


def _sleep_forever() -> None:
    while True:
        time.sleep(60)


# ---------------------------------------------------------------- create / add


def test_open_manager_picks_v1_here() -> None:
    cgroups.reset_manager()
    try:
        assert cgroups.open_manager().version == "v1"
        assert cgroups.open_manager() is cgroups.open_manager()
    finally:
        cgroups.reset_manager()


def test_create_writes_limits_and_add_moves_child(mgr: V1Manager) -> None:
    cg = mgr.create("limits", memory=32 * MiB, cpus=0.5, pids=10)
    try:
        mem, cpu, pids = cg.dirs["memory"], cg.dirs["cpu"], cg.dirs["pids"]
        assert mem == f"/sys/fs/cgroup/memory/{mgr.subdir}/limits"
        assert _read(f"{mem}/memory.limit_in_bytes") == str(32 * MiB)
        if os.path.exists(f"{mem}/memory.memsw.limit_in_bytes"):
            assert _read(f"{mem}/memory.memsw.limit_in_bytes") == str(32 * MiB)
        assert _read(f"{cpu}/cpu.cfs_period_us") == "100000"
        assert _read(f"{cpu}/cpu.cfs_quota_us") == "50000"
        assert _read(f"{pids}/pids.max") == "10"
        child = Child(_sleep_forever)
        cg.add(child.pid)
        for path in (mem, cpu, pids):
            assert str(child.pid) in _read(f"{path}/cgroup.procs").split()
        own = _read(f"/proc/{child.pid}/cgroup")
        assert f"memory:/{mgr.subdir}/limits" in own
        assert f"pids:/{mgr.subdir}/limits" in own
        cg.kill()
        assert os.WIFSIGNALED(child.wait())
    finally:
        cg.destroy()


def test_only_requested_controllers_are_created(mgr: V1Manager) -> None:
    cg = mgr.create("pidsonly", memory=None, cpus=None, pids=5)
    try:
        assert set(cg.dirs) == {"pids"}
        assert not os.path.exists(f"/sys/fs/cgroup/memory/{mgr.subdir}")
        assert not os.path.exists(f"/sys/fs/cgroup/cpu/{mgr.subdir}")
    finally:
        cg.destroy()


# ---------------------------------------------------------------- limits hit


def test_memory_balloon_is_oom_killed_and_reported(mgr: V1Manager) -> None:
    cg = mgr.create("balloon", memory=32 * MiB, cpus=None, pids=None)
    try:
        fds = cg.event_fds()
        assert len(fds) == 1
        assert cg.limit_hit() is None
        child = Child(_balloon)
        cg.add(child.pid)
        child.go()
        ready, _, _ = select.select(fds, [], [], 20)
        assert ready == fds, "the OOM eventfd did not become readable"
        status = child.wait()
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert cg.limit_hit() == "memory"
        oom = _read(f"{cg.dirs['memory']}/memory.oom_control")
        assert "oom_kill 1" in oom
        # limit_hit drained the eventfd: a level-triggered selector will not spin.
        assert select.select(fds, [], [], 0)[0] == []
    finally:
        cg.destroy()


def _fork_loop() -> None:
    while True:
        try:
            pid = os.fork()
        except BlockingIOError:
            os._exit(0)  # fork refused by pids.max: what we wanted
        if pid == 0:
            _sleep_forever()


def test_fork_loop_past_pids_max_is_reported(mgr: V1Manager) -> None:
    cg = mgr.create("forkloop", memory=None, cpus=None, pids=8)
    try:
        assert cg.limit_hit() is None
        child = Child(_fork_loop)
        cg.add(child.pid)
        child.go()
        status = child.wait()
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        procs = f"{cg.dirs['pids']}/cgroup.procs"
        assert len(_read(procs).split()) == 7  # the loop's 7 sleepers
        fds = cg.event_fds()
        if fds:  # the kernel notifies pids.events on this hierarchy (probed)
            assert select.select(fds, [], [], 5)[0] == fds
        assert cg.limit_hit() == "pids"
        assert "max 1" in _read(f"{cg.dirs['pids']}/pids.events")
        cg.kill()
        assert _wait_empty(procs)
    finally:
        cg.destroy()


def _spin() -> None:
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        pass


def test_cpu_quota_throttles(mgr: V1Manager) -> None:
    cg = mgr.create("cpu", memory=None, cpus=0.1, pids=None)
    try:
        cpu = cg.dirs["cpu"]
        assert _read(f"{cpu}/cpu.cfs_quota_us") == "10000"
        child = Child(_spin)
        cg.add(child.pid)
        child.go()
        child.wait()
        stat = dict(line.split() for line in _read(f"{cpu}/cpu.stat").splitlines())
        assert int(stat["nr_throttled"]) > 0
    finally:
        cg.destroy()


# ---------------------------------------------------------------- kill / destroy / sweep


def _tree() -> None:
    for _ in range(3):
        if os.fork() == 0:
            if os.fork() == 0:
                _sleep_forever()
            _sleep_forever()
    _sleep_forever()


def test_kill_kills_a_process_tree(mgr: V1Manager) -> None:
    cg = mgr.create("tree", memory=64 * MiB, cpus=1.0, pids=50)
    try:
        child = Child(_tree)
        cg.add(child.pid)
        child.go()
        procs = f"{cg.dirs['pids']}/cgroup.procs"
        deadline = time.monotonic() + 5
        while len(_read(procs).split()) < 7 and time.monotonic() < deadline:
            time.sleep(0.01)
        members = [int(p) for p in _read(procs).split()]
        assert len(members) == 7
        t = time.perf_counter()
        cg.kill()
        elapsed = time.perf_counter() - t
        assert elapsed < 0.1
        assert os.WIFSIGNALED(child.wait())
        assert _wait_empty(procs)
        for path in cg.dirs.values():
            assert _read(f"{path}/cgroup.procs") == ""
    finally:
        cg.destroy()


def test_destroy_leaves_nothing_and_is_idempotent(mgr: V1Manager) -> None:
    cg = mgr.create("gone", memory=32 * MiB, cpus=0.5, pids=10)
    dirs = dict(cg.dirs)
    fds = cg.event_fds()
    child = Child(lambda: None)
    cg.add(child.pid)
    child.go()
    child.wait()
    cg.destroy()
    for path in dirs.values():
        assert not os.path.exists(path)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    cg.destroy()  # again: no error
    assert mgr.sweep(min_age=0) == 0


def test_destroy_of_a_busy_cgroup_does_not_raise_and_can_be_retried(mgr: V1Manager) -> None:
    cg = mgr.create("busy", memory=None, cpus=None, pids=10)
    path = cg.dirs["pids"]
    child = Child(_sleep_forever)
    cg.add(child.pid)
    t = time.perf_counter()
    cg.destroy()  # still has a process: gives up after a short retry
    assert time.perf_counter() - t < 0.2
    assert os.path.isdir(path)
    assert mgr.sweep(min_age=0) == 0  # busy and live: left alone
    cg.kill()
    child.wait()
    cg.destroy()
    assert not os.path.exists(path)


def test_destroy_after_external_removal(mgr: V1Manager) -> None:
    cg = mgr.create("ext", memory=None, cpus=1.0, pids=None)
    os.rmdir(cg.dirs["cpu"])
    cg.destroy()
    cg.destroy()


def test_sweep_removes_empty_leftovers_only(mgr: V1Manager) -> None:
    live = mgr.create("live", memory=32 * MiB, cpus=None, pids=10)
    try:
        for ctl in ("memory", "pids"):
            os.mkdir(f"{mgr.mounts[ctl]}/{mgr.subdir}/crashed-1")
        os.mkdir(f"{mgr.mounts['memory']}/{mgr.subdir}/crashed-2")
        os.mkdir(f"{mgr.mounts['pids']}/{mgr.subdir}/busy")
        child = Child(_sleep_forever)
        with open(f"{mgr.mounts['pids']}/{mgr.subdir}/busy/cgroup.procs", "w") as f:
            f.write(str(child.pid))
        assert mgr.sweep() == 0  # younger than the default minimum age: maybe not ours
        assert mgr.sweep(min_age=0) == 2
        for name in ("crashed-1", "crashed-2"):
            for ctl in ("memory", "pids"):
                assert not os.path.exists(f"{mgr.mounts[ctl]}/{mgr.subdir}/{name}")
        assert os.path.isdir(f"{mgr.mounts['pids']}/{mgr.subdir}/busy")
        assert all(os.path.isdir(p) for p in live.dirs.values())
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert mgr.sweep(min_age=0) == 1
    finally:
        live.destroy()


# ---------------------------------------------------------------- errors


def test_failed_create_leaves_nothing_behind(mgr: V1Manager, tmp_path: object) -> None:
    # "pids" points at a plain directory: its pids.max does not exist, so the write fails
    # after the memory cgroup was already created; create() must undo that.
    broken = V1Manager({"memory": mgr.mounts["memory"], "pids": str(tmp_path)}, subdir=mgr.subdir)
    with pytest.raises(LimitUnavailable, match=r"^cannot limit pids: writing '5' to"):
        broken.create("half", memory=32 * MiB, cpus=None, pids=5)
    assert not os.path.exists(f"{mgr.mounts['memory']}/{mgr.subdir}/half")
    assert not os.path.exists(f"{tmp_path}/{mgr.subdir}/half")
    assert broken.live == set()


def test_unmounted_controller_is_unavailable(mgr: V1Manager) -> None:
    partial = V1Manager({"memory": mgr.mounts["memory"]}, subdir=mgr.subdir)
    with pytest.raises(LimitUnavailable, match="'pids' controller is not mounted"):
        partial.create("x", memory=32 * MiB, cpus=None, pids=5)
    assert not os.path.exists(f"{mgr.mounts['memory']}/{mgr.subdir}/x")


def _as_nobody(subdir: str, limits: dict[str, object]) -> str:
    """Run create() in a child as uid 65534; return the error text (or 'created')."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            cgroups.reset_manager()
            m = cgroups.detect(
                _read("/proc/self/mountinfo"), _read("/proc/self/cgroup"), os.geteuid()
            )
            assert isinstance(m, V1Manager)
            m.subdir = subdir
            try:
                m.create("nobody", **limits)  # type: ignore[arg-type]
                msg = "created"
            except LimitUnavailable as e:
                msg = f"LimitUnavailable: {e.message}"
            os.write(w, msg.encode())
        finally:
            os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return out.decode()


@pytest.mark.parametrize("precreate", [False, True])
def test_unprivileged_user_gets_limit_unavailable(mgr: V1Manager, precreate: bool) -> None:
    if precreate:  # the silo directory already exists (root-owned, 0755)
        os.mkdir(f"{mgr.mounts['memory']}/{mgr.subdir}")
    msg = _as_nobody(mgr.subdir, {"memory": 32 * MiB, "cpus": 1.0, "pids": None})
    assert msg == (
        "LimitUnavailable: cannot limit memory: the cgroup v1 'memory' controller is not "
        "writable by uid 65534; run as root or use a cgroup v2 system with delegation"
    )
    assert "\n" not in msg
    for ctl in ("memory", "cpu"):
        assert not os.path.exists(f"{mgr.mounts[ctl]}/{mgr.subdir}/nobody")
    msg = _as_nobody(mgr.subdir, {"memory": None, "cpus": None, "pids": 3})
    assert msg.startswith("LimitUnavailable: cannot limit pids: the cgroup v1 'pids' controller")
