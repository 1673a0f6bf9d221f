"""Unprivileged test users that run silo (and their own rootless silod) through ``runuser``:
a clean environment, private state and socket directories, this checkout's virtual
environment (the tests skip when that user cannot read it)."""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python")
SILO = str(REPO / ".venv" / "bin" / "silo")


def ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True, capture_output=True)
        return pwd.getpwnam(name)


def peer_pid(path: str) -> int:
    """The pid of the process serving the unix socket ``path`` (SO_PEERCRED)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        pid, _, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return int(pid)


class User:
    """A user with a private directory (0700) for its daemon's sockets and state."""

    def __init__(self, name: str, home: Path, src: Path) -> None:
        self.pw = ensure_user(name)
        self.name = name
        self.home = home
        self.run = str(home / "run")
        self.state = str(home / "state")
        for path in (home, self.run, self.state):
            os.makedirs(path, mode=0o700, exist_ok=True)
            os.chown(path, self.pw.pw_uid, self.pw.pw_gid)
        self.env = {"PATH": "/usr/bin:/bin", "HOME": self.pw.pw_dir, "XDG_RUNTIME_DIR": self.run,
                    "SILO_DAEMON_DIR": self.run, "SILO_STATE_DIR": self.state, "PYTHONPATH": str(src)}
        self.daemon: subprocess.Popen[bytes] | None = None

    @property
    def uid(self) -> int:
        return self.pw.pw_uid

    @property
    def socket(self) -> str:
        return os.path.join(self.run, "silod.sock")

    def argv(self, argv: list[str], **env: str) -> list[str]:
        return ["runuser", "-u", self.name, "--", "env", "-i", *(f"{k}={v}" for k, v in {**self.env, **env}.items()),
                *argv]

    def run_cmd(self, argv: list[str], stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(argv, **env), input=stdin, capture_output=True, text=True, timeout=120,
                              cwd="/")

    def silo(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return self.run_cmd([SILO, *args], **env)

    def start_daemon(self) -> None:
        with open(os.path.join(self.home, "silod.log"), "ab") as log:
            self.daemon = subprocess.Popen(self.argv([PYTHON, "-m", "silo.daemon"]), stdin=subprocess.DEVNULL,
                                           stdout=log, stderr=log, cwd="/")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.daemon.poll() is None, Path(self.home, "silod.log").read_text()[-2000:]
            if self.silo("ls", "-q").returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"{self.name}'s silod did not come up")

    def stop_daemon(self) -> None:
        """Stop whichever silod serves the user's socket: the one started here, or one the
        CLI started on demand (after a crash test killed the first)."""
        try:
            pid: int | None = peer_pid(self.socket)
        except OSError:
            pid = None
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.daemon is not None:
            try:
                self.daemon.wait(20)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
            self.daemon = None


def usable_by(user: str) -> bool:
    return subprocess.run(["runuser", "-u", user, "--", PYTHON, "-c", "import fastapi, httpx"], cwd="/",
                          capture_output=True).returncode == 0
