"""A private silod for tests: its own state and socket directories, started and stopped
by the test, checked for leftovers (processes, cgroups) when it stops."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

import silo
from silo import NotFoundError

REPO = Path(__file__).resolve().parents[2]
SILO = str(REPO / ".venv" / "bin" / "silo")


class Daemon:
    def __init__(self, state: str, sockets: str, user: str | None = None) -> None:
        self.state = state
        self.sockets = sockets
        self.user = user
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = os.path.join(sockets, "silod.log")

    @property
    def env(self) -> dict[str, str]:
        return {"SILO_STATE_DIR": self.state, "SILO_DAEMON_DIR": self.sockets}

    @property
    def socket(self) -> str:
        return os.path.join(self.sockets, "silod.sock")

    def start(self) -> None:
        env = {**os.environ, **self.env}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "silo.daemon"], env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"silod exited with {self.proc.returncode}: {Path(self.log).read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                with httpx.Client(transport=httpx.HTTPTransport(uds=self.socket), base_url="http://silod") as c:
                    if c.get("/v1/version").status_code == 200:
                        return
            time.sleep(0.05)
        raise RuntimeError("silod did not come up in 30 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def http(self) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=self.socket), base_url="http://silod", timeout=60)


def descendants_of_init() -> list[str]:
    """Command lines of live silo-init processes (workspace inits and exec relays)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm in ("silo-init", "silo-setup"):
            out.append(pid)
    return out


@contextlib.contextmanager
def private_daemon() -> Iterator[Daemon]:
    base = tempfile.mkdtemp(prefix="silod-", dir="/tmp")
    os.chmod(base, 0o711)
    state = os.path.join(base, "state")
    sockets = os.path.join(base, "run")
    os.makedirs(sockets, mode=0o700)
    daemon = Daemon(state, sockets)
    daemon.start()
    old = {k: os.environ.get(k) for k in daemon.env}
    os.environ.update(daemon.env)
    try:
        yield daemon
    finally:
        daemon.stop()
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        subprocess.run(["rm", "-rf", "--one-file-system", base], check=False)


@contextlib.contextmanager
def private_client() -> Iterator[silo.Client]:
    """A client of a private silod of its own (``client.daemon``); the workspaces left
    when the block ends are removed, then the daemon is stopped."""
    with private_daemon() as d, silo.Client(d.socket, autostart=False) as c:
        c.daemon = d  # type: ignore[attr-defined]
        yield c
        for info in c.list():
            with contextlib.suppress(silo.SiloError):
                c.get(info.name).remove(force=True)


# Fixtures of the modules whose tests make workspaces by name on the module's private
# daemon (tests/conftest.py's ``daemon``); such a module imports them.


@pytest.fixture
def client(daemon: Daemon) -> Iterator[silo.Client]:
    with silo.Client(daemon.socket, autostart=False) as c:
        yield c


@pytest.fixture
def names(client: silo.Client) -> Iterator[list[str]]:
    """Workspace and template names a test makes (templates: ``tpl-*``); all removed after it."""
    made: list[str] = []
    try:
        yield made
    finally:
        for name in made:
            if not name.startswith("tpl-"):
                with contextlib.suppress(NotFoundError):
                    client.get(name).remove(force=True)
        for name in made:
            if name.startswith("tpl-"):
                with contextlib.suppress(NotFoundError):
                    client.remove_template(name)


def new(names: list[str], prefix: str) -> str:
    """A fresh workspace (or, with prefix ``tpl``, template) name, removed after the test."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    names.append(name)
    return name


def started(names: list[str], level: str, ok: Callable[..., str], *options: str) -> str:
    """A new workspace at ``level``, created with ``options`` and started through the CLI
    (``ok``: the module's runner, which checks the exit code)."""
    name = new(names, level[:2])
    ok("create", name, "--isolation", level, *options)
    ok("start", name)
    return name


def cli(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``silo ARGS`` (the daemon is the one SILO_STATE_DIR and SILO_DAEMON_DIR name)."""
    return subprocess.run([SILO, *args], input=stdin, capture_output=True, text=True, timeout=timeout,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


def ok(*args: str, stdin: str | None = None) -> str:
    """``silo ARGS``, which must succeed: its output."""
    r = cli(*args, stdin=stdin)
    assert r.returncode == 0, r
    return r.stdout
