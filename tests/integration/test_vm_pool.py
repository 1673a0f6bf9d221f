"""VM pools (``silo pool``): booted VMs kept ready, so a ``silo run --isolation vm`` costs
an exec, not a boot. Real QEMU boots (TCG here); one private server and state directory
for the module, so the pools never meet another test's VMs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmtools import nothing_left, pid_of, vm_processes

READY_TIMEOUT = 120.0  # a boot under TCG on a loaded 2-core machine


@pytest.fixture(scope="module")
def pool_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    top = tmp_path_factory.mktemp("vmpool")
    runtime, state = top / "run", top / "state"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "SILO_RUNTIME_DIR": str(runtime), "SILO_STATE_DIR": str(state)}
    yield env
    silo = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "silo"
    subprocess.run([str(silo), "pool", "set", "--isolation", "vm", "--size", "0"], env=env,
                   capture_output=True, check=False, timeout=60)
    subprocess.run([str(silo), "server", "stop"], env=env, capture_output=True, check=False)
    nothing_left()


def _silo(silo_cli: list[str], env: dict[str, str], *args: str,
          timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*silo_cli, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _status(silo_cli: list[str], env: dict[str, str]) -> str:
    cp = _silo(silo_cli, env, "pool")
    assert cp.returncode == 0, cp.stderr
    return cp.stdout.strip()


def _gone(pid: int) -> None:
    deadline = time.monotonic() + 10
    while pid in {int(line.split()[0]) for line in vm_processes()}:
        assert time.monotonic() < deadline, f"QEMU {pid} outlived its run"
        time.sleep(0.05)


def _wait_ready(silo_cli: list[str], env: dict[str, str], ready: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while f"{ready} ready, 0 booting" not in (line := _status(silo_cli, env)):
        assert time.monotonic() < deadline, line
        assert "failed" not in line, line
        time.sleep(0.2)


@pytest.fixture(scope="module")
def pool_of_one(silo_cli_module: list[str], pool_env: dict[str, str]) -> dict[str, str]:
    cp = _silo(silo_cli_module, pool_env, "pool", "set", "--isolation", "vm", "--size", "1")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip() == "--isolation vm: 1 kept, 0 ready, 1 booting"  # it boots at once
    _wait_ready(silo_cli_module, pool_env, 1)
    return pool_env


@pytest.fixture(scope="module")
def silo_cli_module() -> list[str]:
    return [str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "silo")]


def test_a_run_takes_a_booted_vm_with_a_fresh_identity_and_never_gives_it_back(
        silo_cli: list[str], pool_of_one: dict[str, str]) -> None:
    env = pool_of_one
    pooled = pid_of("qemu-system")
    time.sleep(3)  # the pooled VM's clock runs on: a run that boots its own shows less
    script = "hostname; cat /etc/machine-id; cut -d' ' -f1 /proc/uptime; grep -c . /etc/hosts"
    first = _silo(silo_cli, env, "run", "--isolation", "vm", "--hostname", "box1", "--", "sh", "-c", script)
    assert first.returncode == 0, first.stderr
    hostname, machine_id, uptime, _ = first.stdout.split()
    assert hostname == "box1"
    assert re.fullmatch(r"[0-9a-f]{32}", machine_id)
    assert float(uptime) >= 3.0, "the run booted a VM of its own instead of taking the pooled one"
    # The VM ended with its command; the pool boots a new one in its place.
    _gone(pooled)
    _wait_ready(silo_cli, env, 1)
    assert pid_of("qemu-system") != pooled
    second = _silo(silo_cli, env, "run", "--isolation", "vm", "--", "sh", "-c", script)
    assert second.returncode == 0, second.stderr
    hostname2, machine_id2, _, _ = second.stdout.split()
    assert hostname2 == "silo"  # the default, not the last run's
    assert machine_id2 != machine_id
    _wait_ready(silo_cli, env, 1)


def test_the_replacement_boots_after_the_runs_start_not_beside_it(
        silo_cli: list[str], pool_of_one: dict[str, str]) -> None:
    """A boot takes a whole CPU under TCG: started at the hand-over it slowed the run it
    was handed to. It starts POOL_REFILL_DELAY (1 s) later, or when the run ends."""
    env = pool_of_one
    run = subprocess.Popen([*silo_cli, "run", "--isolation", "vm", "--", "sh", "-c", "echo go; sleep 4"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert run.stdout is not None and run.stdout.readline() == b"go\n"
        assert _status(silo_cli, env) == "--isolation vm: 1 kept, 0 ready, 0 booting"
        deadline = time.monotonic() + 2.5
        while "1 booting" not in (line := _status(silo_cli, env)):
            assert time.monotonic() < deadline, f"no refill while the run goes on: {line}"
            time.sleep(0.1)
        assert run.poll() is None  # the run still goes on
    finally:
        assert run.wait(timeout=60) == 0
    _wait_ready(silo_cli, env, 1)


def test_stdio_exit_codes_and_errors_from_a_pooled_vm_are_a_cold_runs(
        silo_cli: list[str], pool_of_one: dict[str, str]) -> None:
    env = pool_of_one
    cp = subprocess.run([*silo_cli, "run", "--isolation", "vm", "-i", "-w", "/tmp", "-u", "1000:1000", "--",
                         "sh", "-c", "pwd; id -u; cat; echo err >&2; exit 7"],
                        env=env, input=b"in\n", capture_output=True, timeout=120, check=False)
    assert (cp.returncode, cp.stdout, cp.stderr) == (7, b"/tmp\n1000\nin\n", b"err\n")
    _wait_ready(silo_cli, env, 1)
    cp2 = _silo(silo_cli, env, "run", "--isolation", "vm", "--", "no-such-command")
    assert cp2.returncode == 127
    assert cp2.stderr.splitlines() == [
        "silo: no-such-command: command not found inside the VM; check the name and PATH"]
    _wait_ready(silo_cli, env, 1)


def test_another_machine_shape_boots_its_own_and_leaves_the_pool_alone(
        silo_cli: list[str], pool_of_one: dict[str, str]) -> None:
    env = pool_of_one
    pooled = pid_of("qemu-system")
    cp = _silo(silo_cli, env, "run", "--isolation", "vm", "--memory", "256M", "--", "sh", "-c",
               "cut -d' ' -f1 /proc/uptime")
    assert cp.returncode == 0, cp.stderr
    assert float(cp.stdout) < 30
    assert pid_of("qemu-system") == pooled
    assert _status(silo_cli, env) == "--isolation vm: 1 kept, 1 ready, 0 booting"


def test_a_pooled_vm_that_dies_is_replaced(silo_cli: list[str], pool_of_one: dict[str, str]) -> None:
    env = pool_of_one
    pooled = pid_of("qemu-system")
    os.kill(pooled, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while "1 ready" in (line := _status(silo_cli, env)):  # until the server sees it die
        assert time.monotonic() < deadline, line
        time.sleep(0.1)
    _wait_ready(silo_cli, env, 1)
    assert pid_of("qemu-system") != pooled
    cp = _silo(silo_cli, env, "run", "--isolation", "vm", "--", "echo", "still works")
    assert (cp.returncode, cp.stdout) == (0, "still works\n"), cp.stderr
    _wait_ready(silo_cli, env, 1)


def test_the_pool_is_kept_across_server_restarts(silo_cli: list[str], pool_of_one: dict[str, str]) -> None:
    env = pool_of_one
    assert _silo(silo_cli, env, "server", "stop").returncode == 0
    nothing_left()  # the old server's VMs went with it
    assert _status(silo_cli, env).startswith("--isolation vm: 1 kept")  # a new server, from pools.json
    _wait_ready(silo_cli, env, 1)


@pytest.mark.parametrize(("args", "message"), [
    (["--isolation", "process", "--size", "1"], "pools are for --isolation vm"),
    (["--isolation", "vm", "--size", "x"], "bad pool size 'x'"),
    (["--isolation", "vm", "--size", "17"], "bad pool size 17"),
    (["--isolation", "vm", "--size", "1", "-v", "/tmp:/tmp"], "silo pool set takes --isolation, --size"),
    (["--isolation", "vm", "--size", "1", "--memory", "lots"], "memory"),
    (["--size", "1"], "needs --isolation vm and --size N"),
    (["--isolation", "vm"], "needs --isolation vm and --size N"),
])
def test_bad_pool_settings_are_one_line_and_change_nothing(silo_cli: list[str], pool_of_one: dict[str, str],
                                                           args: list[str], message: str) -> None:
    env = pool_of_one
    cp = _silo(silo_cli, env, "pool", "set", *args)
    assert cp.returncode == 2, cp.stderr
    assert len(cp.stderr.splitlines()) == 1 and cp.stderr.startswith("silo: ") and message in cp.stderr
    assert "Traceback" not in cp.stderr
    assert _status(silo_cli, env) == "--isolation vm: 1 kept, 1 ready, 0 booting"


def _qemu_pids() -> set[int]:
    return {int(line.split()[0]) for line in vm_processes() if "qemu-system" in line.split(None, 2)[2].split()[0]
            and "<defunct>" not in line}


def test_the_sdk_keeps_a_pool_of_its_own_and_close_drops_it() -> None:
    import silo

    before = _qemu_pids()
    sandbox = silo.Sandbox(isolation="vm")
    try:
        status = sandbox.pool(1, wait=READY_TIMEOUT)
        assert status == silo.PoolStatus(size=1, ready=1, booting=0, error=""), status
        pooled = _qemu_pids() - before
        assert len(pooled) == 1, pooled
        time.sleep(3)  # the pooled VM's clock runs on: a run that boots its own shows less
        result = sandbox.run(["sh", "-c", "cut -d' ' -f1 /proc/uptime; hostname"])
        assert result.exit_code == 0, result
        uptime, hostname = result.stdout.decode().split()
        assert float(uptime) >= 3.0, "the run booted a VM of its own instead of taking the pooled one"
        assert hostname == "silo"
        _gone(pooled.pop())  # used once, never given back
        assert sandbox.pool(1, wait=READY_TIMEOUT).ready == 1  # replaced in the background
        with pytest.raises(silo.SpecError, match=r"^bad pool size 17: give 0 \(no pool\) to 16$"):
            sandbox.pool(17)
        with pytest.raises(silo.SpecError) as refused:
            silo.Sandbox(isolation="process").pool(1)
        assert refused.value.message == ("pools are for the vm level, and this sandbox is at isolation "
                                         "'process': use Sandbox(isolation='vm')")
        replacement = _qemu_pids() - before
        assert len(replacement) == 1, replacement
    finally:
        sandbox.close()
    _gone(replacement.pop())
    assert _qemu_pids() <= before


def test_size_zero_drops_the_pool_and_leaves_nothing(silo_cli: list[str], pool_of_one: dict[str, str]) -> None:
    env = pool_of_one
    cp = _silo(silo_cli, env, "pool", "set", "--isolation", "vm", "--size", "0")
    assert (cp.returncode, cp.stdout) == (0, "no pools\n"), cp.stderr
    nothing_left()
    assert _silo(silo_cli, env, "server", "stop").returncode == 0
    assert _status(silo_cli, env) == "no pools"  # and it stays dropped
