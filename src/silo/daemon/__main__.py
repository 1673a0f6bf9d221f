"""``python -m silo.daemon``: run silod in the foreground (the CLI starts it on demand).

System-wide as root (sockets in ``/run/silod``, usable by root and the members of the
``silo`` group, each seeing only their own workspaces), per user otherwise (sockets in
the user's private runtime directory). One daemon per state directory: a second one
exits with a message naming the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hashlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

from silo.engine import paths
from silo.model.errors import SiloError

log = logging.getLogger("silod")


def _listen(path: str, kind: int, group: int | None) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    if group is not None:
        os.chown(path, 0, group)
        os.chmod(path, 0o660)
    sock.listen(128)
    return sock


def _alive(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _server(config: Any) -> Any:
    """uvicorn's server without its signal capture: uvicorn re-raises a captured SIGTERM
    once it has stopped serving, which would end the process before silod stops its
    workspaces. silod's own loop handlers ask it to exit instead."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server(config)


async def serve() -> int:
    import uvicorn

    from silo.daemon import api, execsock
    from silo.daemon.manager import Manager
    from silo.daemon.runtime import Runtime

    daemon_dir = paths.daemon_dir()
    group = None
    if os.geteuid() == 0 and daemon_dir == "/run/silod":
        with contextlib.suppress(KeyError):
            group = grp.getgrnam("silo").gr_gid
        os.makedirs(daemon_dir, mode=0o755, exist_ok=True)
        os.chmod(daemon_dir, 0o755 if group is not None else 0o700)
    else:
        os.makedirs(daemon_dir, mode=0o700, exist_ok=True)
    api_path, exec_path = paths.daemon_socket(), paths.exec_socket()
    if _alive(api_path):
        print(f"silod: already running ({api_path})", file=sys.stderr)
        return 0
    state_dir = paths.state_dir()
    runtime = Runtime(hashlib.sha256(os.path.realpath(state_dir).encode()).hexdigest()[:8])
    manager = Manager(state_dir, os.path.join(daemon_dir, "run"), runtime)
    await manager.recover()
    api_sock = _listen(api_path, socket.SOCK_STREAM, group)
    exec_sock = _listen(exec_path, socket.SOCK_SEQPACKET, group)
    config = uvicorn.Config(api.build(manager), http=api.PeerH11Protocol, log_level="warning",
                            access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    server = _server(config)
    execs = execsock.Server(exec_sock, manager)
    execs.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    log.warning("silod %d serving %s", os.getpid(), api_path)
    try:
        await server.serve(sockets=[api_sock])
    finally:
        execs.close()
        await manager.shutdown()
        runtime.close()
        for path in (api_path, exec_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return 0


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s silod: %(message)s")
    try:
        code = asyncio.run(serve())
    except SiloError as e:
        print(f"silod: {e.message}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
