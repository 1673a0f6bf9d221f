"""The host-guest agent protocol, version 4: the host's side (silo.backends.vm) of what the
guest agent (``silo-agent``, src/silo/native/agent.c) speaks.

A byte stream (virtio-serial, or vsock where the host has it) carries frames::

    u32 payload length | u8 kind | u32 channel | payload

big-endian. A channel is one exec; channel 0 is the agent itself. Payloads are fixed
binary layouts (below), not JSON: the agent is a small static C program, and a layout
with exact lengths is easier to check on both sides than a parser. argv, env and cwd are
byte strings, as the kernel takes them. Every frame is bounded by :data:`MAX_PAYLOAD`
and every payload is checked by its reader: the host treats each byte from the guest as
untrusted (SECURITY.md #19).

    host -> guest                               guest -> host
    EXEC ch  u32 uid, u32 gid, u16 rows,        HELLO 0  u32 version, u32 pid
             u16 cols, u8 tty, u32 argc,        STARTED ch  u32 pid
             u32 envc, u32 nrlimit, then        STDOUT/STDERR ch  bytes
             nrlimit x (u32 resource, u64 soft, CLOSE ch  u8 stream (1 or 2)
             u64 hard), then cwd, argv...,
             env..., each ending in NUL
    STDIN ch  bytes; CLOSE ch  u8 0             EXIT ch  u32 code (0-255)
    SIGNAL ch  u8 signal                        ERROR ch  u32 code, UTF-8 message
    WINSIZE ch  u16 rows, u16 cols
    SHUTDOWN 0  (empty: the guest powers off; or
                u32 grace in ms: SIGTERM to all,
                that long, SIGKILL, sync, power off)
    IDENTITY 0  u8 n, hostname (n bytes), machine-id
                (32 hex digits), RNG seed (the rest,
                16-512 bytes): set before a run's EXEC
    USERS 0  u32 uid, u32 gid, u32 n, /etc/passwd
             (n bytes), /etc/group (the rest):
             the guest's user database, and the
             user's home made (host-root guests)

A working directory that does not exist is made (owned by the command's user), as
at the process level.
"""

from __future__ import annotations

import struct

VERSION = 4
MAX_PAYLOAD = 1 << 20  # a frame's payload; stdio is sent in chunks of at most CHUNK
CHUNK = 64 << 10
HEADER = struct.Struct(">IBI")
MAX_ERROR = 2000  # bytes of an ERROR's message the host keeps

(HELLO, EXEC, STARTED, STDIN, STDOUT, STDERR, CLOSE, SIGNAL, WINSIZE, EXIT, ERROR, SHUTDOWN,
 IDENTITY, USERS) = range(1, 15)
KINDS = frozenset(range(1, 15))
SEED_MIN, SEED_MAX = 16, 512

_EXEC = struct.Struct(">IIHHBIII")
_RLIMIT = struct.Struct(">IQQ")
RLIM_INFINITY = (1 << 64) - 1
# silo's rlimit names (silo.model.spec.RLIMITS) -> Linux's resource numbers
RLIMIT_IDS = {"cpu": 0, "fsize": 1, "stack": 3, "core": 4, "nproc": 6, "nofile": 7, "memlock": 8, "as": 9}
_U32 = struct.Struct(">I")
_HELLO = struct.Struct(">II")
_WINSIZE = struct.Struct(">HH")


class ProtocolError(Exception):
    """The peer broke the protocol: the stream cannot be trusted any further."""


def frame(kind: int, channel: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes is over {MAX_PAYLOAD}")
    return HEADER.pack(len(payload), kind, channel) + payload


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


# host -> guest ------------------------------------------------------------------------

def exec_request(channel: int, argv: list[bytes], env: list[bytes], cwd: bytes, uid: int, gid: int,
                 tty: bool, rows: int, cols: int, rlimits: tuple[tuple[str, int, int], ...] = ()) -> bytes:
    """``rlimits``: (name, soft, hard) as in a plan, a negative value meaning unlimited."""
    strings = [cwd, *argv, *env]
    if not argv or any(b"\0" in s for s in strings) or any(b"=" not in e for e in env):
        raise ValueError("argv must not be empty, no string may hold NUL, every env entry is NAME=VALUE")
    limits = b"".join(_RLIMIT.pack(RLIMIT_IDS[name], *(RLIM_INFINITY if v < 0 else v for v in (soft, hard)))
                      for name, soft, hard in rlimits)
    head = _EXEC.pack(uid, gid, rows, cols, int(tty), len(argv), len(env), len(rlimits))
    return frame(EXEC, channel, head + limits + b"".join(s + b"\0" for s in strings))


def close_stdin(channel: int) -> bytes:
    return frame(CLOSE, channel, b"\0")


def signal_request(channel: int, sig: int) -> bytes:
    return frame(SIGNAL, channel, bytes([sig]))


def winsize(channel: int, rows: int, cols: int) -> bytes:
    return frame(WINSIZE, channel, _WINSIZE.pack(rows, cols))


def shutdown(grace_ms: int | None = None) -> bytes:
    """Power the guest off; with ``grace_ms`` (a workspace's stop) its processes first
    get SIGTERM and that long to end, then SIGKILL, then the disks are synced."""
    if grace_ms is None:
        return frame(SHUTDOWN, 0)
    return frame(SHUTDOWN, 0, _U32.pack(max(0, min(grace_ms, 0xFFFFFFFF))))


def identity(hostname: bytes, machine_id: bytes, seed: bytes) -> bytes:
    """The guest's identity for one run: its hostname (also ``/etc/hostname`` and
    ``/etc/hosts``), ``/etc/machine-id`` and bytes credited to its RNG. A pooled VM was
    booted before anybody asked for it; this makes it a machine of its own."""
    if not 0 < len(hostname) < 64 or not all(c in _HOSTNAME for c in hostname):
        raise ValueError(f"bad hostname {hostname!r}")
    if len(machine_id) != 32 or not all(c in b"0123456789abcdef" for c in machine_id):
        raise ValueError("a machine-id is 32 lowercase hex digits")
    if not SEED_MIN <= len(seed) <= SEED_MAX:
        raise ValueError(f"an RNG seed is {SEED_MIN} to {SEED_MAX} bytes")
    return frame(IDENTITY, 0, bytes([len(hostname)]) + hostname + machine_id + seed)


def users(uid: int, gid: int, passwd: bytes, group: bytes) -> bytes:
    """The guest's ``/etc/passwd`` and ``/etc/group``, and the home of ``uid`` made."""
    return frame(USERS, 0, _USERS.pack(uid, gid, len(passwd)) + passwd + group)


_USERS = struct.Struct(">III")
_HOSTNAME = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")


# guest -> host (untrusted) -----------------------------------------------------------

def _exact(payload: bytes, st: struct.Struct, what: str) -> tuple[int, ...]:
    if len(payload) != st.size:
        raise ProtocolError(f"{what} of {len(payload)} bytes, expected {st.size}")
    return st.unpack(payload)


def hello(untrusted: bytes) -> tuple[int, int]:
    """``(version, pid)`` of a HELLO."""
    version, pid = _exact(untrusted, _HELLO, "a hello")
    return version, pid


def started(untrusted: bytes) -> int:
    return _exact(untrusted, _U32, "a started message")[0]


def exit_code(untrusted: bytes) -> int:
    code = _exact(untrusted, _U32, "an exit message")[0]
    if code > 255:
        raise ProtocolError(f"exit code {code} is not in [0, 255]")
    return code


def closed_stream(untrusted: bytes) -> int:
    if len(untrusted) != 1 or untrusted[0] not in (1, 2):
        raise ProtocolError("a close message names no output stream")
    return untrusted[0]


def error(untrusted: bytes) -> tuple[int, str]:
    """``(code, message)`` of an ERROR: the code in [0, 255], the message cut to
    :data:`MAX_ERROR` bytes and stripped of control characters."""
    if len(untrusted) < _U32.size:
        raise ProtocolError("an error message without its code")
    code = _U32.unpack_from(untrusted)[0]
    if code > 255:
        raise ProtocolError(f"error code {code} is not in [0, 255]")
    text = untrusted[_U32.size:_U32.size + MAX_ERROR].decode("utf-8", "replace")
    return code, "".join(c if c.isprintable() else "?" for c in text)
