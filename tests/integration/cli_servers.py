"""Helpers shared by the CLI tests: private runtime dirs with their own CLI server, a pty."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def private_runtime_dir(prefix: str = "silo-cli-rt-") -> Iterator[str]:
    """A private runtime dir (own CLI server); the server is stopped at the end."""
    path = tempfile.mkdtemp(prefix=prefix)
    os.chmod(path, 0o711)
    try:
        yield path
    finally:
        env = {**os.environ, "SILO_RUNTIME_DIR": path}
        subprocess.run([sys.executable, "-m", "silo.cli.main", "server", "stop"], env=env,
                       capture_output=True, timeout=30)
        deadline = time.monotonic() + 10
        while server_pid(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(path, ignore_errors=True)


def server_pid(runtime_dir: str) -> int | None:
    """The CLI server serving ``runtime_dir``, if one runs."""
    marker = f"SILO_RUNTIME_DIR={runtime_dir}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            if b"silo.cli.server" not in cmdline:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    return int(entry)
        except OSError:
            continue
    return None


def pty_run(argv: list[str], env: dict[str, str], rows: int = 30, cols: int = 100,
            on_output: Callable[[int, int, bytes], None] | None = None,
            timeout: float = 15) -> tuple[bytes, int]:
    """Run ``argv`` as the session leader of a fresh pty of ``rows`` x ``cols``; returns
    (everything it printed, its exit code). ``on_output(pid, master, output_so_far)`` is
    called after each read."""
    pid, master = pty.fork()
    if pid == 0:  # pragma: no cover - the child only execs
        try:
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 4096)
                except OSError:
                    break
                if not data:
                    break
                buf += data
                if on_output is not None:
                    on_output(pid, master, buf)
        else:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(master)
    return buf, os.waitstatus_to_exitcode(status)


def shell_dialogue() -> tuple[list[str], Callable[[int, int, bytes], None]]:
    """An ``on_output`` for :func:`pty_run` of an interactive ``sh -i`` whose prompt is
    ``$ ``: it starts ``sleep 60``, interrupts it with ctrl-C, then has the shell read
    ``abc`` and exit 5 after printing ``got-abc``. Returns the steps done and the driver."""
    steps: list[str] = []

    def drive(pid: int, master: int, buf: bytes) -> None:
        if not steps and buf.endswith(b"$ "):
            steps.append("sleep")
            os.write(master, b"echo sle''eping; sleep 60\n")
        elif steps == ["sleep"] and b"sleeping\r\n" in buf:
            steps.append("ctrl-c")
            time.sleep(0.3)  # sleep is running, not just forked
            os.write(master, b"\x03")
        elif steps == ["sleep", "ctrl-c"] and buf.endswith(b"$ "):
            steps.append("read")
            os.write(master, b"read x; echo got-$x; exit 5\nabc\n")

    return steps, drive


def client_env(runtime_dir: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test's environment without SILO_* settings, pointed at ``runtime_dir``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SILO_")}
    env["SILO_RUNTIME_DIR"] = runtime_dir
    env.setdefault("TERM", "dumb")
    env.update(extra or {})
    return env
