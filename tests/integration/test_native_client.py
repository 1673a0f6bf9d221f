"""The C client (``src/silo/native/client.c``), installed as ``.venv/bin/silo``.

It must behave exactly like the Python fast path (:mod:`silo.cli.client`) it replaces:
real sandboxes through the installed binary (streams, exit codes, errors, stdin, signals,
``-t``), the hand-over to the Python client (other verbs, no server yet, a stale one),
and, against a fake server on the same socket, the very bytes of the protocol: the
requests of both clients are compared field by field (token, argv, cwd, environment with
bytes that are not UTF-8, locale coercion), real replies are decoded to the same exit
codes and messages, and malformed ones give one ``silo:`` line.

Fallbacks are observed through "probe" builds of the same source whose Python is a
script that records its arguments and exits 42: a probe that exits 42 handed over, one
that does anything else served the command itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import marshal
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_servers import client_env as _env
from cli_servers import private_runtime_dir, pty_run, server_pid
from procs import children

from silo import native
from silo.model.errors import CommandNotExecutable, CommandNotFound, SpecError

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.skip("the CLI integration tests run as root", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
SRC = str(REPO / "src")
SILO = str(REPO / ".venv" / "bin" / "silo")
PY_CLIENT = [sys.executable, "-IS", "-c",
             f"import sys; sys.path.insert(0, {SRC!r}); from silo.cli.client import main; main()"]
PY_CODE = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
           "from silo.cli.client import main; main()")
FAKE_PYTHON = '#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done > "$FAKE_PYTHON_OUT"\nexit 42\n'
HANDED_OVER = 42


# fixtures and helpers ---------------------------------------------------------------------


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def _wait_for(predicate, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


@pytest.fixture(scope="module")
def runtime_dir() -> Iterator[str]:
    with private_runtime_dir('silo-native-rt-') as path:
        yield path


def _run(argv: list[str], runtime_dir: str, input: bytes | None = None,
         env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, input=input, capture_output=True, timeout=timeout, cwd="/",
                          env=_env(runtime_dir, env), stdin=None if input is not None else subprocess.DEVNULL)


@pytest.fixture
def cli(runtime_dir: str):  # type: ignore[no-untyped-def]
    def run(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        return _run([SILO, *args], runtime_dir, **kwargs)

    return run


def _one_silo_line(cp: subprocess.CompletedProcess[bytes], code: int) -> str:
    err = cp.stderr.decode(errors="replace")
    assert cp.returncode == code, (cp.returncode, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("silo: "), err
    assert cp.stdout == b""
    return lines[0]


class Probe:
    """A build of client.c whose "Python" records its arguments and exits 42."""

    def __init__(self, path: str, record: str) -> None:
        self.path = path
        self.record = record

    def run(self, args: list[str], runtime_dir: str, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.record)
        env = {"FAKE_PYTHON_OUT": self.record, **kwargs.pop("env", {})}
        return _run([self.path, *args], runtime_dir, env=env, **kwargs)

    def handed_over(self) -> list[str] | None:
        """The fake Python's arguments, None if it did not run."""
        try:
            with open(self.record, "rb") as f:
                return [a.decode() for a in f.read().split(b"\0")[:-1]]
        except FileNotFoundError:
            return None


def _build_probe(directory: Path, src: str = SRC) -> Probe:
    python = directory / "fake-python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    out = native.build("silo", out=str(directory / "silo"), defines={"SILO_PYTHON": str(python), "SILO_SRC": src})
    return Probe(out, str(directory / "fake-python.out"))


@pytest.fixture(scope="module")
def probe() -> Iterator[Probe]:
    directory = Path(tempfile.mkdtemp(prefix="silo-probe-"))
    try:
        yield _build_probe(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class FakeServer:
    """Listens on ``<runtime>/spawner.sock`` like the CLI server. Per connection: records
    the hello, answers ``hello_reply`` (closes if None); records the request and its fds,
    runs ``on_request(fds)``, sends ``replies`` (raw packets); then records what else comes
    (signals) and, with ``close`` set, hangs up."""

    def __init__(self, runtime_dir: str, replies: list[bytes] = (), hello_reply: bytes | None = None,  # type: ignore[assignment]
                 on_request=None, close: bool = True) -> None:  # type: ignore[no-untyped-def]
        self.replies = list(replies)
        self.hello_reply = marshal.dumps(("ok",)) if hello_reply is None else hello_reply
        self.on_request = on_request
        self.close = close
        self.messages: list[Any] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(os.path.join(runtime_dir, "spawner.sock"))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                self._talk(conn)

    def _talk(self, conn: socket.socket) -> None:
        data, _, _, _ = socket.recv_fds(conn, 1 << 20, 8)
        self.messages.append(marshal.loads(data))
        if self.hello_reply == b"close":
            return
        conn.send(self.hello_reply)
        data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 8)
        if not data:
            return
        self.messages.append(marshal.loads(data))
        try:
            if self.on_request is not None:
                self.on_request(fds)
        finally:
            for fd in fds:
                os.close(fd)
        for reply in self.replies:
            conn.send(reply)
        conn.settimeout(0.5 if self.close else 10)
        with contextlib.suppress(OSError):
            while data := conn.recv(1 << 20):
                self.messages.append(marshal.loads(data))

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(timeout=10)
        self.sock.close()


@contextlib.contextmanager
def _fake_server(**kwargs: Any) -> Iterator[tuple[FakeServer, str]]:
    rt = tempfile.mkdtemp(prefix="silo-fake-rt-")
    server = FakeServer(rt, **kwargs)
    try:
        yield server, rt
    finally:
        server.stop()
        shutil.rmtree(rt, ignore_errors=True)


# the installed client ---------------------------------------------------------------------


def test_the_installed_silo_is_the_c_client() -> None:
    with open(SILO, "rb") as f:
        assert f.read(4) == b"\x7fELF"
    assert os.access(SILO, os.X_OK)


# real sandboxes through the C client -------------------------------------------------------


def test_streams_and_exit_code(cli) -> None:  # type: ignore[no-untyped-def]
    cp = cli("run", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (cp.returncode, cp.stdout, cp.stderr) == (3, b"out\n", b"err\n")
    assert cli("run", "echo", "a", "-n", "--x").stdout == b"a -n --x\n"


@pytest.mark.parametrize(("sig", "code"), [("KILL", 137), ("SEGV", 139), ("TERM", 143)])
def test_killed_by_signal_is_128_plus_n(cli, sig: str, code: int) -> None:  # type: ignore[no-untyped-def]
    cp = cli("run", "--", "sh", "-c", f"kill -{sig} $$")
    assert cp.returncode == code, cp.stderr
    assert cp.stderr == b""


@pytest.mark.parametrize(("args", "code", "words"), [
    (["--", "no-such-command-here"], 127, "no-such-command-here"),
    (["--", "/etc/passwd"], 126, "not executable"),
    (["--memory", "12Q", "--", "true"], 125, "bad memory size '12Q'"),
    ([], 125, "no command given"),
])
def test_errors_are_one_line(cli, args: list[str], code: int, words: str) -> None:  # type: ignore[no-untyped-def]
    assert words in _one_silo_line(cli("run", *args), code)


def test_timeout_says_so(cli) -> None:  # type: ignore[no-untyped-def]
    cp = cli("run", "--timeout", "300ms", "--", "sleep", "10")
    assert cp.returncode == 137
    assert cp.stderr == b"silo: the sandbox was killed: it hit its timeout\n"


def test_stdin_only_with_i(cli) -> None:  # type: ignore[no-untyped-def]
    assert cli("run", "-i", "--", "cat", input=b"hi\n").stdout == b"hi\n"
    data = os.urandom(1 << 20)
    assert cli("run", "-i", "--", "cat", input=data).stdout == data
    cp = cli("run", "--", "sh", "-c", "cat; echo end", input=b"secret\n")
    assert (cp.returncode, cp.stdout) == (0, b"end\n")


def test_closed_stdin_is_one_line(runtime_dir: str) -> None:
    cp = subprocess.run(["sh", "-c", 'exec "$0" run -- true <&-', SILO], capture_output=True, timeout=30,
                        env=_env(runtime_dir))
    assert "file descriptor 0" in _one_silo_line(cp, 125)


@pytest.mark.parametrize(("sig", "script", "code", "out"), [
    (signal.SIGTERM, "echo ready; sleep 30", 143, b"ready\n"),
    (signal.SIGINT, 'trap "echo got INT; exit 7" INT; echo ready; sleep 30 & wait', 7, b"ready\ngot INT\n"),
    (signal.SIGUSR1, 'trap "echo got USR1; exit 8" USR1; echo ready; sleep 30 & wait', 8, b"ready\ngot USR1\n"),
])
def test_signals_reach_the_sandbox(runtime_dir: str, sig: int, script: str, code: int, out: bytes) -> None:
    proc = subprocess.Popen([SILO, "run", "--", "sh", "-c", script], env=_env(runtime_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first == b"ready\n"
    proc.send_signal(sig)  # the client lives on and exits with the sandbox's code
    rest, err = proc.communicate(timeout=15)
    assert (proc.returncode, first + rest, err) == (code, out, b"")


# -t under a real terminal -------------------------------------------------------------------


def _in_pty(script: str, env: dict[str, str], on_output=None, timeout: float = 20) -> tuple[bytes, int]:  # type: ignore[no-untyped-def]
    """``sh -c script`` as the session leader of a fresh 30x100 pty; (output, exit code)."""
    return pty_run(["/bin/sh", "-c", script], env, 30, 100, on_output, timeout)


def _lines(out: bytes) -> list[str]:
    return out.decode(errors="replace").replace("\r", "").splitlines()


def test_tty_raw_mode_input_and_restore(runtime_dir: str) -> None:
    inner = 'stty size; echo ready; read line; echo "got $line"; exit 5'
    script = f"stty -g; {SILO} run -t -- sh -c '{inner}'; echo rc=$?; stty -g"
    seen: dict[str, Any] = {}

    def type_a_line(pid: int, master: int, buf: bytes) -> None:
        if b"ready" in buf and "lflag" not in seen:
            seen["lflag"] = termios.tcgetattr(master)[3]  # our terminal while the client runs
            os.write(master, b"hello\r")

    out, code = _in_pty(script, _env(runtime_dir), type_a_line)
    lines = _lines(out)
    assert code == 0, out
    assert "30 100" in lines and "got hello" in lines, lines
    assert "rc=5" in lines, lines
    assert not seen["lflag"] & (termios.ICANON | termios.ECHO | termios.ISIG)  # raw
    assert lines[0] == lines[-1]  # stty -g: the terminal is as it was


def test_tty_restored_when_a_signal_ends_the_client(runtime_dir: str) -> None:
    script = f"stty -g; {SILO} run -t -- sh -c 'echo ready; sleep 30'; echo rc=$?; stty -g"
    killed: list[int] = []

    def kill_client(pid: int, master: int, buf: bytes) -> None:
        if b"ready" in buf and not killed:
            clients = [kid for kid in children(pid) if _cmdline(kid).startswith(SILO.encode())]
            assert len(clients) == 1, clients
            os.kill(clients[0], signal.SIGALRM)  # not forwarded: its default action ends us
            killed.append(clients[0])

    out, code = _in_pty(script, _env(runtime_dir), kill_client)
    lines = _lines(out)
    assert killed and code == 0, out
    assert f"rc={128 + signal.SIGALRM}" in lines, lines
    assert lines[0] == lines[-1]


# handing over to the Python client -------------------------------------------------------------


@pytest.mark.parametrize("args", [["version"], ["plan", "--", "true"], ["run", "--help"], ["run", "-h"],
                                  ["--help"], []])
def test_other_verbs_are_handed_over(probe: Probe, args: list[str]) -> None:
    with _fake_server() as (server, rt):
        cp = probe.run(args, rt)
    assert cp.returncode == HANDED_OVER, cp.stderr
    assert probe.handed_over() == ["-IS", "-c", PY_CODE, SRC, *args]
    assert server.messages == []  # not even a hello


def test_other_verbs_work(runtime_dir: str) -> None:
    assert _run([SILO, "version"], runtime_dir).stdout.startswith(b"silo ")
    cp = _run([SILO, "plan", "--", "true"], runtime_dir)
    assert cp.returncode == 0 and cp.stdout.splitlines()[-1] == b"exec cwd=/ true", cp.stderr
    cp = _run([SILO, "run", "--help"], runtime_dir)
    assert cp.returncode == 0 and b"--isolation" in cp.stdout and b"NOT a security boundary" in cp.stdout


@pytest.mark.parametrize("hello_reply", [marshal.dumps(("restart",)), marshal.dumps(("error", 0, {})),
                                         b"not marshal", b"close"])
def test_no_ok_to_hello_is_handed_over(probe: Probe, hello_reply: bytes) -> None:
    with _fake_server(hello_reply=hello_reply) as (server, rt):
        cp = probe.run(["run", "--", "true"], rt)
    assert cp.returncode == HANDED_OVER, cp.stderr
    assert probe.handed_over() == ["-IS", "-c", PY_CODE, SRC, "run", "--", "true"]
    assert [m[0] for m in server.messages] == ["hello"]  # no request was sent


def test_no_server_is_handed_over(probe: Probe) -> None:
    rt = tempfile.mkdtemp(prefix="silo-empty-rt-")
    try:
        cp = probe.run(["run", "--", "true"], rt)
    finally:
        shutil.rmtree(rt)
    assert cp.returncode == HANDED_OVER
    assert probe.handed_over() == ["-IS", "-c", PY_CODE, SRC, "run", "--", "true"]


def test_first_run_starts_the_server_then_c_serves(probe: Probe) -> None:
    with private_runtime_dir('silo-native-rt-') as rt:
        cp = _run([SILO, "run", "--", "echo", "first"], rt)
        assert (cp.returncode, cp.stdout) == (0, b"first\n"), cp.stderr
        server = server_pid(rt)
        assert server
        # the probe cannot hand over (its Python only records): it ran this itself
        cp = probe.run(["run", "--", "echo", "second"], rt)
        assert (cp.returncode, cp.stdout) == (0, b"second\n"), cp.stderr
        assert probe.handed_over() is None
        assert server_pid(rt) == server


def test_a_stale_server_is_replaced(tmp_path: Path) -> None:
    # A client built from a copy of the source tree has another code token: the running
    # server (of this tree) retires, the Python client of the copy starts its own.
    copy = tmp_path / "src"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    other = native.build("silo", out=str(tmp_path / "silo"),
                         defines={"SILO_PYTHON": sys.executable, "SILO_SRC": str(copy)})
    with private_runtime_dir('silo-native-rt-') as rt:
        assert _run([SILO, "run", "--", "true"], rt).returncode == 0
        old = server_pid(rt)
        assert old and str(copy).encode() not in _cmdline(old)
        cp = _run([other, "run", "--", "echo", "from the copy"], rt)
        assert (cp.returncode, cp.stdout) == (0, b"from the copy\n"), cp.stderr
        assert _wait_for(lambda: server_pid(rt) not in (None, old)), "the stale server was not replaced"
        new = server_pid(rt)
        assert new and str(copy).encode() in _cmdline(new)
        assert _wait_for(lambda: not os.path.exists(f"/proc/{old}"))
        # and back: this tree's client finds the copy's server stale in turn
        cp = _run([SILO, "run", "--", "echo", "back"], rt)
        assert (cp.returncode, cp.stdout) == (0, b"back\n"), cp.stderr
        assert _wait_for(lambda: server_pid(rt) not in (None, new))


# the protocol, byte for byte, against a fake server ----------------------------------------------

RAW_EXEC = r"""
import ctypes, marshal, os, sys
with open(sys.argv[1], "rb") as f:
    argv, envp, cwd = marshal.load(f)
os.chdir(cwd)
libc = ctypes.CDLL(None, use_errno=True)
arr = lambda items: (ctypes.c_char_p * (len(items) + 1))(*items, None)
libc.execve(argv[0], arr(argv), arr(envp))
sys.exit(f"execve: {os.strerror(ctypes.get_errno())}")
"""
STARTED_EXIT = [marshal.dumps(("started", 1, 99)), marshal.dumps(("exit", 1, 0, None))]


def _raw_exec(argv: list[bytes], envp: list[bytes], cwd: bytes) -> subprocess.CompletedProcess[bytes]:
    """Run argv with exactly envp (duplicates and entries without "=" included)."""
    with tempfile.NamedTemporaryFile(prefix="silo-raw-exec-") as f:
        f.write(marshal.dumps((argv, envp, cwd)))
        f.flush()
        return subprocess.run([sys.executable, "-c", RAW_EXEC, f.name], capture_output=True, timeout=30,
                              stdin=subprocess.DEVNULL, env={})


WEIRD_ENV = [b"K\xff=v\xfe", b"TRUNC=\xe2\x82A", b"SURR=\xed\xa0\x80", b"OVERLONG=\xc0\xaf",
             b"BIG=\xf4\x90\x80\x80", b"OK=h\xc3\xa9llo \xf0\x9f\x98\x80", b"=lead", b"NOEQ", b"D=1", b"D=2",
             b"EMPTY=", b"EQ=a=b", b"LONG=" + b"x" * 100_000]


@pytest.mark.parametrize("locale", [[b"LANG=C.UTF-8"], [], [b"LC_ALL=C"], [b"LANG=POSIX"],
                                    [b"LANG=xx_XX.UTF-8"], [b"LC_CTYPE=C", b"LANG=C.UTF-8"], [b"LC_ALL="]],
                         ids=["utf8", "unset", "lc_all_c", "posix", "unknown", "lc_ctype_c", "lc_all_empty"])
def test_request_is_the_python_clients(tmp_path: Path, locale: list[bytes], request: pytest.FixtureRequest) -> None:
    locale_id = request.node.callspec.id
    cwd = tmp_path / os.fsdecode(b"dir-\xff-\xc3\xa9")
    cwd.mkdir()
    args = [b"run", b"--", b"printf", b"%s", b"\xff\xfe", b"caf\xc3\xa9", b""]
    with _fake_server(replies=STARTED_EXIT) as (server, rt):
        envp = [b"PATH=/usr/bin:/bin", b"SILO_RUNTIME_DIR=" + rt.encode(), *locale, *WEIRD_ENV]
        for client in ([SILO.encode()], [os.fsencode(a) for a in PY_CLIENT]):
            cp = _raw_exec([*client, *args], envp, bytes(cwd))
            assert cp.returncode == 0, cp.stderr
            assert _wait_for(lambda: len(server.messages) in (2, 4))
    c_client, py_client = server.messages[:2], server.messages[2:]
    assert c_client[0][0] == "hello" and c_client[1][0] == "cli"
    assert c_client == py_client
    env = c_client[1][4]
    assert env["D"] == "1" and env[""] == "lead" and "NOEQ" not in env and env["K\udcff"] == "v\udcfe"
    # PEP 538: Python's startup sets LC_CTYPE for the legacy C locale, unless LC_ALL is set
    coerced = {"utf8": None, "unset": "C.UTF-8", "lc_all_c": None, "posix": "C.UTF-8", "unknown": "C.UTF-8",
               "lc_ctype_c": "C.UTF-8", "lc_all_empty": "C.UTF-8"}[locale_id]
    assert env.get("LC_CTYPE") == coerced


REPLIES = [
    ([("started", 1, 123), ("exit", 1, 0, None)], 0, b""),
    ([("started", 1, 1), ("exit", 1, 1, None)], 1, b""),  # back-references ('r') to the int 1
    ([("started", 1, 1 << 40), ("exit", 1, 300, None)], 300 & 0xFF, b""),  # 'l', exit() takes the low byte
    ([("started", 1, 7), ("exit", 1, 137, "memory")], 137, b"silo: the sandbox was killed: it hit its memory limit\n"),
    ([("started", 1, 7), ("exit", 1, 137, "pids")], 137, b"silo: the sandbox was killed: it hit its process limit\n"),
    ([("started", 1, 7), ("exit", 1, 137, "timeout")], 137, b"silo: the sandbox was killed: it hit its timeout\n"),
    ([("started", 1, 7), ("exit", 1, 137, "frost")], 137, b"silo: the sandbox was killed: it hit frost\n"),
    ([("started", 1, 7), ("exit", 1, 2, "")], 2, b""),
    ([("error", 1, CommandNotFound("nope: not found").to_wire())], 127, b"silo: nope: not found\n"),
    ([("started", 1, 7), ("error", 1, CommandNotExecutable("x: not executable").to_wire())], 126,
     b"silo: x: not executable\n"),
    ([("error", 1, SpecError("bad memory size 'x'").to_wire())], 125, b"silo: bad memory size 'x'\n"),
    ([("error", 1, {"class": "CommandNotFound", "message": "CommandNotFound"})], 127, b"silo: CommandNotFound\n"),
    ([("error", 1, {"message": "caf\u00e9 \U0001f600", "class": "X", "extra": [None, True, False, {}]})], 125,
     "silo: caf\u00e9 \U0001f600\n".encode()),
    ([("started", 1, 7), ("news", 1, [1, 2]), ("exit", 1, 4, None)], 4, b""),  # unknown replies are ignored
]


@pytest.mark.parametrize(("replies", "code", "stderr"), REPLIES)
def test_replies_decode_as_in_python(probe: Probe, replies: list[tuple[Any, ...]], code: int,
                                     stderr: bytes) -> None:
    packets = [marshal.dumps(r) for r in replies]
    with _fake_server(replies=packets) as (_, rt):
        cp = probe.run(["run", "--", "true"], rt)
    assert probe.handed_over() is None
    results = [(cp.returncode, cp.stdout, cp.stderr)]
    with _fake_server(replies=packets) as (_, rt):
        cp = _run([*PY_CLIENT, "run", "--", "true"], rt)
    results.append((cp.returncode, cp.stdout, cp.stderr))
    assert results[0] == results[1] == (code, b"", stderr)


@pytest.mark.parametrize("packet", [
    b"\x00garbage",
    marshal.dumps(("exit", 1, 0, None))[:-3],  # truncated
    b"r\x05\x00\x00\x00",  # a reference to nothing
    b")\x02\xda\xff",  # a string longer than the packet
    b"(\xff\xff\xff\x7f",  # two billion items
    b")\x01" * 100 + b"N",  # nested too deep
    b"N", b")\x00", marshal.dumps((1, 2)),  # not a tuple, empty, no name
    marshal.dumps(("exit", 1, "zero", None)),  # code not an int
    marshal.dumps(("exit", 1, 1 << 100, None)),  # an int beyond 60 bits
    marshal.dumps(("exit", 1, 1.5, None)),  # a float
])
def test_malformed_replies_are_one_line(probe: Probe, packet: bytes) -> None:
    with _fake_server(replies=[marshal.dumps(("started", 1, 7)), packet]) as (_, rt):
        cp = probe.run(["run", "--", "true"], rt)
    assert _one_silo_line(cp, 125) == "silo: malformed reply from silo's server"
    assert probe.handed_over() is None


def test_server_gone_is_never_handed_over(probe: Probe) -> None:
    with _fake_server() as (server, rt):
        cp = probe.run(["run", "--", "true"], rt)
        assert _one_silo_line(cp, 125) == "silo: silo's server went away; the sandbox was killed"
        assert [m[0] for m in server.messages] == ["hello", "cli"]
    with _fake_server(replies=[marshal.dumps(("started", 1, 7))]) as (_, rt):
        cp = probe.run(["run", "--", "true"], rt)
        assert _one_silo_line(cp, 125) == "silo: silo's server went away; the sandbox was killed"
    assert probe.handed_over() is None


def test_stdio_fds_reach_the_server(probe: Probe) -> None:
    def use_them(fds: list[int]) -> None:
        assert len(fds) == 3
        assert os.read(fds[0], 100) == b"to the sandbox"
        os.write(fds[1], b"from the sandbox\n")
        os.write(fds[2], b"on stderr\n")

    with _fake_server(replies=STARTED_EXIT, on_request=use_them) as (_, rt):
        cp = probe.run(["run", "-i", "--", "cat"], rt, input=b"to the sandbox")
    assert (cp.returncode, cp.stdout, cp.stderr) == (0, b"from the sandbox\n", b"on stderr\n")


def test_signals_are_forwarded_as_messages(probe: Probe) -> None:
    with _fake_server(replies=[marshal.dumps(("started", 1, 7))], close=False) as (server, rt):
        proc = subprocess.Popen([probe.path, "run", "--", "true"], env=_env(rt), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert _wait_for(lambda: len(server.messages) >= 2)
        time.sleep(0.1)  # the client waits for replies now
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                    signal.SIGUSR2, signal.SIGWINCH):
            proc.send_signal(sig)
            time.sleep(0.05)
        assert _wait_for(lambda: len(server.messages) >= 8)
        assert proc.poll() is None  # none of them ended the client
        proc.kill()
        proc.wait(timeout=10)
    assert server.messages[2:] == [("signal", 1, int(s)) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP,
                                                                   signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)]


TAIL = b"y" * 7000 + b"bye\n"  # more than a read of the master takes (4 KiB), less than a pty holds


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return data[data.rindex(b")") + 2:].split()[0].decode()


def test_pty_from_the_server_is_pumped(probe: Probe) -> None:
    # The fake server plays the sandbox's side of -t: it sends a pty master and talks on the slave.
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 1, 1, 0, 0))
    packets = [marshal.dumps(("started", 1, 7)), marshal.dumps(("pty", 1))]

    class PtyServer(FakeServer):
        def _talk(self, conn: socket.socket) -> None:
            data, _, _, _ = socket.recv_fds(conn, 1 << 20, 8)
            self.messages.append(marshal.loads(data))
            conn.send(self.hello_reply)
            data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 8)
            for fd in fds:
                os.close(fd)
            os.write(slave, b"to the terminal\n")
            conn.send(packets[0])
            socket.send_fds(conn, [packets[1]], [master])
            os.close(master)
            line = b""
            while not line.endswith(b"\n"):
                line += os.read(slave, 100)
            self.messages.append(line)
            self.messages.append(struct.unpack("HHHH", fcntl.ioctl(slave, termios.TIOCGWINSZ, b"\0" * 8))[:2])
            # With the client stopped, more output than one read takes, then the exit:
            # what the client has not read yet when the exit comes must still be shown.
            pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
            os.kill(pid, signal.SIGSTOP)
            assert _wait_for(lambda: _state(pid) == "T")
            os.set_blocking(slave, False)
            assert os.write(slave, TAIL) == len(TAIL)
            os.close(slave)
            conn.send(marshal.dumps(("exit", 1, 6, None)))
            os.kill(pid, signal.SIGCONT)

    rt = tempfile.mkdtemp(prefix="silo-fake-rt-")
    server = PtyServer(rt)
    try:
        cp = probe.run(["run", "-t", "--", "sh"], rt, input=b"typed\n")
    finally:
        server.stop()
        shutil.rmtree(rt, ignore_errors=True)
    assert cp.returncode == 6, cp.stderr
    assert cp.stdout.replace(b"\r", b"") == b"to the terminal\ntyped\n" + TAIL  # the echo of "typed" too
    assert server.messages[1] == b"typed\n"
    assert server.messages[2] == (1, 1)  # stdin is no terminal: the size is left alone
