"""silod's HTTP API (docs/api.md), a FastAPI app over a :class:`~silo.daemon.manager.Manager`.

Who is asking comes from the unix socket's peer credentials, read once per connection
by :class:`PeerH11Protocol` and carried in the ASGI scope's ``client`` as
``("uid", UID)`` (uvicorn has no other slot for it; a TCP client would never reach this
app, it listens on a unix socket only). Errors are silo's classes as JSON
(``{"error": {"class", "message"}}``) with the status of their kind; so are the refusals
no route makes (unknown path 404, wrong method 405) and malformed requests (400, never
FastAPI's 422).

The OpenAPI document (``GET /openapi.json``) is the contract ``tests/contract`` checks real
replies against: every status an operation sends is listed with its body and content type.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import struct
import tempfile
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

import silo
from silo.backends.process import copier
from silo.daemon.manager import Manager
from silo.model import errors as e
from silo.model.errors import SiloError

API_VERSION = 1
MAX_UPLOAD = 1 << 40


class PeerH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with the peer's uid (SO_PEERCRED) as the scope's client."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        uid = -1
        if sock is not None and sock.family == socket.AF_UNIX:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
        self.client = ("uid", uid)


def peer_of(request: Request) -> int:
    client = request.scope.get("client")
    if not client or client[0] != "uid" or client[1] < 0:
        raise e.PermissionDenied("the caller's credentials are unknown: use silod's unix socket")
    return int(client[1])


def unrouted_error(method: str, untrusted_path: str, exc: HTTPException) -> SiloError:
    """What silo class a refusal of Starlette's own (no route, wrong method, unreadable body)
    travels as; the reply keeps Starlette's status. The path is quoted with ``repr`` so a
    decoded newline cannot break the CLI's one-line message."""
    where = f"{method} {untrusted_path[:200]!r}"
    hint = f"see docs/api.md, or use a silo client of silod's version ({silo.__version__}, API v{API_VERSION})"
    if exc.status_code == 404:
        return e.NotFoundError(f"silod has no endpoint {where}: {hint}")
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow")
        return e.ProtocolError(f"silod does not allow {where}" + (f" (only {allowed})" if allowed else "")
                               + f": {hint}")
    if exc.status_code < 500:
        return e.ProtocolError(f"bad request: {exc.detail}")
    return e.InternalError(f"silod failed: {exc.detail}")


class ErrorBody(BaseModel):
    class_: str = Field(alias="class")
    message: str


class ErrorReply(BaseModel):
    error: ErrorBody


class Version(BaseModel):
    version: str
    api: int


class SnapshotOut(BaseModel):
    tag: str
    created: float
    memory: bool = False  # it saved the workspace's processes too (gvisor: snapshot --memory)


class WorkspaceOut(BaseModel):
    name: str
    state: str
    spec: dict[str, Any]
    owner: int
    created: float
    updated: float
    error: str | None
    pid: int | None
    template: str | None
    snapshots: list[SnapshotOut]
    private_bytes: int | None
    network: dict[str, Any] | None = None  # a running workspace's addresses, counters and refusals
    memory: dict[str, Any] | None = None  # a running vm workspace's guest and host memory
    gvisor: dict[str, Any] | None = None  # a gvisor workspace's sandbox: its platform


class TemplateOut(BaseModel):
    model_config = {"populate_by_name": True}
    name: str
    base: str
    from_: str = Field(alias="from")
    created: float
    layers: int


class ChangeOut(BaseModel):
    kind: str
    path: str


class ExecResultOut(BaseModel):
    exit_code: int
    stdout: str
    stderr: str


class CreateIn(BaseModel):
    spec: dict[str, Any]


class StopIn(BaseModel):
    timeout: float | None = None


class ExecIn(BaseModel):
    argv: list[str]
    env: dict[str, str] | None = None
    workdir: str | None = None
    user: str | None = None
    stdin: str | None = None
    timeout: float | None = None


class SnapshotIn(BaseModel):
    tag: str | None = None
    memory: bool = False  # a running gvisor workspace's processes too (runsc checkpoint)


class RestoreIn(BaseModel):
    tag: str


class ForkIn(BaseModel):
    name: str


class TemplateIn(BaseModel):
    model_config = {"populate_by_name": True}
    name: str
    from_: str = Field(alias="from")


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorReply, "description": text}
    for code, text in ((400, "bad request or spec"), (403, "not allowed"), (404, "no such workspace"),
                       (409, "wrong state or name taken"), (500, "silo's fault"),
                       ("default", "any other refusal (405 wrong method, 507 store full)"))
}
"""Every operation's error replies. With a ``default`` reply listed, FastAPI adds no 422
HTTPValidationError: silod answers a malformed request 400 with ErrorReply."""


def body_of(media_type: str, description: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route whose 200 is not JSON; give it ``response_class=Response``
    (no media type), so that its error replies stay ``application/json`` ErrorReply."""
    schema = {"schema": {"type": "string"}} if media_type.startswith("text/") else {}
    return {200: {"description": description, "content": {media_type: schema}}}


def raw_body(media_type: str) -> dict[str, Any]:
    """``openapi_extra=`` for a route that reads its request body as a stream."""
    return {"requestBody": {"required": True, "content": {media_type: {}}}}


def build(manager: Manager) -> FastAPI:
    app = FastAPI(title="silod", version=silo.__version__, description="silo's workspace daemon (docs/api.md)",
                  responses=ERRORS)

    @app.exception_handler(SiloError)
    async def silo_error(request: Request, exc: SiloError) -> JSONResponse:
        return JSONResponse({"error": exc.to_wire()}, status_code=e.http_status(exc))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        import logging

        logging.getLogger("silod").exception("internal error")
        body = e.InternalError(f"silod failed: {type(exc).__name__}: {exc}").to_wire()
        return JSONResponse({"error": body}, status_code=500)

    @app.exception_handler(HTTPException)
    async def unrouted(request: Request, exc: HTTPException) -> JSONResponse:
        err = unrouted_error(request.method, request.url.path, exc)
        return JSONResponse({"error": err.to_wire()}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = f"bad request: {where}: {first.get('msg', 'invalid')}" if where else "bad request"
        return JSONResponse({"error": e.ProtocolError(msg).to_wire()}, status_code=400)

    def info(record: Any, usage: bool = False) -> dict[str, Any]:
        return manager.info(record, usage=usage)

    @app.get("/v1/version", response_model=Version)
    async def version() -> dict[str, Any]:
        return {"version": silo.__version__, "api": API_VERSION}

    @app.get("/v1/workspaces", response_model=list[WorkspaceOut])
    async def list_workspaces(request: Request) -> list[dict[str, Any]]:
        return [info(r) for r in manager.records(peer_of(request))]

    @app.post("/v1/workspaces", response_model=WorkspaceOut, status_code=201)
    async def create(request: Request, body: CreateIn) -> dict[str, Any]:
        return info(await manager.create(peer_of(request), body.spec))

    @app.post("/v1/workspaces/import", response_model=WorkspaceOut, status_code=201,
              openapi_extra=raw_body("application/octet-stream"))
    async def import_(request: Request, name: str | None = Query(None)) -> dict[str, Any]:
        peer = peer_of(request)
        tmp_dir = os.path.join(manager.state_dir, "tmp")
        os.makedirs(tmp_dir, mode=0o700, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=tmp_dir, prefix="import-")
        try:
            size = 0
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > MAX_UPLOAD:
                        raise e.UserError("the archive is too large")
                    f.write(chunk)
            return info(await manager.import_(peer, path, name))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    @app.get("/v1/workspaces/{name}", response_model=WorkspaceOut)
    async def inspect(request: Request, name: str) -> dict[str, Any]:
        return info(manager.record(peer_of(request), name), usage=True)

    @app.delete("/v1/workspaces/{name}", status_code=204)
    async def remove(request: Request, name: str, force: bool = False) -> Response:
        await manager.remove(peer_of(request), name, force)
        return Response(status_code=204)

    @app.put("/v1/workspaces/{name}/network", response_model=WorkspaceOut)
    async def set_network(request: Request, name: str, body: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
        return info(await manager.set_network(peer_of(request), name, body), usage=True)

    @app.post("/v1/workspaces/{name}/start", response_model=WorkspaceOut)
    async def start(request: Request, name: str) -> dict[str, Any]:
        return info(await manager.start(peer_of(request), name))

    @app.post("/v1/workspaces/{name}/stop", response_model=WorkspaceOut)
    async def stop(request: Request, name: str,
                   body: Annotated[StopIn | None, Body()] = None) -> dict[str, Any]:
        return info(await manager.stop(peer_of(request), name, body.timeout if body else None))

    @app.post("/v1/workspaces/{name}/restart", response_model=WorkspaceOut)
    async def restart(request: Request, name: str) -> dict[str, Any]:
        return info(await manager.restart(peer_of(request), name))

    @app.post("/v1/workspaces/{name}/exec", response_model=ExecResultOut)
    async def exec_(request: Request, name: str, body: ExecIn) -> dict[str, Any]:
        try:
            stdin = base64.b64decode(body.stdin, validate=True) if body.stdin else b""
        except ValueError:
            raise e.ProtocolError("bad request: stdin is not base64") from None
        return await manager.exec_captured(peer_of(request), name, body.argv, body.env, body.workdir, body.user,
                                           stdin, body.timeout)

    @app.put("/v1/workspaces/{name}/files", status_code=204, openapi_extra=raw_body("application/x-tar"))
    async def put_files(request: Request, name: str, path: str = Query(...)) -> Response:
        peer = peer_of(request)
        async with manager.lock(name):
            helper, temp = await manager.copier(peer, name, "put", path)
            try:
                assert helper.stdin is not None and helper.stderr is not None
                try:
                    async for chunk in request.stream():
                        helper.stdin.write(chunk)
                        await helper.stdin.drain()
                except (BrokenPipeError, ConnectionResetError):
                    pass
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    helper.stdin.close()
                err = await helper.stderr.read()
                code = await helper.wait()
            finally:
                if helper.returncode is None:
                    helper.kill()
                    await helper.wait()
                if temp is not None:
                    await manager.runtime.stop(temp, 0)
        if code != 0:
            raise copier.error_of(code, f"cannot copy into {name}:{path}: {err.decode(errors='replace').strip()}")
        return Response(status_code=204)

    @app.get("/v1/workspaces/{name}/files", response_class=Response,
             responses=body_of("application/x-tar", "a tar stream of the path"))
    async def get_files(request: Request, name: str, path: str = Query(...)) -> StreamingResponse:
        peer = peer_of(request)
        lock = manager.lock(name)
        await lock.acquire()
        try:
            helper, temp = await manager.copier(peer, name, "get", path)
        except BaseException:
            lock.release()
            raise
        assert helper.stdout is not None and helper.stderr is not None and helper.stdin is not None
        helper.stdin.close()
        # The first chunk decides between an archive and an error.
        first = await helper.stdout.read(1 << 16)
        if not first:
            err = await helper.stderr.read()
            code = await helper.wait()
            if temp is not None:
                await manager.runtime.stop(temp, 0)
            lock.release()
            raise copier.error_of(code, f"cannot copy {name}:{path}: "
                                        f"{err.decode(errors='replace').strip() or 'failed'}")

        async def stream() -> AsyncIterator[bytes]:
            try:
                yield first
                assert helper.stdout is not None
                while chunk := await helper.stdout.read(1 << 20):
                    yield chunk
                await helper.wait()
            finally:
                if helper.returncode is None:
                    helper.kill()
                    await helper.wait()
                if temp is not None:
                    await manager.runtime.stop(temp, 0)
                lock.release()

        return StreamingResponse(stream(), media_type="application/x-tar")

    @app.post("/v1/workspaces/{name}/snapshots", response_model=SnapshotOut, status_code=201)
    async def snapshot(request: Request, name: str,
                       body: Annotated[SnapshotIn | None, Body()] = None) -> dict[str, Any]:
        return await manager.snapshot(peer_of(request), name, body.tag if body else None,
                                      body.memory if body else False)

    @app.get("/v1/workspaces/{name}/snapshots", response_model=list[SnapshotOut])
    async def snapshots(request: Request, name: str) -> list[dict[str, Any]]:
        return manager.snapshots(peer_of(request), name)

    @app.delete("/v1/workspaces/{name}/snapshots/{tag}", status_code=204)
    async def delete_snapshot(request: Request, name: str, tag: str) -> Response:
        await manager.delete_snapshot(peer_of(request), name, tag)
        return Response(status_code=204)

    @app.post("/v1/workspaces/{name}/restore", response_model=WorkspaceOut)
    async def restore(request: Request, name: str, body: RestoreIn) -> dict[str, Any]:
        return info(await manager.restore(peer_of(request), name, body.tag))

    @app.post("/v1/workspaces/{name}/reset", response_model=WorkspaceOut)
    async def reset(request: Request, name: str) -> dict[str, Any]:
        return info(await manager.reset(peer_of(request), name))

    @app.post("/v1/workspaces/{name}/fork", response_model=WorkspaceOut, status_code=201)
    async def fork(request: Request, name: str, body: ForkIn) -> dict[str, Any]:
        return info(await manager.fork(peer_of(request), name, body.name))

    @app.get("/v1/workspaces/{name}/diff", response_model=list[ChangeOut])
    async def diff(request: Request, name: str) -> list[dict[str, str]]:
        return await manager.diff(peer_of(request), name)

    @app.get("/v1/workspaces/{name}/logs", response_class=Response,
             responses=body_of("text/plain", "the workspace's log"))
    async def logs(request: Request, name: str, tail: int | None = Query(None, ge=0)) -> Response:
        return PlainTextResponse(manager.logs(peer_of(request), name, tail))

    @app.get("/v1/workspaces/{name}/export", response_class=Response,
             responses=body_of("application/octet-stream", "the workspace's archive, streamed"))
    async def export(request: Request, name: str) -> StreamingResponse:
        stream = await manager.export(peer_of(request), name)
        return StreamingResponse(stream, media_type="application/octet-stream")

    @app.get("/v1/templates", response_model=list[TemplateOut])
    async def templates(request: Request) -> list[dict[str, Any]]:
        return manager.templates(peer_of(request))

    @app.post("/v1/templates", response_model=TemplateOut, status_code=201)
    async def create_template(request: Request, body: TemplateIn) -> dict[str, Any]:
        return await manager.create_template(peer_of(request), body.name, body.from_)

    @app.delete("/v1/templates/{tname}", status_code=204)
    async def remove_template(request: Request, tname: str) -> Response:
        await manager.remove_template(peer_of(request), tname)
        return Response(status_code=204)

    return app
