"""The CLI's fast path: ``silo run`` as a thin client of the per-user CLI server.

Runs under ``python -I -S`` and imports only C-level builtins (``_socket``,
``_signal``, ``marshal``, ``select``), because Python's startup is most
of ``silo run``'s cost: the server (:mod:`silo.cli.server`) parses, plans and
spawns. It passes its own stdio fds to the sandbox, so output is never copied;
it forwards Ctrl-C and other signals; with ``-t`` it owns a pty pair and pumps it.
Every other verb is handed to :mod:`silo.cli.main`.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]
import _socket
import marshal
import os
import select
import sys
import time

from silo.engine import paths

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_FORWARD = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT, _signal.SIGUSR1,
            _signal.SIGUSR2)
_EXIT_CODES = {"CommandNotFound": 127, "CommandNotExecutable": 126}


def _send(sock: _socket.socket, message: tuple[Any, ...], fds: list[int] | None = None) -> None:
    payload = b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds or ())
    anc = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, payload)] if fds else []
    sock.sendmsg([marshal.dumps(message)], anc)


def _recv(sock: _socket.socket, keep_fds: list[int] | None = None) -> tuple[Any, ...] | None:
    """One message; received fds go to ``keep_fds`` or are closed."""
    data, anc, _, _ = sock.recvmsg(1 << 20, _socket.CMSG_SPACE(32))
    for level, kind, payload in anc:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            for i in range(0, len(payload) - 3, 4):
                fd = int.from_bytes(payload[i:i + 4], sys.byteorder)
                if keep_fds is not None:
                    keep_fds.append(fd)
                else:
                    os.close(fd)
    if not data:
        return None
    message = marshal.loads(data)  # noqa: S302 - peer is our own server, same uid
    return message if isinstance(message, tuple) and message else None


def _die(message: str, code: int = 125) -> None:
    os.write(2, f"silo: {message}\n".encode())
    sys.exit(code)


def _start_server() -> None:
    code = (f"import sys; sys.path[:0] = {[p for p in sys.path if p]!r}; "
            "from silo.cli.server import main; main()")
    python = sys.executable
    pid = os.fork()
    if pid == 0:  # detach: the server outlives this command, in its own session
        try:
            os.setsid()
            if os.fork() == 0:
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, 0)
                os.dup2(null, 1)
                log = os.open(os.path.join(paths.runtime_dir(), "server.log"),
                              os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                os.dup2(log, 2)
                os.execv(python, [python, "-c", code])  # noqa: S606
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _connect(token: str) -> _socket.socket:
    path = paths.server_socket()
    deadline = time.monotonic() + 15
    started = False
    while True:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
            _send(sock, ("hello", token))
            reply = _recv(sock)
            if reply is not None and reply[0] == "ok":
                return sock
            sock.close()  # "restart": the old server retired
        except OSError:
            sock.close()
        if not started:
            try:
                os.makedirs(paths.runtime_dir(), mode=0o711, exist_ok=True)
            except OSError as e:
                _die(f"cannot create {paths.runtime_dir()}: {e.strerror}")
            _start_server()
            started = True
        if time.monotonic() > deadline:
            _die(f"silo's server did not start; see {os.path.join(paths.runtime_dir(), 'server.log')}")
        time.sleep(0.005)


# For the full CLI's verbs that talk to the server (silo pool).
connect_server, send, recv = _connect, _send, _recv


def _run(argv: list[str]) -> None:
    sock = _connect(paths.code_token())
    env = dict(os.environ)
    cwd = os.getcwd()
    job = 1
    # Signals are caught (and later forwarded) from before the request: the command
    # may already run when the server's first reply arrives.
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    _signal.set_wakeup_fd(wfd)
    for sig in _FORWARD:
        _signal.signal(sig, lambda s, f: None)
    _signal.signal(_signal.SIGWINCH, lambda s, f: None)
    _send(sock, ("cli", job, argv, cwd, env, False), [0, 1, 2])
    tty = _Tty()
    try:
        code = _wait(sock, job, rfd, tty)
    finally:
        tty.restore()
    sys.exit(code)


class _Tty:
    """The client's end of ``-t``: the sandbox's pty master, and our terminal in raw mode."""

    def __init__(self) -> None:
        self.master = -1
        self.saved: list[Any] | None = None

    def attach(self, master: int) -> None:
        self.master = master
        _copy_winsize(master)
        self.saved = _raw_mode()

    def restore(self) -> None:
        if self.saved is not None:
            import termios

            termios.tcsetattr(0, termios.TCSADRAIN, self.saved)
            self.saved = None


def _copy_winsize(master: int) -> None:
    import fcntl
    import termios

    try:
        size = fcntl.ioctl(0, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(master, termios.TIOCSWINSZ, size)
    except OSError:
        pass


def _raw_mode() -> list[Any] | None:
    import termios
    import tty

    if not os.isatty(0):
        return None
    saved = termios.tcgetattr(0)
    tty.setraw(0)
    return saved


def _wait(sock: _socket.socket, job: object, rfd: int, tty: _Tty) -> int:
    poll = select.poll()
    poll.register(sock.fileno(), select.POLLIN)
    poll.register(rfd, select.POLLIN)
    stdin_open = False
    master = -1
    while True:
        for fd, _event in poll.poll():
            if fd == rfd:
                for signum in os.read(rfd, 64):
                    if signum == _signal.SIGWINCH and master != -1:
                        _copy_winsize(master)
                    elif signum != _signal.SIGWINCH:
                        _send(sock, ("signal", job, signum))
            elif fd == master:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    data = b""
                if data:
                    os.write(1, data)
                else:
                    poll.unregister(master)
            elif fd == 0 and stdin_open:
                data = os.read(0, 65536)
                if data:
                    os.write(master, data)
                else:
                    poll.unregister(0)
                    stdin_open = False
            elif fd == sock.fileno():
                fds: list[int] = []
                reply = _recv(sock, fds)
                if reply is not None and reply[0] == "pty" and len(fds) == 1:
                    master = fds[0]
                    tty.attach(master)
                    poll.register(master, select.POLLIN)
                    poll.register(0, select.POLLIN)
                    stdin_open = True
                    continue
                for extra in fds:
                    os.close(extra)
                if reply is None:
                    _die("silo's server went away; the sandbox was killed")
                    return 125
                if reply[0] == "exit":
                    if master != -1:
                        _drain(master)
                    if reply[3]:
                        reason = str(reply[3])
                        words = {"memory": "its memory limit", "pids": "its process limit",
                                 "timeout": "its timeout"}.get(reason, reason)
                        os.write(2, f"silo: the sandbox was killed: it hit {words}\n".encode())
                    return int(str(reply[2]))
                if reply[0] == "error":
                    err = reply[2] if isinstance(reply[2], dict) else {}
                    _die(str(err.get("message", "error")), _EXIT_CODES.get(str(err.get("class")), 125))


def _drain(master: int) -> None:
    os.set_blocking(master, False)
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            return
        if not data:
            return
        os.write(1, data)


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] == "run" and "--help" not in argv[1:2] and "-h" not in argv[1:2]:
        _run(argv[1:])
        return
    import site

    site.main()  # the full CLI needs the virtualenv's packages
    from silo.cli.main import main as full_main

    full_main(argv)


if __name__ == "__main__":
    main()
