"""Warm sandboxes: the spawner builds the next sandbox of a plan while a run of it runs.

What must hold: a parked sandbox is already fully built and hardened; the next run of
the same plan uses it and gets its own argv, env and stdio; anything else about the
plan that differs starts cold; a custom seccomp profile is still in force; a parked
sandbox that dies is replaced; closing the Sandbox leaves nothing.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from procs import children, comm, sdk_spawner, settle

from silo import Sandbox
from silo.sys.seccomp import DEFAULT_PROFILE

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs as root (the unprivileged runs are in test_sdk)")


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _warm(spawner: int) -> list[int]:
    return [pid for pid in children(spawner) if comm(pid) == "silo-warm"]


def test_a_parked_sandbox_is_built_and_hardened_and_the_next_run_uses_it() -> None:
    with Sandbox() as sb:
        assert sb.run(["true"]).exit_code == 0
        spawner = sdk_spawner()
        warm = settle(lambda: _warm(spawner), lambda v: len(v) == 1)
        assert len(warm) == 1, warm
        pid = warm[0]
        status = _status(pid)
        assert status["NoNewPrivs"] == "1"
        assert status["Seccomp"] == "2"  # the default filter is loaded before it parks
        assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
        assert int(status["Uid"].split()[0]) >= 1000000000  # mapped, never host root
        # PID 1 is already silo-init (from its sealed memfd), waiting for the command; it
        # holds /dev/null as stdio and its channel to the spawner, nothing the spawner had
        # open when it was cloned (another run's pipes, sockets)
        assert os.readlink(f"/proc/{pid}/exe").startswith("/memfd:silo-init")
        links = sorted(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
        assert links[:3] == ["/dev/null"] * 3 and len(links) == 4 and links[3].startswith("socket:"), links
        for ns in ("mnt", "pid", "user", "net", "ipc", "uts"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        proc = sb.start(["sleep", "30"])
        try:
            assert proc.pid == pid  # the parked sandbox ran it
        finally:
            proc.kill()
            assert proc.wait(timeout=10).exit_code == 137


def test_each_warm_run_gets_its_own_argv_env_and_stdio() -> None:
    with Sandbox(env={"BASE": "b"}) as sb:
        sb.run(["true"])
        first = sb.run(["sh", "-c", 'echo "$BASE $ONE $TWO"; cat'], env={"ONE": "1"}, input=b"in-1\n")
        second = sb.run(["sh", "-c", 'echo "$BASE $ONE $TWO"; cat >&2'], env={"TWO": "2"}, input=b"in-2\n")
    assert (first.exit_code, first.stdout, first.stderr) == (0, b"b 1 \nin-1\n", b"")
    assert (second.exit_code, second.stdout, second.stderr) == (0, b"b  2\n", b"in-2\n")


def test_a_run_with_another_workdir_starts_cold_and_is_right() -> None:
    with Sandbox() as sb:
        sb.run(["true"])
        assert sb.run(["pwd"], workdir="/tmp").stdout == b"/tmp\n"
        assert sb.run(["pwd"]).stdout == b"/\n"


def test_a_custom_seccomp_profile_holds_in_every_run(tmp_path: Path) -> None:
    profile = json.loads(DEFAULT_PROFILE.read_text())
    for entry in profile["syscalls"]:
        if entry.get("action") == "SCMP_ACT_ALLOW" and not entry.get("args"):
            entry["names"] = [n for n in entry["names"] if n not in ("mkdir", "mkdirat")]
    path = tmp_path / "no-mkdir.json"
    path.write_text(json.dumps(profile))
    os.chmod(tmp_path, 0o755)
    with Sandbox(seccomp=str(path)) as sb:
        for _ in range(3):  # plans with their own profile are not pooled: all cold
            r = sb.run(["sh", "-c", "mkdir /tmp/x 2>&1; echo $?"])
            assert r.stdout.endswith(b"1\n") and b"Operation not permitted" in r.stdout, r


def test_a_parked_sandbox_that_dies_is_replaced() -> None:
    with Sandbox() as sb:
        sb.run(["true"])
        spawner = sdk_spawner()
        warm = settle(lambda: _warm(spawner), lambda v: len(v) == 1)
        os.kill(warm[0], signal.SIGKILL)
        assert sb.run(["echo", "still"]).stdout == b"still\n"


def test_closing_the_sandbox_drops_its_parked_sandbox() -> None:
    sb = Sandbox()
    sb.run(["true"])
    spawner = sdk_spawner()
    assert settle(lambda: _warm(spawner), lambda v: len(v) == 1)
    sb.close()
    assert settle(lambda: _warm(spawner), lambda v: not v) == []
