"""``silo.Client`` and ``silo.AsyncClient``: workspaces through silod's HTTP API.

This module is the client side of ``docs/api.md`` and nothing else: it turns method
calls into requests, and replies into typed values or the daemon's own error class. It
never touches a workspace's files itself; ``put``/``get`` only pack and unpack the tar
streams the API carries (:mod:`silo.sdk.transport` owns the host-side extraction rules).

Layout: one request-building layer (``_req_*`` functions returning a :class:`_Call`:
method, path, body and the parser of its reply) and one response layer
(:func:`_raise_for_error`, the ``_parse_*`` readers), shared by the two drivers
:meth:`Client._send` and :meth:`AsyncClient._send`. The public methods are one line
each over them, so the blocking and the async API cannot drift apart.

Replies are untrusted data until parsed: a reply of the wrong shape is a
:class:`ProtocolError`, never a half-built value.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Any, Generic, TypedDict, TypeVar, Unpack

import httpx

from silo.engine import paths
from silo.model import specfile
from silo.model.errors import (
    DaemonUnavailable,
    InternalError,
    PermissionDenied,
    ProtocolError,
    SiloError,
    SpecError,
    error_from_wire,
)
from silo.model.spec import Mount
from silo.model.workspace import (
    FieldError,
    Overrides,
    RestartPolicy,
    Snapshot,
    State,
    WorkspaceSpec,
    parse_name,
)
from silo.sdk import transport as tp

T = TypeVar("T")
Progress = tp.Progress
_CHUNK = tp.CHUNK

# -- values --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExecResult:
    """What a command run with :meth:`Workspace.exec` left: its exit code and captured output.

    Example::

        r = ws.exec(["sh", "-c", "echo hi"])
        assert r.exit_code == 0 and r.stdout == b"hi\\n"
    """

    exit_code: int
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True)
class Change:
    """One path a workspace's private layer changed: ``kind`` is added, changed or deleted."""

    kind: str
    path: str


@dataclass(frozen=True)
class WorkspaceInfo:
    """A workspace as silod reported it at one moment (``silo inspect``).

    ``pid`` is the host pid of the workspace's init while it runs; ``private_bytes`` the
    size of its private layer; ``error`` the last failure the daemon recorded.

    Example::

        info = client.get("web").info()
        print(info.state.value, info.spec.isolation.value, info.private_bytes)
    """

    name: str
    state: State
    spec: WorkspaceSpec
    owner: int
    created: float
    updated: float
    error: str | None = None
    pid: int | None = None
    template: str | None = None
    snapshots: tuple[Snapshot, ...] = ()
    private_bytes: int | None = None  # None: the daemon did not measure it
    # A running workspace's network: addresses, bytes_in/bytes_out, refused_attempts and
    # the refused destinations (None when it has no network or was not measured).
    network: dict[str, Any] | None = None
    # A running vm workspace's memory: ram_bytes (the guest's RAM), guest (what its balloon
    # driver reports: total, available, free, caches, and balloon, in bytes) and host_bytes
    # (what its VM uses on the host). None at other levels or when not running.
    memory: dict[str, Any] | None = None
    # A gvisor workspace's sandbox: platform (runsc's: systrap, kvm or ptrace). None at other levels.
    gvisor: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, object]:
        """The API's ``Workspace`` object (what ``silo inspect`` prints)."""
        return {"name": self.name, "state": self.state.value, "spec": self.spec.to_dict(), "owner": self.owner,
                "created": self.created, "updated": self.updated, "error": self.error, "pid": self.pid,
                "template": self.template, "snapshots": [_snapshot_dict(s) for s in self.snapshots],
                "private_bytes": self.private_bytes, "network": self.network, "memory": self.memory,
                "gvisor": self.gvisor}


@dataclass(frozen=True)
class Template:
    """A read-only base made from a workspace (``silo template create py --from web``).

    ``base`` is the root it stacks on (``host`` or an image directory), ``from_`` the
    workspace it was made from, ``layers`` how many read-only layers it holds.

    Example::

        client.create_template("py", from_="web")
        client.create("job", root="py")
    """

    name: str
    base: str
    from_: str | None
    created: float
    layers: int

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "base": self.base, "from": self.from_, "created": self.created,
                "layers": self.layers}


@dataclass(frozen=True)
class DaemonVersion:
    version: str
    api: int


def _snapshot_dict(s: Snapshot) -> dict[str, object]:
    return {"tag": s.tag, "created": s.created, "memory": s.memory}


# -- reading replies (untrusted) -----------------------------------------------------------


def _malformed(what: str) -> ProtocolError:
    return ProtocolError(f"malformed reply from silod: {what}")


def _table(untrusted: object, what: str) -> Mapping[str, object]:
    if not isinstance(untrusted, dict):
        raise _malformed(f"{what} is not an object")
    return untrusted


def _items(untrusted: object, what: str) -> builtins.list[object]:
    if not isinstance(untrusted, builtins.list):
        raise _malformed(f"{what} is not an array")
    return untrusted


def _opt(table: Mapping[str, object], key: str, kind: type[T]) -> T | None:
    """``table[key]`` when it is a ``kind`` (never a bool for a number), None when absent or null."""
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool):
        return value
    raise _malformed(f"{key!r} is not a {kind.__name__}")


def _get(table: Mapping[str, object], key: str, kind: type[T]) -> T:
    value = _opt(table, key, kind)
    if value is None:
        raise _malformed(f"{key!r} is missing")
    return value


def _time(table: Mapping[str, object], key: str) -> float:
    value = table.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else _get(table, key, float)


def _json(response: httpx.Response) -> object:
    try:
        return response.json()
    except ValueError:
        raise _malformed(f"{response.request.method} {response.request.url.path} did not reply JSON") from None


def _parse_snapshot(untrusted: object) -> Snapshot:
    table = _table(untrusted, "a snapshot")
    try:
        return Snapshot(_get(table, "tag", str), _time(table, "created"), bool(_opt(table, "memory", bool)))
    except SpecError as e:
        raise _malformed(e.message) from None


def _parse_info(untrusted: object) -> WorkspaceInfo:
    table = _table(untrusted, "a workspace")
    try:
        spec = WorkspaceSpec.from_dict(_get(table, "spec", dict))
        state = State(_get(table, "state", str))
    except (SpecError, ValueError) as e:
        raise _malformed(f"workspace {table.get('name')!r}: {e}") from None
    return WorkspaceInfo(
        name=spec.name, state=state, spec=spec, owner=_get(table, "owner", int),
        created=_time(table, "created"), updated=_time(table, "updated"),
        error=_opt(table, "error", str), pid=_opt(table, "pid", int),
        template=_opt(table, "template", str),
        snapshots=tuple(_parse_snapshot(s) for s in _items(table.get("snapshots", []), "snapshots")),
        private_bytes=_opt(table, "private_bytes", int), network=_opt(table, "network", dict),
        memory=_opt(table, "memory", dict), gvisor=_opt(table, "gvisor", dict))


def _parse_template(untrusted: object) -> Template:
    table = _table(untrusted, "a template")
    return Template(name=_get(table, "name", str), base=_get(table, "base", str),
                    from_=_opt(table, "from", str),
                    created=_time(table, "created"), layers=_get(table, "layers", int))


def _parse_change(untrusted: object) -> Change:
    table = _table(untrusted, "a change")
    kind = _get(table, "kind", str)
    if kind not in ("added", "changed", "deleted"):
        raise _malformed(f"unknown change kind {kind!r}")
    return Change(kind, _get(table, "path", str))


def _b64(table: Mapping[str, object], key: str) -> bytes:
    try:
        return base64.b64decode(_get(table, key, str), validate=True)
    except binascii.Error:
        raise _malformed(f"{key} is not base64") from None


def _parse_exec(untrusted: object) -> ExecResult:
    table = _table(untrusted, "an exec result")
    return ExecResult(_get(table, "exit_code", int), _b64(table, "stdout"), _b64(table, "stderr"))


def _parse_version(untrusted: object) -> DaemonVersion:
    table = _table(untrusted, "the version")
    return DaemonVersion(_get(table, "version", str), _get(table, "api", int))


def _reply(parse: Callable[[object], T]) -> Callable[[httpx.Response], T]:
    return lambda response: parse(_json(response))


def _reply_list(parse: Callable[[object], T]) -> Callable[[httpx.Response], builtins.list[T]]:
    return lambda response: [parse(item) for item in _items(_json(response), "the reply")]


def _no_reply(response: httpx.Response) -> None:
    return None


def _raise_for_error(response: httpx.Response) -> None:
    """Re-raise the daemon's error class from a non-2xx reply (its body read already)."""
    if response.is_success:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    untrusted = body.get("error") if isinstance(body, dict) else None
    if isinstance(untrusted, dict) and isinstance(untrusted.get("message"), str):
        if untrusted.get("class") == "FieldError":  # a SpecError with a key path; not registered for the wire
            untrusted = {**untrusted, "class": "SpecError"}
        if isinstance(untrusted.get("class"), str):
            raise error_from_wire(untrusted)
    request = response.request
    raise InternalError(f"silod replied {response.status_code} {response.reason_phrase} to "
                        f"{request.method} {request.url.path}")


# -- building requests ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One request and how to read its reply; ``upload``/``download`` stream a body."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Mapping[str, str] = field(default_factory=dict)
    json: object = None
    upload: IO[bytes] | None = None
    download: IO[bytes] | None = None
    progress: Progress | None = None


def _ws(name: str, suffix: str = "") -> str:
    return f"/v1/workspaces/{parse_name(name)}{suffix}"


def _req_info(name: str, verb: str = "", body: object = None) -> _Call[WorkspaceInfo]:
    """GET a workspace, or POST one of its verbs that reply with it (start, stop, ...)."""
    return _Call("POST" if verb else "GET", _ws(name, verb), _reply(_parse_info), json=body)


def _req_network(name: str, mode: str | None, options: Mapping[str, Any]) -> _Call[WorkspaceInfo]:
    """PUT the given parts of a network policy; silod keeps the rest (publish, links,
    bandwidth, dns) from the workspace's spec, except for the mode ``none``."""
    body: dict[str, Any] = {key: list(value) if isinstance(value, (list, tuple)) else value
                            for key, value in options.items() if value}
    body["mode"] = mode if mode is not None else ("allow" if options.get("allow") else "internet")
    body.setdefault("allow", [])
    return _Call("PUT", _ws(name, "/network"), _reply(_parse_info), json=body)


def _req_create(spec: WorkspaceSpec) -> _Call[WorkspaceInfo]:
    return _Call("POST", "/v1/workspaces", _reply(_parse_info), json={"spec": spec.to_dict()})


def _req_list() -> _Call[builtins.list[WorkspaceInfo]]:
    return _Call("GET", "/v1/workspaces", _reply_list(_parse_info))


def _req_remove(name: str, force: bool) -> _Call[None]:
    return _Call("DELETE", _ws(name), _no_reply, params={"force": "true" if force else "false"})


def _req_exec(name: str, argv: Sequence[str], env: Mapping[str, str] | None, workdir: str | None,
              user: str | None, stdin: bytes | None, timeout: float | None) -> _Call[ExecResult]:
    if isinstance(argv, str) or not argv:
        raise SpecError("exec needs a command as a list of strings, like ['ls', '-l']")
    body: dict[str, object] = {"argv": builtins.list(argv)}
    for key, value in (("env", dict(env) if env else None), ("workdir", workdir), ("user", user),
                       ("timeout", timeout)):
        if value is not None:
            body[key] = value
    if stdin is not None:
        body["stdin"] = base64.b64encode(stdin).decode()
    return _Call("POST", _ws(name, "/exec"), _reply(_parse_exec), json=body)


def _req_put(name: str, dest: str, tar: IO[bytes]) -> _Call[None]:
    return _Call("PUT", _ws(name, "/files"), _no_reply, params={"path": dest}, upload=tar)


def _req_get(name: str, src: str, sink: IO[bytes]) -> _Call[None]:
    return _Call("GET", _ws(name, "/files"), _no_reply, params={"path": src}, download=sink)


def _req_snapshot(name: str, tag: str | None, memory: bool) -> _Call[Snapshot]:
    body: dict[str, object] = {} if tag is None else {"tag": parse_name(tag, "snapshot tag")}
    if memory:
        body["memory"] = True
    return _Call("POST", _ws(name, "/snapshots"), _reply(_parse_snapshot), json=body)


def _req_snapshots(name: str) -> _Call[builtins.list[Snapshot]]:
    return _Call("GET", _ws(name, "/snapshots"), _reply_list(_parse_snapshot))


def _req_delete_snapshot(name: str, tag: str) -> _Call[None]:
    return _Call("DELETE", _ws(name, f"/snapshots/{parse_name(tag, 'snapshot tag')}"), _no_reply)


def _req_restore(name: str, tag: str) -> _Call[WorkspaceInfo]:
    return _req_info(name, "/restore", {"tag": parse_name(tag, "snapshot tag")})


def _req_fork(name: str, new_name: str) -> _Call[WorkspaceInfo]:
    return _req_info(name, "/fork", {"name": parse_name(new_name)})


def _req_diff(name: str) -> _Call[builtins.list[Change]]:
    return _Call("GET", _ws(name, "/diff"), _reply_list(_parse_change))


def _req_logs(name: str, tail: int | None) -> _Call[str]:
    if tail is not None and (isinstance(tail, bool) or not isinstance(tail, int) or tail < 0):
        raise SpecError(f"bad tail {tail!r}: give a number of lines, 0 or more")
    params = {} if tail is None else {"tail": str(tail)}
    return _Call("GET", _ws(name, "/logs"), lambda r: r.text, params=params)


def _req_export(name: str, sink: IO[bytes], progress: Progress | None) -> _Call[None]:
    return _Call("GET", _ws(name, "/export"), _no_reply, download=sink, progress=progress)


def _req_import(source: IO[bytes], name: str | None, progress: Progress | None) -> _Call[WorkspaceInfo]:
    params = {} if name is None else {"name": parse_name(name)}
    return _Call("POST", "/v1/workspaces/import", _reply(_parse_info), params=params, upload=source,
                 progress=progress)


def _req_templates() -> _Call[builtins.list[Template]]:
    return _Call("GET", "/v1/templates", _reply_list(_parse_template))


def _req_create_template(tname: str, from_: str) -> _Call[Template]:
    body = {"name": parse_name(tname, "template name"), "from": parse_name(from_)}
    return _Call("POST", "/v1/templates", _reply(_parse_template), json=body)


def _req_remove_template(tname: str) -> _Call[None]:
    return _Call("DELETE", f"/v1/templates/{parse_name(tname, 'template name')}", _no_reply)


def _req_version() -> _Call[DaemonVersion]:
    return _Call("GET", "/v1/version", _reply(_parse_version))


class CreateOptions(TypedDict, total=False):
    """The keywords of :meth:`Client.create` besides the name (``silo create``'s options)."""

    spec: WorkspaceSpec | Mapping[str, object] | None
    file: str | os.PathLike[str] | None
    isolation: str | None
    root: str | None
    disposable: bool | None
    encrypted: bool | None
    diskless: bool | None
    kernel: str | None
    mounts: Sequence[str | Mount]
    env: Mapping[str, str] | None
    memory: str | int | None
    cpus: str | float | None
    pids: str | int | None
    on_start: Sequence[str] | None
    restart: str | RestartPolicy | None
    workdir: str | None
    user: str | int | None
    hostname: str | None
    network: str | None
    allow: Sequence[str]
    publish: Sequence[str]
    links: Sequence[str]
    bandwidth: str | None
    dns: Sequence[str]


def build_spec(name: str | None = None, **options: Unpack[CreateOptions]) -> WorkspaceSpec:
    """The spec ``create`` sends: ``spec`` or ``file`` (``silo.toml``), keyword values over it.

    Validated here with the model's readers, so bad input fails before any request with
    the SpecError the daemon would give (a file's errors carry ``FILE:LINE:COL``).
    """
    unknown = set(options) - set(CreateOptions.__annotations__)
    if unknown:
        raise TypeError(f"create() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
    o = options
    spec, file = o.get("spec"), o.get("file")
    if spec is not None and file is not None:
        raise SpecError("give a spec or a spec file, not both")
    overrides = Overrides(name=name, isolation=o.get("isolation"), root=o.get("root"), disposable=o.get("disposable"),
                          encrypted=o.get("encrypted"), diskless=o.get("diskless"), kernel=o.get("kernel"),
                          mounts=o.get("mounts", ()), env=o.get("env") or {}, workdir=o.get("workdir"),
                          user=o.get("user"), hostname=o.get("hostname"), memory=o.get("memory"), cpus=o.get("cpus"),
                          pids=o.get("pids"), on_start=o.get("on_start"), restart=o.get("restart"),
                          network=o.get("network"), allow=o.get("allow", ()), publish=o.get("publish", ()),
                          links=o.get("links", ()), bandwidth=o.get("bandwidth"), dns=o.get("dns", ()))
    if file is not None:
        return specfile.load(file, overrides)
    if isinstance(spec, WorkspaceSpec):
        return overrides.apply(spec)
    if spec is not None:
        try:
            base = WorkspaceSpec.from_dict(dict(spec), name=None if name is None else parse_name(name))
        except FieldError as e:
            raise SpecError(f"bad spec: {e.message}") from None
        return overrides.apply(base)
    return overrides.apply()


def _download_meter(call: _Call[Any], response: httpx.Response) -> tp.Meter:
    length = response.headers.get("content-length")
    return tp.Meter(call.progress, int(length) if length and length.isdigit() else None)


def _unreachable(socket: str, error: Exception) -> SiloError:
    try:
        os.stat(socket)
        ours = os.access(socket, os.R_OK | os.W_OK)
    except PermissionError:  # a directory on the way is closed to us
        ours = False
    except OSError:
        ours = True  # not there: ours to start
    if not ours:
        # Another's daemon (or the system one, for a user outside group 'silo'): never
        # start a second one beside it.
        return PermissionDenied(f"you may not use silod at {socket}: it is another user's; use your own "
                                "(unset SILO_DAEMON_DIR), or ask for the group of the system daemon ('silo')")
    return DaemonUnavailable(f"cannot reach silod at {socket}: {error}")


def _may_start(socket: str, error: Exception) -> None:
    """Raise instead of starting a daemon when the socket is there but not ours to use."""
    refusal = _unreachable(socket, error)
    if isinstance(refusal, PermissionDenied):
        raise refusal


# -- the blocking client -------------------------------------------------------------------


class Client:
    """A connection to silod (the workspace daemon): create, find and manage workspaces.

    Talks HTTP over silod's unix socket (``socket``, default
    :func:`silo.engine.paths.daemon_socket`); ``transport`` replaces that with any httpx
    transport (:class:`silo.MockTransport` in tests). With ``autostart`` (the default)
    a missing daemon is started on first use. Errors are the daemon's own classes
    (:class:`silo.WorkspaceStateError`, :class:`silo.NotFoundError`, ...).

    Example::

        with silo.Client() as client:
            ws = client.create("web", isolation="process")
            ws.start()
            ws.exec(["apt-get", "install", "-y", "jq"])
    """

    def __init__(self, socket: str | None = None, *, transport: tp.Transport | None = None,
                 autostart: bool = True, timeout: float | None = None) -> None:
        self.socket = socket or paths.daemon_socket()
        self._autostart = autostart and transport is None
        self._http = httpx.Client(transport=tp.sync_transport(transport, self.socket), base_url=tp.BASE_URL,
                                  timeout=tp.timeout(timeout))

    def _send(self, call: _Call[T]) -> T:
        for attempt in (1, 2):
            try:
                return self._exchange(call)
            except httpx.ConnectError as e:
                if attempt == 2 or not self._autostart:
                    raise _unreachable(self.socket, e) from None
                _may_start(self.socket, e)
                tp.start_daemon(self.socket)
            except httpx.HTTPError as e:
                raise _unreachable(self.socket, e) from None
        raise AssertionError("unreachable")

    def _exchange(self, call: _Call[T]) -> T:
        content = None if call.upload is None else tp.chunks(call.upload, call.progress)
        with self._http.stream(call.method, call.path, params=call.params, json=call.json,
                               content=content) as response:
            if call.download is None or not response.is_success:
                response.read()
                _raise_for_error(response)
            else:
                meter = _download_meter(call, response)
                for chunk in response.iter_bytes(_CHUNK):
                    call.download.write(meter.add(chunk))
            return call.parse(response)

    # -- workspaces
    def create(self, name: str | None = None, **options: Unpack[CreateOptions]) -> Workspace:
        """Create a workspace (state ``created``); see :func:`build_spec` for ``options``.

        ``spec`` (a WorkspaceSpec or a dict in ``silo.toml``'s shape) or ``file`` (a
        ``silo.toml``) give a base; the other keywords (``isolation``, ``root``,
        ``disposable``, ``encrypted``, ``diskless``, ``kernel``, ``mounts``, ``env``, ``memory``, ``cpus``, ``pids``,
        ``on_start``, ``restart``, ``workdir``, ``user``, ``hostname``) lay over it.
        """
        info = self._send(_req_create(build_spec(name, **options)))
        return Workspace(self, info.name)

    def get(self, name: str) -> Workspace:
        """The workspace ``name``; NotFoundError if there is none."""
        return Workspace(self, self._send(_req_info(name)).name)

    def templates(self) -> builtins.list[Template]:
        return self._send(_req_templates())

    def create_template(self, tname: str, *, from_: str) -> Template:
        """Make template ``tname`` from workspace ``from_`` (created or stopped)."""
        return self._send(_req_create_template(tname, from_))

    def remove_template(self, tname: str) -> None:
        self._send(_req_remove_template(tname))

    def import_(self, source: str | os.PathLike[str] | IO[bytes], name: str | None = None,
                progress: Progress | None = None) -> Workspace:
        """Make a workspace from an archive of :meth:`Workspace.export` (a path or a file object)."""
        with tp.OpenFile(source, "rb") as f:
            return Workspace(self, self._send(_req_import(f, name, progress)).name)

    def version(self) -> DaemonVersion:
        return self._send(_req_version())

    def list(self) -> builtins.list[WorkspaceInfo]:
        """Every workspace of the caller (all of them for root)."""
        return self._send(_req_list())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Workspace:
    """A handle on one workspace of a :class:`Client`: its name and the client; no cached state.

    Every method is one request to silod (``put``/``get``/``export`` stream). A verb the
    workspace's state does not allow raises :class:`silo.WorkspaceStateError` saying why.

    Example::

        ws = client.create("web", isolation="process")
        ws.start()
        result = ws.exec(["apt-get", "install", "-y", "jq"])
        ws.snapshot("with-jq")
    """

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name

    def __repr__(self) -> str:
        return f"Workspace({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Workspace) and (other.client, other.name) == (self.client, self.name)

    def __hash__(self) -> int:
        return hash(self.name)

    def info(self) -> WorkspaceInfo:
        return self.client._send(_req_info(self.name))

    @property
    def state(self) -> State:
        """The workspace's state now (one request)."""
        return self.info().state

    def start(self) -> WorkspaceInfo:
        return self.client._send(_req_info(self.name, "/start"))

    def stop(self, timeout: float | None = None) -> WorkspaceInfo:
        """Stop it; its init gets ``timeout`` seconds (the daemon's default when None) after SIGTERM."""
        return self.client._send(_req_info(self.name, "/stop", {} if timeout is None else {"timeout": timeout}))

    def restart(self) -> WorkspaceInfo:
        return self.client._send(_req_info(self.name, "/restart"))

    def set_network(self, mode: str | None = None, *, allow: Sequence[str] = (), publish: Sequence[str] = (),
                    links: Sequence[str] = (), bandwidth: str | None = None,
                    dns: Sequence[str] = ()) -> WorkspaceInfo:
        """Replace its network policy (``silo network set``); a running workspace's takes
        effect at once, and connections the new policy forbids are cut."""
        return self.client._send(_req_network(self.name, mode, {
            "allow": allow, "publish": publish, "links": links, "bandwidth": bandwidth, "dns": dns}))

    def remove(self, force: bool = False) -> None:
        """Remove it; ``force`` stops a running one first."""
        self.client._send(_req_remove(self.name, force))

    def exec(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, workdir: str | None = None,
             user: str | None = None, stdin: bytes | None = None, timeout: float | None = None) -> ExecResult:
        """Run ``argv`` in the running workspace and capture its output."""
        return self.client._send(_req_exec(self.name, argv, env, workdir, user, stdin, timeout))

    def put(self, host_path: str | os.PathLike[str], dest: str) -> None:
        """Copy ``host_path`` (file or directory) to ``dest`` in the workspace, as ``docker cp``."""
        with tp.pack(host_path) as tar:
            self.client._send(_req_put(self.name, dest, tar))

    def get(self, src: str, host_path: str | os.PathLike[str]) -> None:
        """Copy ``src`` from the workspace to ``host_path``; a hostile archive is refused whole."""
        with tp.spool() as tar:
            self.client._send(_req_get(self.name, src, tar))
            tar.seek(0)
            tp.unpack(tar, host_path)

    def snapshot(self, tag: str | None = None, *, memory: bool = False) -> Snapshot:
        """Snapshot the workspace's files (it must be stopped); with ``memory`` a running
        gvisor workspace's processes too, and it runs on (see ``silo snapshot --memory``)."""
        return self.client._send(_req_snapshot(self.name, tag, memory))

    def snapshots(self) -> builtins.list[Snapshot]:
        return self.client._send(_req_snapshots(self.name))

    def delete_snapshot(self, tag: str) -> None:
        self.client._send(_req_delete_snapshot(self.name, tag))

    def restore(self, tag: str) -> WorkspaceInfo:
        return self.client._send(_req_restore(self.name, tag))

    def reset(self) -> WorkspaceInfo:
        """Drop every change: back to the root (or template) it was created on."""
        return self.client._send(_req_info(self.name, "/reset"))

    def fork(self, new_name: str) -> Workspace:
        """A new workspace with a copy of this one's private layer."""
        return Workspace(self.client, self.client._send(_req_fork(self.name, new_name)).name)

    def diff(self) -> builtins.list[Change]:
        return self.client._send(_req_diff(self.name))

    def logs(self, tail: int | None = None) -> str:
        return self.client._send(_req_logs(self.name, tail))

    def export(self, dest: str | os.PathLike[str] | IO[bytes], progress: Progress | None = None) -> None:
        """Write an archive of the workspace (spec and private layer) to a path or file object."""
        with tp.OpenFile(dest, "wb") as f:
            self.client._send(_req_export(self.name, f, progress))


# -- the async client ----------------------------------------------------------------------


class AsyncClient:
    """:class:`Client` for asyncio (or trio): the same methods, as coroutines.

    Example::

        async with silo.AsyncClient() as client:
            ws = await client.create("web", isolation="process")
            await ws.start()
            result = await ws.exec(["apt-get", "install", "-y", "jq"])
    """

    def __init__(self, socket: str | None = None, *, transport: tp.AsyncTransport | None = None,
                 autostart: bool = True, timeout: float | None = None) -> None:
        self.socket = socket or paths.daemon_socket()
        self._autostart = autostart and transport is None
        self._http = httpx.AsyncClient(transport=tp.async_transport(transport, self.socket),
                                       base_url=tp.BASE_URL, timeout=tp.timeout(timeout))

    async def _send(self, call: _Call[T]) -> T:
        for attempt in (1, 2):
            try:
                return await self._exchange(call)
            except httpx.ConnectError as e:
                if attempt == 2 or not self._autostart:
                    raise _unreachable(self.socket, e) from None
                _may_start(self.socket, e)
                await tp.run_blocking(tp.start_daemon, self.socket)
            except httpx.HTTPError as e:
                raise _unreachable(self.socket, e) from None
        raise AssertionError("unreachable")

    async def _exchange(self, call: _Call[T]) -> T:
        content = None if call.upload is None else tp.achunks(call.upload, call.progress)
        async with self._http.stream(call.method, call.path, params=call.params, json=call.json,
                                     content=content) as response:
            if call.download is None or not response.is_success:
                await response.aread()
                _raise_for_error(response)
            else:
                meter = _download_meter(call, response)
                async for chunk in response.aiter_bytes(_CHUNK):
                    call.download.write(meter.add(chunk))
            return call.parse(response)

    async def create(self, name: str | None = None, **options: Unpack[CreateOptions]) -> AsyncWorkspace:
        """See :meth:`Client.create`."""
        info = await self._send(_req_create(build_spec(name, **options)))
        return AsyncWorkspace(self, info.name)

    async def get(self, name: str) -> AsyncWorkspace:
        return AsyncWorkspace(self, (await self._send(_req_info(name))).name)

    async def templates(self) -> builtins.list[Template]:
        return await self._send(_req_templates())

    async def create_template(self, tname: str, *, from_: str) -> Template:
        return await self._send(_req_create_template(tname, from_))

    async def remove_template(self, tname: str) -> None:
        await self._send(_req_remove_template(tname))

    async def import_(self, source: str | os.PathLike[str] | IO[bytes], name: str | None = None,
                      progress: Progress | None = None) -> AsyncWorkspace:
        with tp.OpenFile(source, "rb") as f:
            return AsyncWorkspace(self, (await self._send(_req_import(f, name, progress))).name)

    async def version(self) -> DaemonVersion:
        return await self._send(_req_version())

    async def list(self) -> builtins.list[WorkspaceInfo]:
        return await self._send(_req_list())

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class AsyncWorkspace:
    """:class:`Workspace` of an :class:`AsyncClient`: the same methods, as coroutines.

    Example::

        ws = await client.get("web")
        print((await ws.exec(["uname", "-r"])).stdout)
    """

    def __init__(self, client: AsyncClient, name: str) -> None:
        self.client = client
        self.name = name

    def __repr__(self) -> str:
        return f"AsyncWorkspace({self.name!r})"

    async def info(self) -> WorkspaceInfo:
        return await self.client._send(_req_info(self.name))

    async def state(self) -> State:
        """The workspace's state now (a coroutine here, a property on :class:`Workspace`)."""
        return (await self.info()).state

    async def start(self) -> WorkspaceInfo:
        return await self.client._send(_req_info(self.name, "/start"))

    async def stop(self, timeout: float | None = None) -> WorkspaceInfo:
        body = {} if timeout is None else {"timeout": timeout}
        return await self.client._send(_req_info(self.name, "/stop", body))

    async def restart(self) -> WorkspaceInfo:
        return await self.client._send(_req_info(self.name, "/restart"))

    async def set_network(self, mode: str | None = None, *, allow: Sequence[str] = (),
                          publish: Sequence[str] = (), links: Sequence[str] = (), bandwidth: str | None = None,
                          dns: Sequence[str] = ()) -> WorkspaceInfo:
        """See :meth:`Workspace.set_network`."""
        return await self.client._send(_req_network(self.name, mode, {
            "allow": allow, "publish": publish, "links": links, "bandwidth": bandwidth, "dns": dns}))

    async def remove(self, force: bool = False) -> None:
        await self.client._send(_req_remove(self.name, force))

    async def exec(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                   workdir: str | None = None, user: str | None = None, stdin: bytes | None = None,
                   timeout: float | None = None) -> ExecResult:
        return await self.client._send(_req_exec(self.name, argv, env, workdir, user, stdin, timeout))

    async def put(self, host_path: str | os.PathLike[str], dest: str) -> None:
        with await tp.run_blocking(tp.pack, host_path) as tar:
            await self.client._send(_req_put(self.name, dest, tar))

    async def get(self, src: str, host_path: str | os.PathLike[str]) -> None:
        with tp.spool() as tar:
            await self.client._send(_req_get(self.name, src, tar))
            tar.seek(0)
            await tp.run_blocking(tp.unpack, tar, host_path)

    async def snapshot(self, tag: str | None = None, *, memory: bool = False) -> Snapshot:
        return await self.client._send(_req_snapshot(self.name, tag, memory))

    async def snapshots(self) -> builtins.list[Snapshot]:
        return await self.client._send(_req_snapshots(self.name))

    async def delete_snapshot(self, tag: str) -> None:
        await self.client._send(_req_delete_snapshot(self.name, tag))

    async def restore(self, tag: str) -> WorkspaceInfo:
        return await self.client._send(_req_restore(self.name, tag))

    async def reset(self) -> WorkspaceInfo:
        return await self.client._send(_req_info(self.name, "/reset"))

    async def fork(self, new_name: str) -> AsyncWorkspace:
        return AsyncWorkspace(self.client, (await self.client._send(_req_fork(self.name, new_name))).name)

    async def diff(self) -> builtins.list[Change]:
        return await self.client._send(_req_diff(self.name))

    async def logs(self, tail: int | None = None) -> str:
        return await self.client._send(_req_logs(self.name, tail))

    async def export(self, dest: str | os.PathLike[str] | IO[bytes], progress: Progress | None = None) -> None:
        with tp.OpenFile(dest, "wb") as f:
            await self.client._send(_req_export(self.name, f, progress))


__all__ = ["AsyncClient", "AsyncWorkspace", "Change", "Client", "DaemonVersion", "ExecResult", "Template",
           "Workspace", "WorkspaceInfo", "build_spec"]
