"""Escape attempts against the ``process`` isolation level (SECURITY.md classes 1-17).

Every test runs twice through ``run_sandbox``: silo started by root and silo started
by an unprivileged user. Each one makes the attempt from inside the sandbox (see
``probe.py``) and asserts the specific refusal: the errno, the absence, the value.
Writability is only ever checked by opening for write; no byte is written to any
existing file, on the host or in the sandbox. The resource-exhaustion class (18)
lives in ``test_resource_exhaustion.py``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from silo import SiloError, SpecError

REPO = Path(__file__).resolve().parents[2]
# What a refused open-for-write may say; each test narrows it where it can.
WRITE_REFUSED = {"EROFS", "EACCES", "EPERM"}
STDIO_TARGET = re.compile(r"^(pipe:\[\d+\]|socket:\[\d+\]|/dev/null|/dev/pts/\d+)$")
# Where a process inside may legitimately point an fd: stdio kinds, anonymous inodes,
# its own memfds, its own /dev nodes. Anything else absolute is a host path.
INSIDE_FD_TARGET = re.compile(r"^(pipe:|socket:|anon_inode:|/memfd:|/dev/(null|zero|u?random|pts/\d+|ptmx)$)")


def host_ns(name: str) -> str:
    return os.readlink(f"/proc/self/ns/{name}")


# --------------------------------------------------------------------------------------
# 1. runtime binary overwrite (CVE-2019-5736)
# --------------------------------------------------------------------------------------


def test_01_no_host_runtime_process_visible(sb: Any) -> None:
    f = sb.probe("1")["1"]
    procs = {p["pid"]: p for p in f["processes"]}
    # Only the sandbox's init and the probe itself: no spawner, no python of the host.
    assert set(procs) == {1, f["self"]}, f["processes"]
    init = procs[1]
    # PID 1 is silo-init run from a sealed memfd, never a file of the host that could
    # be reopened through /proc/1/exe and overwritten.
    assert init["exe"].startswith("/memfd:silo-init"), init
    assert init["comm"] == "silo-init" or (init["cmdline"] and init["cmdline"][0] == "silo-init"), init
    for p in procs.values():
        assert "/work" not in p["exe"] and ".venv" not in p["exe"], p


def test_01_visible_executables_cannot_be_reopened_for_write(sb: Any) -> None:
    f = sb.probe("1")["1"]
    for p in f["processes"]:
        assert p["exe_open_write"] in {"ETXTBSY", "EACCES", "EPERM", "EROFS"}, p
        if "exe_path_open_write" in p:
            assert p["exe_path_open_write"] in {"ETXTBSY", "EACCES", "EPERM", "EROFS"}, p


def test_01_writes_to_system_dirs_never_reach_the_host(sb: Any, marker: str) -> None:
    targets = [f"/usr/bin/{marker}", f"/usr/lib/{marker}", f"/etc/{marker}", f"/{marker}"]
    try:
        f = sb.probe("create", params={"paths": targets})["create"]
        for path in targets:
            # Inside, a new file may land in the private writable layer, or be refused.
            assert f[path] in {"ok", "EROFS", "EACCES", "EPERM"}, (path, f[path])
            assert not os.path.lexists(path), f"{path} created inside the sandbox appeared on the host"
    finally:
        for path in targets:
            if os.path.lexists(path):
                os.unlink(path)


# --------------------------------------------------------------------------------------
# 2. leaked host fds / cwd (CVE-2024-21626, CVE-2016-9962)
# --------------------------------------------------------------------------------------

# Python falls back to a cached /dev/urandom fd at start-up when getrandom(2) is
# refused; a fixed hash seed keeps its start-up from opening anything, so every fd
# the probe sees at its first line came from silo.
NO_URANDOM = {"PYTHONHASHSEED": "0"}


@pytest.fixture
def stdio_target() -> re.Pattern[str]:
    """What a sandbox's stdio may point to (the gvisor level's re-run adds host:[N])."""
    return STDIO_TARGET


def test_02_only_stdio_reaches_the_sandbox(sb: Any, stdio_target: re.Pattern[str]) -> None:
    f = sb.probe("2", env=NO_URANDOM)["2"]
    assert f["leaked"] == {}, f"fds beyond stdio reached the sandbox: {f['leaked']}"
    assert f["open_numbers"] == [0, 1, 2], f["fds"]
    for n, target in f["stdio"].items():
        assert target is not None and stdio_target.match(target), (n, target)


def test_02_init_holds_no_host_fds(sb: Any) -> None:
    f = sb.probe("2", env=NO_URANDOM)["2"]
    pid1 = f["pid1_fds"]
    assert isinstance(pid1, dict), f"cannot list /proc/1/fd: {pid1}"
    for n, target in pid1.items():
        assert INSIDE_FD_TARGET.match(target), f"PID 1 holds fd {n} -> {target}"


def test_02_cwd_is_inside_the_root(sb: Any) -> None:
    f = sb.probe("2")["2"]
    assert f["cwd_link"] == "/" and f["getcwd"] == "/", f
    # Climbing '..' from the cwd must end at the sandbox's own root, not the host's.
    assert f["climbed_to_root"] is True, f
    assert f["pid1_cwd"] == "/" and f["pid1_root"] == "/", f


def test_02_workdir_is_inside_the_root(sb: Any) -> None:
    f = sb.probe("2", workdir="/tmp")["2"]
    assert f["cwd_link"] == "/tmp" and f["getcwd"] == "/tmp", f
    assert f["climbed_to_root"] is True, f


@pytest.mark.parametrize("bad", ["/proc/self/fd/3", "/proc/self/fd/4", "/proc/self/fd/5",
                                 "/proc/self/fd/7", "/proc/1/fd/3"])
def test_02_workdir_through_proc_fd_is_refused(sb: Any, bad: str) -> None:
    """runc's CVE-2024-21626: a cwd of /proc/self/fd/N reached a host directory fd."""
    try:
        result = sb.run(sb.argv("2"), workdir=bad)
    except SiloError:
        return  # refused up front
    out = result.stdout.decode("utf-8", "replace")
    if result.exit_code == 0 and out.strip():
        f = sb.parse(result)["2"]
        assert f["climbed_to_root"] is True, f"cwd {bad} led OUTSIDE the root: {f}"
        pytest.fail(f"workdir {bad} was accepted (cwd {f['cwd_link']!r}); it must be refused")
    # Refused by silo after the sandbox was made: its own error code, the command never ran.
    assert result.exit_code in (125, 126, 127), (result.exit_code, result.stderr)
    assert out == "", out


# --------------------------------------------------------------------------------------
# 4. masked-path bypass (CVE-2025-31133 class)
# --------------------------------------------------------------------------------------

MASKED_FILES = ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug"]


def assert_masked(masked: dict[str, Any]) -> None:
    for path in MASKED_FILES:
        got = masked[path]
        if got["open"] == "ok":
            assert got.get("read") == "ok" and got["len"] == 0, f"{path} not masked: {got}"
        else:
            assert got["open"] in {"ENOENT", "EACCES", "EPERM"}, (path, got)
    for path in ("/proc/acpi", "/proc/scsi"):
        got = masked[path]
        assert got["open"] != "ok" or got.get("entries") == [], (path, got)


def assert_fresh_procfs_denied(mounts: dict[str, str]) -> None:
    assert mounts["unshare_mnt"] == "EPERM", mounts
    assert mounts["mount_proc"] == "EPERM", mounts
    assert mounts["mount_proc_ro"] == "EPERM", mounts
    assert mounts["bind_proc"] == "EPERM", mounts
    assert mounts["fsopen_proc"] in {"EPERM", "ENOSYS"}, mounts


def test_04_masks_hold_and_fresh_procfs_is_denied(sb: Any) -> None:
    f = sb.probe("4")["4"]
    assert_masked(f["masked"])
    assert_fresh_procfs_denied(f["mounts"])
    for path in ("/proc/sys/kernel/core_pattern", "/proc/sysrq-trigger"):
        assert f["knobs"][path] in WRITE_REFUSED | {"ENOENT"}, (path, f["knobs"][path])


HOSTILE_IMAGES = {
    # runc bind-mounted the image's /dev/null over masked paths: a symlink there
    # turned the mask into a writable procfs file.
    "null-to-core_pattern": {"dev/null": "/proc/sys/kernel/core_pattern"},
    "null-to-sysrq": {"dev/null": "/proc/sysrq-trigger"},
    "all-dev-to-proc": {"dev/null": "/proc/sys/kernel/core_pattern", "dev/zero": "/proc/sysrq-trigger",
                        "dev/full": "/proc/sys/kernel/modprobe", "dev/random": "/proc/kcore",
                        "dev/urandom": "/proc/sys/vm/drop_caches", "dev/tty": "/proc/self/mem",
                        "dev/ptmx": "/proc/sys/kernel/core_pattern", "dev/pts": "/proc/sys/kernel",
                        "dev/shm": "/proc/sys"},
    "dev-dir-is-symlink": {"dev": "/proc/sys/kernel"},
    "proc-dir-is-symlink": {"proc": "/tmp"},
}


def make_image(base: Path, links: dict[str, str]) -> Path:
    """An image directory with /usr to be mapped from the host and hostile symlinks."""
    root = base / "image"
    for d in ("usr", "etc", "tmp", "proc", "dev", "root"):
        if d not in links:
            (root / d).mkdir(parents=True, exist_ok=True)
    for name in ("bin", "lib", "lib64", "sbin"):
        (root / name).symlink_to(f"usr/{name}")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    for rel, target in links.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(target)
    for dirpath, dirnames, _ in os.walk(root):
        os.chmod(dirpath, 0o755)
    return root


def test_04_control_a_plain_image_runs_the_probe(sb: Any, world_dir: Path) -> None:
    """Without this, the hostile-image tests below could pass only because image roots
    never work at all."""
    root = make_image(world_dir, {})
    f = sb.probe("4", root=str(root), mounts=["/usr:/usr:ro"])["4"]
    assert_masked(f["masked"])
    assert f["dev"]["null"].get("dev") == [1, 3], f["dev"]


@pytest.mark.parametrize("image", sorted(HOSTILE_IMAGES))
def test_04_masks_hold_in_an_image_with_symlinked_dev_entries(
        sb: Any, world_dir: Path, image: str) -> None:
    root = make_image(world_dir, HOSTILE_IMAGES[image])
    with open("/proc/sys/kernel/core_pattern") as fh:
        core_pattern = fh.read()
    try:
        result = sb.run(sb.argv("4", "10"), root=str(root), mounts=["/usr:/usr:ro"])
    except SiloError:
        return  # refusing to build from the hostile image is a correct answer
    with open("/proc/sys/kernel/core_pattern") as fh:
        assert fh.read() == core_pattern
    if result.exit_code == 125:
        return  # silo refused after starting (its own error), the command never ran
    f = sb.parse(result)
    four, ten = f["4"], f["10"]
    assert_masked(four["masked"])
    assert_fresh_procfs_denied(four["mounts"])
    for path in ("/proc/sys/kernel/core_pattern", "/proc/sysrq-trigger", "/proc/sys/kernel/modprobe",
                 "/proc/sys/vm/drop_caches"):
        assert four["knobs"].get(path, "EACCES") in WRITE_REFUSED | {"ENOENT"}, (path, four["knobs"])
    # /dev/null and friends are silo's own device nodes, not the image's symlinks.
    for name, dev in {"null": [1, 3], "zero": [1, 5], "full": [1, 7], "random": [1, 8],
                      "urandom": [1, 9], "tty": [5, 0]}.items():
        got = four["dev"][name]
        assert got.get("kind") == "chr" and got.get("dev") == dev, (name, got)
    assert ten["entries"]["pts"]["kind"] == "dir" and ten["entries"]["shm"]["kind"] == "dir", ten["entries"]


# --------------------------------------------------------------------------------------
# 5. host-wide knobs
# --------------------------------------------------------------------------------------

KNOBS = ["/proc/sysrq-trigger", "/proc/sys/kernel/core_pattern", "/proc/sys/kernel/modprobe",
         "/sys/kernel/uevent_helper", "/proc/sys/fs/binfmt_misc/register",
         "/proc/sys/kernel/panic", "/proc/sys/vm/drop_caches", "/proc/sys/kernel/poweroff_cmd",
         "/proc/sys/kernel/ns_last_pid", "/proc/sys/kernel/hostname", "/sys/power/state",
         "/sys/kernel/mm/transparent_hugepage/enabled"]


def test_05_host_wide_knobs_are_not_writable(sb: Any) -> None:
    f = sb.probe("5")["5"]
    for path in KNOBS:
        got = f["knobs"][path]
        if path.startswith("/sys/") and not f["sys_exists"]:
            assert got == "ENOENT", (path, got)
        elif not os.path.exists(path):  # absent from this kernel: absent inside too
            assert got == "ENOENT", (path, got)
        else:
            assert got in {"EROFS", "EACCES"}, (path, got)


def test_05_all_of_proc_sys_is_read_only(sb: Any) -> None:
    f = sb.probe("5")["5"]
    assert f["proc_sys_files"] > 100, f"/proc/sys looks empty: {f['proc_sys_files']} files"
    assert f["proc_sys_writable"] == [], f"writable under /proc/sys: {f['proc_sys_writable'][:20]}"
    assert f["sysfs_writable"] == [], f["sysfs_writable"]
    mounts = f["proc_sys_mounts"]
    assert mounts and all("ro" in m["options"].split(",") for m in mounts), mounts


# --------------------------------------------------------------------------------------
# 6. cgroup release_agent (CVE-2022-0492)
# --------------------------------------------------------------------------------------


def assert_cgroup_findings(f: dict[str, Any]) -> None:
    writable = [a for a in f["release_agents"] if a["open_write"] == "ok"]
    assert writable == [], f"cgroup files writable from inside: {writable}"
    for m in f["cgroup_mounts"]:
        assert "ro" in m["options"].split(","), f"cgroupfs mounted writable: {m}"
    # A cgroup namespace: every hierarchy's path is the namespace root.
    paths = [line.split(":", 2)[2] for line in f["proc_self_cgroup"]]
    assert paths and all(p == "/" for p in paths), f["proc_self_cgroup"]
    direct = f["direct"]
    for key in ("unshare_mnt", "mount_cgroup_v1_memory", "mount_cgroup_v1_named",
                "mount_cgroup_v1_rdma", "mount_cgroup2"):
        assert direct[key] == "EPERM", (key, direct)
    userns = f["userns"]
    assert userns["unshare_user"] == "EPERM", userns
    assert userns["unshare_user_mnt_cgroup"] == "EPERM", userns
    assert "mount_cgroup_v1_named" not in userns, userns


def test_06_no_release_agent_and_no_cgroup_mounts(sb: Any) -> None:
    assert_cgroup_findings(sb.probe("6")["6"])


def test_06_cgroup_namespace_hides_the_limit_cgroup(sb: Any) -> None:
    if sb.mode != "root":
        pytest.skip("cgroup limits need root on this machine (see test_resource_exhaustion)")
    assert_cgroup_findings(sb.probe("6", pids=256, memory="256M")["6"])


# --------------------------------------------------------------------------------------
# 7. terminal injection (CVE-2017-5226, CVE-2019-10063)
# --------------------------------------------------------------------------------------


def test_07_no_controlling_terminal_of_the_host(sb: Any) -> None:
    f = sb.probe("7")["7"]
    assert f["dev_tty_open"] == "ENXIO", f
    assert f["tty_nr"] == 0, f


def test_07_tiocsti_and_tioclinux_refused_even_with_high_bits(sb: Any) -> None:
    f = sb.probe("7")["7"]
    pty = f["pty"]
    # The pty is really a tty and really the probe's controlling terminal, so only a
    # filter can explain EPERM for TIOCSTI on it (the kernel itself would allow it).
    assert pty["openpty"] == "ok" and pty["setsid"] == "ok" and pty["tcgetattr"] == "ok", pty
    assert pty["tiocsctty"] == "ok", pty
    for side in ("slave", "master"):
        for req in ("tiocsti", "tiocsti_high", "tiocsti_high63", "tioclinux", "tioclinux_high"):
            assert pty[f"{req}_{side}"] == "EPERM", (f"{req}_{side}", pty)


# --------------------------------------------------------------------------------------
# 8. capabilities
# --------------------------------------------------------------------------------------

CAP_NET_BIND_SERVICE = 1 << 10


def test_08_all_capabilities_dropped_and_no_new_privs(sb: Any) -> None:
    f = sb.probe("8")["8"]
    for name, cap in f["sets"].items():
        assert cap["value"] == 0, f"{name} = {cap['hex']} {cap['names']}"
    assert f["NoNewPrivs"] == "1", f
    # Without CAP_NET_BIND_SERVICE, and with the sysctl untouched, port 80 is refused.
    assert f["unprivileged_port_start"] == "1024", f
    assert f["bind_port_80"] == "EACCES", f


def test_08_non_root_user_has_no_capabilities(sb: Any) -> None:
    f = sb.probe("8", user="1000:1000")["8"]
    assert f["Uid"].split() == ["1000"] * 4, f["Uid"]
    for name, cap in f["sets"].items():
        assert cap["value"] == 0, f"{name} = {cap['hex']} {cap['names']}"
    assert f["NoNewPrivs"] == "1", f


def test_08_added_capability_is_the_only_one(sb: Any) -> None:
    f = sb.probe("8", caps=["NET_BIND_SERVICE"])["8"]
    sets = {k: v["value"] for k, v in f["sets"].items()}
    assert sets["CapBnd"] == CAP_NET_BIND_SERVICE, f["sets"]["CapBnd"]
    assert sets["CapEff"] == CAP_NET_BIND_SERVICE, f["sets"]["CapEff"]
    assert sets["CapPrm"] == CAP_NET_BIND_SERVICE, f["sets"]["CapPrm"]
    assert sets["CapInh"] in (0, CAP_NET_BIND_SERVICE), f["sets"]["CapInh"]
    assert sets["CapAmb"] in (0, CAP_NET_BIND_SERVICE), f["sets"]["CapAmb"]
    assert f["NoNewPrivs"] == "1", f
    # The capability must take effect where it matters: port 80 of the sandbox's own
    # network namespace (which needs that namespace to be owned by the sandbox's userns).
    assert f["bind_port_80"] == "ok", (f["bind_port_80"], "net ns owner:", f["net_ns_owner"])


@pytest.mark.parametrize("cap", ["SYS_MODULE", "SYS_RAWIO", "SYS_BOOT", "MAC_ADMIN"])
def test_08_capabilities_that_hand_over_the_host_are_refused(sb: Any, cap: str) -> None:
    with pytest.raises(SpecError, match=cap):
        sb.run(["true"], caps=[cap])


# --------------------------------------------------------------------------------------
# 9. kernel attack surface (the filter itself is tested in test_seccomp_filter.py)
# --------------------------------------------------------------------------------------

# Each is called with arguments the kernel would reject with EFAULT/EINVAL/EBADF:
# EPERM (or ENOSYS) can only come from the filter.
FILTERED = ["unshare_newuser", "bpf", "userfaultfd", "perf_event_open", "io_uring_setup",
            "keyctl", "add_key", "request_key", "fsopen", "open_tree", "move_mount", "fsmount",
            "syslog_read_all", "init_module", "finit_module", "delete_module", "kexec_load",
            "kexec_file_load", "clock_settime", "settimeofday", "open_by_handle_at"]


def test_09_seccomp_filter_is_active(sb: Any) -> None:
    f = sb.probe("9")["9"]
    assert f["Seccomp"] == "2", f
    assert f["NoNewPrivs"] == "1", f
    assert f["calls"]["unshare_newuser"] == "EPERM", f["calls"]


def test_09_dangerous_syscalls_refused_by_the_filter(sb: Any) -> None:
    calls = sb.probe("9")["9"]["calls"]
    assert calls["control_getpid"] == "ok", calls
    refused_wrongly = {k: calls[k] for k in FILTERED if calls[k] not in {"EPERM", "ENOSYS"}}
    assert refused_wrongly == {}, f"reached the kernel instead of the filter: {refused_wrongly}"


def test_09_harmless_syscalls_still_work(sb: Any) -> None:
    """Control: the filter refuses specific calls, not everything (getrandom(2) is what
    every TLS library and Python's own start-up use)."""
    calls = sb.probe("9")["9"]["calls"]
    assert calls["control_getpid"] == "ok", calls
    assert calls["control_getrandom"] == "ok", calls


def test_09_unconfined_really_turns_the_filter_off(sb: Any) -> None:
    """Shows the Seccomp field is read correctly: with the filter off it reads 0."""
    f = sb.probe("9", seccomp="unconfined")["9"]
    assert f["Seccomp"] == "0", f
    assert f["NoNewPrivs"] == "1", f


# --------------------------------------------------------------------------------------
# 10. devices
# --------------------------------------------------------------------------------------

DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9),
           "tty": (5, 0)}
STDIO_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
               "stderr": "/proc/self/fd/2"}


def test_10_dev_holds_only_the_allowed_nodes(sb: Any) -> None:
    f = sb.probe("10")["10"]
    entries = f["entries"]
    allowed = set(DEVICES) | {"ptmx", "pts", "shm"} | set(STDIO_LINKS)
    assert set(entries) <= allowed, f"unexpected in /dev: {sorted(set(entries) - allowed)}"
    for name, (major, minor) in DEVICES.items():
        assert entries[name]["kind"] == "chr" and entries[name]["dev"] == [major, minor], (name, entries[name])
    ptmx = entries["ptmx"]
    assert (ptmx["kind"] == "link" and ptmx["target"] in ("pts/ptmx", "/dev/pts/ptmx")) or \
        (ptmx["kind"] == "chr" and ptmx["dev"] == [5, 2]), ptmx
    for name, target in STDIO_LINKS.items():
        if name in entries:
            assert entries[name]["kind"] == "link" and entries[name]["target"] == target, entries[name]
    # A private devpts instance: none of the host's terminals.
    assert f["pts_at_start"] == ["ptmx"], f["pts_at_start"]
    assert f["dev_mounts"]["/dev/pts"]["fstype"] == "devpts", f["dev_mounts"]
    assert f["shm"] == [], f["shm"]


def test_10_host_devices_are_absent(sb: Any) -> None:
    f = sb.probe("10")["10"]
    present = {p: e for p, e in f["forbidden_open"].items() if e != "ENOENT"}
    assert present == {}, f"host devices reachable: {present}"


def test_10_mknod_of_devices_is_refused(sb: Any) -> None:
    f = sb.probe("10")["10"]
    for key in ("mknod_blk_loop0", "mknod_blk_vda", "mknod_chr_mem", "mknod_chr_kmsg"):
        assert f["mknod"][key] == "EPERM", (key, f["mknod"])


def test_10_no_device_nodes_anywhere_else(sb: Any) -> None:
    scan = sb.probe("tree")["tree"]
    assert not scan["truncated"], scan["entries"]
    assert scan["chr"] == [] and scan["blk"] == [], scan


# --------------------------------------------------------------------------------------
# 11. host namespaces
# --------------------------------------------------------------------------------------


class HostIpcAndSockets:
    """Host-side bait for classes 11 and 12: a SysV segment, an abstract socket and a
    path socket under /run and /tmp, all owned by the test and removed after it."""

    def __init__(self, marker: str, world_dir: Path) -> None:
        self.abstract = f"{marker}-abstract"
        self.paths = [f"/run/{marker}.sock", str(world_dir / "host.sock")]
        self.socks: list[socket.socket] = []
        libc = ctypes.CDLL(None, use_errno=True)
        self.libc = libc
        self.shmid = libc.shmget(0, 4096, 0o600 | 0o1000)  # IPC_PRIVATE, IPC_CREAT
        assert self.shmid >= 0, errno.errorcode[ctypes.get_errno()]
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind("\0" + self.abstract)
        s.listen(1)
        self.socks.append(s)
        for path in self.paths:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(path)
            os.chmod(path, 0o777)
            s.listen(1)
            self.socks.append(s)

    def close(self) -> None:
        self.libc.shmctl(self.shmid, 0, None)  # IPC_RMID
        for s in self.socks:
            s.close()
        for path in self.paths:
            if os.path.lexists(path):
                os.unlink(path)


@pytest.fixture
def host_bait(marker: str, world_dir: Path) -> Any:
    bait = HostIpcAndSockets(marker, world_dir)
    yield bait
    bait.close()


def test_11_private_namespaces(sb: Any) -> None:
    f = sb.probe("11")["11"]
    for name in ("pid", "net", "ipc", "uts", "cgroup", "mnt", "user"):
        assert f["ns"][name] != host_ns(name), f"{name} namespace is the host's: {f['ns'][name]}"


def test_11_only_the_sandbox_processes_are_visible(sb: Any) -> None:
    f = sb.probe("11")["11"]
    assert f["count"] == 2, f["processes"]
    init = next(p for p in f["processes"] if p["pid"] == 1)
    with open("/proc/1/cmdline", "rb") as fh:
        host_init = [a.decode() for a in fh.read().split(b"\0") if a]
    assert init["cmdline"] != host_init, init
    assert init["cmdline"] and init["cmdline"][0] == "silo-init", init


def test_11_network_is_loopback_only(sb: Any) -> None:
    f = sb.probe("11")["11"]
    assert f["interfaces"] == ["lo"], f["interfaces"]
    assert f["if_nameindex"] == ["lo"], f["if_nameindex"]
    assert f["routes"] == [], f["routes"]


def test_11_no_host_unix_or_abstract_sockets_listed(sb: Any, host_bait: Any) -> None:
    f = sb.probe("11")["11"]
    assert f["unix_sockets"] == [], f"/proc/net/unix is not private: {f['unix_sockets'][:10]}"


def test_11_hostname_is_the_specs(sb: Any) -> None:
    f = sb.probe("11", hostname="sec-probe-host")["11"]
    assert f["hostname"] == "sec-probe-host" and f["uname_nodename"] == "sec-probe-host", f
    assert socket.gethostname() != "sec-probe-host"


def test_11_ipc_namespace_is_private(sb: Any, host_bait: Any) -> None:
    with open("/proc/sysvipc/shm") as fh:
        assert len(fh.read().splitlines()) > 1, "the host bait segment is missing"
    f = sb.probe("11")["11"]
    assert f["sysvipc"] == {"shm": 0, "msg": 0, "sem": 0}, f["sysvipc"]
    assert f["mqueue"]["exists"] is False, f["mqueue"]


LISTENER = """
import json, os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind("\\0" + sys.argv[1])
s.listen(1)
start = time.time()
time.sleep(float(sys.argv[2]))
ns = {n: os.readlink("/proc/self/ns/" + n) for n in ("net", "ipc", "uts", "pid", "mnt", "user", "cgroup")}
print(json.dumps({"from": start, "to": time.time(), "ns": ns}))
"""
CONNECTOR = """
import errno, json, os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
at = time.time()
try:
    s.connect("\\0" + sys.argv[1])
    got = "ok"
except OSError as e:
    got = errno.errorcode[e.errno]
ns = {n: os.readlink("/proc/self/ns/" + n) for n in ("net", "ipc", "uts", "pid", "mnt", "user", "cgroup")}
print(json.dumps({"at": at, "connect": got, "ns": ns}))
"""


def test_11_concurrent_sandboxes_share_no_namespace(sb: Any, marker: str, leftovers: Any) -> None:
    """Another workspace is as foreign as the host: its abstract socket is unreachable
    and none of its namespaces is shared (a pooled namespace must never be reused)."""
    out: list[Any] = []

    def listen() -> None:
        try:
            out.append(sb.run(["/usr/bin/python3", "-c", LISTENER, marker, "6"]))
        except BaseException as e:
            out.append(e)

    thread = threading.Thread(target=listen)
    thread.start()
    deadline = time.monotonic() + 30
    while not leftovers(marker) and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the listener is running: give it time to bind
    other = sb.run(["/usr/bin/python3", "-c", CONNECTOR, marker])
    thread.join(60)
    assert out and not isinstance(out[0], BaseException), out
    a = json.loads(out[0].stdout)
    b = json.loads(other.stdout)
    assert a["from"] < b["at"] < a["to"], "the listener was not up during the attempt; timing too tight"
    assert b["connect"] == "ECONNREFUSED", b
    shared = {n for n in a["ns"] if a["ns"][n] == b["ns"][n]}
    assert shared == set(), f"namespaces shared between two sandboxes: {shared}"


# --------------------------------------------------------------------------------------
# 12. sockets inside
# --------------------------------------------------------------------------------------

WELL_KNOWN_SOCKETS = ["/run/dbus/system_bus_socket", "/var/run/dbus/system_bus_socket",
                      "/run/systemd/private", "/run/systemd/journal/socket",
                      "/run/systemd/notify", "/var/run/docker.sock", "/run/docker.sock",
                      "/run/containerd/containerd.sock", "/run/user/0/bus", "/run/silo/silod.sock",
                      "/run/silo/spawner.sock", "/var/run/nscd/socket", "/dev/log"]


def host_socket_paths() -> list[str]:
    paths = set()
    with open("/proc/net/unix") as fh:
        for line in fh.read().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[7].startswith("/"):
                paths.add(fields[7])
    return sorted(paths)


def host_abstract_names() -> list[str]:
    names = set()
    with open("/proc/net/unix") as fh:
        for line in fh.read().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[7].startswith("@"):
                names.add(fields[7][1:])
    return sorted(names)


def test_12_no_host_socket_reachable(sb: Any, host_bait: Any) -> None:
    paths = sorted(set(host_socket_paths()) | set(WELL_KNOWN_SOCKETS) | set(host_bait.paths))
    abstract = sorted(set(host_abstract_names()) | {host_bait.abstract})
    assert host_bait.abstract in abstract
    f = sb.probe("12", params={"unix_paths": paths, "abstract_names": abstract})["12"]
    reached = {p: e for p, e in f["connect_paths"].items() if e != "ENOENT"}
    assert reached == {}, f"host socket paths present inside: {reached}"
    reached = {n: e for n, e in f["connect_abstract"].items() if e != "ECONNREFUSED"}
    assert reached == {}, f"host abstract sockets reachable: {reached}"


def test_12_no_socket_files_in_the_tree(sb: Any) -> None:
    f = sb.probe("12")["12"]
    assert not f["scan"]["truncated"], f["scan"]["entries"]
    assert f["scan"]["sock"] == [], f["scan"]["sock"]
    # /run is the sandbox's own: none of the host's entries.
    if isinstance(f["run"], list):
        assert not set(f["run"]) & set(os.listdir("/run")), f["run"]


# --------------------------------------------------------------------------------------
# 14. information leaks
# --------------------------------------------------------------------------------------


def test_14_kernel_information_is_masked(sb: Any) -> None:
    f = sb.probe("14")["14"]
    assert_masked(f["masked"])
    kallsyms = f["kallsyms"]
    assert kallsyms["open"] != "ok" or kallsyms["nonzero"] == 0, kallsyms
    for path, listing in f["sys"].items():
        assert listing in ("ENOENT", "EACCES", "EPERM", []), (path, listing)


def test_14_kernel_log_is_denied(sb: Any) -> None:
    f = sb.probe("14")["14"]
    assert f["syslog"] == {"read_all": "EPERM", "size_buffer": "EPERM"}, f["syslog"]
    assert f["proc_kmsg_open"] in {"EPERM", "EACCES", "ENOENT"}, f["proc_kmsg_open"]
    assert f["dev_kmsg_open"] == "ENOENT", f["dev_kmsg_open"]


def test_14_mountinfo_does_not_reveal_host_paths(sb: Any) -> None:
    f = sb.probe("14")["14"]
    home = os.path.expanduser("~")
    secrets = {"/work", "/root", "/home", str(REPO), home} - {"/"}
    for line in f["mountinfo"]:
        left, _, right = line.partition(" - ")
        fields = left.split()
        # The host side of a mount: its root within the source fs, the source, the options.
        host_side = " ".join([fields[3], *right.split()[1:]])
        paths = [p for p in re.split(r"[ ,=:]", host_side) if p.startswith("/")]
        leaked = sorted({s for s in secrets for p in paths if p == s or p.startswith(s + "/")})
        assert not leaked, f"mountinfo reveals {leaked}: {line}"


# --------------------------------------------------------------------------------------
# 15. mount propagation
# --------------------------------------------------------------------------------------


def test_15_no_shared_mounts_and_mounting_is_denied(sb: Any, marker: str) -> None:
    f = sb.probe("15", params={"marker": marker})["15"]
    assert f["shared"] == [], f"shared peer groups inside: {f['shared']}"
    attempts = f["attempts"]
    assert "exception" not in attempts, attempts
    for key in ("unshare_mnt_first", "mount_tmpfs", "make_shared_root", "remount_root_rw",
                "remount_proc_sys_rw", "umount_proc_sys", "umount_proc_kcore_mask"):
        assert attempts[key] == "EPERM", (key, attempts)
    assert attempts["fsopen_tmpfs"] in {"EPERM", "ENOSYS"}, attempts
    with open("/proc/self/mountinfo") as fh:
        assert marker not in fh.read()


# --------------------------------------------------------------------------------------
# 16. uid mapping
# --------------------------------------------------------------------------------------


def assert_no_mapping_to_root(lines: list[str]) -> None:
    assert lines, "empty id map"
    for line in lines:
        _inside, outside, count = (int(x) for x in line.split())
        assert not outside <= 0 < outside + count, f"maps host id 0: {line!r}"


def test_16_root_owned_file_bound_read_write_stays_unwritable(sb: Any, world_dir: Path) -> None:
    data = world_dir / "data"
    data.mkdir(mode=0o755)
    target = data / "rootfile"
    target.write_text("host root's\n")
    os.chown(target, 0, 0)
    os.chmod(target, 0o644)
    out = world_dir / "out"
    out.mkdir()
    os.chmod(out, 0o777)
    f = sb.probe("16", mounts=[f"{data}:/data", f"{out}:/out"],
                  params={"root_file": "/data/rootfile", "create_in": "/out"})["16"]
    assert f["root_file_open_write"] == "EACCES", f
    assert f["root_file_open_rdwr"] == "EACCES", f
    assert f["root_file_chmod"] == "EPERM", f
    assert f["root_file_chown"] == "EPERM", f
    assert f["root_dir_create"] == "EACCES", f
    # Host root is not mapped inside: its files show as the overflow id.
    assert f["root_file_stat"]["uid"] == 65534, f["root_file_stat"]
    st = target.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode), target.read_text()) == (0, 0o644, "host root's\n")
    assert not (data / "silo-probe-new").exists()
    # What the sandbox's root creates belongs to an unprivileged host id.
    assert f["create"] == "ok", f
    made = (out / "made-by-sandbox").stat()
    assert made.st_uid != 0 and made.st_gid != 0, (made.st_uid, made.st_gid)


def test_16_id_maps_never_include_host_root(sb: Any) -> None:
    f = sb.probe("16")["16"]
    assert_no_mapping_to_root(f["uid_map"])
    assert_no_mapping_to_root(f["gid_map"])


def test_16_sandbox_processes_are_not_host_root_seen_from_the_host(sb: Any, marker: str) -> None:
    """Look at the running sandbox from the host: its ids, caps, filter and maps."""
    argv = ["/usr/bin/python3", "-c", "import time; time.sleep(4)", marker]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            sb.run(argv)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    seen: dict[int, dict[str, str]] = {}
    deadline = time.monotonic() + 30
    while thread.is_alive() and time.monotonic() < deadline and not seen:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/cmdline", "rb") as fh:
                    if marker.encode() not in fh.read().split(b"\0"):
                        continue
                with open(f"/proc/{name}/status") as fh:
                    status = dict(line.split(":\t", 1) for line in fh.read().splitlines() if ":\t" in line)
                with open(f"/proc/{name}/uid_map") as fh:
                    status["uid_map"] = fh.read()
                with open(f"/proc/{name}/gid_map") as fh:
                    status["gid_map"] = fh.read()
            except OSError:
                continue
            seen[int(name)] = status
        time.sleep(0.05)
    thread.join(60)
    assert not errors, errors
    assert seen, "never saw the sandboxed process from the host"
    for pid, status in seen.items():
        uids = [int(x) for x in status["Uid"].split()]
        gids = [int(x) for x in status["Gid"].split()]
        assert 0 not in uids and 0 not in gids, (pid, status["Uid"], status["Gid"])
        assert_no_mapping_to_root(status["uid_map"].splitlines())
        assert_no_mapping_to_root(status["gid_map"].splitlines())
        assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0, status
        assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2", status


# --------------------------------------------------------------------------------------
# 17. environment and credentials
# --------------------------------------------------------------------------------------

ALLOWED_ENV = {"PATH", "HOME", "TERM"}
HOST_ONLY_DIRS = ["/tmp", "/run", "/root", "/home", "/var/lib", "/var/log", "/var/cache",
                  "/var/backups", "/var/mail", "/opt", "/srv", "/mnt", "/media", "/boot", "/work",
                  "/farm", "/old_root", "/lost+found"]
SECRETS = ["/root/.ssh", "/root/.aws", "/root/.bash_history", "/root/.gnupg", "/root/.pyenv",
           "/root/.config", "/run/secrets", "/var/run/secrets", "/etc/shadow", "/etc/gshadow",
           "/etc/shadow-", "/etc/ssh/ssh_host_rsa_key", "/etc/ssh/ssh_host_ed25519_key",
           "/etc/ssh/ssh_host_ecdsa_key", "/work", "/old_root"]


def test_17_only_the_specs_environment(sb: Any, monkeypatch: pytest.MonkeyPatch, marker: str) -> None:
    monkeypatch.setenv("SILO_SECTEST_HOST_SECRET", marker)
    f = sb.probe("17", env={"SPEC_VAR": "given"})["17"]
    env = f["environ"]
    # Python itself may add LC_CTYPE (PEP 538 locale coercion) after exec.
    env.pop("LC_CTYPE", None)
    assert env.get("SPEC_VAR") == "given", env
    assert set(env) <= ALLOWED_ENV | {"SPEC_VAR"}, f"host environment leaked: {sorted(set(env) - ALLOWED_ENV)}"
    assert marker not in repr(env)
    assert f["pid1_environ"] is not None and set(f["pid1_environ"]) <= ALLOWED_ENV | {"SPEC_VAR"}, f["pid1_environ"]


def test_17_no_host_secrets_or_private_trees(sb: Any) -> None:
    host_dirs = [d for d in HOST_ONLY_DIRS if os.path.isdir(d) and os.listdir(d)]
    f = sb.probe("17", params={"host_dirs": host_dirs})["17"]
    present = [p for p in SECRETS if f["sensitive"].get(p, False)]
    assert present == [], f"host secrets visible: {present}"
    for d in host_dirs:
        inside = f["listings"][d]
        if isinstance(inside, str):
            assert inside in {"ENOENT", "EACCES"}, (d, inside)
            continue
        common = set(inside) & set(os.listdir(d))
        assert not common, f"host {d} is visible inside: {sorted(common)[:10]}"
