"""cgroup v2 paths against a fake unified hierarchy under tmp_path (no root needed).

:class:`FakeV2Fs` imitates the kernel's side of cgroupfs where a plain directory tree
cannot: ``mkdir`` populates interface files for the controllers the parent enabled,
``cgroup.subtree_control`` writes are ``+ctl``/``-ctl`` commands checked against
``cgroup.controllers`` and the no-internal-processes rule, ``cgroup.procs`` writes add a
pid, ``cgroup.kill`` SIGKILLs the listed pids, and ``rmdir`` refuses busy cgroups.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from silo.model.errors import InternalError, LimitUnavailable
from silo.sys import cgroups
from silo.sys.cgroups import NoCgroupManager, V1Manager, V2Manager
from silo.sys.cgroups_common import CgroupFs, read_pids
from silo.sys.cgroups_v2 import choose_base

ALL = ("cpu", "memory", "pids")


class FakeV2Fs(CgroupFs):
    def __init__(self, *, swap: bool = True, kill: bool = True, oom_group: bool = True) -> None:
        self.swap, self.kill, self.oom_group = swap, kill, oom_group
        self.fail: dict[str, int] = {}  # file name -> errno to raise on write
        self.readonly: set[str] = set()  # directories where writes/mkdir get EACCES
        self.writes: list[tuple[str, str]] = []
        self.killed: list[int] = []

    # -- tree setup

    def make_root(self, path: Path, controllers: tuple[str, ...] = ALL) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self._populate(path, controllers, root=True)

    def _populate(self, path: Path, controllers: tuple[str, ...], root: bool = False) -> None:
        files = {
            "cgroup.controllers": " ".join(controllers),
            "cgroup.subtree_control": "",
            "cgroup.procs": "",
            "cgroup.events": "populated 0\nfrozen 0\n",
        }
        if self.kill and not root:
            files["cgroup.kill"] = ""
        if "memory" in controllers and not root:
            files["memory.max"] = "max"
            files["memory.events"] = "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n"
            if self.swap:
                files["memory.swap.max"] = "max"
            if self.oom_group:
                files["memory.oom.group"] = "0"
        if "cpu" in controllers and not root:
            files["cpu.max"] = "max 100000"
        if "pids" in controllers and not root:
            files["pids.max"] = "max"
            files["pids.events"] = "max 0\n"
        for name, text in files.items():
            (path / name).write_text(text)

    # -- CgroupFs

    def _check(self, path: str) -> None:
        if any(path == d or path.startswith(d + "/") for d in self.readonly):
            raise PermissionError(errno.EACCES, "Permission denied", path)

    def mkdir(self, path: str) -> None:
        self._check(os.path.dirname(path))
        os.mkdir(path)
        parent = Path(path).parent
        enabled = tuple((parent / "cgroup.subtree_control").read_text().split())
        self._populate(Path(path), enabled)

    def rmdir(self, path: str) -> None:
        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        if (p / "cgroup.procs").read_text().split() or any(x.is_dir() for x in p.iterdir()):
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        for f in p.iterdir():
            f.unlink()
        p.rmdir()

    def write(self, path: str, value: str) -> None:
        self._check(os.path.dirname(path))
        self.writes.append((path, value))
        name = os.path.basename(path)
        if name in self.fail:
            raise OSError(self.fail[name], os.strerror(self.fail[name]), path)
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        d = Path(path).parent
        if name == "cgroup.subtree_control":
            have = (d / "cgroup.controllers").read_text().split()
            on = (d / "cgroup.subtree_control").read_text().split()
            is_root = not (d.parent / "cgroup.controllers").exists()
            if not is_root and (d / "cgroup.procs").read_text().split():
                raise OSError(errno.EBUSY, "Device or resource busy", path)
            for tok in value.split():
                ctl = tok[1:]
                if ctl not in have:
                    raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
                if tok[0] == "+" and ctl not in on:
                    on.append(ctl)
                elif tok[0] == "-" and ctl in on:
                    on.remove(ctl)
            (d / name).write_text(" ".join(on))
            for child in d.iterdir():  # the kernel derives children's cgroup.controllers
                if child.is_dir():
                    (child / "cgroup.controllers").write_text(" ".join(on))
        elif name == "cgroup.procs":
            pids = (d / name).read_text().split()
            (d / name).write_text(" ".join([*pids, value]))
        elif name == "cgroup.kill":
            for pid in read_pids(str(d / "cgroup.procs")):
                os.kill(pid, signal.SIGKILL)
                self.killed.append(pid)
        else:
            with open(path, "r+") as f:  # no O_CREAT: like cgroupfs
                f.write(value)
                f.truncate()


@pytest.fixture
def fake() -> FakeV2Fs:
    return FakeV2Fs()


@pytest.fixture
def root(tmp_path: Path, fake: FakeV2Fs) -> Path:
    r = tmp_path / "cgroup"
    fake.make_root(r)
    return r


def _mgr(root: Path, fake: FakeV2Fs, base: Path | None = None) -> V2Manager:
    return V2Manager(str(root), str(base or root), uid=0, fs=fake)


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"])


def _open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


# ---------------------------------------------------------------- detection

MOUNTINFO_V2 = "30 23 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
MOUNTINFO_HYBRID = (
    "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
    "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    "39 31 0:36 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n"
    "40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n"
    "41 31 0:38 / {root} rw - cgroup2 cgroup2 rw\n"
)


def test_detect_pure_v2(root: Path) -> None:
    m = cgroups.detect(MOUNTINFO_V2.format(root=root), "0::/init.scope\n", 0)
    assert isinstance(m, V2Manager)
    assert m.version == "v2" and m.base == str(root) and m.silo_dir == f"{root}/silo"


def test_detect_hybrid_with_empty_cgroup2_is_v1(tmp_path: Path, fake: FakeV2Fs) -> None:
    fake.make_root(tmp_path / "unified", controllers=("hugetlb",))
    m = cgroups.detect(MOUNTINFO_HYBRID.format(root=tmp_path / "unified"), "0::/\n", 0)
    assert isinstance(m, V1Manager)
    assert m.version == "v1"
    assert m.mounts == {
        "cpu": "/sys/fs/cgroup/cpu,cpuacct",
        "memory": "/sys/fs/cgroup/memory",
        "pids": "/sys/fs/cgroup/pids",
    }


def test_detect_nothing_mounted() -> None:
    m = cgroups.detect("22 1 0:5 / /proc rw - proc proc rw\n", "", 0)
    assert isinstance(m, NoCgroupManager) and m.version == "none"
    with pytest.raises(LimitUnavailable, match=r"^cannot limit memory: no cgroup filesystem"):
        m.create("x", memory=1 << 20, cpus=None, pids=None)
    assert m.sweep() == 0


def test_parse_mountinfo_unescapes_and_prefers_hierarchy_root() -> None:
    text = (
        "50 1 0:40 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "51 1 0:40 / /mnt/my\\040cg rw - cgroup cgroup rw,memory\n"
        "52 1 0:41 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    )
    mounts = cgroups.parse_mountinfo(text)
    assert mounts.v1 == {"memory": "/mnt/my cg"}
    assert mounts.unified == "/sys/fs/cgroup"


def test_open_manager_is_cached() -> None:
    cgroups.reset_manager()
    try:
        m = cgroups.open_manager()
        assert m is cgroups.open_manager()
        assert m.version in ("v1", "v2", "none")
    finally:
        cgroups.reset_manager()


# ---------------------------------------------------------------- create as root


def test_create_places_and_writes_all_limits(root: Path, fake: FakeV2Fs) -> None:
    m = _mgr(root, fake)
    cg = m.create("sbx1", memory=256 << 20, cpus=1.5, pids=64)
    leaf = root / "silo" / "sbx1"
    assert cg.path == str(leaf)
    assert (leaf / "memory.max").read_text() == str(256 << 20)
    assert (leaf / "memory.swap.max").read_text() == "0"
    assert (leaf / "memory.oom.group").read_text() == "1"
    assert (leaf / "cpu.max").read_text() == "150000 100000"
    assert (leaf / "pids.max").read_text() == "64"
    for parent in (root, root / "silo"):
        assert sorted((parent / "cgroup.subtree_control").read_text().split()) == list(ALL)
    assert m.live == {"sbx1"}
    cg.destroy()
    assert not leaf.exists() and m.live == set()


def test_controllers_enabled_only_when_asked_and_once(root: Path, fake: FakeV2Fs) -> None:
    m = _mgr(root, fake)
    a = m.create("a", memory=None, cpus=None, pids=10)
    assert (root / "cgroup.subtree_control").read_text().split() == ["pids"]
    assert (root / "silo" / "cgroup.subtree_control").read_text().split() == ["pids"]
    assert not (root / "silo" / "a" / "memory.max").exists()
    assert a.event_fds() and len(a.event_fds()) == 1
    b = m.create("b", memory=1 << 30, cpus=None, pids=None)
    assert (root / "cgroup.subtree_control").read_text().split() == ["pids", "memory"]
    fake.writes.clear()
    c = m.create("c", memory=1 << 30, cpus=None, pids=10)
    assert not [w for w in fake.writes if w[0].endswith("subtree_control")]
    for cg in (a, b, c):
        cg.destroy()


def test_small_cpu_share_is_clamped_to_kernel_minimum(root: Path, fake: FakeV2Fs) -> None:
    cg = _mgr(root, fake).create("tiny", memory=None, cpus=0.001, pids=None)
    assert (root / "silo" / "tiny" / "cpu.max").read_text() == "1000 100000"
    assert cg.event_fds() == []  # cpu has no events to watch
    cg.destroy()


def test_missing_swap_and_oom_group_files_are_skipped(tmp_path: Path) -> None:
    fake = FakeV2Fs(swap=False, oom_group=False)
    r = tmp_path / "cg"
    fake.make_root(r)
    m = _mgr(r, fake)
    cg = m.create("noswap", memory=64 << 20, cpus=None, pids=None)
    assert not (r / "silo" / "noswap" / "memory.swap.max").exists()
    assert not (r / "silo" / "noswap" / "memory.oom.group").exists()
    fake.writes.clear()
    cg2 = m.create("noswap2", memory=64 << 20, cpus=None, pids=None)
    assert [os.path.basename(p) for p, _ in fake.writes] == ["memory.max"]  # cached
    cg.destroy()
    cg2.destroy()


def test_unavailable_controller_raises_and_creates_nothing(tmp_path: Path) -> None:
    fake = FakeV2Fs()
    r = tmp_path / "unified"
    fake.make_root(r, controllers=("hugetlb",))  # hybrid: controllers bound to v1
    m = _mgr(r, fake)
    with pytest.raises(LimitUnavailable) as ei:
        m.create("x", memory=32 << 20, cpus=None, pids=None)
    msg = ei.value.message
    assert msg.startswith("cannot limit memory: the cgroup v2 'memory' controller is not avail")
    assert "\n" not in msg
    assert not (r / "silo").exists()


def test_failed_limit_write_rolls_back(root: Path, fake: FakeV2Fs) -> None:
    m = _mgr(root, fake)
    fake.fail["cpu.max"] = errno.EINVAL
    before = _open_fds()
    with pytest.raises(LimitUnavailable, match=r"^cannot limit cpu: writing '50000 100000'"):
        m.create("bad", memory=32 << 20, cpus=0.5, pids=5)
    assert not (root / "silo" / "bad").exists()
    assert _open_fds() == before
    assert m.live == set()


def test_duplicate_and_invalid_names(root: Path, fake: FakeV2Fs) -> None:
    m = _mgr(root, fake)
    cg = m.create("dup", memory=None, cpus=None, pids=3)
    with pytest.raises(InternalError, match="already exists"):
        m.create("dup", memory=None, cpus=None, pids=3)
    assert (root / "silo" / "dup").is_dir()  # the existing one is not removed
    for bad in ("../x", "a/b", ".", "", ".hidden", "x" * 200):
        with pytest.raises(ValueError):
            m.create(bad, memory=None, cpus=None, pids=3)
    with pytest.raises(ValueError):
        m.create("neg", memory=-1, cpus=None, pids=None)
    cg.destroy()


def test_controller_disabled_behind_our_back_is_reenabled(root: Path, fake: FakeV2Fs) -> None:
    m = _mgr(root, fake)
    m.create("one", memory=1 << 20, cpus=None, pids=None).destroy()
    (root / "silo" / "cgroup.subtree_control").write_text("")
    with pytest.raises(LimitUnavailable, match=r"memory\.max is missing"):
        m.create("two", memory=1 << 20, cpus=None, pids=None)
    assert not (root / "silo" / "two").exists()
    m.create("three", memory=1 << 20, cpus=None, pids=None).destroy()


def test_silo_dir_removed_behind_our_back_is_recreated(root: Path, fake: FakeV2Fs) -> None:
    m = _mgr(root, fake)
    m.create("one", memory=None, cpus=None, pids=2).destroy()
    fake.rmdir(str(root / "silo"))
    cg = m.create("two", memory=None, cpus=None, pids=2)
    assert (root / "silo" / "two" / "pids.max").read_text() == "2"
    cg.destroy()


# ---------------------------------------------------------------- rootless placement

OWN = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/term.scope\n"


def test_rootless_uses_the_delegated_parent(tmp_path: Path, fake: FakeV2Fs) -> None:
    r = tmp_path / "cg"
    fake.make_root(r)
    app = r / "user.slice/user-1000.slice/user@1000.service/app.slice"
    parent = r
    for part in app.relative_to(r).parts:
        fake.write(str(parent / "cgroup.subtree_control"), "+cpu +memory +pids")
        parent = parent / part
        fake.mkdir(str(parent))
    fake.mkdir(str(app / "term.scope"))
    fake.write(str(app / "term.scope" / "cgroup.procs"), str(os.getpid()))
    base, why = choose_base(str(r), OWN, 1000)
    assert base == str(app) and why == ""
    m = V2Manager(str(r), base, uid=1000, fs=fake)
    cg = m.create("u1", memory=64 << 20, cpus=None, pids=20)
    assert cg.path == f"{app}/silo/u1"
    assert (app / "silo" / "u1" / "memory.max").read_text() == str(64 << 20)
    cg.destroy()


def test_rootless_without_delegation_is_unavailable(tmp_path: Path, fake: FakeV2Fs) -> None:
    r = tmp_path / "cg"
    fake.make_root(r)
    own = "0::/user.slice/user-1000.slice/session-2.scope\n"
    base, why = choose_base(str(r), own, 1000, writable=lambda p: False)
    assert base is None
    m = V2Manager(str(r), base, uid=1000, why_not=why, fs=fake)
    with pytest.raises(LimitUnavailable) as ei:
        m.create("u", memory=None, cpus=None, pids=5)
    assert ei.value.message.startswith(
        "cannot limit pids: no delegated cgroup v2 subtree is writable by uid 1000"
    )
    assert "run as root" in ei.value.message
    assert m.sweep() == 0


def test_rootless_parent_not_writable_when_creating(tmp_path: Path, fake: FakeV2Fs) -> None:
    r = tmp_path / "cg"
    fake.make_root(r)
    fake.readonly.add(str(r))
    m = V2Manager(str(r), str(r), uid=1000, fs=fake)
    with pytest.raises(LimitUnavailable, match="not writable by uid 1000"):
        m.create("u", memory=1 << 20, cpus=None, pids=None)


def test_parent_with_processes_cannot_enable_controllers(tmp_path: Path, fake: FakeV2Fs) -> None:
    r = tmp_path / "cg"
    fake.make_root(r)
    fake.write(str(r / "cgroup.subtree_control"), "+memory")
    fake.mkdir(str(r / "busy"))
    fake.write(str(r / "busy" / "cgroup.procs"), "4242")
    m = V2Manager(str(r), str(r / "busy"), uid=1000, fs=fake)
    with pytest.raises(LimitUnavailable, match="no-internal-processes"):
        m.create("u", memory=1 << 20, cpus=None, pids=None)


def test_root_process_in_cgroup_namespace_root(tmp_path: Path) -> None:
    assert choose_base("/sys/fs/cgroup", "0::/\n", 0) == ("/sys/fs/cgroup", "")
    base, why = choose_base(str(tmp_path), "1:name=systemd:/\n", 1000)
    assert base is None and "not on the cgroup v2 hierarchy" in why


# ---------------------------------------------------------------- events and limit_hit


def test_oom_event_wakes_selector_and_is_reported(root: Path, fake: FakeV2Fs) -> None:
    cg = _mgr(root, fake).create("oom", memory=32 << 20, cpus=None, pids=8)
    fds = cg.event_fds()
    assert len(fds) == 1
    assert select.select(fds, [], [], 0)[0] == []
    assert cg.limit_hit() is None
    events = root / "silo" / "oom" / "memory.events"
    events.write_text("low 0\nhigh 0\nmax 7\noom 0\noom_kill 0\noom_group_kill 0\n")
    assert select.select(fds, [], [], 2)[0] == fds  # memory.max reached, no OOM yet
    assert cg.limit_hit() is None
    assert select.select(fds, [], [], 0)[0] == []  # drained by limit_hit
    events.write_text("low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\noom_group_kill 1\n")
    assert select.select(fds, [], [], 2)[0] == fds
    assert cg.limit_hit() == "memory"
    cg.destroy()
    with pytest.raises(OSError):
        os.fstat(fds[0])


def test_pids_event_is_reported(root: Path, fake: FakeV2Fs) -> None:
    cg = _mgr(root, fake).create("forks", memory=None, cpus=None, pids=8)
    fds = cg.event_fds()
    (root / "silo" / "forks" / "pids.events").write_text("max 3\n")
    assert select.select(fds, [], [], 2)[0] == fds
    assert cg.limit_hit() == "pids"
    cg.destroy()


# ---------------------------------------------------------------- kill / destroy / sweep


def test_kill_uses_cgroup_kill(root: Path, fake: FakeV2Fs) -> None:
    cg = _mgr(root, fake).create("k", memory=None, cpus=None, pids=8)
    proc = _sleeper()
    cg.add(proc.pid)
    assert read_pids(f"{cg.path}/cgroup.procs") == [proc.pid]
    cg.kill()
    assert proc.wait(5) == -signal.SIGKILL
    assert fake.killed == [proc.pid]
    (Path(cg.path) / "cgroup.procs").write_text("")  # the kernel would do this
    cg.destroy()
    assert not Path(cg.path).exists()


def test_kill_falls_back_to_procs_loop(tmp_path: Path) -> None:
    fake = FakeV2Fs(kill=False)
    r = tmp_path / "cg"
    fake.make_root(r)
    m = _mgr(r, fake)
    cg = m.create("k", memory=None, cpus=1.0, pids=None)
    procs = [_sleeper(), _sleeper()]
    for p in procs:
        cg.add(p.pid)
    cg.kill()
    for p in procs:
        assert p.wait(5) == -signal.SIGKILL
    assert fake.killed == []


def test_kill_loop_never_signals_a_pid_that_left_the_cgroup(tmp_path: Path) -> None:
    fake = FakeV2Fs(kill=False)
    r = tmp_path / "cg"
    fake.make_root(r)
    cg = _mgr(r, fake).create("k", memory=None, cpus=None, pids=5)
    outsider = _sleeper()
    procs = Path(cg.path) / "cgroup.procs"
    reads = 0
    real_read = cgroups._c.read_file

    def read_file(path: str) -> str:
        nonlocal reads
        text = real_read(path)
        if path == str(procs):
            reads += 1
            if reads == 1:  # listed at first, gone by the re-check (pid reuse window)
                return str(outsider.pid)
            return ""
        return text

    cgroups._c.read_file = read_file  # type: ignore[assignment]
    try:
        cg.kill()
    finally:
        cgroups._c.read_file = real_read  # type: ignore[assignment]
    time.sleep(0.05)
    assert outsider.poll() is None
    outsider.kill()
    outsider.wait()


def test_destroy_busy_then_retry_and_idempotent(root: Path, fake: FakeV2Fs) -> None:
    m = _mgr(root, fake)
    cg = m.create("busy", memory=1 << 20, cpus=None, pids=None)
    leaf = Path(cg.path)
    (leaf / "cgroup.procs").write_text("999999")
    t = time.perf_counter()
    cg.destroy()  # busy: bounded retry, no exception
    assert time.perf_counter() - t < 0.2
    assert leaf.is_dir() and m.live == {"busy"}
    (leaf / "cgroup.procs").write_text("")
    cg.destroy()
    assert not leaf.exists() and m.live == set()
    cg.destroy()
    cg.kill()  # on a removed cgroup: nothing to do, no error


def test_destroy_tolerates_external_removal(root: Path, fake: FakeV2Fs) -> None:
    cg = _mgr(root, fake).create("ext", memory=None, cpus=None, pids=3)
    fake.rmdir(cg.path)
    cg.destroy()
    cg.destroy()


def test_destroy_removes_child_cgroups_first(root: Path, fake: FakeV2Fs) -> None:
    cg = _mgr(root, fake).create("nested", memory=None, cpus=None, pids=3)
    fake.mkdir(f"{cg.path}/inner")
    cg.destroy()
    assert not Path(cg.path).exists()


def test_sweep_removes_only_old_empty_leftovers(root: Path, fake: FakeV2Fs) -> None:
    m = _mgr(root, fake)
    live = m.create("live", memory=None, cpus=None, pids=3)
    silo = root / "silo"
    for name in ("crashed-1", "crashed-2", "busy", "young"):
        fake.mkdir(str(silo / name))
    (silo / "busy" / "cgroup.procs").write_text("4242")
    old = time.time() - 60
    for name in ("crashed-1", "crashed-2", "busy", "live"):
        os.utime(silo / name, (old, old))
    assert m.sweep() == 2
    assert sorted(p.name for p in silo.iterdir() if p.is_dir()) == ["busy", "live", "young"]
    assert m.sweep(min_age=0) == 1  # "young" now; "live" is ours, "busy" still busy
    live.destroy()
