"""One request and its reply over a SEQPACKET socket: a JSON object per datagram, file
descriptors alongside (SCM_RIGHTS); replies are ``{"ok": ...}`` or ``{"error": "..."}``.
Spoken between a keeper's owner and the keeper, and between the keeper and its
rootless helper (:mod:`silo.net.keeper`, :mod:`silo.net.rootless`)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from typing import Any

from silo.model.errors import SiloError

MAX_MSG = 1 << 20


def request(sock: socket.socket, message: dict[str, Any], who: str, timeout: float = 10.0,
            fds: Sequence[int] = (), max_fds: int = 0) -> tuple[Any, list[int]]:
    """Send ``message`` (with ``fds``) and wait for the reply: its ``ok`` value and up to
    ``max_fds`` descriptors; SiloError naming ``who`` when the peer is gone or refuses."""
    sock.settimeout(timeout)
    try:
        socket.send_fds(sock, [json.dumps(message).encode()], list(fds))
        data, got, _, _ = socket.recv_fds(sock, MAX_MSG, max_fds)
    except OSError as e:
        raise SiloError(f"{who} is gone ({e.strerror or e})") from None
    if not data:
        raise SiloError(f"{who} is gone")
    reply = json.loads(data)
    if "error" in reply:
        for fd in got:
            os.close(fd)
        raise SiloError(str(reply["error"]))
    return reply.get("ok"), got
