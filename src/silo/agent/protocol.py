"""The host-guest agent protocol, version 1: shared by the host (silo.backends.vm) and the
guest agent (silo.agent.main), so it imports nothing but the standard library.

A byte stream (virtio-serial, or vsock where the host has it) carries frames::

    u32 payload length | u8 kind | u32 channel | payload

big-endian. A channel is one exec (or one file transfer); channel 0 is the agent itself.
Control payloads are JSON objects; data payloads (stdin, stdout, stderr, file bytes) are
raw. Every frame is bounded by :data:`MAX_PAYLOAD` and every JSON message is checked by its
reader: the host treats each byte from the guest as untrusted (SECURITY.md #19).

    host -> guest                           guest -> host
    EXEC ch {argv, env, cwd, uid, gid,      HELLO 0 {version, pid}
             tty, rows, cols}               STARTED ch {pid}
    STDIN ch bytes / CLOSE ch {stream: 0}   STDOUT/STDERR ch bytes, CLOSE ch {stream: 1|2}
    SIGNAL ch {signal}                      EXIT ch {code}
    WINSIZE ch {rows, cols}                 ERROR ch {message, code}
    SHUTDOWN 0 {}                           (the guest powers off)
"""

from __future__ import annotations

import json
import struct
from typing import Any

VERSION = 1
MAX_PAYLOAD = 1 << 20  # a frame's payload; stdio is sent in chunks of at most CHUNK
CHUNK = 64 << 10
HEADER = struct.Struct(">IBI")

HELLO, EXEC, STARTED, STDIN, STDOUT, STDERR, CLOSE, SIGNAL, WINSIZE, EXIT, ERROR, SHUTDOWN = range(1, 13)
KINDS = frozenset(range(1, 13))
CONTROL = frozenset({HELLO, EXEC, STARTED, CLOSE, SIGNAL, WINSIZE, EXIT, ERROR, SHUTDOWN})


class ProtocolError(Exception):
    """The peer broke the protocol: the stream cannot be trusted any further."""


def frame(kind: int, channel: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes is over {MAX_PAYLOAD}")
    return HEADER.pack(len(payload), kind, channel) + payload


def message(kind: int, channel: int, body: dict[str, Any]) -> bytes:
    return frame(kind, channel, json.dumps(body, separators=(",", ":")).encode())


class Reader:
    """Frames from a byte stream fed in pieces; :meth:`feed` returns the complete ones as
    ``(kind, channel, payload)`` and raises ProtocolError on an unknown kind or an
    oversized frame (before buffering its payload)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        self._buf += data
        out = []
        while len(self._buf) >= HEADER.size:
            length, kind, channel = HEADER.unpack_from(self._buf)
            if kind not in KINDS:
                raise ProtocolError(f"unknown frame kind {kind}")
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"frame of {length} bytes is over the limit of {MAX_PAYLOAD}")
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            out.append((kind, channel, bytes(self._buf[HEADER.size:end])))
            del self._buf[:end]
        return out


def decode(untrusted: bytes) -> dict[str, Any]:
    """A control payload as a JSON object, or ProtocolError."""
    try:
        value = json.loads(untrusted)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("a control frame is not JSON") from None
    if not isinstance(value, dict):
        raise ProtocolError("a control frame is not a JSON object")
    return value


def field_int(body: dict[str, Any], key: str, low: int, high: int) -> int:
    """``body[key]`` as an int in ``[low, high]``, or ProtocolError."""
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError(f"field {key!r} is not an integer in [{low}, {high}]")
    return value


def field_str(body: dict[str, Any], key: str, limit: int = 4096) -> str:
    value = body.get(key)
    if not isinstance(value, str) or len(value) > limit:
        raise ProtocolError(f"field {key!r} is not a string of at most {limit} characters")
    return value
