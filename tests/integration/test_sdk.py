"""``silo.Sandbox`` end to end: real sandboxes from Python.

Tests that take the ``run_sandbox`` fixture run twice: as root (this process's SDK) and
as the unprivileged ``silotest`` user (a fresh interpreter run by that user). The
others use the SDK in this process, as root. Host directories handed to sandboxes live
under a 0755 directory so that both the unprivileged user and a root-run sandbox's
mapped ids can reach them.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import silo
from silo import (
    CommandNotExecutable,
    CommandNotFound,
    LimitUnavailable,
    NotFoundError,
    Sandbox,
    SpecError,
)

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.skip("the SDK integration tests run as root (and as a user root creates)", allow_module_level=True)

RunSandbox = Callable[..., Any]


@pytest.fixture(scope="module")
def shared() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="silo-sdk-data-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def hostdir(shared: Path, request: pytest.FixtureRequest) -> Path:
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "_")
    path = shared / name
    path.mkdir()
    os.chmod(path, 0o755)
    return path


@pytest.fixture(scope="module")
def image(shared: Path) -> Path:
    """A tiny image: busybox-static plus a few applets; nothing of the host."""
    busybox = "/bin/busybox"
    if not os.path.exists(busybox):
        pytest.skip("busybox-static is not installed (apt package busybox-static)")
    root = shared / "image"
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in ("sh", "ls", "cat", "id", "echo"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "image-release").write_text("tiny\n")
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o755)
    return root


# the issue's example ----------------------------------------------------------------------


def test_issue_example(hostdir: Path) -> None:
    (hostdir / "answer.py").write_text("print(6*7)\n")
    with Sandbox(isolation="process", memory="256M", mounts=[f"{hostdir}:/data:ro"]) as sb:
        r = sb.run(["python3", "-c", "print(6*7)"], timeout=10)
        assert r.exit_code == 0 and r.stdout == b"42\n"
        assert r.stderr == b"" and r.limit is None
        r = sb.run(["python3", "/data/answer.py"], timeout=10)
        assert r.exit_code == 0 and r.stdout == b"42\n"
    assert isinstance(r, silo.Result)


def test_each_run_is_a_fresh_sandbox() -> None:
    with Sandbox() as sb:
        first = sb.run(["sh", "-c", "echo left > /marker && echo wrote"])
        second = sb.run(["sh", "-c", "test -e /marker && echo still-there || echo fresh"])
    assert first.stdout == b"wrote\n", first.stderr
    assert second.stdout == b"fresh\n"


# run options ----------------------------------------------------------------------------------


def test_input(run_sandbox: RunSandbox) -> None:
    r = run_sandbox(["cat"], input=b"hello\x00world\n")
    assert r.exit_code == 0 and r.stdout == b"hello\x00world\n"
    big = os.urandom(1 << 20)
    r = run_sandbox(["sh", "-c", "wc -c"], input=big)
    assert r.stdout.strip() == str(len(big)).encode()
    r = run_sandbox(["sh", "-c", "cat; echo end"])  # no input: empty stdin, no hang
    assert r.stdout == b"end\n"


def test_env(run_sandbox: RunSandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOST_SECRET", "hunter2")
    r = run_sandbox(["env"], env={"A": "1", "B": "x y"})
    env = dict(line.split("=", 1) for line in r.stdout.decode().splitlines())
    assert env.pop("A") == "1" and env.pop("B") == "x y"
    assert set(env) <= {"PATH", "HOME", "TERM"}
    assert "HOST_SECRET" not in r.stdout.decode()


def test_run_level_env_workdir_timeout() -> None:
    with Sandbox(env={"A": "1", "B": "2"}, workdir="/srv") as sb:
        r = sb.run(["sh", "-c", 'echo "$A $B"; pwd'], env={"B": "run"}, workdir="/w/run")
        assert r.stdout == b"1 run\n/w/run\n", r.stderr
        r = sb.run(["pwd"])
        assert r.stdout == b"/srv\n"
        start = time.monotonic()
        r = sb.run(["sleep", "10"], timeout=0.5)
        assert r.exit_code == 137 and r.limit == "timeout"
        assert time.monotonic() - start < 4
        r = sb.run(["sleep", "0.1"], timeout="5s")
        assert r.exit_code == 0 and r.limit is None
        with pytest.raises(SpecError):
            sb.run(["true"], timeout="soon")
        with pytest.raises(SpecError):
            sb.run(["true"], workdir="relative")
        with pytest.raises(SpecError):
            sb.run(["true"], env={"1X": "y"})
        with pytest.raises(SpecError):
            sb.run([])
        with pytest.raises(SpecError, match="NUL"):  # would reach the command cut short
            sb.run(["echo", "a\0b"])
        with pytest.raises(SpecError):
            sb.run(["true"], env={"A": "x\0y"})


def test_workdir(run_sandbox: RunSandbox) -> None:
    r = run_sandbox(["sh", "-c", "pwd; touch here && echo writable"], workdir="/work/dir")
    assert r.stdout == b"/work/dir\nwritable\n", r.stderr


def test_timeout(run_sandbox: RunSandbox) -> None:
    start = time.monotonic()
    r = run_sandbox(["sh", "-c", "sleep 10 & sleep 10"], timeout="1s")
    assert r.exit_code == 137
    assert r.limit == "timeout"
    assert time.monotonic() - start < 8


def test_private_writable_tmp_and_home(run_sandbox: RunSandbox) -> None:
    r = run_sandbox(["sh", "-c", "echo t > /tmp/f && cat /tmp/f; echo h > $HOME/f && cat $HOME/f"])
    assert (r.exit_code, r.stdout) == (0, b"t\nh\n"), r.stderr


def test_mount_rw_writes_through(run_sandbox: RunSandbox, hostdir: Path) -> None:
    os.chmod(hostdir, 0o777)
    (hostdir / "in").write_text("from host\n")
    r = run_sandbox(["sh", "-c", "cat /data/in; echo from sandbox > /data/out"], mounts=[f"{hostdir}:/data"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout == b"from host\n"
    out = hostdir / "out"
    assert out.read_text() == "from sandbox\n"
    assert out.stat().st_uid != 0  # never host root
    if run_sandbox.mode == "unprivileged":  # type: ignore[attr-defined]
        import pwd

        assert out.stat().st_uid == pwd.getpwnam("silotest").pw_uid


def test_mount_ro_is_refused_with_erofs(run_sandbox: RunSandbox, hostdir: Path) -> None:
    os.chmod(hostdir, 0o777)
    probe = ("import errno, os\n"
             "try:\n"
             "    os.open('/data/f', os.O_WRONLY | os.O_CREAT)\n"
             "    print('wrote')\n"
             "except OSError as e:\n"
             "    print(errno.errorcode[e.errno])\n")
    r = run_sandbox(["python3", "-c", probe], mounts=[f"{hostdir}:/data:ro"])
    assert r.stdout == b"EROFS\n", r.stderr
    assert not (hostdir / "f").exists()


# start / kill / wait ----------------------------------------------------------------------------------


def _nspid(pid: int) -> list[str]:
    """The pid's NSpid line ([] once it is gone): ``[pid, "1"]`` for a sandbox's init."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return line.split()[1:]
    except OSError:
        pass
    return []


def test_start_pid_kill_wait() -> None:
    with Sandbox() as sb:
        proc = sb.start(["sleep", "30"])
        assert proc.pid > 0
        assert _nspid(proc.pid) == [str(proc.pid), "1"]  # the sandbox's init, PID 1 inside
        start = time.monotonic()
        proc.kill()
        result = proc.wait(timeout=10)
        assert result.exit_code == 137
        assert time.monotonic() - start < 5
        assert proc.wait() is result  # idempotent
        assert _nspid(proc.pid) != [str(proc.pid), "1"]


def test_start_with_stdout_and_signal(hostdir: Path) -> None:
    r, w = os.pipe()
    try:
        with Sandbox() as sb:
            proc = sb.start(["sh", "-c", 'trap "echo term; exit 3" TERM; echo up; while :; do sleep 0.05; done'],
                            stdout=w)
            os.close(w)
            w = -1
            with os.fdopen(r, "rb", closefd=False) as f:
                assert f.readline() == b"up\n"
                proc.send_signal(signal.SIGTERM)
                result = proc.wait(timeout=10)
                assert f.read() == b"term\n"
        assert result.exit_code == 3
    finally:
        os.close(r)
        if w != -1:
            os.close(w)


def test_start_timeout_kills() -> None:
    with Sandbox() as sb:
        proc = sb.start(["sleep", "30"], timeout=0.3)
        result = proc.wait(timeout=10)
    assert result.exit_code == 137 and result.limit == "timeout"


def test_closing_the_sandbox_kills_started_processes() -> None:
    # Sandbox.close() documents: "sandboxes still running from start() are killed".
    sb = Sandbox()
    proc = sb.start(["sleep", "30"])
    pid = proc.pid
    try:
        sb.close()
        deadline = time.monotonic() + 5
        while _nspid(pid) == [str(pid), "1"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _nspid(pid) != [str(pid), "1"], "the started sandbox outlived Sandbox.close()"
        with pytest.raises(SpecError, match="closed"):
            sb.run(["true"])
    finally:
        proc.kill()
        proc.wait(timeout=10)


# threads ----------------------------------------------------------------------------------


def test_threads_run_sandboxes_at_once() -> None:
    errors: list[BaseException] = []
    results: dict[int, list[bytes]] = {}
    barrier = threading.Barrier(8)

    with Sandbox() as sb:
        def work(n: int) -> None:
            try:
                barrier.wait(timeout=30)
                out = []
                for i in range(5):
                    r = sb.run(["sh", "-c", f"sleep 0.05; echo {n}-{i}"], timeout=30)
                    assert r.exit_code == 0, r.stderr
                    out.append(r.stdout)
                results[n] = out
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        elapsed = time.monotonic() - start
    assert not errors, errors
    assert results == {n: [f"{n}-{i}\n".encode() for i in range(5)] for n in range(8)}
    assert elapsed < 8 * 5 * 0.05 + 10  # concurrent, not one after the other behind a lock
    # threads share nothing: another sandbox object at the same time works too
    with Sandbox() as a, Sandbox(env={"X": "b"}) as b:
        pa = a.start(["sleep", "1"])
        assert b.run(["sh", "-c", "echo $X"]).stdout == b"b\n"
        pa.kill()
        assert pa.wait(timeout=10).exit_code == 137


# limits and errors ----------------------------------------------------------------------------------


def test_memory_limit_reports_the_limit() -> None:
    with Sandbox(memory="32M") as sb:
        r = sb.run(["python3", "-c", "b = []\nwhile True: b.append(bytearray(8 << 20))"], timeout=60)
    assert r.exit_code == 137 and r.limit == "memory"


def test_errors_raise_the_right_classes(run_sandbox: RunSandbox, hostdir: Path) -> None:
    with pytest.raises(SpecError, match="bad memory size"):
        run_sandbox(["true"], memory="12Q")
    with pytest.raises(SpecError, match="bad timeout"):
        run_sandbox(["true"], timeout="5y")
    with pytest.raises(SpecError, match="absolute host path"):
        run_sandbox(["true"], mounts=["relative:/data"])
    with pytest.raises(SpecError, match="unknown isolation"):
        run_sandbox(["true"], isolation="bogus")
    with pytest.raises(NotFoundError, match="does not exist"):
        run_sandbox(["true"], mounts=[f"{hostdir}/missing:/data"])
    with pytest.raises(NotFoundError, match="root directory"):
        run_sandbox(["true"], root=f"{hostdir}/no-image")
    with pytest.raises(CommandNotFound, match="no-such-cmd"):
        run_sandbox(["no-such-cmd"])
    with pytest.raises(CommandNotExecutable):
        run_sandbox(["/etc/passwd"])


def test_limits_need_privileges(run_sandbox: RunSandbox) -> None:
    for limit in ({"memory": "64M"}, {"pids": 32}, {"cpus": 1}):
        if run_sandbox.mode == "unprivileged":  # type: ignore[attr-defined]
            with pytest.raises(LimitUnavailable) as info:
                run_sandbox(["true"], **limit)
            assert "run as root" in info.value.message or "delegation" in info.value.message
        else:
            assert run_sandbox(["true"], **limit).exit_code == 0


def test_error_classes_are_silo_errors() -> None:
    with pytest.raises(silo.UserError):
        Sandbox(memory="lots")
    with pytest.raises(silo.SiloError):
        Sandbox(hostname="-bad-")
    with Sandbox() as sb:
        with pytest.raises(CommandNotFound) as info:
            sb.run(["definitely-not-here"])
    assert info.value.exit_code == 127


# image root ----------------------------------------------------------------------------------


def test_image_root(run_sandbox: RunSandbox, image: Path, hostdir: Path) -> None:
    (hostdir / "host-marker").write_text("host\n")
    os.chmod(hostdir / "host-marker", 0o644)
    script = (f"ls /; cat /etc/image-release; "
              f"cat {hostdir}/host-marker 2>/dev/null || echo no-host-file; "
              "ls /usr 2>/dev/null || echo no-usr; test -e /etc/passwd || echo no-passwd; "
              "ls /dev/null /proc/self/status >/dev/null && echo has-dev-proc")
    r = run_sandbox(["/bin/sh", "-c", script], root=str(image))
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    top = lines[: lines.index("tiny")]
    assert set(top) <= {"bin", "etc", "dev", "proc", "tmp"} and "bin" in top
    assert lines[lines.index("tiny") + 1:] == ["no-host-file", "no-usr", "no-passwd", "has-dev-proc"]
    assert sorted(os.listdir(image)) == ["bin", "etc"]


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_a_signal_sent_before_the_command_runs_is_not_lost(warm: bool) -> None:
    # start() returns once the spawner has started the sandbox, which may still be
    # building (cold) or waiting for its command (warm). A signal sent then stays pending
    # until silo-init runs the command and is forwarded to it; PID 1 of a pid namespace
    # would otherwise drop it (no handler) and `sleep 30` would run to its end.
    with Sandbox(hostname=f"sig-{os.getpid()}-{warm}") as sb:
        if warm:
            sb.run(["true"])  # leaves a parked sandbox of this spec
        proc = sb.start(["sleep", "30"])
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        result = proc.wait(timeout=10)
    assert result.exit_code == 128 + signal.SIGTERM
    assert time.monotonic() - start < 5


def test_root_can_change_the_hosts_system_copy_on_write() -> None:
    # As root, /usr and the skeleton's /etc reach the sandbox as clones idmapped into its
    # user namespace: its root may install into /usr or edit /etc (apt-get's writes), in
    # the overlay's upper layer only. The host's files never change.
    name = f"silo-test-{os.getpid()}"
    script = (f"echo new > /usr/local/bin/{name} && cat /usr/local/bin/{name}; "
              "echo more >> /usr/share/common-licenses/GPL-3 && tail -n 1 /usr/share/common-licenses/GPL-3; "
              "echo x >> /etc/os-release && tail -n 1 /etc/os-release; stat -c %u /usr/bin/env")
    before = Path("/usr/share/common-licenses/GPL-3").read_bytes()
    with Sandbox() as sb:
        r = sb.run(["sh", "-c", script])
    assert (r.exit_code, r.stdout) == (0, b"new\nmore\nx\n0\n"), r.stderr
    assert not os.path.exists(f"/usr/local/bin/{name}")
    assert Path("/usr/share/common-licenses/GPL-3").read_bytes() == before
    assert not Path("/etc/os-release").read_text().endswith("x\n")
