"""The gvisor level (issue 6): ``silo run --isolation gvisor`` runs the command under
gVisor's Sentry, through a real ``runsc`` (Debian 12's 0.0~20221219).

What the process level's suite checks again at this level is in test_gvisor_suite.py;
this module holds what is the gvisor level's own: gVisor's kernel, the writable
overlays that never reach the host, the platform probe, the refusals, the gaps of this
runsc as a user meets them, the Sentry's own seccomp on the host, and cleanup.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_servers import pty_run, shell_dialogue

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.skip("the gvisor level needs root", allow_module_level=True)

SILO = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "silo")


def run(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SILO, "run", "--isolation", "gvisor", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False, env=env)


def runsc_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if re.search(r"runsc(-sandbox|-gofer)?\s", line)]


def test_the_command_meets_gvisors_kernel_not_the_hosts() -> None:
    r = run("--", "sh", "-c", "uname -r; cat /proc/version")
    assert r.returncode == 0, r
    release, version = r.stdout.splitlines()[:2]
    assert release != os.uname().release  # the Sentry's own answer (4.4.0 in this runsc)
    assert os.uname().release not in version


def test_writes_anywhere_land_in_the_sandboxs_tmpfs_never_on_the_host() -> None:
    name = f"silo-gvisor-{os.getpid()}"
    script = (f"echo u > /usr/{name} && cat /usr/{name}; echo e > /etc/{name} && cat /etc/{name}; "
              f"echo r > /{name} && cat /{name}")
    r = run("--", "sh", "-c", script)
    assert (r.returncode, r.stdout) == (0, "u\ne\nr\n"), r
    for path in (f"/usr/{name}", f"/etc/{name}", f"/{name}"):
        assert not os.path.lexists(path), path
    # nor in silo's shared skeleton, which is the root's lower layer
    assert not list(Path("/var/cache/silo/skeleton").glob(f"*/{name}"))
    # the host's secrets are not in the view
    r = run("--", "sh", "-c", "cat /etc/shadow; busybox ls -A /root")
    assert "No such file" in r.stderr and r.stdout == "", r


def test_the_platform_is_probed_once_cached_and_shown_in_the_plan() -> None:
    plan = subprocess.run([SILO, "plan", "--isolation", "gvisor", "--", "true"], capture_output=True, text=True,
                          check=True).stdout
    shown = re.search(r"--platform=(\w+)", plan)
    assert shown is not None, plan
    cached = [json.loads(p.read_text())["platform"] for p in Path("/var/cache/silo/gvisor").glob("platform-*.json")]
    assert shown.group(1) in cached
    # /dev/kvm exists on these machines, but its guests hang: the probe fell back
    assert shown.group(1) in ("systrap", "kvm", "ptrace")
    forced = subprocess.run([SILO, "plan", "--isolation", "gvisor", "--", "true"], capture_output=True, text=True,
                            check=True, env={**os.environ, "SILO_GVISOR_PLATFORM": "kvm"}).stdout
    assert "--platform=kvm" in forced
    assert "runsc --root /" in plan and "--network=none" in plan and "--ignore-cgroups" in plan


MKDIR_REFUSED = ('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir", "mkdirat"], '
                 '"action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}')


def test_a_seccomp_profile_is_enforced_inside_by_gvisors_kernel(tmp_path: Path) -> None:
    """--seccomp FILE: silo's own compiled program (the process level's), loaded by
    silo-init inside the Sentry before the command runs; a bad profile is one line."""
    profile = tmp_path / "profile.json"
    profile.write_text(MKDIR_REFUSED)
    script = "mkdir /tmp/d 2>/dev/null && echo made || echo refused; grep ^Seccomp: /proc/self/status; " \
             "echo x > /tmp/f && echo wrote"
    r = run("--seccomp", str(profile), "--", "sh", "-c", script)
    assert (r.returncode, r.stdout) == (0, "refused\nSeccomp:\t2\nwrote\n"), r
    profile.write_text("{not json")
    r = run("--seccomp", str(profile), "--", "true")
    assert r.returncode == 125 and r.stderr.startswith(f"silo: {profile}:1:2: invalid JSON"), r
    assert len(r.stderr.splitlines()) == 1


def test_seccomp_default_and_unconfined_add_no_filter_inside() -> None:
    """The Sentry is the command's kernel and filter: neither choice puts a seccomp
    filter inside it (the process level's 'default' is silo's profile)."""
    for choice in ("default", "unconfined"):
        r = run("--seccomp", choice, "--", "grep", "^Seccomp:", "/proc/self/status")
        assert (r.returncode, r.stdout) == (0, "Seccomp:\t0\n"), r


def test_t_gives_the_command_runscs_pty_with_the_terminals_size_input_and_ctrl_c() -> None:
    """-t: runsc makes the pty (in the sandbox's own devpts) and silo-init hands its
    master to the client, sized from the start. An interactive shell reads its input,
    and ctrl-C interrupts its foreground job, not the run (the Sentry, the pty's session
    leader, passes it on). gVisor names no pty for its terminal: ``tty`` says "not a
    tty" though stdin is one (this runsc's gap, in the docs)."""
    out, code = pty_run([SILO, "run", "-t", "--isolation", "gvisor", "--", "sh", "-c",
                         "tty; stty size; test -t 0 && echo stdin-tty; echo $TERM"],
                        {**os.environ, "TERM": "xterm"}, 33, 97, timeout=30)
    assert (code, out.decode().replace("\r", "").splitlines()) == (0, ["not a tty", "33 97", "stdin-tty", "xterm"])
    steps, drive = shell_dialogue()
    started = time.monotonic()
    out, code = pty_run([SILO, "run", "-it", "--isolation", "gvisor", "-e", "PS1=$ ", "--", "sh", "-i"],
                        dict(os.environ), on_output=drive, timeout=45)
    assert steps == ["sleep", "ctrl-c", "read"], out
    assert (code, out.decode().replace("\r", "").splitlines()[-1]) == (5, "got-abc"), out
    assert time.monotonic() - started < 30  # the sleep was interrupted


def test_pids_contains_a_fork_loop_for_every_user_inside() -> None:
    """--pids is RLIMIT_NPROC inside the Sentry, which holds for root too (no capability
    exempts it there): a fork loop is refused its 17th task and the run ends at once.
    Below the limit nothing is refused. The count is per user: silo cannot read the
    Sentry's refusals, so the run's end is the shell's own error, not silo's."""
    started = time.monotonic()
    r = run("--pids", "16", "--", "sh", "-c", "while :; do sleep 30 & done")
    assert r.returncode != 0 and "Cannot fork" in r.stderr, r
    assert time.monotonic() - started < 20
    r = run("--pids", "16", "--", "sh", "-c", "sleep 0 & sleep 0 & wait; echo ok; ulimit -p")
    assert (r.returncode, r.stdout) == (0, "ok\n16\n"), r
    threads = "import threading, time\nn = 0\ntry:\n    for _ in range(40):\n" \
              "        threading.Thread(target=time.sleep, args=(5,), daemon=True).start(); n += 1\n" \
              "except RuntimeError:\n    print('refused after', n)"
    r = run("--pids", "16", "-u", "1000", "--", "python3", "-c", threads)
    assert r.returncode == 0 and r.stdout.startswith("refused after "), r
    assert int(r.stdout.split()[-1]) < 16  # threads count too


def test_runsc_holds_no_host_privilege_and_its_control_socket_is_the_sandboxs() -> None:
    """runsc, its gofer and the Sentry run as the root of the sandbox's user namespace
    (silo's id range on the host, never host root), in a network namespace of their
    own: runsc's control socket (abstract, named after the container) is in no host
    namespace, so two runs at once do not collide on it and no host process can reach
    it."""
    proc = subprocess.Popen([SILO, "run", "--isolation", "gvisor", "--", "sleep", "20"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not [line for line in runsc_processes() if "runsc-sandbox" in line]:
            assert time.monotonic() < deadline, runsc_processes()
            time.sleep(0.1)
        for line in runsc_processes():
            pid = line.split()[0]
            uids = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[:4]
            assert "0" not in uids, (line, uids)
        sockets = subprocess.run(["ss", "-xlp"], capture_output=True, text=True, check=True).stdout
        assert "runsc" not in sockets, sockets
        # a second run at the same time has its own socket and state
        r = run("--", "echo", "second")
        assert (r.returncode, r.stdout) == (0, "second\n"), r
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory the sandbox's root (not host root) may enter, as volumes need."""
    path = Path(tempfile.mkdtemp(prefix="silo-gvisor-", dir="/tmp"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_a_read_write_volume_is_written_with_the_sandboxs_ids_never_host_roots(open_dir: Path) -> None:
    """As at the process level: the sandbox's root is silo's first id on the host, so a
    folder the host's root owns is not writable, and what the sandbox makes in a folder
    it may write (here one given to silo's range) is owned by that range, set-uid bit
    and all: never a set-uid file of host root's."""
    base = int(subprocess.run([SILO, "plan", "--isolation", "gvisor", "--", "true"], capture_output=True,
                              text=True, check=True).stdout.split("map uid 0 -> host ")[1].split()[0])
    shared = open_dir / "shared"
    shared.mkdir()
    os.chown(shared, base, base)
    root_owned = open_dir / "root-owned"
    root_owned.mkdir()
    r = run("-v", f"{shared}:/data", "-v", f"{root_owned}:/other", "--", "sh", "-c",
            "echo x > /data/f && chmod 4755 /data/f && echo written; echo y > /other/g || echo refused")
    assert r.stdout.splitlines() == ["written", "refused"], r
    st = os.stat(shared / "f")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (base, base, 0o4755)
    assert os.listdir(root_owned) == []


def test_a_read_only_volume_and_capabilities_reach_the_command(open_dir: Path) -> None:
    tmp_path = open_dir
    (tmp_path / "in.txt").write_text("from the host\n")
    r = run("-v", f"{tmp_path}:/data:ro", "--cap", "NET_BIND_SERVICE", "--", "sh", "-c",
            "cat /data/in.txt; echo x > /data/new || echo refused; grep CapEff /proc/self/status")
    assert r.returncode == 0, r
    assert r.stdout.splitlines() == ["from the host", "refused", "CapEff:\t0000000000000400"]
    assert sorted(os.listdir(tmp_path)) == ["in.txt"]


def test_gaps_of_this_runsc_are_what_a_user_sees() -> None:
    """Known gaps of runsc 0.0~20221219, written down in SECURITY.md and the README: a
    change of runsc that closes one makes this test say so."""
    # statx refuses AT_NO_AUTOMOUNT, which GNU ls passes; busybox ls works
    r = run("--", "sh", "-c", "ls /; busybox ls / | grep -c usr")
    assert "ls: cannot access '/': Invalid argument" in r.stderr and r.stdout == "1\n", r



def test_the_sentry_runs_under_its_own_seccomp_filter_on_the_host() -> None:
    """In the sandbox /proc/self/status says ``Seccomp: 0``: it is the Sentry's emulated
    /proc, whose command no host filter could see. The filter that matters is on the
    host, on the Sentry itself (runsc-sandbox): mode 2."""
    proc = subprocess.Popen([SILO, "run", "--isolation", "gvisor", "--", "sleep", "20"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        sentries: list[int] = []
        while not sentries:
            assert time.monotonic() < deadline, runsc_processes()
            sentries = [int(line.split()[0]) for line in runsc_processes() if "runsc-sandbox" in line]
            time.sleep(0.1)
        deadline = time.monotonic() + 10
        while "Seccomp:\t2" not in Path(f"/proc/{sentries[0]}/status").read_text():
            assert time.monotonic() < deadline, Path(f"/proc/{sentries[0]}/status").read_text()
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    r = run("--", "grep", "Seccomp:", "/proc/self/status")
    assert r.stdout == "Seccomp:\t0\n", r


def test_leaves_no_runsc_process_state_or_mount_behind() -> None:
    assert run("--timeout", "1", "--", "sleep", "30").returncode == 137
    assert run("--memory", "64M", "--", "python3", "-c", "x = bytearray(200 << 20)").returncode == 137
    assert run("--", "true").returncode == 0
    deadline = time.monotonic() + 10
    while runsc_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert runsc_processes() == []
    mounts = Path("/proc/mounts").read_text()
    assert "/scratch" not in mounts and "runsc" not in mounts
    assert not list(Path("/run").glob("runsc*")) and not Path("/var/run/runsc").exists()


def test_every_sdk_run_is_a_runsc_sandbox_of_its_own_command() -> None:
    """The SDK's Sandbox plans once and swaps the command into the plan's process at the
    other levels; at this one the process is runsc and the command is in its bundle, so
    each run (with its own env and workdir) is planned whole: the command runs in the
    Sentry (gVisor's kernel release, the run's own 1 GiB tmpfs), never in runsc's place
    with the host's root around it."""
    import silo

    host_release = os.uname().release
    with tempfile.TemporaryDirectory(prefix="silo-gvisor-sdk-") as tmp, silo.Sandbox(isolation="gvisor") as sb:
        os.chmod(tmp, 0o1777)
        script = f'uname -r; echo "$FOO"; pwd; df -k /tmp | tail -1; touch {tmp}/escaped 2>/dev/null; echo done'
        first = sb.run(["sh", "-c", script], env={"FOO": "one"}, workdir="/var")
        second = sb.run(["sh", "-c", script])
        assert not os.path.exists(f"{tmp}/escaped")  # the host's /tmp is not the sandbox's
    for r in (first, second):
        assert r.exit_code == 0, r
    release, foo, cwd, df, done = first.stdout.decode().splitlines()
    assert release != host_release and (foo, cwd, done) == ("one", "/var", "done"), first
    assert df.split()[1] == str(1 << 20), df  # the run's own tmpfs, 1 GiB
    release2, foo2, cwd2, _, _ = second.stdout.decode().splitlines()
    assert (release2, foo2, cwd2) == (release, "", "/"), second
