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
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


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
