"""silo.Client / silo.AsyncClient against MockTransport: requests, typed results, the
daemon's errors re-raised as their own class, autostart, and cp's host-side tar checks."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import signal
import socket
import sys
import tarfile
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import silo
from silo.model.errors import InternalError, NotFoundError, ProtocolError, SpecError, UserError
from silo.model.specfile import SpecFileError
from silo.model.workspace import State, WorkspaceSpec
from silo.sdk import transport as tp
from silo.sdk.client import AsyncClient, Change, Client, ExecResult, Template, Workspace, WorkspaceInfo


@pytest.fixture
def mock() -> silo.MockTransport:
    return silo.MockTransport()


@pytest.fixture
def client(mock: silo.MockTransport) -> Client:
    return Client(transport=mock)


def last(mock: silo.MockTransport) -> httpx.Request:
    return mock.daemon.requests[-1]


def body(request: httpx.Request) -> Any:
    return json.loads(request.content)


# -- create and the spec ---------------------------------------------------------------------


def test_create_sends_the_validated_spec(client: Client, mock: silo.MockTransport) -> None:
    ws = client.create("web", isolation="process", mounts=["/tmp:/data:ro"], env={"LANG": "C.UTF-8"},
                       memory="512M", cpus=1.5, pids=64, on_start=["sh", "-c", "echo hi"], restart="on-failure",
                       workdir="/tmp", user="1000:1000", hostname="box", disposable=True)
    assert isinstance(ws, silo.Workspace) and ws.name == "web"
    request = last(mock)
    assert (request.method, request.url.path) == ("POST", "/v1/workspaces")
    spec = body(request)["spec"]
    assert spec["name"] == "web" and spec["isolation"] == "process" and spec["disposable"] is True
    assert spec["mount"] == [{"source": "/tmp", "target": "/data", "readonly": True}]
    assert spec["limits"] == {"memory": 512 << 20, "cpus": 1.5, "pids": 64}
    assert spec["on_start"] == ["sh", "-c", "echo hi"] and spec["restart"] == "on-failure"
    assert spec["user"] == "1000:1000" and spec["hostname"] == "box" and spec["workdir"] == "/tmp"
    assert WorkspaceSpec.from_dict(spec).env == (("LANG", "C.UTF-8"),)


def test_create_from_a_spec_dict_a_spec_object_and_a_file(client: Client, tmp_path: Path) -> None:
    assert client.create("a", spec={"isolation": "app", "env": {"X": "1"}}).info().spec.isolation.value == "app"
    base = WorkspaceSpec(name="ignored", root="host")
    assert client.create("b", spec=base, memory="1G").info().spec.limits.memory == 1 << 30
    toml = tmp_path / "silo.toml"
    toml.write_text('name = "c"\nisolation = "app"\n[env]\nA = "1"\n')
    info = client.create(file=str(toml), env={"B": "2"}).info()
    assert info.name == "c" and dict(info.spec.env) == {"A": "1", "B": "2"}
    assert client.create("d", file=toml).info().name == "d"  # the name given wins over the file's


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "Web"}, "bad workspace name 'Web'"),
    ({"name": "web", "isolation": "vmm"}, "unknown isolation 'vmm'"),
    ({"name": "web", "memory": "lots"}, "bad memory size"),
    ({"name": "web", "mounts": ["relative:/x"]}, "absolute host path"),
    ({"name": "web", "restart": "sometimes"}, "unknown restart policy"),
    ({"name": "web", "spec": {"isolaton": "app"}}, "did you mean 'isolation'"),
    ({}, "the workspace has no name"),
])
def test_bad_input_fails_before_any_request(client: Client, mock: silo.MockTransport, kwargs: dict[str, Any],
                                            message: str) -> None:
    with pytest.raises(SpecError, match=message):
        client.create(**kwargs)
    assert mock.daemon.requests == []


def test_a_bad_spec_file_names_line_and_column(client: Client, mock: silo.MockTransport, tmp_path: Path) -> None:
    toml = tmp_path / "silo.toml"
    toml.write_text('name = "web"\n[limits]\nmemory = "huge"\n')
    with pytest.raises(SpecFileError) as info:
        client.create(file=toml)
    assert info.value.message.startswith(f"{toml}:3:10: ")
    assert mock.daemon.requests == []


def test_unknown_keyword_is_a_type_error(client: Client) -> None:
    with pytest.raises(TypeError, match="colour"):
        client.create("web", colour="red")  # type: ignore[call-arg]


# -- reading workspaces ----------------------------------------------------------------------


def test_get_list_and_info_are_typed(client: Client, mock: silo.MockTransport) -> None:
    client.create("web")
    client.create("db", isolation="app")
    ws = client.get("web")
    assert last(mock).url.path == "/v1/workspaces/web"
    info = ws.info()
    assert isinstance(info, WorkspaceInfo) and info.state is State.CREATED and info.pid is None
    assert info.owner == os.geteuid() and info.created <= time.time() and info.snapshots == ()
    assert ws.state is State.CREATED
    infos = client.list()
    assert [i.name for i in infos] == ["web", "db"] and infos[1].spec.isolation.value == "app"
    assert info.to_dict() == mock.daemon.workspaces["web"].to_wire()


def test_lifecycle_requests(client: Client, mock: silo.MockTransport) -> None:
    ws = client.create("web")
    assert ws.start().state is State.RUNNING
    assert last(mock).url.path == "/v1/workspaces/web/start"
    assert ws.info().pid == 4242
    assert ws.stop(timeout=3).state is State.STOPPED
    assert (last(mock).url.path, body(last(mock))) == ("/v1/workspaces/web/stop", {"timeout": 3})
    assert ws.restart().state is State.RUNNING
    ws.remove(force=True)
    assert (last(mock).method, str(last(mock).url.params)) == ("DELETE", "force=true")
    assert client.list() == []


def test_errors_arrive_as_the_daemons_class(client: Client) -> None:
    ws = client.create("web")
    with pytest.raises(silo.WorkspaceStateError, match="cannot exec in 'web': it has not been started; "
                                                       "run 'silo start web'") as e:
        ws.exec(["true"])
    assert type(e.value) is silo.WorkspaceStateError and e.value.exit_code == 125
    with pytest.raises(silo.WorkspaceExists, match="exists already"):
        client.create("web")
    with pytest.raises(NotFoundError, match="no workspace named 'nope'"):
        client.get("nope")
    ws.start()
    with pytest.raises(silo.WorkspaceStateError, match="run 'silo stop web' first, or 'silo rm -f web'"):
        ws.remove()
    with pytest.raises(silo.CommandNotFound) as cnf:
        ws.exec(["jq"])
    assert cnf.value.exit_code == 127


def _reply(status: int, payload: Any = None, content: bytes | None = None) -> Client:
    def handler(request: httpx.Request) -> httpx.Response:
        if content is not None:
            return httpx.Response(status, content=content)
        return httpx.Response(status, json=payload)
    return Client(transport=httpx.MockTransport(handler))


def test_odd_replies() -> None:
    # a FieldError is a SpecError (the class is not registered for the wire)
    with pytest.raises(SpecError, match=r"mount\[0\].source: bad"):
        _reply(400, {"error": {"class": "FieldError", "message": "mount[0].source: bad"}}).list()
    # a full disk is its own class (exit code 8 in the CLI); an unknown class keeps its message as an InternalError
    with pytest.raises(silo.StoreFull, match="disk full"):
        _reply(507, {"error": {"class": "StoreFull", "message": "disk full"}}).list()
    with pytest.raises(InternalError, match=r"^odd$"):
        _reply(500, {"error": {"class": "NoSuchClass", "message": "odd"}}).list()
    # an old silod's own 404 for an unknown path (today's sends the error body), and a non-JSON error
    with pytest.raises(InternalError, match="silod replied 404 Not Found to GET /v1/workspaces"):
        _reply(404, {"detail": "Not Found"}).list()
    with pytest.raises(InternalError, match="silod replied 502"):
        _reply(502, content=b"<html>").list()
    # a 200 of the wrong shape is a protocol error, never a half-built value
    with pytest.raises(ProtocolError, match="did not reply JSON"):
        _reply(200, content=b"nope").list()
    with pytest.raises(ProtocolError, match="not an array"):
        _reply(200, {"a": 1}).list()
    with pytest.raises(ProtocolError, match="'flying' is not a valid State"):
        _reply(200, {"name": "web", "spec": {"name": "web"}, "state": "flying"}).get("web")
    with pytest.raises(ProtocolError, match="not base64"):
        Workspace(_reply(200, {"exit_code": 0, "stdout": "!!", "stderr": ""}), "web").exec(["true"])


def test_any_object_with_handle_request_is_a_transport(mock: silo.MockTransport) -> None:
    class Mine:
        closed = False

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            return mock.handle_request(request)

        def close(self) -> None:
            self.closed = True

    mine = Mine()
    with Client(transport=mine) as client:
        assert client.version().api == 1
    assert mine.closed


# -- exec, files, snapshots, archives, templates ---------------------------------------------


def test_exec_encodes_stdin_and_decodes_output(client: Client, mock: silo.MockTransport) -> None:
    ws = client.create("web")
    ws.start()
    result = ws.exec(["cat"], env={"A": "1"}, workdir="/tmp", user="1000:1000", stdin=b"\x00\xffbytes", timeout=30)
    assert result == ExecResult(0, b"\x00\xffbytes", b"")
    assert body(last(mock)) == {"argv": ["cat"], "env": {"A": "1"}, "workdir": "/tmp", "user": "1000:1000",
                                "timeout": 30, "stdin": base64.b64encode(b"\x00\xffbytes").decode()}
    assert ws.exec(["echo", "hi"]).stdout == b"hi\n"
    assert body(last(mock)) == {"argv": ["echo", "hi"]}
    assert ws.exec(["false"]).exit_code == 1
    mock.daemon.exec_handler = lambda w, b: (3, b"out", b"err")
    assert ws.exec(["anything"]) == ExecResult(3, b"out", b"err")
    with pytest.raises(SpecError, match="list of strings"):
        ws.exec("ls -l")  # type: ignore[arg-type]


def test_cp_round_trip(client: Client, mock: silo.MockTransport, tmp_path: Path) -> None:
    ws = client.create("web")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("A")
    (src / "sub" / "b.txt").write_text("B")
    (src / "link").symlink_to("a.txt")
    ws.put(src, "/tmp")  # into an existing directory
    request = last(mock)
    assert (request.method, request.url.path, request.url.params["path"]) == ("PUT", "/v1/workspaces/web/files",
                                                                             "/tmp")
    names = tarfile.open(fileobj=io.BytesIO(request.content)).getnames()
    assert sorted(names) == ["src", "src/a.txt", "src/link", "src/sub", "src/sub/b.txt"]
    files = mock.daemon.workspaces["web"].files
    assert files["/tmp/src/a.txt"] == b"A" and files["/tmp/src/sub/b.txt"] == b"B"
    ws.put(src / "a.txt", "/etc/renamed")  # as DEST itself
    assert files["/etc/renamed"] == b"A"

    out = tmp_path / "out"
    out.mkdir()
    ws.get("/tmp/src", out)  # into an existing directory
    assert (out / "src" / "sub" / "b.txt").read_text() == "B"
    ws.get("/etc/hostname", out / "hn")  # as HOSTPATH itself
    assert (out / "hn").read_text() == "web\n"
    ws.get("/etc/hostname", out / "hn")  # a file replaces a file
    assert sorted(os.listdir(out)) == ["hn", "src"]  # no temporary directory left behind
    with pytest.raises(NotFoundError, match="no such directory on the host"):
        ws.get("/etc/hostname", tmp_path / "missing" / "x")
    with pytest.raises(NotFoundError, match="on the host"):
        ws.put(tmp_path / "missing", "/tmp")
    with pytest.raises(NotFoundError, match="/nope: no such file"):
        ws.get("/nope", out)


def test_snapshots_restore_reset_fork_diff_logs(client: Client, mock: silo.MockTransport, tmp_path: Path) -> None:
    ws = client.create("web")
    (tmp_path / "f").write_text("x")
    ws.put(tmp_path / "f", "/tmp")
    assert ws.diff() == [Change("added", "/tmp/f")]
    snap = ws.snapshot("clean")
    assert snap.tag == "clean" and body(last(mock)) == {"tag": "clean"}
    assert ws.snapshot().tag.startswith("snap-") and body(last(mock)) == {}
    assert [s.tag for s in ws.snapshots()] == ["clean", "snap-1"]
    ws.reset()
    assert ws.diff() == []
    assert ws.restore("clean").name == "web" and body(last(mock)) == {"tag": "clean"}
    assert ws.diff() == [Change("added", "/tmp/f")]
    ws.delete_snapshot("snap-1")
    assert (last(mock).method, last(mock).url.path) == ("DELETE", "/v1/workspaces/web/snapshots/snap-1")
    with pytest.raises(NotFoundError, match="no snapshot 'snap-1'"):
        ws.delete_snapshot("snap-1")
    twin = ws.fork("web2")
    assert twin == Workspace(client, "web2") and body(last(mock)) == {"name": "web2"}
    ws.start()
    ws.stop()
    assert ws.logs() == "start\nstop\n" and ws.logs(tail=1) == "stop\n"
    assert last(mock).url.params["tail"] == "1"
    with pytest.raises(silo.WorkspaceStateError, match="cannot snapshot 'web2'"):
        twin.start() and twin.snapshot("x")
    with pytest.raises(SpecError, match="bad snapshot tag"):
        ws.snapshot("../x")


def test_export_import_with_progress(client: Client, tmp_path: Path) -> None:
    ws = client.create("web", env={"A": "1"})
    seen: list[tuple[int, int | None]] = []
    archive = tmp_path / "web.silo"
    ws.export(archive, progress=lambda done, total: seen.append((done, total)))
    size = archive.stat().st_size
    assert seen and seen[-1] == (size, size)
    seen.clear()
    copy = client.import_(archive, name="copy", progress=lambda done, total: seen.append((done, total)))
    assert copy.name == "copy" and dict(copy.info().spec.env) == {"A": "1"}
    assert seen[-1] == (size, size)
    buf = io.BytesIO()
    ws.export(buf)
    buf.seek(0)
    with pytest.raises(silo.WorkspaceExists):
        client.import_(buf)  # its own name, taken
    with pytest.raises(SpecError, match="cannot open"):
        client.import_(tmp_path / "missing")
    ws.start()
    with pytest.raises(silo.WorkspaceStateError, match="cannot export 'web'"):
        ws.export(tmp_path / "half.silo")
    assert not (tmp_path / "half.silo").exists()  # no half-written archive left


def test_templates(client: Client, mock: silo.MockTransport) -> None:
    client.create("web")
    template = client.create_template("py", from_="web")
    assert template == Template("py", "host", "web", template.created, 1)
    assert body(last(mock)) == {"name": "py", "from": "web"}
    assert client.templates() == [template]
    job = client.create("job", root="py")
    assert job.info().template == "py"
    with pytest.raises(UserError, match="used by job"):
        client.remove_template("py")
    job.remove()
    client.remove_template("py")
    assert client.templates() == []
    with pytest.raises(NotFoundError, match="no template named 'nope'"):
        client.create("x", root="nope")


# -- autostart -------------------------------------------------------------------------------

_FAKE_DAEMON = textwrap.dedent("""
    import http.server, json, os, socketserver, sys
    sock = os.path.join(os.environ["SILO_DAEMON_DIR"], "silod.sock")
    with open(sys.argv[1], "w") as f:
        json.dump({"pid": os.getpid(), "env": dict(os.environ)}, f)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            data = json.dumps({"version": "9.9", "api": 1}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        def address_string(self):
            return "silod"
    class S(socketserver.UnixStreamServer):
        pass
    S(sock, H).serve_forever()
""")


def test_autostart_starts_the_daemon_and_passes_silo_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = tmp_path / "started.json"
    monkeypatch.setenv("SILO_DAEMON_DIR", str(tmp_path))
    monkeypatch.setenv("SILO_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("NOT_FOR_THE_DAEMON", "secret")
    monkeypatch.setattr(tp, "daemon_command", lambda: [sys.executable, "-c", _FAKE_DAEMON, str(info)])
    try:
        with Client() as client:
            assert client.version().version == "9.9"
        started = json.loads(info.read_text())
        assert started["env"]["SILO_STATE_DIR"] == str(tmp_path / "state")
        assert "NOT_FOR_THE_DAEMON" not in started["env"]
        assert os.getsid(started["pid"]) == started["pid"]  # its own session
        assert (tmp_path / "silod.log").exists()
    finally:
        if info.exists():
            os.kill(json.loads(info.read_text())["pid"], signal.SIGTERM)


def test_a_daemon_that_cannot_start_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SILO_DAEMON_DIR", str(tmp_path))
    monkeypatch.setattr(tp, "daemon_command",
                        lambda: [sys.executable, "-c", "import sys; print('no luck', file=sys.stderr); sys.exit(3)"])
    with pytest.raises(silo.DaemonUnavailable) as e:
        Client().list()
    assert e.value.message == f"silod exited at start (status 3); see {tmp_path}/silod.log"
    assert "no luck" in (tmp_path / "silod.log").read_text()


def test_a_daemon_that_does_not_answer_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SILO_DAEMON_DIR", str(tmp_path))
    monkeypatch.setattr(tp, "START_TIMEOUT", 0.3)
    monkeypatch.setattr(tp, "daemon_command", lambda: [sys.executable, "-c", "pass"])
    with pytest.raises(silo.DaemonUnavailable, match=r"silod exited at start \(status 0\)|did not answer"):
        Client().list()


def test_without_autostart_a_missing_daemon_is_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SILO_DAEMON_DIR", str(tmp_path))
    monkeypatch.setattr(tp, "daemon_command", lambda: pytest.fail("must not start"))
    with pytest.raises(silo.DaemonUnavailable, match=f"cannot reach silod at {tmp_path}/silod.sock"):
        Client(autostart=False).list()


def test_a_socket_the_caller_may_not_use_is_refused_not_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user's silod (here root's, asked by nobody): a clear PermissionDenied, and
    no second daemon started beside it."""
    directory = tempfile.mkdtemp(prefix="silo-sock-")
    os.chmod(directory, 0o755)  # like /run/silod: the socket's own mode guards it
    monkeypatch.setenv("SILO_DAEMON_DIR", directory)
    monkeypatch.setattr(tp, "daemon_command", lambda: pytest.fail("must not start"))
    path = os.path.join(directory, "silod.sock")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    os.chmod(path, 0o600)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                try:
                    Client().list()
                except silo.PermissionDenied as e:
                    code = 0 if e.message.startswith(f"you may not use silod at {path}: it is another user's") else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        sock.close()
        shutil.rmtree(directory)


# -- the async client ------------------------------------------------------------------------


def test_async_client_does_the_same(mock: silo.MockTransport, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with AsyncClient(transport=mock) as client:
            ws = await client.create("web", env={"A": "1"})
            assert (await ws.state()) is State.CREATED
            assert (await ws.start()).state is State.RUNNING
            assert await ws.exec(["cat"], stdin=b"in") == ExecResult(0, b"in", b"")
            with pytest.raises(silo.WorkspaceStateError, match="already running"):
                await ws.start()
            (tmp_path / "f").write_text("x")
            await ws.put(tmp_path / "f", "/tmp")
            await ws.get("/tmp/f", tmp_path / "back")
            assert (tmp_path / "back").read_text() == "x"
            assert await ws.diff() == [Change("added", "/tmp/f")]
            await ws.stop(timeout=1)
            assert (await ws.snapshot("s")).tag == "s"
            assert [s.tag for s in await ws.snapshots()] == ["s"]
            await ws.reset()
            await ws.restore("s")
            await ws.delete_snapshot("s")
            fork = await ws.fork("web2")
            assert (await fork.info()).name == "web2"
            assert "stop" in await ws.logs(tail=5)
            archive = io.BytesIO()
            await ws.export(archive)
            archive.seek(0)
            assert (await client.import_(archive, name="web3")).name == "web3"
            assert (await client.create_template("t", from_="web")).layers == 1
            assert [t.name for t in await client.templates()] == ["t"]
            await client.remove_template("t")
            assert [i.name for i in await client.list()] == ["web", "web2", "web3"]
            assert (await client.get("web")).name == "web"
            assert (await client.version()).api == 1
            await fork.remove()
            with pytest.raises(NotFoundError):
                await client.get("web2")

    asyncio.run(scenario())


def test_async_autostart_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SILO_DAEMON_DIR", str(tmp_path))
    monkeypatch.setattr(tp, "daemon_command", lambda: [sys.executable, "-c", "raise SystemExit(4)"])

    async def scenario() -> None:
        async with AsyncClient() as client:
            await client.list()

    with pytest.raises(silo.DaemonUnavailable, match="status 4"):
        asyncio.run(scenario())


# -- cp: a hostile archive from the daemon ---------------------------------------------------


def _tar(*members: tuple[str, str, str]) -> bytes:
    """Members as (name, kind, data): kind file, dir, sym, hard, chr, fifo; data is content or target."""
    kinds = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
             "chr": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = kinds[kind]
            info.mode = 0o6777 if kind == "file" else 0o755
            if kind in ("sym", "hard"):
                info.linkname = data
                tar.addfile(info)
            else:
                info.size = len(data) if kind == "file" else 0
                tar.addfile(info, io.BytesIO(data.encode()) if kind == "file" else None)
    return out.getvalue()


HOSTILE = {
    "dotdot": [("top", "dir", ""), ("top/../../evil", "file", "x")],
    "absolute": [("/tmp/evil", "file", "x")],
    "symlink out": [("top", "dir", ""), ("top/passwd", "sym", "/etc/passwd")],
    "symlink up": [("top", "dir", ""), ("top/up", "sym", "../..")],
    "symlink up through a link": [("top", "dir", ""), ("top/s", "sym", "."), ("top/u", "sym", "s/s/../..")],
    "write through a link": [("top", "dir", ""), ("top/d", "sym", "."), ("top/d/x", "file", "x")],
    "top is a link out": [("top", "sym", "../outside")],
    "hard link out": [("top", "dir", ""), ("top/h", "hard", "/etc/passwd")],
    "hard link to a link": [("top", "dir", ""), ("top/s", "sym", "f"), ("top/h", "hard", "top/s")],
    "device": [("top", "dir", ""), ("top/null", "chr", "")],
    "fifo": [("top", "dir", ""), ("top/p", "fifo", "")],
    "two tops": [("a", "file", "x"), ("b", "file", "y")],
    "twice": [("top", "dir", ""), ("top/f", "file", "x"), ("top/f", "file", "y")],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_archive_is_refused_whole(case: str, client: Client, mock: silo.MockTransport,
                                            tmp_path: Path) -> None:
    ws = client.create("web")
    dest = tmp_path / "a" / "b"
    dest.mkdir(parents=True)
    mock.daemon.files_reply = _tar(*HOSTILE[case])
    with pytest.raises(silo.UserError, match="refusing the archive from silod"):
        ws.get("/whatever", dest)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["a", "a/b"]


def test_a_plain_archive_with_inner_links_is_extracted_safely(client: Client, mock: silo.MockTransport,
                                                              tmp_path: Path) -> None:
    ws = client.create("web")
    mock.daemon.files_reply = _tar(("top", "dir", ""), ("top/f", "file", "data"), ("top/sub", "dir", ""),
                                   ("top/sub/l", "sym", "../f"), ("top/h", "hard", "top/f"),
                                   ("top/sibling", "sym", "../other"))
    ws.get("/whatever", tmp_path)
    top = tmp_path / "top"
    assert (top / "sub" / "l").read_text() == "data" and (top / "h").read_text() == "data"
    assert os.readlink(top / "sibling") == "../other"  # still inside the destination directory
    mode = (top / "f").stat().st_mode & 0o7777
    assert mode == 0o755  # no setuid, setgid, sticky or group/other write


def test_a_top_level_link_to_a_sibling_is_fine(client: Client, mock: silo.MockTransport, tmp_path: Path) -> None:
    ws = client.create("web")
    mock.daemon.files_reply = _tar(("python3", "sym", "python3.11"))
    ws.get("/usr/bin/python3", tmp_path)
    assert os.readlink(tmp_path / "python3") == "python3.11"


def test_a_garbage_archive_is_a_protocol_error(client: Client, mock: silo.MockTransport, tmp_path: Path) -> None:
    ws = client.create("web")
    mock.daemon.files_reply = b"not a tar at all" * 64
    with pytest.raises(ProtocolError, match="malformed archive"):
        ws.get("/x", tmp_path)
    assert list(tmp_path.iterdir()) == []
