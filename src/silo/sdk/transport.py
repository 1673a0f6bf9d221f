"""How the SDK's bytes reach silod, and the tar streams ``cp`` carries.

* :class:`Transport` / :class:`AsyncTransport`: what ``Client(transport=...)`` accepts
  (any httpx transport); the default is httpx over silod's unix socket.
* :class:`Meter`, :func:`chunks`, :class:`OpenFile`: streamed request and reply bodies
  (archives) with progress; a file opened for a failed download is removed.
* :func:`start_daemon`: the client's autostart (``python -m silo.daemon``, detached).
* :func:`pack` / :func:`unpack`: the host side of ``cp``. ``unpack`` is a security
  boundary: the archive comes from the daemon, its contents from a workspace, so a guest
  controls names, link targets and file types. It refuses the whole archive before
  writing anything when a name is absolute or has ``..``, when a member goes through a
  symlink of the archive, when a link points outside the destination, or when a member is
  a device node or fifo; it extracts into a fresh private directory next to the
  destination, with its own writes (``O_EXCL|O_NOFOLLOW``, never through a link), and
  renames the result into place. This is the check ``tarfile``'s ``filter="data"``
  makes (CVE-2007-4559 and its kin), which Python 3.11.2 lacks; where that filter
  exists it is applied as well.
* :class:`MockTransport`: an in-memory fake silod (:class:`FakeDaemon`) for tests.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import itertools
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Protocol, TypeVar

import httpx

from silo.model import errors
from silo.model.errors import NotFoundError, SiloError, SpecError, UserError
from silo.model.workspace import State, WorkspaceSpec, parse_name, require

T = TypeVar("T")
Progress = Callable[[int, "int | None"], None]
"""``progress(done_bytes, total_bytes_or_None)``, called as an archive streams."""

BASE_URL = "http://silod"
CHUNK = 1 << 16
SPOOL = 16 << 20  # tar streams up to this size stay in memory
START_TIMEOUT = 10.0  # seconds a started daemon has to answer GET /v1/version


class Transport(Protocol):
    """What :class:`silo.Client` accepts as ``transport=``: an ``httpx.BaseTransport``
    (or any object with these two methods). The default is httpx over silod's socket.

    Example::

        client = silo.Client(transport=httpx.HTTPTransport(uds="/run/silod/silod.sock"))
    """

    def handle_request(self, request: httpx.Request) -> httpx.Response: ...

    def close(self) -> None: ...


class AsyncTransport(Protocol):
    """What :class:`silo.AsyncClient` accepts: an ``httpx.AsyncBaseTransport`` or alike."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response: ...

    async def aclose(self) -> None: ...


class _Sync(httpx.BaseTransport):
    def __init__(self, inner: Transport) -> None:
        self.inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


class _Async(httpx.AsyncBaseTransport):
    def __init__(self, inner: AsyncTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def sync_transport(given: Transport | None, socket: str) -> httpx.BaseTransport:
    if given is None:
        return httpx.HTTPTransport(uds=socket)
    return given if isinstance(given, httpx.BaseTransport) else _Sync(given)


def async_transport(given: AsyncTransport | None, socket: str) -> httpx.AsyncBaseTransport:
    if given is None:
        return httpx.AsyncHTTPTransport(uds=socket)
    return given if isinstance(given, httpx.AsyncBaseTransport) else _Async(given)


def timeout(seconds: float | None) -> httpx.Timeout:
    """``seconds`` for each read (None: wait as long as the daemon works); 5 s to connect."""
    return httpx.Timeout(seconds, connect=5.0)


async def run_blocking(func: Callable[..., T], *args: Any) -> T:
    """``func(*args)`` in a worker thread, so file work does not stall the event loop."""
    import anyio.to_thread

    return await anyio.to_thread.run_sync(functools.partial(func, *args))


# -- streamed bodies ----------------------------------------------------------------------


class Meter:
    """Counts streamed bytes and reports them to a progress callback."""

    def __init__(self, progress: Progress | None, total: int | None) -> None:
        self.progress = progress
        self.total = total
        self.done = 0

    def add(self, chunk: bytes) -> bytes:
        self.done += len(chunk)
        if self.progress is not None:
            self.progress(self.done, self.total)
        return chunk


def _size(f: IO[bytes]) -> int | None:
    try:
        st = os.fstat(f.fileno())
        return st.st_size - f.tell() if st.st_size else None
    except (OSError, ValueError, AttributeError):
        return None


def chunks(f: IO[bytes], progress: Progress | None) -> Iterator[bytes]:
    meter = Meter(progress, _size(f))
    while chunk := f.read(CHUNK):
        yield meter.add(chunk)


async def achunks(f: IO[bytes], progress: Progress | None) -> AsyncIterator[bytes]:
    for chunk in chunks(f, progress):
        yield chunk


class OpenFile:
    """A path or a caller's file object, opened for the length of one call; a file this
    opened for writing is removed again when the call fails (no half-written archive)."""

    def __init__(self, target: str | os.PathLike[str] | IO[bytes], mode: str) -> None:
        self.target = target
        self.mode = mode
        self.file: IO[bytes] | None = None

    def __enter__(self) -> IO[bytes]:
        if isinstance(self.target, (str, os.PathLike)):
            try:
                self.file = open(self.target, self.mode)
            except OSError as e:
                raise SpecError(f"cannot open {os.fspath(self.target)}: {e.strerror}") from None
            return self.file
        return self.target

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if self.file is not None:
            self.file.close()
            if kind is not None and "w" in self.mode:
                with contextlib.suppress(OSError):
                    os.unlink(self.file.name)


def spool() -> IO[bytes]:
    return tempfile.SpooledTemporaryFile(max_size=SPOOL)


# -- autostart -----------------------------------------------------------------------------

_PASSED_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TMPDIR", "XDG_RUNTIME_DIR", "XDG_DATA_HOME")


def daemon_command() -> list[str]:
    """How a client starts silod (tests replace it)."""
    return [sys.executable, "-m", "silo.daemon"]


def _daemon_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _PASSED_ENV or k.startswith("SILO_")}
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    return env


def _answers(socket: str) -> bool:
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=socket), base_url=BASE_URL, timeout=1.0) as c:
            return c.get("/v1/version").is_success
    except httpx.HTTPError:
        return False


def start_daemon(socket: str) -> None:
    """Start silod detached (its own session, stderr to ``silod.log`` beside the socket)
    and wait up to :data:`START_TIMEOUT` for it to answer; an InternalError naming the log if not.

    Two clients racing here may both start one; the daemon's own lock keeps one alive,
    and the loser's exit is not an error as long as the socket answers.
    """
    directory = os.path.dirname(socket) or "."
    log_path = os.path.join(directory, "silod.log")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(daemon_command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=log, start_new_session=True, env=_daemon_env())
    except OSError as e:
        raise errors.DaemonUnavailable(f"cannot start silod: {e}; see {log_path}") from None
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if _answers(socket):
            return
        status = proc.poll()
        if status is not None and not _answers(socket):
            raise errors.DaemonUnavailable(f"silod exited at start (status {status}); see {log_path}")
        time.sleep(0.05)
    raise errors.DaemonUnavailable(f"silod did not answer on {socket} within {START_TIMEOUT:g} s; see {log_path}")


# -- cp: tar streams -----------------------------------------------------------------------


def _owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0  # as docker cp: the host's ids mean nothing in the workspace
    info.uname = info.gname = ""
    return info


def pack(host_path: str | os.PathLike[str]) -> IO[bytes]:
    """A tar stream of ``host_path`` (its top entry named by its basename), rewound.

    Symlinks are stored as links, not followed. The caller closes the returned file.
    """
    path = os.fspath(host_path)
    if not os.path.lexists(path):
        raise NotFoundError(f"{path}: no such file or directory on the host")
    name = os.path.basename(os.path.abspath(path))
    if not name:
        raise SpecError("cannot copy / itself: name a directory below it")
    out = spool()
    try:
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(path, arcname=name, filter=_owned_by_root)
    except OSError as e:
        out.close()
        raise SpecError(f"cannot read {e.filename or path}: {e.strerror}") from None
    out.seek(0)
    return out


def _refuse(why: str) -> UserError:
    return UserError(f"refusing the archive from silod: {why}; nothing was copied")


def _member_name(untrusted: str) -> str:
    """A member's name as a relative path without '.', '..' or empty parts, or a refusal."""
    if untrusted.startswith("/") or "\0" in untrusted:
        raise _refuse(f"{untrusted!r} is an absolute name")
    parts = [p for p in untrusted.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise _refuse(f"{untrusted!r} leads out of the destination")
    return "/".join(parts)


def _check_symlink(name: str, untrusted_target: str) -> None:
    """A symlink at ``name`` must resolve inside the destination directory: a relative target
    whose '..' parts all come first and climb no higher than the destination."""
    parts = [p for p in untrusted_target.split("/") if p not in ("", ".")]
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    if untrusted_target.startswith("/") or not parts or ".." in parts[ups:] or ups > name.count("/"):
        raise _refuse(f"{name} is a symlink to {untrusted_target!r}, outside the destination")


def _check_members(members: list[tarfile.TarInfo], root: str) -> str:
    """Validate every member before anything is written; the top entry's name."""
    kinds: dict[str, tarfile.TarInfo] = {}
    top = None
    for m in members:
        name = _member_name(m.name)
        parts = name.split("/")
        top = top or parts[0]
        if parts[0] != top:
            raise _refuse(f"it has more than one top entry ({top}, {parts[0]})")
        if name in kinds:
            raise _refuse(f"{name} appears twice")
        for depth in range(1, len(parts)):
            above = kinds.get("/".join(parts[:depth]))
            if above is not None and not above.isdir():
                raise _refuse(f"{name} lies below {above.name}, which is not a directory")
        if m.issym():
            _check_symlink(name, m.linkname)
        elif m.islnk():
            target = kinds.get(_member_name(m.linkname))
            if target is None or not target.isreg():
                raise _refuse(f"{name} is a hard link to {m.linkname!r}, not to a file before it in the archive")
        elif not (m.isreg() or m.isdir()):
            raise _refuse(f"{name} is a device node, fifo or other special file")
        data_filter = getattr(tarfile, "data_filter", None)
        if data_filter is not None:  # Python >= 3.11.4: the same rules, checked a second way
            try:
                data_filter(m, root)
            except tarfile.FilterError as e:
                raise _refuse(str(e)) from None
        kinds[name] = m
    if top is None:
        raise _refuse("it is empty")
    return top


def _extract(tar: tarfile.TarFile, members: list[tarfile.TarInfo], root: str) -> None:
    """Write checked members under the fresh private directory ``root``; never through a link."""
    dirs = []
    for m in members:
        path = os.path.join(root, _member_name(m.name))
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        if m.isdir():
            os.makedirs(path, mode=0o700, exist_ok=True)
            dirs.append((path, m))
        elif m.issym():
            os.symlink(m.linkname, path)
        elif m.islnk():
            os.link(os.path.join(root, _member_name(m.linkname)), path, follow_symlinks=False)
        else:
            source = tar.extractfile(m)
            assert source is not None
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(source, out)
                os.fchmod(out.fileno(), (m.mode & 0o755) | 0o600)  # no setuid/sticky, no group/other write
            os.utime(path, (m.mtime, m.mtime), follow_symlinks=False)
    for path, m in reversed(dirs):
        os.chmod(path, (m.mode & 0o755) | 0o700)
        os.utime(path, (m.mtime, m.mtime), follow_symlinks=False)


def _place(tree: str, final: str) -> None:
    """Move the extracted top entry to ``final`` (as ``docker cp``: a directory merges)."""
    if not os.path.lexists(final):
        os.rename(tree, final)
        return
    final_is_dir = os.path.isdir(final) and not os.path.islink(final)
    tree_is_dir = os.path.isdir(tree) and not os.path.islink(tree)
    if final_is_dir and tree_is_dir:
        shutil.copytree(tree, final, symlinks=True, dirs_exist_ok=True)
    elif final_is_dir:
        raise UserError(f"cannot overwrite the directory {final} with a file")
    elif tree_is_dir:
        raise UserError(f"cannot overwrite {final} (not a directory) with a directory")
    else:
        os.replace(tree, final)


def unpack(archive: IO[bytes], host_path: str | os.PathLike[str]) -> None:
    """Extract a ``GET files`` archive to ``host_path`` (into it, when it is a directory).

    Every member is checked before anything is written (see the module docstring).
    """
    dest = os.path.abspath(os.fspath(host_path))
    parent = dest if os.path.isdir(dest) else os.path.dirname(dest)
    if not os.path.isdir(parent):
        raise NotFoundError(f"{parent}: no such directory on the host")
    try:
        tar = tarfile.open(fileobj=archive, mode="r:")
    except tarfile.TarError as e:
        raise errors.ProtocolError(f"malformed archive from silod: {e}") from None
    with tar:
        root = tempfile.mkdtemp(prefix=".silo-cp-", dir=parent)
        try:
            members = tar.getmembers()
            top = _check_members(members, root)
            _extract(tar, members, root)
            _place(os.path.join(root, top), os.path.join(dest, top) if dest == parent else dest)
        except tarfile.TarError as e:
            raise errors.ProtocolError(f"malformed archive from silod: {e}") from None
        except OSError as e:
            raise UserError(f"cannot write {e.filename or dest}: {e.strerror}") from None
        finally:
            shutil.rmtree(root, ignore_errors=True)


# -- the fake daemon -----------------------------------------------------------------------


def _error(error: SiloError) -> httpx.Response:
    return httpx.Response(errors.http_status(error), json={"error": error.to_wire()})


Files = dict[str, "bytes | None"]  # path -> content; None is a directory


def _base_files(name: str) -> Files:
    return {"/": None, "/etc": None, "/etc/hostname": f"{name}\n".encode(), "/tmp": None}


@dataclass
class FakeWorkspace:
    """One workspace of :class:`FakeDaemon`: its record and an in-memory file tree."""

    spec: WorkspaceSpec
    template: str | None = None
    state: State = State.CREATED
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    snapshots: dict[str, tuple[float, Files]] = field(default_factory=dict)
    files: Files = field(default_factory=dict)
    logs: list[str] = field(default_factory=list)
    pid: int | None = None

    def __post_init__(self) -> None:
        self.files = self.files or _base_files(self.spec.name)

    def to_wire(self) -> dict[str, object]:
        base = _base_files(self.spec.name)
        private = sum(len(v or b"") for k, v in self.files.items() if base.get(k, -1) != v)
        return {"name": self.spec.name, "state": self.state.value, "spec": self.spec.to_dict(), "owner": os.geteuid(),
                "created": self.created, "updated": self.updated, "error": None, "pid": self.pid,
                "template": self.template, "snapshots": [{"tag": t, "created": c} for t, (c, _) in
                                                         self.snapshots.items()], "private_bytes": private,
                "network": None, "memory": None, "gvisor": None}

    def move(self, verb: str, to: State | None = None) -> None:
        require(verb, self.spec.name, self.state, disposable=self.spec.disposable)
        if to is not None:
            self.state = to
            self.pid = 4242 if to is State.RUNNING else None
            if to is State.STOPPED and self.spec.disposable:
                self.files = _base_files(self.spec.name)
            self.logs.append(f"{verb}\n")
        self.updated = time.time()


ExecHandler = Callable[[FakeWorkspace, Mapping[str, Any]], tuple[int, bytes, bytes]]


def default_exec(ws: FakeWorkspace, body: Mapping[str, Any]) -> tuple[int, bytes, bytes]:
    """``echo``, ``cat`` (stdin back), ``true``, ``false``; anything else is errors.CommandNotFound."""
    argv = body["argv"]
    stdin = base64.b64decode(body.get("stdin", ""))
    if argv[0] == "echo":
        return 0, (" ".join(argv[1:]) + "\n").encode(), b""
    if argv[0] == "cat":
        return 0, stdin, b""
    if argv[0] in ("true", "false"):
        return int(argv[0] == "false"), b"", b""
    raise errors.CommandNotFound(f"{argv[0]}: command not found in '{ws.spec.name}'")


_ROUTES = [(method, re.compile(pattern), handler) for method, pattern, handler in (
    ("GET", r"/v1/version", "version"),
    ("GET", r"/v1/workspaces", "list"),
    ("POST", r"/v1/workspaces", "create"),
    ("POST", r"/v1/workspaces/import", "import_"),
    ("GET", r"/v1/workspaces/(?P<name>[^/]+)", "get"),
    ("DELETE", r"/v1/workspaces/(?P<name>[^/]+)", "remove"),
    ("POST", r"/v1/workspaces/(?P<name>[^/]+)/(?P<verb>start|stop|restart|reset)", "lifecycle"),
    ("POST", r"/v1/workspaces/(?P<name>[^/]+)/exec", "exec"),
    ("PUT", r"/v1/workspaces/(?P<name>[^/]+)/files", "put_files"),
    ("GET", r"/v1/workspaces/(?P<name>[^/]+)/files", "get_files"),
    ("POST", r"/v1/workspaces/(?P<name>[^/]+)/snapshots", "snapshot"),
    ("GET", r"/v1/workspaces/(?P<name>[^/]+)/snapshots", "snapshots"),
    ("DELETE", r"/v1/workspaces/(?P<name>[^/]+)/snapshots/(?P<tag>[^/]+)", "delete_snapshot"),
    ("POST", r"/v1/workspaces/(?P<name>[^/]+)/restore", "restore"),
    ("POST", r"/v1/workspaces/(?P<name>[^/]+)/fork", "fork"),
    ("GET", r"/v1/workspaces/(?P<name>[^/]+)/diff", "diff"),
    ("GET", r"/v1/workspaces/(?P<name>[^/]+)/logs", "logs"),
    ("GET", r"/v1/workspaces/(?P<name>[^/]+)/export", "export"),
    ("GET", r"/v1/templates", "templates"),
    ("POST", r"/v1/templates", "create_template"),
    ("DELETE", r"/v1/templates/(?P<tname>[^/]+)", "remove_template"),
)]

_EXPORT_MAGIC = b"silo-fake-export\n"


class FakeDaemon:
    """docs/api.md served from memory: workspaces, states (the model's own :func:`require`),
    snapshots, templates, cp, exec (``exec_handler``), with the daemon's error bodies.

    ``requests`` records every request; ``files_reply``, when set, replaces the tar a
    ``GET files`` returns (to test the host side against a hostile archive).
    """

    def __init__(self) -> None:
        self.workspaces: dict[str, FakeWorkspace] = {}
        self.templates: dict[str, dict[str, object]] = {}
        self.requests: list[httpx.Request] = []
        self.exec_handler: ExecHandler = default_exec
        self.files_reply: bytes | None = None
        self._tags = itertools.count(1)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        matches = [(method, m, handler) for method, rx, handler in _ROUTES if (m := rx.fullmatch(path))]
        for method, match, handler in matches:
            if method == request.method:
                try:
                    return getattr(self, "_" + handler)(request, **match.groupdict())  # type: ignore[no-any-return]
                except SiloError as e:
                    return _error(e)
        if matches:
            return httpx.Response(405, json={"detail": "Method Not Allowed"})
        return httpx.Response(404, json={"detail": "Not Found"})  # FastAPI's reply to an unknown path

    # -- helpers
    def _ws(self, name: str) -> FakeWorkspace:
        ws = self.workspaces.get(name)
        if ws is None:
            raise NotFoundError(f"no workspace named {name!r}: see 'silo ls'")
        return ws

    @staticmethod
    def _body(request: httpx.Request) -> dict[str, Any]:
        try:
            body = json.loads(request.content or b"{}")
        except ValueError:
            raise errors.ProtocolError("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise errors.ProtocolError("the request body must be a JSON object")
        return body

    def _add(self, ws: FakeWorkspace) -> httpx.Response:
        if ws.spec.name in self.workspaces:
            raise errors.WorkspaceExists(f"a workspace named {ws.spec.name!r} exists already: pick another name "
                                  f"or run 'silo rm {ws.spec.name}'")
        self.workspaces[ws.spec.name] = ws
        return httpx.Response(201, json=ws.to_wire())

    # -- endpoints
    def _version(self, request: httpx.Request) -> httpx.Response:
        from silo import __version__

        return httpx.Response(200, json={"version": __version__, "api": 1})

    def _list(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=[ws.to_wire() for ws in self.workspaces.values()])

    def _create(self, request: httpx.Request) -> httpx.Response:
        spec = WorkspaceSpec.from_dict(self._body(request).get("spec"))
        if spec.template is not None and spec.template not in self.templates:
            raise NotFoundError(f"no template named {spec.template!r}: see 'silo template ls'")
        return self._add(FakeWorkspace(spec, template=spec.template))

    def _get(self, request: httpx.Request, name: str) -> httpx.Response:
        return httpx.Response(200, json=self._ws(name).to_wire())

    def _remove(self, request: httpx.Request, name: str) -> httpx.Response:
        ws = self._ws(name)
        if request.url.params.get("force") == "true" and ws.state in (State.RUNNING, State.PAUSED):
            ws.move("stop", State.STOPPED)
        ws.move("rm")
        del self.workspaces[name]
        return httpx.Response(204)

    def _lifecycle(self, request: httpx.Request, name: str, verb: str) -> httpx.Response:
        ws = self._ws(name)
        if verb == "reset":
            ws.move("reset")
            ws.files = _base_files(name)
        else:
            ws.move(verb, State.STOPPED if verb == "stop" else State.RUNNING)
        return httpx.Response(200, json=ws.to_wire())

    def _exec(self, request: httpx.Request, name: str) -> httpx.Response:
        ws = self._ws(name)
        body = self._body(request)
        argv = body.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise errors.ProtocolError("argv must be a non-empty list of strings")
        ws.move("exec")
        code, out, err = self.exec_handler(ws, body)
        return httpx.Response(200, json={"exit_code": code, "stdout": base64.b64encode(out).decode(),
                                         "stderr": base64.b64encode(err).decode()})

    def _put_files(self, request: httpx.Request, name: str) -> httpx.Response:
        ws = self._ws(name)
        ws.move("cp")
        dest = posixpath.normpath(request.url.params.get("path", ""))
        into_dir = ws.files.get(dest, b"") is None  # docker cp: into an existing directory, else as DEST
        if ws.files.get(dest if into_dir else posixpath.dirname(dest), b"") is not None:
            raise NotFoundError(f"{posixpath.dirname(dest)}: no such directory in {name!r}")
        with tarfile.open(fileobj=io.BytesIO(request.read()), mode="r:") as tar:
            top = tar.getmembers()[0].name.split("/")[0]
            for m in tar.getmembers():
                path = posixpath.join(dest, m.name) if into_dir else dest + m.name[len(top):]
                data = tar.extractfile(m) if m.isreg() else None
                ws.files[path] = data.read() if data is not None else None
        return httpx.Response(204)

    def _get_files(self, request: httpx.Request, name: str) -> httpx.Response:
        ws = self._ws(name)
        ws.move("cp")
        if self.files_reply is not None:
            return httpx.Response(200, content=self.files_reply, headers={"content-type": "application/x-tar"})
        src = posixpath.normpath(request.url.params.get("path", "/"))
        if src not in ws.files:
            raise NotFoundError(f"{src}: no such file or directory in {name!r}")
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as tar:
            for path in sorted(p for p in ws.files if p == src or p.startswith(src.rstrip("/") + "/")):
                info = tarfile.TarInfo(posixpath.basename(src) + path[len(src):])
                content = ws.files[path]
                info.type = tarfile.DIRTYPE if content is None else tarfile.REGTYPE
                info.mode = 0o755 if content is None else 0o644
                info.size = len(content or b"")
                tar.addfile(info, io.BytesIO(content or b""))
        return httpx.Response(200, content=out.getvalue(), headers={"content-type": "application/x-tar"})

    def _snapshot(self, request: httpx.Request, name: str) -> httpx.Response:
        ws = self._ws(name)
        if self._body(request).get("memory"):  # the fake runs no processes to save
            raise UserError(f"'silo snapshot --memory' saves processes at isolation 'gvisor' only; workspace "
                            f"{name!r} is a fake's: drop --memory")
        ws.move("snapshot")
        tag = parse_name(str(self._body(request).get("tag") or f"snap-{next(self._tags)}"), "snapshot tag")
        if tag in ws.snapshots:
            raise UserError(f"'{name}' has a snapshot {tag!r} already: pick another tag")
        ws.snapshots[tag] = (time.time(), dict(ws.files))
        return httpx.Response(201, json={"tag": tag, "created": ws.snapshots[tag][0]})

    def _snapshots(self, request: httpx.Request, name: str) -> httpx.Response:
        return httpx.Response(200, json=self._ws(name).to_wire()["snapshots"])

    def _snapshot_of(self, name: str, tag: object) -> tuple[FakeWorkspace, str]:
        ws = self._ws(name)
        if tag not in ws.snapshots:
            raise NotFoundError(f"'{name}' has no snapshot {tag!r}: see 'silo snapshots {name}'")
        assert isinstance(tag, str)
        return ws, tag

    def _delete_snapshot(self, request: httpx.Request, name: str, tag: str) -> httpx.Response:
        ws, tag = self._snapshot_of(name, tag)
        del ws.snapshots[tag]
        return httpx.Response(204)

    def _restore(self, request: httpx.Request, name: str) -> httpx.Response:
        ws, tag = self._snapshot_of(name, self._body(request).get("tag"))
        ws.move("restore")
        ws.files = dict(ws.snapshots[tag][1])
        return httpx.Response(200, json=ws.to_wire())

    def _fork(self, request: httpx.Request, name: str) -> httpx.Response:
        ws = self._ws(name)
        ws.move("fork")
        new = parse_name(str(self._body(request).get("name")))
        spec = WorkspaceSpec.from_dict({**ws.spec.to_dict(), "name": new})
        return self._add(FakeWorkspace(spec, template=ws.template, files=dict(ws.files)))

    def _diff(self, request: httpx.Request, name: str) -> httpx.Response:
        ws = self._ws(name)
        base = _base_files(name)
        changes = [{"kind": "added" if p not in base else "changed", "path": p}
                   for p, v in sorted(ws.files.items()) if base.get(p, -1) != v]
        changes += [{"kind": "deleted", "path": p} for p in sorted(base) if p not in ws.files]
        return httpx.Response(200, json=changes)

    def _logs(self, request: httpx.Request, name: str) -> httpx.Response:
        lines = self._ws(name).logs
        tail = request.url.params.get("tail")
        return httpx.Response(200, text="".join(lines[-int(tail):] if tail else lines))

    def _export(self, request: httpx.Request, name: str) -> httpx.Response:
        ws = self._ws(name)
        ws.move("export")
        files = {p: None if v is None else base64.b64encode(v).decode() for p, v in ws.files.items()}
        data = _EXPORT_MAGIC + json.dumps({"spec": ws.spec.to_dict(), "files": files}).encode()
        return httpx.Response(200, content=data, headers={"content-type": "application/octet-stream"})

    def _import_(self, request: httpx.Request) -> httpx.Response:
        data = request.read()
        if not data.startswith(_EXPORT_MAGIC):
            raise UserError("this is not a workspace archive made by 'silo export'")
        archive = json.loads(data[len(_EXPORT_MAGIC):])
        name = request.url.params.get("name")
        spec = WorkspaceSpec.from_dict(archive["spec"], name=parse_name(name) if name else None)
        files = {p: None if v is None else base64.b64decode(v) for p, v in archive["files"].items()}
        return self._add(FakeWorkspace(spec, files=files))

    def _templates(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=list(self.templates.values()))

    def _create_template(self, request: httpx.Request) -> httpx.Response:
        body = self._body(request)
        tname = parse_name(str(body.get("name")), "template name")
        ws = self._ws(parse_name(str(body.get("from"))))
        ws.move("template-create")
        if tname in self.templates:
            raise UserError(f"a template named {tname!r} exists already: pick another name")
        parent = self.templates.get(ws.template or "", {"base": ws.spec.root, "layers": 0})
        layers = parent["layers"]
        assert isinstance(layers, int)
        self.templates[tname] = {"name": tname, "base": parent["base"], "from": ws.spec.name,
                                 "created": time.time(), "layers": layers + 1}
        return httpx.Response(201, json=self.templates[tname])

    def _remove_template(self, request: httpx.Request, tname: str) -> httpx.Response:
        if tname not in self.templates:
            raise NotFoundError(f"no template named {tname!r}: see 'silo template ls'")
        users = sorted(n for n, ws in self.workspaces.items() if ws.template == tname)
        if users:
            raise UserError(f"template {tname!r} is used by {', '.join(users)}: remove those workspaces first")
        del self.templates[tname]
        return httpx.Response(204)


class MockTransport(httpx.MockTransport):
    """An httpx transport serving a :class:`FakeDaemon` from memory, for tests of code using the SDK.

    Works for both :class:`silo.Client` and :class:`silo.AsyncClient`; ``daemon`` holds the
    fake's state (workspaces, templates, recorded ``requests``, ``exec_handler``).

    Example::

        mock = silo.MockTransport()
        client = silo.Client(transport=mock)
        client.create("web").start()
        assert mock.daemon.workspaces["web"].state is silo.model.workspace.State.RUNNING
    """

    def __init__(self, daemon: FakeDaemon | None = None) -> None:
        self.daemon = daemon or FakeDaemon()
        super().__init__(self.daemon.handle)


__all__ = ["AsyncTransport", "FakeDaemon", "FakeWorkspace", "MockTransport", "Transport",
           "pack", "start_daemon", "unpack"]
