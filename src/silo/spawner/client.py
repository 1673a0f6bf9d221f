"""The SDK's side of the spawner: one spawner process per Python process.

Started lazily on first use, with the importing process's ``sys.path`` so it runs
the same silo; shut down at interpreter exit (closing the last connection ends it).
Each caller gets its own connection (``attach``), so threads never share a socket.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import threading

from silo.model.errors import InternalError
from silo.spawner import protocol

_lock = threading.Lock()
_proc: subprocess.Popen[bytes] | None = None
_main: socket.socket | None = None
_pid = 0
_open: set[socket.socket] = set()


def _start() -> None:
    global _proc, _main, _pid
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    paths = [p for p in sys.path if p]
    code = (f"import sys; sys.path[:0] = {paths!r}; "
            f"from silo.spawner.core import serve_socketpair; serve_socketpair({theirs.fileno()})")
    try:
        _proc = subprocess.Popen(
            [sys.executable, "-s", "-c", code], pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL, close_fds=True, start_new_session=True,
        )
    except OSError as e:
        raise InternalError(f"cannot start silo's spawner: {e}") from None
    finally:
        theirs.close()
    _main, _pid = ours, os.getpid()


def connect() -> socket.socket:
    """A new private connection to this process's spawner (starting it if needed)."""
    with _lock:
        if _main is None or _pid != os.getpid():
            _start()
        assert _main is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            protocol.send(_main, ("attach",), [theirs.fileno()])
        except OSError as e:
            ours.close()
            raise InternalError(f"silo's spawner is gone ({e}); restart the program") from None
        finally:
            theirs.close()
        _open.add(ours)
        return ours


def release(sock: socket.socket) -> None:
    """Close a connection from :func:`connect`; its running sandboxes are killed."""
    with _lock:
        _open.discard(sock)
    sock.close()


@atexit.register
def shutdown() -> None:
    global _main, _proc
    with _lock:
        if _main is not None and _pid == os.getpid():
            for sock in _open:
                sock.close()
            _open.clear()
            _main.close()
            _main = None
            if _proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    _proc.wait(timeout=10)
                _proc = None
