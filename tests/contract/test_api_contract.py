"""silod's real replies against its own OpenAPI document, and that document against docs/api.md.

A private silod serves ``GET /openapi.json``; every reply the tests provoke (successes and
the 400/404/409 refusals) is validated with ``jsonschema`` against the response schema
that document gives for its path, method and status (``$ref``s resolved in
``components/schemas``). A status the document does not list for an operation is a
failure, as is a path or method of docs/api.md's endpoint table that it lacks.
"""

from __future__ import annotations

import io
import os
import re
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from daemons import REPO, Daemon, private_daemon

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.skip("the API contract tests run a root silod", allow_module_level=True)

Doc = dict[str, Any]


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with private_daemon() as d:
        yield d


@pytest.fixture(scope="module")
def openapi(daemon: Daemon) -> Doc:
    with daemon.http() as h:
        r = h.get("/openapi.json")
    assert r.status_code == 200
    doc: Doc = r.json()
    assert doc["openapi"].startswith("3.1")
    return doc


def shape(path: str) -> str:
    """``/v1/templates/{tname}`` -> ``/v1/templates/{}``: the docs and the code may name parameters apart."""
    return re.sub(r"\{[^}]*\}", "{}", path)


def operation(doc: Doc, method: str, path: str) -> Doc:
    paths = {shape(p): ops for p, ops in doc["paths"].items()}
    assert shape(path) in paths, f"{path} is not in openapi.json"
    assert method.lower() in paths[shape(path)], f"{method} {path} is not in openapi.json"
    op: Doc = paths[shape(path)][method.lower()]
    return op


class Contract:
    """``call(method, template, **params)`` makes the request and validates its reply."""

    def __init__(self, doc: Doc, http: httpx.Client) -> None:
        self.doc = doc
        self.http = http
        self.seen: set[tuple[str, str, int]] = set()

    def call(self, method: str, template: str, expect: int, *, json: object = None, content: bytes | None = None,
             params: dict[str, str] | None = None, **names: str) -> httpx.Response:
        r = self.http.request(method, template.format(**names), json=json, content=content, params=params)
        assert r.status_code == expect, (method, template, r.status_code, r.text[:500])
        self.validate(method, template, r)
        return r

    def validate(self, method: str, template: str, r: httpx.Response) -> None:
        responses = operation(self.doc, method, template)["responses"]
        status = str(r.status_code)
        assert status in responses, f"{method} {template} replied {status}, which openapi.json does not list"
        self.seen.add((method, template, r.status_code))
        content = responses[status].get("content")
        if r.status_code == 204:
            assert not content and r.content == b""
            return
        kind = r.headers["content-type"].split(";")[0]
        if kind != "application/json":
            return  # streams and text: their content types are checked in test_reply_content_types
        schema = content["application/json"]["schema"]
        assert schema, f"{method} {template} {status}: an empty schema validates anything"
        Draft202012Validator({**schema, "components": self.doc["components"]}).validate(r.json())


@pytest.fixture
def contract(daemon: Daemon, openapi: Doc) -> Iterator[Contract]:
    with daemon.http() as h:
        yield Contract(openapi, h)


def tar_of(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


WS = "/v1/workspaces/{name}"


def test_replies_match_the_openapi_document(contract: Contract) -> None:
    c = contract
    name, fork, copy, tname = (f"{p}-{uuid.uuid4().hex[:8]}" for p in ("api", "apifork", "apicopy", "apit"))
    try:
        assert c.call("GET", "/v1/version", 200).json()["api"] == 1
        c.call("POST", "/v1/workspaces", 201, json={"spec": {"name": name, "env": {"K": "V"}}})
        c.call("POST", "/v1/workspaces", 409, json={"spec": {"name": name}})
        c.call("POST", "/v1/workspaces", 400, json={"spec": {"name": fork, "bogus": 1}})
        c.call("POST", "/v1/workspaces", 400, json={"nospec": {}})
        c.call("POST", "/v1/workspaces", 404, json={"spec": {"name": fork, "mount": ["/no/such/dir:/d"]}})
        listed = c.call("GET", "/v1/workspaces", 200).json()
        assert name in [w["name"] for w in listed]
        c.call("GET", WS, 200, name=name)
        c.call("GET", WS, 404, name=fork)
        c.call("GET", WS, 400, name="Bad_Name")
        c.call("POST", WS + "/exec", 409, json={"argv": ["true"]}, name=name)
        assert c.call("POST", WS + "/start", 200, name=name).json()["pid"] > 0
        c.call("POST", WS + "/start", 409, name=name)
        r = c.call("POST", WS + "/exec", 200, json={"argv": ["sh", "-c", "echo $K; exit 4"], "env": {"K": "x"},
                                                   "workdir": "/tmp", "user": "0:0", "stdin": "", "timeout": 30},
                   name=name)
        assert r.json()["exit_code"] == 4
        c.call("POST", WS + "/exec", 400, json={"env": {}}, name=name)
        c.call("POST", WS + "/exec", 404, json={"argv": ["true"]}, name=fork)
        c.call("PUT", WS + "/files", 204, content=tar_of("f", b"data\n"), params={"path": "/root/f"}, name=name)
        c.call("GET", WS + "/files", 200, params={"path": "/root/f"}, name=name)
        c.call("GET", WS + "/files", 404, params={"path": "/root/none"}, name=name)
        c.call("POST", WS + "/snapshots", 409, json={"tag": "one"}, name=name)
        c.call("DELETE", WS, 409, name=name)
        c.call("POST", WS + "/restart", 200, name=name)
        assert c.call("POST", WS + "/stop", 200, json={"timeout": 5}, name=name).json()["state"] == "stopped"
        c.call("POST", WS + "/stop", 409, name=name)
        assert c.call("POST", WS + "/snapshots", 201, json={"tag": "one"}, name=name).json()["tag"] == "one"
        c.call("POST", WS + "/snapshots", 201, json={}, name=name)
        assert "one" in [s["tag"] for s in c.call("GET", WS + "/snapshots", 200, name=name).json()]
        c.call("POST", WS + "/restore", 200, json={"tag": "one"}, name=name)
        c.call("POST", WS + "/restore", 404, json={"tag": "none"}, name=name)
        c.call("DELETE", WS + "/snapshots/{tag}", 204, name=name, tag="one")
        changes = c.call("GET", WS + "/diff", 200, name=name).json()
        assert {"kind": "added", "path": "/root/f"} in changes
        c.call("GET", WS + "/logs", 200, params={"tail": "5"}, name=name)
        c.call("POST", WS + "/fork", 201, json={"name": fork}, name=name)
        c.call("POST", WS + "/fork", 409, json={"name": fork}, name=name)
        c.call("POST", WS + "/reset", 200, name=fork)
        archive = c.call("GET", WS + "/export", 200, name=name).content
        c.call("POST", "/v1/workspaces/import", 201, content=archive, params={"name": copy})
        c.call("POST", "/v1/workspaces/import", 400, content=b"not an archive", params={"name": f"{copy}x"})
        assert c.call("POST", "/v1/templates", 201, json={"name": tname, "from": name}).json()["from"] == name
        assert tname in [t["name"] for t in c.call("GET", "/v1/templates", 200).json()]
        c.call("POST", "/v1/workspaces", 201, json={"spec": {"name": f"{tname}-user", "root": tname}})
        c.call("DELETE", "/v1/templates/{tname}", 409, tname=tname)
        c.call("DELETE", WS, 204, name=f"{tname}-user")
        c.call("DELETE", "/v1/templates/{tname}", 204, tname=tname)
        c.call("DELETE", "/v1/templates/{tname}", 404, tname=tname)
        for gone in (name, fork, copy):
            c.call("DELETE", WS, 204, params={"force": "true"}, name=gone)
        c.call("DELETE", WS, 404, name=name)
    finally:
        for left in (name, fork, copy, f"{tname}-user"):
            c.http.delete(f"/v1/workspaces/{left}", params={"force": "true"})
        c.http.delete(f"/v1/templates/{tname}")
    statuses = {status for _, _, status in c.seen}
    assert {200, 201, 204, 400, 404, 409} <= statuses
    assert len({(m, t) for m, t, _ in c.seen}) >= 24


def test_the_validation_is_not_vacuous(openapi: Doc) -> None:
    """A reply missing a field, or with a field of the wrong type, fails the schemas the tests use."""
    from jsonschema import ValidationError

    def schema(method: str, path: str, status: str) -> Draft202012Validator:
        s = operation(openapi, method, path)["responses"][status]["content"]["application/json"]["schema"]
        return Draft202012Validator({**s, "components": openapi["components"]})

    for validator, wrong in ((schema("GET", WS, "200"), {"name": "x", "state": "running"}),
                             (schema("GET", "/v1/workspaces", "200"), [{"name": 1}]),
                             (schema("POST", WS + "/exec", "200"), {"exit_code": "0", "stdout": "", "stderr": ""}),
                             (schema("GET", WS, "404"), {"detail": "Not Found"})):
        with pytest.raises(ValidationError):
            validator.validate(wrong)


def documented_endpoints() -> list[tuple[str, str, int]]:
    """(method, path, success status) of every row of docs/api.md's endpoint table."""
    rows = []
    for line in (REPO / "docs" / "api.md").read_text().splitlines():
        m = re.match(r"\| `(GET|POST|PUT|DELETE|PATCH) (/[^`?]*)(?:\?[^`]*)?` \|[^|]*\| *(\S+)", line)
        if m:
            reply = m.group(3)
            rows.append((m.group(1), m.group(2), int(reply) if reply in ("201", "204") else 200))
    return rows


def test_every_documented_endpoint_is_in_the_openapi_document(openapi: Doc) -> None:
    rows = documented_endpoints()
    assert len(rows) >= 24, rows
    for method, path, status in rows:
        responses = operation(openapi, method, path)["responses"]
        assert str(status) in responses, f"docs/api.md says {method} {path} replies {status}; openapi.json: " \
                                         f"{sorted(responses)}"
    documented = {(method, shape(path)) for method, path, _ in rows}
    served = {(m.upper(), shape(p)) for p, ops in openapi["paths"].items() for m in ops}
    assert served == documented, f"in openapi.json only: {served - documented}; in docs only: {documented - served}"


def test_the_document_lists_only_statuses_silod_sends(openapi: Doc) -> None:
    """No 422 (FastAPI's default): silod answers a malformed request 400 with ErrorReply."""
    listed = {(m, p) for p, ops in openapi["paths"].items() for m, op in ops.items() if "422" in op["responses"]}
    assert listed == set()
    assert "HTTPValidationError" not in openapi["components"]["schemas"]
    for p, ops in openapi["paths"].items():
        for m, op in ops.items():
            refs = {s: r["content"]["application/json"]["schema"].get("$ref") for s, r in op["responses"].items()
                    if s == "default" or int(s) >= 400}
            assert set(refs.values()) == {"#/components/schemas/ErrorReply"}, (m, p, refs)


@pytest.mark.parametrize("method, template, params, status", [
    pytest.param("GET", WS + "/files", {"path": "/etc/hostname"}, 200, id="files"),
    pytest.param("GET", WS + "/export", {}, 200, id="export"),
    pytest.param("GET", WS + "/logs", {}, 200, id="logs"),
    pytest.param("GET", "/v1/workspaces/{name}-none/logs", {}, 404, id="logs-404"),
])
def test_reply_content_types(daemon: Daemon, openapi: Doc, method: str, template: str, params: dict[str, str],
                             status: int) -> None:
    name = f"api-{uuid.uuid4().hex[:8]}"
    with daemon.http() as h:
        assert h.post("/v1/workspaces", json={"spec": {"name": name}}).status_code == 201
        try:
            r = h.request(method, template.format(name=name), params=params)
            assert r.status_code == status, r.text
            kind = r.headers["content-type"].split(";")[0]
            listed = operation(openapi, method, template.replace("{name}-none", "{name}"))["responses"][str(status)]
            assert kind in listed.get("content", {}), f"sent {kind}; openapi.json lists {sorted(listed['content'])}"
            assert len(listed["content"]) == 1, f"openapi.json lists {sorted(listed['content'])}"
        finally:
            h.delete(f"/v1/workspaces/{name}")


@pytest.mark.parametrize("method, path, status, cls", [("GET", "/v1/nothing-here", 404, "NotFoundError"),
                                                       ("DELETE", "/v1/version", 405, "ProtocolError"),
                                                       ("GET", "/v1/workspaces/a%2Fb", 404, "NotFoundError")])
def test_unrouted_requests_get_the_documented_error_body(daemon: Daemon, openapi: Doc, method: str, path: str,
                                                         status: int, cls: str) -> None:
    """docs/api.md's error body, with a class the SDK re-raises and a one-line message saying what to do."""
    with daemon.http() as h:
        r = h.request(method, path)
    assert r.status_code == status
    schema = openapi["components"]["schemas"]["ErrorReply"]
    Draft202012Validator({**schema, "components": openapi["components"]}).validate(r.json())
    error = r.json()["error"]
    assert error["class"] == cls
    assert "\n" not in error["message"] and "docs/api.md" in error["message"], error["message"]
    if status == 405:
        assert r.headers["allow"] == "GET"
