"""The per-user CLI server: a warm spawner that runs ``silo run`` for the CLI client.

``silo run`` would otherwise pay for a fresh interpreter's imports on every call; the
client (:mod:`silo.cli.client`) only forwards argv, cwd, environment and its stdio
fds here. Started on demand by the client; exits after ``SILO_SERVER_IDLE`` seconds
(default 60) without sandboxes, when its code changes, or on ``silo server stop``.

Listens on ``<runtime dir>/spawner.sock`` (0600, in a 0711 directory); only peers
with the same uid are served (checked with SO_PEERCRED before any message is read).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import selectors
import signal
import socket
import sys
import time
from typing import Any

from silo.cli.args import parse_run
from silo.engine import host as hostmod
from silo.engine import keep as keepmod
from silo.engine import paths, planner
from silo.model.errors import ProtocolError, SiloError
from silo.model.spec import Isolation
from silo.spawner.core import Connection, Spawner


class CliServer(Spawner):
    def __init__(self, listener: socket.socket, token: str, lock_fd: int, path: str) -> None:
        super().__init__()
        self.listener: socket.socket | None = listener
        self.token = token
        self.lock_fd = lock_fd
        self.path = path
        self.warm_shared = True  # each `silo run` is a new connection
        self.handlers["cli"] = self._on_cli
        self.handlers["hello"] = self._on_hello
        self.handlers["stop"] = self._on_stop
        self.extra_dispatch["accept"] = self._on_accept
        self.sel.register(listener, selectors.EVENT_READ, ("accept", None))

    def retire(self) -> None:
        """Stop taking clients (a fresh server may start at once); finish running sandboxes."""
        if self.listener is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(self.listener)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == os.fstat(self.listener.fileno()).st_ino:
                os.unlink(self.path)
        self.listener.close()
        self.listener = None
        self.retired = True
        os.close(self.lock_fd)
        self.lock_fd = -1

    def _on_accept(self, _: Any) -> None:
        if self.listener is None:
            return
        self.last_activity = time.monotonic()
        try:
            sock, _addr = self.listener.accept()
        except OSError:
            return
        try:
            self.add_connection(sock)
        except (PermissionError, OSError):
            sock.close()

    def _on_hello(self, conn: Connection, message: tuple[Any, ...], fds: list[int]) -> None:
        if len(message) != 2 or message[1] != self.token:
            self.retire()  # our code is stale: the client starts a fresh server
            conn.reply(("restart",))
            return
        conn.reply(("ok",))

    def _on_stop(self, conn: Connection, message: tuple[Any, ...], fds: list[int]) -> None:
        conn.reply(("ok",))
        self.retire()

    def _on_cli(self, conn: Connection, message: tuple[Any, ...], fds: list[int]) -> None:
        """``("cli", job, argv, cwd, env, has_pty)`` + stdin/stdout/stderr fds.

        With ``-t`` the sandbox makes its own pty and its master reaches the client as
        ``("pty", job)`` + fd; stdin is /dev/null unless ``-i`` or ``-t``.
        """
        try:
            _, job_id, untrusted_argv, cwd, untrusted_env, _reserved = message
        except ValueError:
            raise ProtocolError("malformed cli request") from None
        if not (isinstance(untrusted_argv, list) and all(isinstance(a, str) for a in untrusted_argv)
                and isinstance(cwd, str) and isinstance(untrusted_env, dict) and len(fds) == 3):
            raise ProtocolError("malformed cli request")
        env = {str(k): str(v) for k, v in untrusted_env.items()}
        req = parse_run(untrusted_argv, cwd)
        if req.spec.isolation is Isolation.APP and req.spec.keep is not None:
            home = env.get("HOME") or os.path.expanduser("~")
            keepmod.prepare(req.spec.keep, [os.path.realpath(p) for p in (home, *req.spec.cow)])
        plan = planner.plan(req.spec, req.argv, term=env.get("TERM"), tty=req.tty, caller_env=env,
                            caller_cwd=cwd)
        if not (req.interactive or req.tty):
            null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            os.close(fds[0])
            fds[0] = null
        self.run_job(conn, job_id, plan, fds)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        hostmod.host()  # runtime dir with the right owner and mode
    except SiloError as e:
        print(f"silo: {e.message}", file=sys.stderr)
        sys.exit(125)
    runtime = paths.runtime_dir()
    lock_fd = os.open(os.path.join(runtime, "spawner.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # another server is starting or running
    path = paths.server_socket()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(128)
    listener.setblocking(False)
    server = CliServer(listener, paths.code_token(), lock_fd, path)
    server.fill_netns_pool()
    idle = float(os.environ.get("SILO_SERVER_IDLE", "60"))
    try:
        server.loop(idle_exit=idle)
    finally:
        server.retire()


if __name__ == "__main__":
    main()
