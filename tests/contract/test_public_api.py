"""The public API is the curated ``silo.__all__``, and importing it stays cheap.

``import silo`` must not pull in ``typing`` or ``dataclasses`` (names are loaded
lazily), and ``silo.cli.client`` - the fast path of ``silo run``, run under
``python -I -S`` - imports none of ``typing``, ``enum``, ``argparse``, ``re``, ``socket``:
each would add milliseconds to every ``silo run``. Those two checks run in a fresh
interpreter, since this one has imported everything already.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import silo
from silo.model import errors

SRC = Path(__file__).resolve().parents[2] / "src"

CURATED = [
    "AsyncClient",
    "Client",
    "CommandNotExecutable",
    "CommandNotFound",
    "DaemonUnavailable",
    "InternalError",
    "Isolation",
    "LimitUnavailable",
    "Mount",
    "NotFoundError",
    "PermissionDenied",
    "PoolStatus",
    "PrivilegeError",
    "ProtocolError",
    "ExecResult",
    "MockTransport",
    "Result",
    "Sandbox",
    "SiloError",
    "Spec",
    "SpecError",
    "StoreFull",
    "Template",
    "Transport",
    "UserError",
    "Workspace",
    "WorkspaceExists",
    "WorkspaceInfo",
    "WorkspaceStateError",
    "__version__",
]


def test_all_is_exactly_the_curated_list() -> None:
    assert sorted(silo.__all__) == sorted(CURATED)
    assert len(silo.__all__) == len(set(silo.__all__))


@pytest.mark.parametrize("name", CURATED)
def test_every_public_name_resolves(name: str) -> None:
    value = getattr(silo, name)
    assert value is not None
    if name == "__version__":
        assert isinstance(value, str) and value.count(".") >= 1
        return
    assert inspect.isclass(value)
    assert value.__module__.startswith("silo.")
    assert value.__doc__, f"silo.{name} has no docstring"
    # `from silo import *` gives the same object
    ns: dict[str, object] = {}
    exec("from silo import *", ns)
    assert ns[name] is value


def test_error_classes_are_the_model_tree() -> None:
    for name in CURATED:
        if name.endswith("Error") or name.startswith(("Command", "Limit", "Permission", "WorkspaceExists")):
            cls = getattr(silo, name)
            assert cls is getattr(errors, name)
            assert issubclass(cls, silo.SiloError)
    for name in ("SpecError", "NotFoundError", "LimitUnavailable", "PrivilegeError", "CommandNotFound",
                 "CommandNotExecutable", "WorkspaceStateError", "WorkspaceExists"):
        assert issubclass(getattr(silo, name), silo.UserError)
    assert silo.CommandNotFound.exit_code == 127
    assert silo.CommandNotExecutable.exit_code == 126
    assert silo.SpecError.exit_code == 125


def test_private_names_are_not_attributes() -> None:
    with pytest.raises(AttributeError):
        silo.Plan  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        silo.planner  # type: ignore[attr-defined]


def _modules_after(statement: str) -> set[str]:
    # json would import re itself: print plain names
    code = (f"import sys; sys.path.insert(0, {str(SRC)!r}); {statement}; "
            "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    return set(out.stdout.strip().splitlines()[-1].split())


def test_import_silo_is_cheap() -> None:
    mods = _modules_after("import silo; silo.__version__; silo.__all__")
    assert "silo" in mods
    heavy = {"typing", "dataclasses"} & mods
    assert not heavy, f"import silo loads {heavy}: the CLI's fast path pays for it"
    assert not {m for m in mods if m.startswith("silo.")} - {"silo.engine", "silo.engine.paths"}


def test_cli_client_is_cheap() -> None:
    mods = _modules_after("import silo.cli.client")
    assert "silo.cli.client" in mods
    heavy = {"typing", "enum", "argparse", "re", "socket"} & mods
    assert not heavy, f"silo.cli.client loads {heavy}: every 'silo run' pays for it"
    # nothing of the full CLI, the SDK or the engine's planner on the fast path
    assert not {"silo.cli.main", "silo.cli.args", "silo.sdk.sandbox", "silo.engine.planner"} & mods


def test_the_fast_launcher_runs_the_client() -> None:
    launcher = Path(sys.executable).parent / "silo"
    if not launcher.exists():
        pytest.skip("no .venv/bin/silo launcher installed")
    data = launcher.read_bytes()
    if data.startswith(b"\x7fELF"):
        # the C fast path (src/silo/native/client.c); everything but `run` goes to the
        # Python client, which it names by the interpreter and source path built in
        assert b"from silo.cli.client import main" in data or b"silo.cli.client" in data
        assert os.path.dirname(sys.executable).encode() + b"/python" in data
        return
    text = data.decode()
    assert text.startswith("#!") and "-IS" in text.splitlines()[0]
    assert "from silo.cli.client import main" in text
