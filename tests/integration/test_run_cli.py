"""``silo run`` end to end: real sandboxes through the installed CLI, as root.

Every option of ``silo run`` is exercised and its effect observed from inside (or, for
limits, from the host's cgroup files); exit codes follow the issue (CMD's code, 128+N,
125 with one line on stderr, 126, 127); stdin, Ctrl-C and ``-t`` go through real
processes and a real pty; ``silo plan`` runs nothing; and a run leaves no mount,
process, cgroup or scratch file behind.

The whole module talks to its own CLI server: ``SILO_RUNTIME_DIR`` points to a private
directory (0711, owned by the caller) for every CLI call, and the server is stopped at
the end. Host directories given to sandboxes live under a 0755 directory, because a
root-run sandbox's users are unprivileged host ids that must be able to reach them.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_servers import client_env as _env
from cli_servers import private_runtime_dir, pty_run, server_pid
from procs import children, comm

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.skip("the CLI integration tests run as root", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
SILO = str(REPO / ".venv" / "bin" / "silo")
MiB = 1 << 20


# fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime_dir() -> Iterator[str]:
    with private_runtime_dir() as path:
        yield path


@pytest.fixture(scope="module")
def shared() -> Iterator[Path]:
    """World-traversable scratch space on the host for mount sources and images."""
    path = Path(tempfile.mkdtemp(prefix="silo-cli-data-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def hostdir(shared: Path, request: pytest.FixtureRequest) -> Path:
    path = shared / request.node.name.replace("[", "-").replace("]", "").replace("/", "_")
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)
    return path


@pytest.fixture
def cli(silo_cli: list[str], runtime_dir: str):  # type: ignore[no-untyped-def]
    """``cli(*args, input=..., env=..., cwd=..., timeout=...)`` -> CompletedProcess (bytes)."""

    def run(*args: str, input: bytes | None = None, env: dict[str, str] | None = None,
            cwd: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*silo_cli, *args], input=input, capture_output=True, timeout=timeout,
                              env=_env(runtime_dir, env), cwd=cwd or "/",
                              stdin=None if input is not None else subprocess.DEVNULL)

    return run


def _out(cp: subprocess.CompletedProcess[bytes]) -> str:
    return cp.stdout.decode()


def _ok(cp: subprocess.CompletedProcess[bytes]) -> str:
    assert cp.returncode == 0, (cp.returncode, cp.stdout, cp.stderr)
    return _out(cp)


def _assert_silo_error(cp: subprocess.CompletedProcess[bytes], code: int, *words: str) -> str:
    err = cp.stderr.decode()
    assert cp.returncode == code, (cp.returncode, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("silo: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert cp.stdout == b""
    return lines[0]


def _jobs(pid: int) -> list[int]:
    """The server's children that run a command: their PID 1 is silo-init (a warm
    sandbox being built is still the server's Python; a parked one is silo-warm)."""
    return [kid for kid in children(pid) if comm(kid) == "silo-init"]


def _mounts() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {" ".join(line.split()[3:5]) for line in f}


def _silo_cgroups(spawner_pid: int) -> list[str]:
    pattern = f"job-{spawner_pid}-*"
    return (glob.glob(f"/sys/fs/cgroup/*/silo/{pattern}") + glob.glob(f"/sys/fs/cgroup/silo/{pattern}")
            + glob.glob(f"/sys/fs/cgroup/*/silo/**/{pattern}", recursive=True))


def _wait_for(predicate, timeout: float = 5.0, interval: float = 0.02):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def _make_image(root: Path) -> Path:
    """A tiny root filesystem: busybox-static and a few applets, nothing of the host."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        pytest.skip("busybox-static is not installed (apt package busybox-static)")
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in ("sh", "ls", "cat", "id", "echo", "hostname", "env"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "image-release").write_text("tiny\n")
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
    return root


@pytest.fixture(scope="module")
def image(shared: Path) -> Path:
    return _make_image(shared / "image")


# running a command, exit codes ----------------------------------------------------------------


def test_runs_a_command_isolated(cli) -> None:  # type: ignore[no-untyped-def]
    cp = cli("run", "--", "sh", "-c", "echo out; echo err >&2; hostname; readlink /proc/self/ns/pid")
    out = _ok(cp).splitlines()
    assert out[0] == "out" and out[1] == "silo"
    assert out[2] != os.readlink("/proc/self/ns/pid")
    assert cp.stderr == b"err\n"


def test_command_without_double_dash(cli) -> None:  # type: ignore[no-untyped-def]
    assert _ok(cli("run", "echo", "a", "-n", "--x")) == "a -n --x\n"
    assert _ok(cli("run", "--", "ls", "-d", "/")) == "/\n"


@pytest.mark.parametrize("code", [0, 1, 42, 255])
def test_exit_code_is_the_commands(cli, code: int) -> None:  # type: ignore[no-untyped-def]
    assert cli("run", "--", "sh", "-c", f"exit {code}").returncode == code


@pytest.mark.parametrize(("sig", "code"), [("TERM", 143), ("KILL", 137), ("HUP", 129), ("SEGV", 139)])
def test_killed_by_signal_is_128_plus_n(cli, sig: str, code: int) -> None:  # type: ignore[no-untyped-def]
    cp = cli("run", "--", "sh", "-c", f"kill -{sig} $$")
    assert cp.returncode == code, cp.stderr


@pytest.mark.parametrize(("args", "words"), [
    (["--bogus", "--", "true"], ["--bogus", "silo run --help"]),
    ([], ["no command given"]),
    (["--"], ["no command given"]),
    (["--memory", "512M"], ["no command given"]),
    (["-v", "rel/dir:/data", "--", "true"], ["bad mount source 'rel/dir'", "absolute host path"]),
    (["-v", "/nonexistent/silo-src:/data", "--", "true"], ["/nonexistent/silo-src does not exist"]),
    (["-v", "/tmp", "--", "true"], ["bad mount '/tmp'", "HOST:GUEST"]),
    (["--memory", "12Q", "--", "true"], ["bad memory size '12Q'"]),
    (["--memory", "0", "--", "true"], ["bad memory size '0'", "greater than zero"]),
    (["--timeout", "5y", "--", "true"], ["bad timeout '5y'"]),
    (["--root", "/nonexistent/image", "--", "true"], ["root directory /nonexistent/image does not exist"]),
    (["--env-file", "/nonexistent/env", "--", "true"], ["--env-file /nonexistent/env", "No such file"]),
    (["--cpus", "lots", "--", "true"], ["bad cpu count 'lots'"]),
    (["--pids", "-3", "--", "true"], ["bad pids limit '-3'"]),
    (["-u", "root", "--", "true"], ["bad user 'root'"]),
    (["--hostname", "a_b", "--", "true"], ["bad hostname 'a_b'"]),
    (["--cap", "FLY", "--", "true"], ["unknown capability 'FLY'"]),
    (["--cap", "SYS_MODULE", "--", "true"], ["SYS_MODULE", "cannot be added"]),
    (["--rlimit", "files=3", "--", "true"], ["bad rlimit 'files=3'"]),
    (["-e", "1X=2", "--", "true"], ["bad environment entry '1X=2'"]),
    (["-w", "relative", "--", "true"], ["bad working directory 'relative'"]),
    (["--isolation", "bogus", "--", "true"], ["unknown isolation 'bogus'"]),
    (["--seccomp", "/nonexistent/profile.json", "--", "true"], ["seccomp profile", "does not exist"]),
    (["--keep", "/tmp/k", "--", "true"], ["--isolation app"]),
])
def test_silo_errors_are_one_line_and_125(cli, args: list[str], words: list[str]) -> None:  # type: ignore[no-untyped-def]
    _assert_silo_error(cli("run", *args), 125, *words)


def test_bad_env_file_content_names_file_and_line(cli, hostdir: Path) -> None:  # type: ignore[no-untyped-def]
    (hostdir / "bad.env").write_text("# ok\nA=1\nthis is not an entry\n")
    line = _assert_silo_error(cli("run", "--env-file", "bad.env", "--", "true", cwd=str(hostdir)), 125)
    assert "bad.env:3:" in line and "NAME=VALUE" in line


def test_not_executable_is_126(cli, hostdir: Path) -> None:  # type: ignore[no-untyped-def]
    _assert_silo_error(cli("run", "--", "/etc/passwd"), 126, "/etc/passwd", "not executable")
    script = hostdir / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    _assert_silo_error(cli("run", "-v", f"{hostdir}:/x:ro", "--", "/x/script.sh"), 126, "not executable")


def test_not_found_is_127(cli) -> None:  # type: ignore[no-untyped-def]
    _assert_silo_error(cli("run", "--", "no-such-command-here"), 127, "no-such-command-here", "not found")
    _assert_silo_error(cli("run", "--", "/no/such/path"), 127, "not found")


def test_help(cli) -> None:  # type: ignore[no-untyped-def]
    cp = cli("run", "--help")
    text = _ok(cp)
    for option in ("--isolation", "--root", "--volume", "--env-file", "--workdir", "--user", "--hostname",
                   "--memory", "--cpus", "--pids", "--timeout", "--cap", "--seccomp", "--rlimit", "--tty",
                   "--interactive"):
        assert option in text, option
    assert "NOT a security boundary" in text


# stdin ----------------------------------------------------------------------------------


def test_stdin_streams_with_i(cli) -> None:  # type: ignore[no-untyped-def]
    assert _ok(cli("run", "-i", "--", "cat", input=b"hi\n")) == "hi\n"
    data = os.urandom(3 * MiB)
    cp = cli("run", "-i", "--", "sha256sum", input=data)
    assert _ok(cp).split()[0] == hashlib.sha256(data).hexdigest()


def test_stdin_is_empty_without_i(cli) -> None:  # type: ignore[no-untyped-def]
    cp = cli("run", "--", "sh", "-c", "cat; echo end", input=b"secret from the host\n", timeout=20)
    assert _ok(cp) == "end\n"


def test_shell_pipeline_into_silo(runtime_dir: str, silo_cli: list[str]) -> None:
    cmd = f"echo hi | {' '.join(silo_cli)} run -i -- cat"
    cp = subprocess.run(["sh", "-c", cmd], capture_output=True, env=_env(runtime_dir), timeout=30)
    assert cp.returncode == 0 and cp.stdout == b"hi\n", cp.stderr


# isolation and root ------------------------------------------------------------------------------


def test_isolation_process_vs_app(cli) -> None:  # type: ignore[no-untyped-def]
    script = "readlink /proc/self/ns/net /proc/self/ns/mnt; id -u"
    host_net = os.readlink("/proc/self/ns/net")
    proc_out = _ok(cli("run", "--isolation", "process", "--", "sh", "-c", script)).split()
    assert proc_out[0] != host_net
    app_out = _ok(cli("run", "--isolation", "app", "--", "sh", "-c", script)).split()
    assert app_out[0] == host_net  # the host's network: no boundary
    assert app_out[1] != os.readlink("/proc/self/ns/mnt")  # but its own mount view
    assert app_out[2] == "0"


def test_root_host_is_read_only_system_and_curated_etc(cli) -> None:  # type: ignore[no-untyped-def]
    script = ("test -x /usr/bin/python3 && echo has-python; "
              "test -e /etc/shadow || echo no-shadow; "
              "test -e /etc/ssh || echo no-ssh; "
              "head -1 /etc/passwd; "
              "touch /usr/bin/x 2>/dev/null || echo usr-unchanged-on-host")
    out = _ok(cli("run", "--root", "host", "--", "sh", "-c", script)).splitlines()
    assert out[:4] == ["has-python", "no-shadow", "no-ssh", "root:x:0:0:root:/root:/bin/bash"]
    # writes to /usr (if allowed at all) land in the overlay, never on the host
    assert not os.path.exists("/usr/bin/x")


def test_private_writable_tmp_and_home(cli) -> None:  # type: ignore[no-untyped-def]
    script = ("echo t > /tmp/f && cat /tmp/f; echo h > $HOME/f && cat $HOME/f; "
              "mkdir /var/tmp/d && echo vt")
    cp = cli("run", "--", "sh", "-c", script)
    assert _ok(cp) == "t\nh\nvt\n"
    assert not os.path.exists("/tmp/f")
    cp = cli("run", "-u", "1000", "--", "sh", "-c", script)
    assert _ok(cp) == "t\nh\nvt\n"


def test_root_dir_image(cli, image: Path, hostdir: Path) -> None:  # type: ignore[no-untyped-def]
    (hostdir / "marker-on-host").write_text("x")
    script = "ls /; cat /etc/image-release; ls /usr 2>&1 || true; ls /etc"
    out = _ok(cli("run", "--root", str(image), "--", "/bin/sh", "-c", script))
    top = out.split("tiny\n")[0].split()
    assert set(top) <= {"bin", "etc", "dev", "proc", "tmp"}
    assert "usr" not in top
    assert "tiny" in out
    assert "passwd" not in out.split("tiny\n")[1]  # no generated host-style /etc in an image
    # a relative --root is resolved against the caller's directory
    rel = os.path.relpath(image, hostdir)
    assert "tiny" in _ok(cli("run", "--root", rel, "--", "cat", "/etc/image-release", cwd=str(hostdir)))
    # writes land in the overlay's upper, never in the image
    cli("run", "--root", str(image), "--", "sh", "-c", "echo changed > /etc/image-release; echo > /tmp/t")
    assert (image / "etc" / "image-release").read_text() == "tiny\n"
    assert sorted(os.listdir(image)) == ["bin", "etc"]


def test_root_dir_image_is_writable_through_the_overlay(cli, shared: Path) -> None:  # type: ignore[no-untyped-def]
    # An image owned by silo's id range (what a root-run sandbox's root maps to) is
    # writable through the overlay; the image itself never changes.
    image = _make_image(shared / "image-owned")
    base = 1_000_000_000
    for root, dirs, files in os.walk(image):
        for name in (*dirs, *files):
            os.lchown(os.path.join(root, name), base, base)
    os.lchown(image, base, base)
    script = "echo changed > /etc/image-release && cat /etc/image-release; echo t > /tmp/t && cat /tmp/t"
    assert _ok(cli("run", "--root", str(image), "--", "sh", "-c", script)) == "changed\nt\n"
    assert (image / "etc" / "image-release").read_text() == "tiny\n"


def test_root_dir_image_owned_by_host_root_is_copy_on_write(cli, image: Path) -> None:  # type: ignore[no-untyped-def]
    # Host root is never mapped into a sandbox (SECURITY.md #16), but an image it owns is
    # shown to a root-run sandbox through a read-only clone idmapped into the sandbox's
    # user namespace: the sandbox's root owns its files there and changes them in the
    # overlay's upper layer; the image itself never changes.
    script = "stat -c %u /etc/image-release; echo changed > /etc/image-release && cat /etc/image-release"
    assert _ok(cli("run", "--root", str(image), "--", "sh", "-c", script)) == "0\nchanged\n"
    assert (image / "etc" / "image-release").read_text() == "tiny\n"
    assert (image / "etc" / "image-release").stat().st_uid == 0


# mounts ----------------------------------------------------------------------------------


def test_volume_rw_writes_through(cli, hostdir: Path) -> None:  # type: ignore[no-untyped-def]
    data = hostdir / "data"
    data.mkdir()
    os.chmod(data, 0o777)
    (data / "in.txt").write_text("from host\n")
    out = _ok(cli("run", "-v", f"{data}:/data", "--", "sh", "-c", "cat /data/in.txt; echo new > /data/out.txt"))
    assert out == "from host\n"
    assert (data / "out.txt").read_text() == "new\n"
    # the sandbox's root is never host root (SECURITY.md #16)
    assert (data / "out.txt").stat().st_uid != 0


def test_volume_root_owned_file_stays_unwritable(cli, hostdir: Path) -> None:  # type: ignore[no-untyped-def]
    f = hostdir / "root-owned"
    f.write_text("keep\n")
    os.chmod(f, 0o644)
    cp = cli("run", "-v", f"{f}:/f", "--", "sh", "-c", "echo pwned > /f")
    assert cp.returncode != 0
    assert f.read_text() == "keep\n"


def test_volume_ro_is_refused(cli, hostdir: Path) -> None:  # type: ignore[no-untyped-def]
    os.chmod(hostdir, 0o777)
    cp = cli("run", "-v", f"{hostdir}:/data:ro", "--", "sh", "-c", "echo x > /data/f")
    assert cp.returncode != 0
    assert b"Read-only file system" in cp.stderr
    assert not (hostdir / "f").exists()


def test_volume_file(cli, hostdir: Path) -> None:  # type: ignore[no-untyped-def]
    conf = hostdir / "app.conf"
    conf.write_text("setting=1\n")
    assert _ok(cli("run", "-v", f"{conf}:/etc/app/app.conf:ro", "--", "cat", "/etc/app/app.conf")) == "setting=1\n"


# environment, workdir, user, hostname ----------------------------------------------------------------


def test_env_is_clean_plus_e(cli) -> None:  # type: ignore[no-untyped-def]
    cp = cli("run", "-e", "A=1", "-e", "B=two words", "--", "env",
             env={"TERM": "xterm-test", "AWS_SECRET_ACCESS_KEY": "hunter2", "LD_PRELOAD": "/x.so"})
    env = dict(line.split("=", 1) for line in _ok(cp).splitlines())
    assert set(env) == {"PATH", "HOME", "TERM", "A", "B"}
    assert env["A"] == "1" and env["B"] == "two words" and env["TERM"] == "xterm-test"
    assert env["HOME"] == "/root"


def test_env_file(cli, hostdir: Path) -> None:  # type: ignore[no-untyped-def]
    (hostdir / "vars.env").write_text("# comment\nexport X=1\nY='quoted value'\nZ=from-file\n")
    cp = cli("run", "--env-file", "vars.env", "-e", "Z=from-e", "--", "sh", "-c", 'echo "$X|$Y|$Z"',
             cwd=str(hostdir))
    assert _ok(cp) == "1|quoted value|from-e\n"


def test_workdir(cli) -> None:  # type: ignore[no-untyped-def]
    assert _ok(cli("run", "-w", "/work/dir", "--", "pwd")) == "/work/dir\n"
    out = _ok(cli("run", "-u", "1000", "-w", "/w", "--", "sh", "-c", "pwd; touch x && echo writable"))
    assert out == "/w\nwritable\n"


def test_user(cli) -> None:  # type: ignore[no-untyped-def]
    out = _ok(cli("run", "-u", "1000:100", "--", "sh", "-c", "id -u; id -g; echo $HOME; cat /proc/self/uid_map"))
    uid, gid, home, uid_map = out.splitlines()
    assert (uid, gid, home) == ("1000", "100", "/home/user")
    inside, outside, _count = map(int, uid_map.split())
    assert inside == 0 and outside > 0  # never host root
    assert _ok(cli("run", "-u", "1234", "--", "id", "-g")) == "1234\n"


def test_hostname(cli) -> None:  # type: ignore[no-untyped-def]
    assert _ok(cli("run", "--hostname", "box-1", "--", "sh", "-c", "hostname; cat /etc/hostname")) == "box-1\nbox-1\n"
    assert os.uname().nodename != "box-1"


# limits ----------------------------------------------------------------------------------


def _cgroup_of(pid: int) -> dict[str, str]:
    """controller -> host path of ``pid``'s cgroup (v1 and v2)."""
    out = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, ctls, path = line.rstrip("\n").split(":", 2)
            if not ctls:
                out["unified"] = f"/sys/fs/cgroup{path}"
            for ctl in ctls.split(","):
                if ctl:
                    out[ctl] = f"/sys/fs/cgroup/{ctl}{path}"
    return out


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def test_memory_cpus_pids_land_in_the_cgroup(silo_cli: list[str], runtime_dir: str) -> None:
    proc = subprocess.Popen([*silo_cli, "run", "--memory", "512M", "--cpus", "1.5", "--pids", "256", "--",
                             "sh", "-c", "echo ready; sleep 20"], env=_env(runtime_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        server = server_pid(runtime_dir)
        assert server
        kids = _jobs(server)
        assert len(kids) == 1
        cg = _cgroup_of(kids[0])
        if "memory" in cg and os.path.exists(f"{cg['memory']}/memory.limit_in_bytes"):  # v1
            assert "/silo/" in cg["memory"]
            assert int(_read(f"{cg['memory']}/memory.limit_in_bytes")) == 512 * MiB
            quota = int(_read(f"{cg['cpu']}/cpu.cfs_quota_us"))
            period = int(_read(f"{cg['cpu']}/cpu.cfs_period_us"))
            assert quota / period == pytest.approx(1.5)
            assert _read(f"{cg['pids']}/pids.max") == "256"
        else:  # v2
            base = cg["unified"]
            assert int(_read(f"{base}/memory.max")) == 512 * MiB
            quota_s, period_s = _read(f"{base}/cpu.max").split()
            assert int(quota_s) / int(period_s) == pytest.approx(1.5)
            assert _read(f"{base}/pids.max") == "256"
    finally:
        proc.send_signal(signal.SIGTERM)  # forwarded to the sandbox
        proc.communicate(timeout=10)
    assert proc.returncode == 143


def test_a_fresh_server_removes_a_killed_ones_empty_cgroups(silo_cli: list[str]) -> None:
    # What a server killed mid-run can leave: the empty cgroup of a job (or VM) that is
    # gone. The next server sweeps empty ones older than a few seconds when it starts.
    parents = glob.glob("/sys/fs/cgroup/*/silo") or glob.glob("/sys/fs/cgroup/silo")
    assert parents
    stale = [os.path.join(parent, f"vm-{(1 << 22) + 4321}-1") for parent in parents
             if os.path.exists(os.path.join(parent, "cgroup.procs"))]
    for path in stale:
        os.mkdir(path)
        os.utime(path, (time.time() - 60, time.time() - 60))
    try:
        with private_runtime_dir() as fresh:
            _ok(subprocess.run([*silo_cli, "run", "--memory", "64M", "--", "true"], capture_output=True,
                               env=_env(fresh), timeout=60, stdin=subprocess.DEVNULL))
        assert [p for p in stale if os.path.exists(p)] == []
    finally:
        for path in stale:
            with contextlib.suppress(OSError):
                os.rmdir(path)


def test_memory_limit_kills_a_balloon(cli) -> None:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    cp = cli("run", "--memory", "32M", "--", "python3", "-c",
             "b = []\nwhile True: b.append(bytearray(8 << 20))", timeout=60)
    assert cp.returncode == 137, cp.stderr
    assert b"memory limit" in cp.stderr
    assert b"Traceback" not in cp.stderr
    assert time.monotonic() - start < 30
    # within the limit, the same command works
    assert _ok(cli("run", "--memory", "512M", "--", "python3", "-c",
                   "b = bytearray(64 << 20); print(len(b))")) == f"{64 * MiB}\n"


def test_pids_limit_contains_a_fork_loop(cli) -> None:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    cp = cli("run", "--pids", "16", "--", "sh", "-c", "while :; do sleep 30 & done", timeout=60)
    assert time.monotonic() - start < 20
    assert cp.returncode != 0
    assert b"process limit" in cp.stderr
    # below the limit nothing is refused
    assert _ok(cli("run", "--pids", "16", "--", "sh", "-c", "sleep 0 & sleep 0 & wait; echo ok")) == "ok\n"


def test_timeout_kills_and_says_so(cli) -> None:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    cp = cli("run", "--timeout", "1s", "--", "sleep", "10", timeout=30)
    elapsed = time.monotonic() - start
    assert cp.returncode == 137
    assert b"timeout" in cp.stderr
    assert 0.9 <= elapsed < 4, elapsed
    # a command that finishes in time is not affected
    assert _ok(cli("run", "--timeout", "30s", "--", "echo", "in time")) == "in time\n"


def test_timeout_kills_the_whole_tree(cli, runtime_dir: str) -> None:  # type: ignore[no-untyped-def]
    cp = cli("run", "--timeout", "500ms", "--", "sh", "-c", "sleep 60 & sleep 60 & sleep 60", timeout=30)
    assert cp.returncode == 137
    server = server_pid(runtime_dir)
    assert server
    assert _wait_for(lambda: not _jobs(server)), _jobs(server)


def test_cpus_limits_cpu_time(cli) -> None:  # type: ignore[no-untyped-def]
    busy = ("import os, time\n"
            "t0 = time.monotonic()\n"
            "while time.monotonic() - t0 < 1.0: pass\n"
            "t = os.times()\n"
            "print(t.user + t.system)")
    used = float(_ok(cli("run", "--cpus", "0.5", "--", "python3", "-c", busy)))
    assert 0.15 <= used <= 0.75, used


def test_rlimit(cli) -> None:  # type: ignore[no-untyped-def]
    assert _ok(cli("run", "--rlimit", "nofile=64", "--", "sh", "-c", "ulimit -n; ulimit -Hn")) == "64\n64\n"
    out = _ok(cli("run", "--rlimit", "nofile=32:128", "--rlimit", "core=0", "--", "sh", "-c",
                  "ulimit -Sn; ulimit -Hn; ulimit -c"))
    assert out == "32\n128\n0\n"


# hardening options ----------------------------------------------------------------------------------


def _caps(text: str) -> dict[str, int]:
    return {line.split(":")[0]: int(line.split()[1], 16) for line in text.splitlines() if line.startswith("Cap")}


def test_cap_adds_exactly_one(cli) -> None:  # type: ignore[no-untyped-def]
    caps = _caps(_ok(cli("run", "--", "grep", "^Cap", "/proc/self/status")))
    assert caps == {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapBnd": 0, "CapAmb": 0}
    caps = _caps(_ok(cli("run", "--cap", "NET_BIND_SERVICE", "--", "grep", "^Cap", "/proc/self/status")))
    assert caps["CapEff"] == caps["CapBnd"] == caps["CapPrm"] == 1 << 10


@pytest.mark.parametrize("user", ["0", "1000"])
def test_cap_net_bind_service_binds_a_low_port(cli, user: str) -> None:  # type: ignore[no-untyped-def]
    bind = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 80)); print('bound')"
    denied = cli("run", "-u", user, "--", "python3", "-c", bind)
    assert denied.returncode != 0 and b"Permission denied" in denied.stderr
    cp = cli("run", "-u", user, "--cap", "NET_BIND_SERVICE", "--", "python3", "-c", bind)
    assert cp.returncode == 0 and cp.stdout == b"bound\n", cp.stderr


def test_seccomp_default_unconfined_and_file(cli, hostdir: Path) -> None:  # type: ignore[no-untyped-def]
    probe = "grep '^Seccomp:' /proc/self/status; unshare -U true 2>/dev/null && echo nested-userns || echo refused"
    assert _ok(cli("run", "--", "sh", "-c", probe)) == "Seccomp:\t2\nrefused\n"
    assert _ok(cli("run", "--seccomp", "default", "--", "sh", "-c", probe)) == "Seccomp:\t2\nrefused\n"
    assert _ok(cli("run", "--seccomp", "unconfined", "--", "sh", "-c", "grep '^Seccomp:' /proc/self/status")) \
        == "Seccomp:\t0\n"
    profile = hostdir / "profile.json"
    profile.write_text('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": ['
                       '{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}')
    script = "mkdir /d 2>/dev/null && echo made || echo refused; echo x > /f && echo wrote"
    assert _ok(cli("run", "--seccomp", str(profile), "--", "sh", "-c", script)) == "refused\nwrote\n"
    # relative profile paths are the caller's
    assert _ok(cli("run", "--seccomp", "profile.json", "--", "sh", "-c", script, cwd=str(hostdir))) \
        == "refused\nwrote\n"


def test_bad_seccomp_file_is_a_silo_error(cli, hostdir: Path) -> None:  # type: ignore[no-untyped-def]
    (hostdir / "bad.json").write_text("{not json")
    _assert_silo_error(cli("run", "--seccomp", str(hostdir / "bad.json"), "--", "true"), 125, "bad.json")


# signals and terminals ----------------------------------------------------------------------------------


def test_ctrl_c_reaches_the_command(silo_cli: list[str], runtime_dir: str) -> None:
    # The foreground child exists before "ready" is written: with 'echo ready; sleep 30' a
    # Ctrl-C that lands between the echo and the fork of sleep reaches sh alone, and sh
    # runs its trap only when sleep ends (the cause of this test's rare timeouts under load).
    proc = subprocess.Popen(
        [*silo_cli, "run", "--", "sh", "-c", 'trap "echo got INT; exit 7" INT; (echo ready; exec sleep 30)'],
        env=_env(runtime_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=15)
    assert out == b"got INT\n", err
    assert proc.returncode == 7
    assert time.monotonic() - start < 5


def test_tty_gives_a_pty_with_the_window_size(silo_cli: list[str], runtime_dir: str) -> None:
    out, code = pty_run([*silo_cli, "run", "-t", "--", "sh", "-c", "tty; stty size; test -t 0 && echo stdin-tty"],
                         _env(runtime_dir), 33, 97)
    lines = out.decode(errors="replace").replace("\r", "").splitlines()
    assert code == 0, out
    assert lines[0].startswith("/dev/pts/"), lines
    assert lines[1] == "33 97"
    assert lines[2] == "stdin-tty"


def test_tty_resize_propagates(silo_cli: list[str], runtime_dir: str) -> None:
    script = ('trap "stty size; exit 3" WINCH; echo ready; '
              'i=0; while [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done; echo no-winch')
    resized = []

    def resize(pid: int, master: int, buf: bytes) -> None:
        if b"ready" in buf and not resized:
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 132, 0, 0))
            resized.append(True)

    out, code = pty_run([*silo_cli, "run", "-t", "--", "sh", "-c", script], _env(runtime_dir), 24, 80,
                         on_output=resize)
    assert resized
    assert b"50 132" in out, out
    assert b"no-winch" not in out
    assert code == 3


def test_command_starts_with_default_signal_dispositions(cli) -> None:  # type: ignore[no-untyped-def]
    # Neither the server's ignored SIGHUP nor Python's ignored SIGXFSZ may leak into the sandbox.
    out = _ok(cli("run", "--", "grep", "-E", "^Sig(Ign|Blk):", "/proc/self/status"))
    assert out == "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"


def test_no_controlling_terminal_without_t(cli) -> None:  # type: ignore[no-untyped-def]
    out = _ok(cli("run", "--", "sh", "-c", "test -t 0 || echo no-tty; (exec 3</dev/tty) 2>/dev/null || echo no-ctty"))
    assert out == "no-tty\nno-ctty\n"


# silo plan ----------------------------------------------------------------------------------


def test_plan_prints_and_runs_nothing(hostdir: Path, silo_cli: list[str]) -> None:
    rt = tempfile.mkdtemp(prefix="silo-plan-rt-")
    os.chmod(rt, 0o711)
    try:
        os.chmod(hostdir, 0o777)
        cp = subprocess.run([*silo_cli, "plan", "-v", f"{hostdir}:/d", "--memory", "64M", "--",
                             "touch", "/d/marker"], env=_env(rt), capture_output=True, timeout=60)
        lines = _ok(cp).splitlines()
        names = [line.split(" ", 1)[0] for line in lines]
        assert names[0] == "isolation"
        assert "make-private" in names and "overlay" in names and "proc" in names and "bind" in names
        assert names.index("pivot-root") > names.index("bind")
        assert any(line.startswith("limit memory") for line in lines)
        assert lines[-1] == "exec cwd=/ touch /d/marker"
        assert not (hostdir / "marker").exists()
        assert not os.path.exists(os.path.join(rt, "spawner.sock"))  # no server started
        # bad input is reported the same way as by `silo run`
        _assert_silo_error(subprocess.run([*silo_cli, "plan", "--memory", "x", "--", "true"], env=_env(rt),
                                          capture_output=True, timeout=60), 125, "bad memory size")
    finally:
        shutil.rmtree(rt, ignore_errors=True)


# nothing left behind ----------------------------------------------------------------------------------


def test_leaves_nothing_behind(silo_cli: list[str], hostdir: Path) -> None:
    with private_runtime_dir() as runtime_dir:
        _leaves_nothing_behind(silo_cli, runtime_dir, hostdir)


def _leaves_nothing_behind(silo_cli: list[str], runtime_dir: str, hostdir: Path) -> None:
    def c(*args: str) -> subprocess.CompletedProcess[bytes]:
        # A server of its own whose warm sandboxes (one per plan, built while a run of
        # that plan runs) expire after 1 s instead of 30 s: "nothing left" covers them.
        return subprocess.run([*silo_cli, *args], capture_output=True, timeout=60, cwd="/",
                              env=_env(runtime_dir, {"SILO_WARM_IDLE": "1"}), stdin=subprocess.DEVNULL)

    _ok(c("run", "--", "true"))  # the server is up
    server = server_pid(runtime_dir)
    assert server
    mounts_before = _mounts()
    entries_before = set(os.listdir(runtime_dir))
    time.sleep(0.3)  # let the server refill its netns pool
    fds_before = _fd_count(server)
    # ordinary runs, runs with limits, killed runs and failed runs
    _ok(c("run", "-v", f"{hostdir}:/d", "--memory", "64M", "--cpus", "1", "--pids", "64", "--",
            "sh", "-c", "sleep 0.1 & mount -t tmpfs none /tmp 2>/dev/null; wait"))
    assert c("run", "--timeout", "300ms", "--memory", "64M", "--", "sleep", "10").returncode == 137
    assert c("run", "--memory", "32M", "--", "python3", "-c", "b = bytearray(256 << 20)").returncode == 137
    assert c("run", "--pids", "8", "--", "sh", "-c", "while :; do sleep 30 & done").returncode != 0
    assert c("run", "-v", "/nonexistent/x:/x", "--", "true").returncode == 125
    assert c("run", "--memory", "64M", "--", "no-such-command").returncode == 127
    assert c("run", "--", "sh", "-c", "kill -KILL $$").returncode == 137
    assert any(comm(kid) == "silo-warm" for kid in children(server)), "no warm sandbox was built"
    assert _wait_for(lambda: not children(server)), f"processes left under the server: {children(server)}"
    assert _wait_for(lambda: not _silo_cgroups(server)), _silo_cgroups(server)
    assert _mounts() - mounts_before == set()
    assert os.listdir(os.path.join(runtime_dir, "scratch")) == []
    assert set(os.listdir(runtime_dir)) == entries_before
    # the server keeps no fd of a finished sandbox (its netns pool refills when idle)
    assert _wait_for(lambda: _fd_count(server) <= fds_before), (fds_before, _fd_links(server))


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _fd_links(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


def test_unprivileged_user_can_run(user_silo_cli: list[str]) -> None:
    """The same CLI as a plain user (its own server, in its own runtime dir)."""
    import pwd

    try:
        user = pwd.getpwnam("silotest")
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", "silotest"], check=True,
                       capture_output=True)
        user = pwd.getpwnam("silotest")
    rt = tempfile.mkdtemp(prefix="silo-user-rt-")
    os.chown(rt, user.pw_uid, user.pw_gid)
    os.chmod(rt, 0o711)
    env = {"PATH": "/usr/bin:/bin", "HOME": user.pw_dir, "SILO_RUNTIME_DIR": rt}
    base = ["runuser", "-u", "silotest", "--", "env", *(f"{k}={v}" for k, v in env.items())]
    try:
        cp = subprocess.run([*base, *user_silo_cli, "run", "--", "sh", "-c",
                             "id -u; cat /proc/self/uid_map; echo x > /tmp/f && cat /tmp/f"],
                            capture_output=True, timeout=60, cwd="/")
        assert cp.returncode == 0, cp.stderr
        uid, uid_map, x = cp.stdout.decode().splitlines()
        assert uid == "0"
        assert uid_map.split() == ["0", str(user.pw_uid), "1"]
        assert x == "x"
        cp = subprocess.run([*base, *user_silo_cli, "run", "-v", "/nonexistent:/x", "--", "true"],
                            capture_output=True, timeout=60, cwd="/")
        _assert_silo_error(cp, 125, "does not exist")
        cp = subprocess.run([*base, *user_silo_cli, "run", "--isolation", "vm", "--", "true"],
                            capture_output=True, timeout=60, cwd="/")
        _assert_silo_error(cp, 125, "--isolation vm needs root")
    finally:
        subprocess.run([*base, *user_silo_cli, "server", "stop"], capture_output=True, timeout=30, cwd="/")
        time.sleep(0.1)
        shutil.rmtree(rt, ignore_errors=True)
