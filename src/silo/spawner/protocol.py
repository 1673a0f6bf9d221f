"""Messages between silo's processes and the spawner.

One message per ``SOCK_SEQPACKET`` packet: a ``marshal``-encoded tuple whose first
item names the operation, with file descriptors attached as ``SCM_RIGHTS``.
``marshal`` is not safe against a hostile peer, so a connection is only read after
its peer credentials showed the same uid (or root): no privilege boundary is crossed
by a message. Sandboxes never reach these sockets (SECURITY.md #12).

Requests: ``("run", job, plan_wire)`` + stdin/stdout/stderr fds;
``("signal", job, signum)``; ``("attach",)`` + a socket fd to serve as another
connection; ``("cli", job, argv, cwd, env, term)`` + stdio fds (the CLI server only).
Replies: ``("started", job, pid)``, ``("exit", job, code, reason)``,
``("error", job, error_wire)``.
"""

from __future__ import annotations

import array
import marshal
import socket
import struct
from typing import Any

MAX_MESSAGE = 1 << 20
MAX_FDS = 8


def send(sock: socket.socket, message: tuple[Any, ...], fds: tuple[int, ...] | list[int] = ()) -> None:
    data = marshal.dumps(message)
    if len(data) > MAX_MESSAGE:
        raise ValueError("message too large")
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


def recv(sock: socket.socket) -> tuple[Any, list[int]] | None:
    """One message and its fds; None at end of stream. Shape checks are the caller's."""
    fds = array.array("i")
    data, anc, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data:
        for fd in fds:
            socket.close(fd)
        return None
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            socket.close(fd)
        raise ValueError("message truncated")
    return marshal.loads(data), list(fds)  # noqa: S302 - peer uid checked first


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])
