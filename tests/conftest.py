"""Shared fixtures.

``run_sandbox`` runs a one-shot sandbox through the SDK and returns a
:class:`silo.Result`; it is parametrised so every test that uses it runs twice:
as root (in-process SDK) and as an unprivileged user that the fixture creates
(``silotest``), through a world-readable copy of ``src/`` run by that user.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from networld import world  # noqa: F401  (the network tests' session fixture: tests/networld.py)

REPO = Path(__file__).resolve().parent.parent
TEST_USER = "silotest"
IS_ROOT = os.geteuid() == 0


def ensure_test_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        if not IS_ROOT:
            pytest.skip("creating the unprivileged test user needs root")
        subprocess.run(
            ["useradd", "--create-home", "--shell", "/bin/bash", TEST_USER],
            check=True, capture_output=True,
        )
        return pwd.getpwnam(TEST_USER)


@pytest.fixture(scope="session")
def unpriv_src() -> Iterator[Path]:
    """A copy of src/ that the unprivileged test user can read."""
    ensure_test_user()
    tmp = Path(tempfile.mkdtemp(prefix="silo-test-src-"))
    os.chmod(tmp, 0o755)
    shutil.copytree(REPO / "src" / "silo", tmp / "silo",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for root, dirs, files in os.walk(tmp):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


_RUNNER = r"""
import base64, json, sys
sys.path.insert(0, sys.argv[1])
sys.path.append("/usr/lib/python3/dist-packages")
from silo import Sandbox, SiloError
req = json.loads(sys.stdin.read())
try:
    with Sandbox(**req["spec"]) as sb:
        r = sb.run(req["argv"], input=base64.b64decode(req["input"]) if req["input"] is not None else None)
    out = {"exit_code": r.exit_code, "stdout": base64.b64encode(r.stdout).decode(),
           "stderr": base64.b64encode(r.stderr).decode(), "limit": r.limit}
except SiloError as e:
    out = {"error": type(e).__name__, "message": e.message}
print(json.dumps(out))
"""


class UnprivResult:
    def __init__(self, d: dict[str, Any]) -> None:
        self.exit_code: int = d["exit_code"]
        self.stdout: bytes = base64.b64decode(d["stdout"])
        self.stderr: bytes = base64.b64decode(d["stderr"])
        self.limit: str | None = d["limit"]


def _run_unprivileged(src: Path, argv: list[str], input: bytes | None, spec: dict[str, Any]) -> Any:
    import silo

    req = json.dumps({"argv": argv, "spec": spec,
                      "input": base64.b64encode(input).decode() if input is not None else None})
    proc = subprocess.run(
        ["runuser", "-u", TEST_USER, "--", "/usr/bin/python3", "-I", "-c", _RUNNER, str(src)],
        input=req.encode(), capture_output=True, timeout=120, cwd="/",
    )
    if proc.returncode != 0:
        raise AssertionError(f"unprivileged runner failed: {proc.stderr.decode()[-2000:]}")
    out = json.loads(proc.stdout)
    if "error" in out:
        raise getattr(silo, out["error"])(out["message"])
    return UnprivResult(out)


@pytest.fixture(params=["root", "unprivileged"])
def run_sandbox(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``run_sandbox(argv, input=None, **spec)`` -> Result-like (exit_code, stdout, stderr, limit)."""
    if not IS_ROOT:
        pytest.skip("the sandbox tests are run by root, which also creates the unprivileged user")
    if request.param == "root":
        from silo import Sandbox

        def run_root(argv: list[str], input: bytes | None = None, **spec: Any) -> Any:
            with Sandbox(**spec) as sb:
                return sb.run(argv, input=input)

        run_root.mode = "root"  # type: ignore[attr-defined]
        return run_root
    src = request.getfixturevalue("unpriv_src")

    def run_user(argv: list[str], input: bytes | None = None, **spec: Any) -> Any:
        return _run_unprivileged(src, argv, input, spec)

    run_user.mode = "unprivileged"  # type: ignore[attr-defined]
    return run_user


@pytest.fixture
def silo_cli() -> list[str]:
    """The command that runs the CLI from this checkout."""
    launcher = REPO / ".venv" / "bin" / "silo"
    if launcher.exists():
        return [str(launcher)]
    return [sys.executable, "-m", "silo.cli.main"]


@pytest.fixture
def user_silo_cli(unpriv_src: Path) -> list[str]:
    """The CLI as the unprivileged test user can run it, wherever this checkout lives
    (a clone under a 0700 directory such as /root is out of that user's reach)."""
    code = (f"import sys; sys.path.insert(0, {str(unpriv_src)!r}); "
            "from silo.cli.client import main; main()")
    return ["/usr/bin/python3", "-c", code]


@pytest.fixture(scope="module")
def daemon() -> Iterator[Any]:
    """A private silod for the test module (tests/integration/daemons.py), stopped after it.
    The modules that use it import ``daemons`` themselves (for its types), which puts it
    on sys.path before this runs."""
    from daemons import private_daemon

    with private_daemon() as d:
        yield d
