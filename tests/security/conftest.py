"""Helpers for the escape tests: run ``probe.py`` inside a sandbox and read its findings.

The probe is passed as ``python3 -c SOURCE`` so no host path has to be mapped in (a
mapped folder would itself show up in ``/proc/self/mountinfo``); tests that need
host files create them in a world-traversable directory (``world_dir``) so the
unprivileged run of ``run_sandbox`` can map them too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

PROBE = Path(__file__).with_name("probe.py")
PROBE_SRC = PROBE.read_text()

def probe_argv(*checks: str, params: dict[str, Any] | None = None) -> list[str]:
    return ["/usr/bin/python3", "-c", PROBE_SRC, "--params", json.dumps(params or {}), *checks]


def parse_findings(result: Any) -> dict[str, Any]:
    """The probe's JSON line, or an assertion error that shows what the sandbox said."""
    out = result.stdout.decode("utf-8", "replace").strip().splitlines()
    assert result.exit_code == 0 and out, (
        f"probe did not finish: exit {result.exit_code}, limit {result.limit}, "
        f"stderr {result.stderr.decode('utf-8', 'replace')[-3000:]!r}, stdout {out[-3:]!r}"
    )
    findings: dict[str, Any] = json.loads(out[-1])
    for name, value in findings.items():
        assert not (isinstance(value, dict) and "probe_exception" in value), (
            f"probe check {name} crashed: {value['probe_exception']}"
        )
    return findings


class Prober:
    """What a test uses: ``sb.probe("4", root=..., params=...)`` -> findings, ``sb.run``
    (the raw ``run_sandbox``), ``sb.argv``/``sb.parse`` and ``sb.mode`` (root/unprivileged)."""

    def __init__(self, run_sandbox: Callable[..., Any]) -> None:
        self.run = run_sandbox
        self.mode: str = run_sandbox.mode  # type: ignore[attr-defined]
        self.argv = probe_argv
        self.parse = parse_findings

    def probe(self, *checks: str, params: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
        """Run the probe's ``checks`` in a sandbox made from ``spec``; return its findings."""
        return parse_findings(self.run(probe_argv(*checks, params=params), **spec))


@pytest.fixture
def sb(run_sandbox: Callable[..., Any]) -> Prober:
    """The probe runner, once as root and once as the unprivileged user (via run_sandbox)."""
    return Prober(run_sandbox)


def host_processes_with(marker: str) -> list[tuple[int, str]]:
    """Host processes whose command line contains ``marker`` (leftovers of a sandbox)."""
    found = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if marker in cmd:
            found.append((int(name), cmd[:200]))
    return found


@pytest.fixture
def leftovers() -> Callable[[str], list[tuple[int, str]]]:
    """``leftovers(marker)``: host processes still carrying ``marker`` in their argv."""
    return host_processes_with


@pytest.fixture
def marker() -> str:
    return f"silo-sectest-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A fresh directory under /tmp that every user can traverse (root-owned, 0755)."""
    path = Path(tempfile.mkdtemp(prefix="silo-sectest-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
