"""Workspaces at isolation gvisor (issue 6, requirement 2), under a private silod.

A gvisor workspace's init is ``runsc run`` of a container whose PID 1 is silo-init
(from silo's read-only top layer, ``/.silo/init``); its root is the process level's
overlays on the same layer store, served by runsc's gofer, so snapshots, forks,
templates and diff are the store's. Commands join with ``runsc exec``; signals reach
them through ``runsc kill``; cp goes through the Sentry while the workspace runs.
Each test makes its own workspaces and removes them.
"""

# ruff: noqa: F811 - the imported fixtures are the tests' parameters by name

from __future__ import annotations

import fcntl
import glob
import os
import re
import signal
import struct
import subprocess
import termios
import time
import uuid
from pathlib import Path

import daemons
import pytest
from cli_servers import pty_run, shell_dialogue
from daemons import REPO, Daemon, cli, client, names, ok  # noqa: F401 - fixtures

import silo

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.skip("gvisor workspaces need root", allow_module_level=True)

SILO = str(REPO / ".venv" / "bin" / "silo")
NOT_FOUND = 3


def runsc_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if re.search(r"runsc(-sandbox|-gofer)?\s", line)]


def nothing_left() -> None:
    deadline = time.monotonic() + 10
    while runsc_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert runsc_processes() == []
    assert "/scratch" not in Path("/proc/mounts").read_text()


def new(names: list[str], prefix: str = "gv") -> str:
    return daemons.new(names, prefix)


def started(names: list[str], *options: str) -> str:
    return daemons.started(names, "gvisor", ok, *options)


def test_a_workspace_runs_under_gvisors_kernel_keeps_its_files_and_shows_its_platform(
        client: silo.Client, names: list[str], daemon: Daemon) -> None:
    name = started(names)
    assert ok("exec", name, "--", "uname", "-r").strip() != os.uname().release
    assert ok("exec", name, "--", "hostname").strip() == name
    # the container's PID 1 is silo-init, from silo's read-only layer
    ps = ok("exec", name, "--", "busybox", "ps")
    assert re.search(r"^\s*1 root .*/\.silo/init --idle", ps, re.M), ps
    ok("exec", name, "--", "sh", "-c", "echo kept > /root/kept; echo tmp > /tmp/t; apt-get --version >/dev/null")
    info = client.get(name).info()
    assert info.gvisor is not None and info.gvisor["platform"] in ("systrap", "kvm", "ptrace")
    # the workspace's files are in its own layer, with the process level's ids (silo's
    # range, not host root): runsc ran as the root of the sandbox's user namespace
    upper = Path(daemon.state, "workspaces", name, "upper", "root")
    st = os.stat(upper / "root" / "kept")
    assert st.st_uid >= 100000 and st.st_uid != 0, st
    # only what the workspace made is in its layer: no mount point runsc made, no init
    changed = [line.split()[1] for line in ok("diff", name).splitlines()[1:]]
    assert "/root/kept" in changed and "/tmp/t" in changed, changed
    assert not [path for path in changed if path.startswith(("/.silo", "/sys", "/dev", "/proc"))], changed
    ok("stop", name)
    nothing_left()
    ok("start", name)
    assert ok("exec", name, "--", "cat", "/root/kept", "/tmp/t") == "kept\ntmp\n"


def test_exec_takes_the_users_identity_directory_environment_and_exit_codes(names: list[str]) -> None:
    name = started(names, "--env", "FROM_SPEC=spec", "-w", "/srv")
    r = cli("exec", "-u", "1000", "-e", "EXTRA=x", name, "--", "sh", "-c",
            'id -u; id -g; pwd; echo "$FROM_SPEC $EXTRA"; grep CapEff /proc/self/status; exit 7')
    assert r.returncode == 7, r
    assert r.stdout.splitlines() == ["1000", "1000", "/srv", "spec x", "CapEff:\t0000000000000000"]
    # no_new_privs holds for every exec (runsc exec inherits the bundle's); the Sentry's
    # /proc/self/status has no NoNewPrivs line, so ask prctl(PR_GET_NO_NEW_PRIVS)
    r = cli("exec", "-u", "1000", name, "--", "python3", "-c",
            "import ctypes; print(ctypes.CDLL(None).prctl(39, 0, 0, 0, 0))")
    assert (r.returncode, r.stdout) == (0, "1\n"), r
    # the workspace's environment is its commands', not runsc's (a host-side program)
    environs = [Path(f"/proc/{line.split()[0]}/environ").read_bytes() for line in runsc_processes()]
    assert environs and not [e for e in environs if b"FROM_SPEC" in e], environs
    r = cli("exec", "-w", "/usr", name, "--", "pwd")
    assert r.stdout == "/usr\n", r
    # silo-init finds the command inside, as at the process level
    r = cli("exec", name, "--", "no-such-command")
    assert (r.returncode, r.stderr) == (127, "silo: no-such-command: command not found inside the sandbox; "
                                             "check the name and PATH\n"), r
    r = cli("exec", name, "--", "/etc/hostname")
    assert r.returncode == 126 and "not executable inside the sandbox" in r.stderr, r


def test_exec_t_is_a_terminal_sized_from_the_start_with_input_ctrl_c_and_resize(
        client: silo.Client, names: list[str]) -> None:
    """exec -t: silo-setup's pty (in the workspace's own devpts) is runsc exec's
    terminal, and through it the command's (its process file says so). Sized before the
    command runs; an interactive shell reads its input; ctrl-C interrupts its foreground
    job and a resize sends SIGWINCH (runsc passes the terminal's signals to the
    foreground group inside); the exec's files are gone afterwards."""
    name = started(names)
    out, code = pty_run([SILO, "exec", "-t", name, "--", "sh", "-c", "stty size; test -t 0 && echo stdin-tty"],
                        dict(os.environ), rows=33, cols=101, timeout=30)
    assert (code, out.decode().replace("\r", "").split()) == (0, ["33", "101", "stdin-tty"])
    steps, drive = shell_dialogue()

    begun = time.monotonic()
    out, code = pty_run([SILO, "exec", "-it", "-e", "PS1=$ ", name, "--", "sh", "-i"], dict(os.environ),
                        on_output=drive, timeout=45)
    assert steps == ["sleep", "ctrl-c", "read"], out
    assert (code, out.decode().replace("\r", "").splitlines()[-1]) == (5, "got-abc"), out
    assert time.monotonic() - begun < 30  # the sleep was interrupted
    # a resize reaches the foreground group as SIGWINCH (here the shell's own: no job control)
    resized: list[bool] = []

    def resize(pid: int, master: int, buf: bytes) -> None:
        if b"ready" in buf and not resized:
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 132, 0, 0))
            resized.append(True)

    script = 'trap "stty size; exit 3" WINCH; echo ready; i=0; while [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done'
    out, code = pty_run([SILO, "exec", "-t", name, "--", "sh", "-c", script], dict(os.environ), on_output=resize,
                        timeout=45)
    assert resized and (code, out.decode().replace("\r", "").split()[-2:]) == (3, ["50", "132"]), out
    # the pty is the workspace's devpts's, and no exec left its process or pid file
    init = client.get(name).info().pid
    assert init is not None
    mounts = [line.split() for line in Path(f"/proc/{init}/mountinfo").read_text().splitlines()]
    assert [m for m in mounts if m[4] == "/dev/pts" and "ptmxmode=666" in m[-1]], mounts
    scratch = next(m[4] for m in mounts if m[4].endswith("/scratch"))
    assert os.listdir(f"/proc/{init}/root{scratch}/exec") == []


def test_signals_and_timeouts_reach_the_command_inside(client: silo.Client, names: list[str]) -> None:
    name = started(names)
    proc = subprocess.Popen([SILO, "exec", name, "--", "sh", "-c",
                             'trap "echo got-term; exit 9" TERM; echo ready; while :; do sleep 0.1; done'],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert (proc.returncode, out) == (9, "got-term\n"), err
    started_at = time.monotonic()
    result = client.get(name).exec(["sh", "-c", "echo begun; exec sleep 60"], timeout=1)
    assert (result.exit_code, result.stdout) == (137, b"begun\n")
    assert time.monotonic() - started_at < 15
    # the timed-out command is gone from the sandbox, not just its relay on the host
    deadline = time.monotonic() + 10
    while "sleep 60" in ok("exec", name, "--", "busybox", "ps") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "sleep 60" not in ok("exec", name, "--", "busybox", "ps")


def test_cp_in_and_out_running_or_stopped(tmp_path: Path, names: list[str]) -> None:
    name = started(names)
    (tmp_path / "in.txt").write_text("from the host\n")
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "dir" / "sub" / "a").write_text("a\n")
    ok("cp", str(tmp_path / "in.txt"), f"{name}:/root/in.txt")
    ok("cp", str(tmp_path / "dir"), f"{name}:/srv/")
    # the Sentry sees a copy into a running workspace at once (it went through it)
    assert ok("exec", name, "--", "cat", "/root/in.txt", "/srv/dir/sub/a") == "from the host\na\n"
    ok("exec", name, "--", "sh", "-c", "echo made inside > /root/out.txt")
    ok("cp", f"{name}:/root/out.txt", str(tmp_path / "out.txt"))
    assert (tmp_path / "out.txt").read_text() == "made inside\n"
    r = cli("cp", f"{name}:/nope", str(tmp_path / "x"))
    assert r.returncode == NOT_FOUND and "no such file or directory in the workspace" in r.stderr, r
    ok("stop", name)
    ok("cp", str(tmp_path / "in.txt"), f"{name}:/root/while-stopped.txt")
    ok("cp", f"{name}:/root/out.txt", str(tmp_path / "out2.txt"))
    assert (tmp_path / "out2.txt").read_text() == "made inside\n"
    r = cli("cp", f"{name}:/nope", str(tmp_path / "x"))
    assert r.returncode == NOT_FOUND, r
    assert cli("ls").stdout.count(name) == 1 and client_state(name) == "stopped"
    nothing_left()
    ok("start", name)
    assert ok("exec", name, "--", "cat", "/root/while-stopped.txt") == "from the host\n"


def client_state(name: str) -> str:
    for line in cli("ls").stdout.splitlines():
        if line.split()[0] == name:
            return line.split()[1]
    return ""


def test_snapshot_restore_reset_fork_and_templates_share_the_process_levels_store(
        client: silo.Client, names: list[str]) -> None:
    name = started(names)
    ok("exec", name, "--", "sh", "-c", "echo one > /root/v")
    ok("stop", name)
    ok("snapshot", name, "one")
    ok("start", name)
    ok("exec", name, "--", "sh", "-c", "echo two > /root/v; echo extra > /root/extra")
    ok("stop", name)
    ok("restore", name, "one")
    ok("start", name)
    assert ok("exec", name, "--", "sh", "-c", "cat /root/v; ls /root/extra 2>&1 || true").startswith("one\n")
    ok("stop", name)
    fork = new(names)
    ok("fork", name, fork)
    ok("start", fork)
    assert ok("exec", fork, "--", "cat", "/root/v") == "one\n"
    assert ok("exec", fork, "--", "hostname").strip() == fork
    ok("stop", fork)
    # a template made at the gvisor level serves workspaces at gvisor and at process:
    # both levels keep the same files with the same ids
    tpl = new(names, "tpl")
    ok("template", "create", tpl, "--from", fork)
    for level in ("gvisor", "process"):
        child = new(names)
        ok("create", child, "--root", tpl, "--isolation", level)
        ok("start", child)
        assert ok("exec", child, "--", "cat", "/root/v") == "one\n", level
        ok("rm", "-f", child)
    ok("reset", name)
    ok("start", name)
    r = cli("exec", name, "--", "cat", "/root/v")
    assert r.returncode == 1 and "No such file" in r.stderr, r
    ok("stop", name)
    nothing_left()


COUNTER = "i=0; while :; do i=$((i+1)); echo $i > /root/count; sleep 0.2; done"


def inside_pids(name: str, pattern: str) -> list[str]:
    ps = ok("exec", name, "--", "ps", "-eo", "pid,args")
    return [line.split()[0] for line in ps.splitlines() if pattern in line and "ps -eo" not in line]


def test_snapshot_memory_saves_a_running_workspaces_processes_and_restore_resumes_them(
        client: silo.Client, names: list[str], daemon: Daemon) -> None:
    """``silo snapshot --memory`` (runsc checkpoint): the workspace runs on with the same
    processes; the snapshot keeps their memory with the files of the same instant, and
    after ``restore`` the next start brings those processes back, once."""
    name = started(names)
    ok("exec", name, "--", "sh", "-c", f"echo before > /root/v; ({COUNTER}) </dev/null >/dev/null 2>&1 &")
    time.sleep(1)
    pids = inside_pids(name, "while :")
    assert len(pids) == 1, pids
    assert ok("snapshot", name, "live", "--memory") == "live\n"
    # it runs on, with the same process (same pid inside), still counting
    assert client_state(name) == "running"
    assert inside_pids(name, "while :") == pids
    at = int(ok("exec", name, "--", "cat", "/root/count"))
    time.sleep(1)
    later = int(ok("exec", name, "--", "cat", "/root/count"))
    assert later > at, (at, later)
    snaps = client.get(name).snapshots()
    assert [(s.tag, s.memory) for s in snaps] == [("live", True)]
    assert ok("snapshots", name).splitlines()[1].split()[-1] == "saved"
    # the memory image is the store's, owned by the workspace's id range, not host root
    (image,) = Path(daemon.state, "images").iterdir()
    assert (image / "checkpoint.img").stat().st_size > 0 and image.stat().st_uid != 0
    assert not Path(daemon.state, "workspaces", name, "checkpoint").exists()
    ok("exec", name, "--", "sh", "-c", "echo after > /root/v")
    ok("stop", name)
    ok("restore", name, "live")
    info = client.get(name).info()
    assert info.gvisor is not None and info.gvisor["resumes"] == "live"
    ok("start", name)
    # the process is back, with the snapshot's files and memory: its count went on from
    # what it was at the snapshot, below what it had reached since
    assert inside_pids(name, "while :") == pids
    assert ok("exec", name, "--", "cat", "/root/v") == "before\n"
    time.sleep(0.5)
    resumed = int(ok("exec", name, "--", "cat", "/root/count"))
    assert 0 < resumed < later + 10, (resumed, later)
    assert "resumed" in ok("logs", name)
    info = client.get(name).info()
    assert info.gvisor is not None and info.gvisor["resumes"] is None
    # once: the next start is a fresh one, with the files
    ok("restart", name)
    assert inside_pids(name, "while :") == []
    assert ok("exec", name, "--", "cat", "/root/v") == "before\n"
    # a plain snapshot, reset and fork carry no processes
    ok("stop", name)
    ok("snapshot", name, "files")
    assert [(s.tag, s.memory) for s in client.get(name).snapshots()] == [("live", True), ("files", False)]
    ok("restore", name, "live")
    fork = new(names)
    ok("fork", name, fork)
    fork_info = client.get(fork).info()
    assert fork_info.gvisor is None or fork_info.gvisor["resumes"] is None
    ok("reset", name)
    info = client.get(name).info()
    assert info.gvisor is not None and info.gvisor["resumes"] is None
    # deleting the snapshot frees its image (the daemon's garbage collection)
    ok("snapshot", "rm", name, "live")
    ok("rm", "-f", fork)
    deadline = time.monotonic() + 10
    while list(Path(daemon.state, "images").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(Path(daemon.state, "images").iterdir()) == []
    nothing_left_of(name)


def nothing_left_of(name: str) -> None:
    ok("rm", "-f", name)
    nothing_left()


def test_snapshot_memory_refusals_name_the_problem_and_keep_the_processes(
        client: silo.Client, names: list[str]) -> None:
    name = started(names)
    ok("exec", name, "--", "sh", "-c", "sleep 300 </dev/null >/dev/null 2>&1 &")
    ok("snapshot", name, "taken", "--memory")
    # a tag in use is refused before anything is saved: the processes run on
    r = cli("snapshot", name, "taken", "--memory")
    assert r.returncode != 0 and "already has a snapshot 'taken'" in r.stderr, r
    assert client_state(name) == "running" and inside_pids(name, "sleep 300")
    # the SDK asks the same
    with pytest.raises(silo.WorkspaceExists, match="already has a snapshot"):
        client.get(name).snapshot("taken", memory=True)
    ok("stop", name)
    r = cli("snapshot", name, "--memory")
    assert r.returncode != 0 and r.stderr == (
        f"silo: workspace {name!r} is stopped: 'silo snapshot --memory' saves a running workspace's processes; "
        f"start it first (silo start {name}), or drop --memory\n"), r
    other = daemons.started(names, "process", ok)
    r = cli("snapshot", other, "--memory")
    assert r.returncode != 0 and r.stderr.startswith(
        "silo: 'silo snapshot --memory' saves processes at isolation 'gvisor' only"), r
    assert client_state(other) == "running"
    assert [s.tag for s in client.get(name).snapshots()] == ["taken"]
    ok("rm", "-f", other)
    nothing_left_of(name)


def test_limits_of_a_gvisor_workspace(names: list[str]) -> None:
    name = started(names, "--memory", "96M")
    r = cli("exec", name, "--", "python3", "-c", "x = bytearray(300 << 20)")
    assert r.returncode != 0, r
    # --pids: each user inside has at most that many tasks (RLIMIT_NPROC in the Sentry)
    limited = started(names, "--pids", "12")
    r = cli("exec", limited, "--", "sh", "-c", "i=0; while [ $i -lt 30 ]; do sleep 5 & i=$((i+1)); done")
    assert r.returncode != 0 and "Cannot fork" in r.stderr, r
    assert ok("exec", "-u", "1000", limited, "--", "sh", "-c", "sleep 0 & wait; echo other-user") == "other-user\n"


def test_a_crashed_daemon_leaves_nothing_and_the_workspace_starts_again(tmp_path: Path) -> None:
    """SIGKILL the daemon while a gvisor workspace runs: runsc, its gofer and Sentry die
    with the workspace's init (they are in its pid namespace); the next daemon records
    the workspace as stopped, and it starts again with its files."""
    from daemons import private_daemon

    with private_daemon() as d:
        name = f"gv-{uuid.uuid4().hex[:8]}"
        ok("create", name, "--isolation", "gvisor")
        ok("start", name)
        ok("exec", name, "--", "sh", "-c", "echo survived > /root/f; sleep 300 >/dev/null 2>&1 &")
        assert d.proc is not None
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        nothing_left()
        assert not glob.glob(f"/sys/fs/cgroup/*/silo/ws-*-{name}")
        d.start()
        assert client_state(name) == "stopped"
        ok("start", name)
        assert ok("exec", name, "--", "cat", "/root/f") == "survived\n"
        ok("rm", "-f", name)
        nothing_left()
