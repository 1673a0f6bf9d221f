"""The per-user CLI server: a warm spawner that runs ``silo run`` for the CLI client.

``silo run`` would otherwise pay for a fresh interpreter's imports on every call; the
client (:mod:`silo.cli.client`) only forwards argv, cwd, environment and its stdio
fds here. Started on demand by the client; exits after ``SILO_SERVER_IDLE`` seconds
(default 60) without sandboxes and without VM pools, when its code changes, or on
``silo server stop``.

It keeps the VM pools (``silo pool set``): their settings live in
``<state dir>/pools.json``, so a server that starts (after a stop, a code change or a
reboot) boots them again.

Listens on ``<runtime dir>/spawner.sock`` (0600, in a 0711 directory); only peers
with the same uid are served (checked with SO_PEERCRED before any message is read).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
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
from silo.model.errors import InternalError, ProtocolError, SiloError, SpecError
from silo.model.spec import Isolation
from silo.spawner.core import Connection, Spawner, check_pool_size
from silo.sys import cachefile


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
        self.handlers["pool"] = self._on_pool
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
        self.drop_pools()  # the next server boots its own
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


    # VM pools -------------------------------------------------------------------------

    def _on_pool(self, conn: Connection, message: tuple[Any, ...], fds: list[int]) -> None:
        """``("pool", job, "show")`` or ``("pool", job, "set", options, size)``; the reply is
        ``("pools", job, [(options, size, ready, booting, error), ...])``."""
        if len(message) == 5 and message[2] == "set":
            _, job_id, _, options, size = message
            if not (isinstance(options, list) and all(isinstance(o, str) for o in options)
                    and isinstance(size, int)):
                raise ProtocolError("malformed pool request")
            self.pool_set(tuple(options), size)
            self._save_pools()
            conn.reply(("pools", job_id, [list(row) for row in self.pool_status()]))
        else:
            self.on_pool(conn, message, fds)

    def pool_set(self, options: tuple[str, ...], size: int) -> None:
        check_pool_size(size)
        req = parse_run([*options, "--", "true"], "/")
        if req.spec.isolation is not Isolation.VM:
            raise SpecError("pools are for --isolation vm (the process level keeps a warm sandbox "
                            "by itself): add --isolation vm")
        plan = planner.plan(req.spec, req.argv)
        self.set_pool(plan, size, options)
        self._refill_pools()  # booting from now, so `silo pool` shows it at once

    def _save_pools(self) -> None:
        path = os.path.join(paths.state_dir(), "pools.json")
        rows = [{"options": list(options), "size": size} for options, size, *_ in self.pool_status()]
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            cachefile.publish(path, json.dumps({"pools": rows}).encode())
        except OSError as e:
            raise InternalError(f"the pool is set, but cannot be saved to {path}: {e.strerror}; "
                                "it lasts until the server stops") from None

    def load_pools(self) -> None:
        """Boot the pools the last ``silo pool set`` asked for; one that no longer plans
        (a kernel gone) is reported in the server's log and left out."""
        path = os.path.join(paths.state_dir(), "pools.json")
        try:
            with open(path, encoding="utf-8") as f:
                rows = json.load(f)["pools"]
            for row in rows:
                try:
                    self.pool_set(tuple(str(o) for o in row["options"]), int(row["size"]))
                except SiloError as e:
                    print(f"silo server: pool {' '.join(row['options'])}: {e.message}", file=sys.stderr)
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"silo server: cannot read {path}: {e}", file=sys.stderr)


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
    server.load_pools()
    idle = float(os.environ.get("SILO_SERVER_IDLE", "60"))
    try:
        server.loop(idle_exit=idle)
    finally:
        server.retire()


if __name__ == "__main__":
    main()
