"""The import graph keeps the layering of STYLE.md (principles 6 and 7).

Every module under ``src/silo`` is parsed (not imported) and every ``import`` in it,
at any depth (function-level imports too, ``if TYPE_CHECKING`` blocks too), is
resolved to a silo module. The rules:

* ``model`` imports nothing from silo but ``model``;
* ``sys`` imports only ``model``, ``sys`` and ``native`` (to load its C helper);
* ``native`` (the C helpers' build and lookup) imports only ``model``;
* ``store`` (the daemon's persisted records) imports only ``model``;
* ``backends`` import only ``model``, ``sys`` and ``backends``, and no backend
  subpackage imports another one;
* ``engine`` imports none of ``spawner``, ``sdk``, ``cli``;
* ``spawner`` imports neither ``sdk`` nor ``cli``;
* ``sdk`` does not import ``cli``;
* ``daemon`` imports none of ``sdk``, ``cli``, ``spawner`` (it owns its own runtime),
  and nothing imports ``daemon`` but ``daemon``.

``from silo import X`` of a name that is not a subpackage reaches the lazy top-level
package (which loads the SDK), so it counts as an import of the ``sdk`` layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PKG = SRC / "silo"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _exists(module: str) -> bool:
    base = SRC.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def silo_imports(source: str, module: str, is_package: bool) -> set[str]:
    """Silo modules imported by ``source`` (the module ``module``), resolved."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "silo" or alias.name.startswith("silo."):
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts)
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not (target == "silo" or target.startswith("silo.")):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if _exists(sub):
                    found.add(sub)
                elif target == "silo":
                    found.add("silo.sdk")  # the lazy top-level package: reaches the SDK
                else:
                    found.add(target)
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "silo"


def _backend(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "backends" else None


ALLOWED_ONLY = {
    "model": {"model"},
    "sys": {"model", "sys", "native"},
    "native": {"model", "native"},
    "store": {"model", "store"},
    "backends": {"model", "sys", "backends", "native", "agent"},  # native: the programs they run
    "agent": {"agent"},  # the agent protocol: the host's side, standard library only
    "net": {"model", "sys", "net"},  # a sandbox's network: beside backends (ARCHITECTURE.md)
}
FORBIDDEN = {
    "engine": {"spawner", "sdk", "cli"},
    "spawner": {"sdk", "cli"},
    "sdk": {"cli"},
    "daemon": {"sdk", "cli", "spawner"},
}
ONLY_FROM_ITSELF = {"daemon"}


def violations(module: str, imports: set[str]) -> list[str]:
    layer = _layer(module)
    out = []
    for imp in sorted(imports):
        target = _layer(imp)
        if layer in ALLOWED_ONLY and target not in ALLOWED_ONLY[layer]:
            out.append(f"{module} ({layer}) imports {imp} ({target})")
        if layer in FORBIDDEN and target in FORBIDDEN[layer]:
            out.append(f"{module} ({layer}) imports {imp} ({target})")
        if target in ONLY_FROM_ITSELF and layer != target:
            out.append(f"{module} ({layer}) imports {imp} ({target}), which only it may import")
        mine, theirs = _backend(module), _backend(imp)
        if mine is not None and theirs is not None and mine != theirs:
            out.append(f"{module} (backend {mine}) imports {imp} (backend {theirs})")
    return out


def _modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): silo_imports(path.read_text(), _module_name(path), _is_package(path))
            for path in _modules()}


def test_every_module_parses_and_is_in_a_known_layer() -> None:
    graph = _graph()
    assert len(graph) > 20
    known = {"silo", "model", "sys", "native", "store", "backends", "net", "engine", "spawner", "sdk", "cli",
             "daemon", "agent"}
    assert {_layer(m) for m in graph} <= known
    for layer in ("model", "sys", "backends", "engine", "spawner", "sdk", "cli"):
        assert any(_layer(m) == layer for m in graph), layer


def test_the_parser_sees_real_imports() -> None:
    graph = _graph()
    # sanity checks on edges known to exist, so an empty graph cannot pass the rules
    assert "silo.model.plan" in graph["silo.engine.planner"]
    assert "silo.engine.host" in graph["silo.engine.planner"]
    assert "silo.sys.kernel" in graph["silo.backends.process.launcher"]
    assert "silo.sys.cgroups" in graph["silo.spawner.core"]  # a function-level import
    assert all(imp.startswith("silo") for imps in graph.values() for imp in imps)


@pytest.mark.parametrize(("module", "source", "bad"), [
    ("silo.model.spec", "from silo.sys import kernel", True),
    ("silo.model.spec", "from . import errors", False),
    ("silo.model.spec", "from ..engine import host", True),
    ("silo.model.spec", "import silo.sdk.sandbox", True),
    ("silo.model.spec", "def f():\n    from silo import Sandbox\n", True),
    ("silo.sys.kernel", "from silo.model import plan", False),
    ("silo.sys.kernel", "from silo.backends.process import script", True),
    ("silo.backends.process.launcher", "from silo.backends.app import x", True),
    ("silo.backends.process.launcher", "from silo.backends.process import script", False),
    ("silo.backends.process.launcher", "from silo.engine import planner", True),
    ("silo.engine.planner", "from silo.spawner import client", True),
    ("silo.engine.planner", "from silo.backends.process import script", False),
    ("silo.spawner.core", "from silo.cli import args", True),
    ("silo.spawner.core", "from silo import SpecError", True),
    ("silo.sdk.sandbox", "from silo.cli.main import main", True),
    ("silo.sdk.sandbox", "from silo.spawner import client", False),
    ("silo.daemon.manager", "from silo.sdk import client", True),
    ("silo.daemon.manager", "from silo.store import layers", False),
    ("silo.sdk.client", "from silo.daemon import api", True),
])
def test_the_rules_catch_violations(module: str, source: str, bad: bool) -> None:
    path = SRC.joinpath(*module.split(".")).with_suffix(".py")
    imports = silo_imports(source, module, _is_package(path))
    assert imports, source
    assert bool(violations(module, imports)) is bad


def test_layering() -> None:
    problems = [v for module, imports in _graph().items() for v in violations(module, imports)]
    assert problems == []
