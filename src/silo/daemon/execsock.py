"""Streamed execs: the caller's own stdio (or a pty) wired into a workspace's command.

The HTTP exec copies output through JSON; an interactive ``silo exec -it`` needs its
terminal. So silod also listens on ``exec.sock`` (SOCK_SEQPACKET, the same permissions
and peer-credential rule as the API). Protocol (docs/api.md, "Streamed exec"):

* request: one packet of NUL-separated key/value fields with three fds (stdin, stdout,
  stderr) as SCM_RIGHTS. Keys: ``name``, ``arg`` (repeated, in order), ``env``
  (``K=V``, repeated), ``workdir``, ``user``, ``tty`` (``1``), ``term``, ``rows`` and
  ``cols`` (the terminal's size, set on the pty before the command starts).
* replies: ``started PID``; with a tty, ``pty`` carrying the pty master; then
  ``exit CODE`` or ``error CLASS MESSAGE``.
* the client may send ``signal N`` (forwarded to the command's process group through
  its relay); closing its end kills the command.

Fields are plain bytes split on NUL: nothing from the peer is unpickled or evaluated.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
from typing import Any

from silo.daemon.manager import Manager
from silo.daemon.runtime import settle
from silo.model.errors import InternalError, ProtocolError, SiloError

MAX_REQUEST = 1 << 20
KEYS = {b"name", b"arg", b"env", b"workdir", b"user", b"tty", b"term", b"rows", b"cols"}


def parse_request(data: bytes) -> dict[str, Any]:
    """The fields of a request packet; ProtocolError for anything malformed."""
    if not data.endswith(b"\0"):
        raise ProtocolError("malformed exec request: fields must end with NUL")
    parts = data[:-1].split(b"\0")
    if len(parts) % 2:
        raise ProtocolError("malformed exec request: a key without a value")
    out: dict[str, Any] = {"argv": [], "env": {}, "tty": False}
    for key, raw in zip(parts[::2], parts[1::2], strict=True):
        if key not in KEYS:
            raise ProtocolError(f"malformed exec request: unknown key {key[:32]!r}")
        value = os.fsdecode(raw)
        if key == b"arg":
            out["argv"].append(value)
        elif key == b"env":
            name, sep, val = value.partition("=")
            if not sep or not name:
                raise ProtocolError("malformed exec request: env entries are K=V")
            out["env"][name] = val
        elif key == b"tty":
            out["tty"] = value == "1"
        elif key in (b"rows", b"cols"):
            if not (value.isdigit() and len(value) <= 5 and int(value) < 65536):
                raise ProtocolError(f"malformed exec request: {key.decode()} must be 0-65535")
            out[key.decode()] = int(value)
        else:
            out[key.decode()] = value
    if "name" not in out:
        raise ProtocolError("malformed exec request: no workspace name")
    return out


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


class Server:
    def __init__(self, sock: socket.socket, manager: Manager) -> None:
        self.sock = sock
        self.manager = manager
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self.sock.setblocking(False)
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        for task in list(self.tasks):
            task.cancel()

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        task = asyncio.get_running_loop().create_task(self._serve(conn))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _readable(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(conn.fileno(), settle, ready)
        try:
            await ready
        finally:
            loop.remove_reader(conn.fileno())

    async def _serve(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            peer = _peer_uid(conn)
            while True:
                await self._readable(conn)
                try:
                    data, fds, flags, _ = socket.recv_fds(conn, MAX_REQUEST, 3)
                    break
                except BlockingIOError:
                    continue
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) != 3:
                raise ProtocolError("malformed exec request: it needs three stdio fds")
            await self._exec(conn, peer, parse_request(data), fds)
        except SiloError as e:
            with contextlib.suppress(OSError):
                conn.send(f"error {e.to_wire()['class']} {e.message}".encode())
        except asyncio.CancelledError:
            raise
        except Exception as e:  # one bad connection must not take the daemon down
            with contextlib.suppress(OSError):
                conn.send(f"error InternalError silod failed: {type(e).__name__}: {e}".encode())
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            conn.close()

    async def _exec(self, conn: socket.socket, peer: int, req: dict[str, Any], fds: list[int]) -> None:
        manager = self.manager
        run = manager.running_of(peer, req["name"])
        plan = manager.join_plan(run, req["argv"], req["env"], req.get("workdir"), req.get("user"),
                                 tty=req["tty"], term=req.get("term"),
                                 winsize=(req.get("rows", 0), req.get("cols", 0)))
        proc = await manager.runtime.join(run.proc, plan, (fds[0], fds[1], fds[2]))
        for fd in fds:
            os.close(fd)
        fds.clear()
        try:
            conn.send(f"started {proc.pid}".encode())
            if proc.pty is not None:
                socket.send_fds(conn, [b"pty"], [proc.pty])
            loop = asyncio.get_running_loop()
            while not proc.exited.done():
                readable = loop.create_task(self._readable(conn))
                waiters: set[asyncio.Future[Any]] = {readable, proc.exited}
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if readable not in done:
                    readable.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await readable
                    break
                try:
                    message = conn.recv(256)
                except BlockingIOError:
                    continue
                if not message:  # the client is gone: so is its command
                    await manager.runtime.kill(proc)
                    return
                if message.startswith(b"signal "):
                    try:
                        sig = int(message[7:])
                    except ValueError:
                        continue
                    if 0 < sig < signal.NSIG and sig not in (signal.SIGKILL, signal.SIGSTOP):
                        proc.signal(sig)
                    elif sig == signal.SIGKILL:
                        await manager.runtime.kill(proc)
            code = await proc.exited
            conn.send(f"exit {code}".encode())
        except OSError:
            if not proc.exited.done():
                await manager.runtime.kill(proc)
        finally:
            proc.close()


__all__ = ["InternalError", "Server", "parse_request"]
