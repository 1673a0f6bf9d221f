"""Workspaces against SECURITY.md's classes that go through silod (issue 3).

* #3/#19 — ``silo cp`` in and out: a symlink planted in the workspace never leads a copy
  to the host's files, and an archive whose links lead out of the destination is refused
  by the client before it writes anything.
* #12/#21 — silod's sockets are unreachable from inside a workspace (not in its mount
  table, no folder that holds them may be mapped), its processes are invisible there
  (a workspace's pid 1 is its silo-init; an exec's relay is outside: the command's
  parent pid is 0), and hostile names and paths in API requests are clear 4xx replies.

One root silod for the module (``private_daemon``); each test removes its workspaces.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from daemons import REPO, Daemon

import silo
from silo import UserError

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.skip("the workspace security tests run a root silod", allow_module_level=True)

SILO = str(REPO / ".venv" / "bin" / "silo")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SILO, *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def sh(ws: silo.Workspace, script: str) -> silo.ExecResult:
    return ws.exec(["sh", "-c", script])


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> Iterator[silo.Client]:
    with silo.Client(daemon.socket, autostart=False) as c:
        yield c


@pytest.fixture
def ws(client: silo.Client) -> Iterator[silo.Workspace]:
    workspace = client.create(f"sec-{uuid.uuid4().hex[:8]}")
    try:
        workspace.start()
        yield workspace
    finally:
        workspace.remove(force=True)


# -- #3, #19: copies ----------------------------------------------------------------------------


@pytest.mark.parametrize("link", ["/etc", "../../../../../etc", "/proc/1/root/etc"])
def test_cp_through_a_planted_symlink_lands_in_the_workspace(ws: silo.Workspace, world_dir: Path, marker: str,
                                                             link: str) -> None:
    assert sh(ws, f"ln -s {link} /tmp/link").exit_code == 0
    src = world_dir / "host.txt"
    src.write_text(f"{marker}\n")
    (world_dir / "tree").mkdir()
    (world_dir / "tree" / "inner").write_text(f"{marker}\n")
    r = cli("cp", str(src), f"{ws.name}:/tmp/link/{marker}")
    assert r.returncode == 0, r
    r = cli("cp", str(world_dir / "tree"), f"{ws.name}:/tmp/link")  # an existing directory: into it
    assert r.returncode == 0, r
    assert not os.path.lexists(f"/etc/{marker}") and not os.path.lexists("/etc/tree/inner")
    seen = sh(ws, f"cat /etc/{marker} /etc/tree/inner; readlink /tmp/link")
    assert (seen.exit_code, seen.stdout.decode()) == (0, f"{marker}\n{marker}\n{link}\n")


def test_cp_replaces_a_planted_symlink_at_the_destination(ws: silo.Workspace, world_dir: Path, marker: str) -> None:
    host_target = world_dir / "victim"
    host_target.write_text("untouched\n")
    assert sh(ws, f"ln -s {host_target} /tmp/dest && ln -s /etc/hostname /tmp/dest2").exit_code == 0
    src = world_dir / "host.txt"
    src.write_text(f"{marker}\n")
    for dest in ("/tmp/dest", "/tmp/dest2"):
        assert cli("cp", str(src), f"{ws.name}:{dest}").returncode == 0
    assert host_target.read_text() == "untouched\n"
    seen = sh(ws, "test ! -L /tmp/dest && test ! -L /tmp/dest2 && cat /tmp/dest /tmp/dest2 && cat /etc/hostname")
    assert seen.exit_code == 0 and seen.stdout.decode().startswith(f"{marker}\n{marker}\n")
    assert marker not in seen.stdout.decode().splitlines()[2]


@pytest.mark.parametrize("src", ["/etc/shadow", "/proc/1/root/etc/shadow", "/../../etc/shadow",
                                 "/proc/self/root/etc/shadow", "/proc/thread-self/root/etc/shadow",
                                 "/tmp/up/shadow"])
def test_cp_out_reads_the_workspaces_file_never_the_hosts(ws: silo.Workspace, world_dir: Path, marker: str,
                                                          src: str) -> None:
    host = Path("/etc/shadow").read_bytes()
    mine = f"ws-shadow-{marker}\n".encode()
    assert sh(ws, f"printf 'ws-shadow-{marker}\\n' > /etc/shadow && ln -s ../../etc /tmp/up").exit_code == 0
    out = world_dir / "out"
    r = cli("cp", f"{ws.name}:{src}", str(out))
    if r.returncode == 0:
        assert out.read_bytes() == mine
    else:
        assert r.returncode == 3 and r.stderr.count("\n") == 1 and not out.exists(), r  # 3: not found in it
        assert host.decode(errors="replace").splitlines()[0] not in r.stderr
    assert not out.exists() or out.read_bytes() != host


def test_an_archive_with_links_out_of_the_destination_is_refused(ws: silo.Workspace, world_dir: Path) -> None:
    assert sh(ws, "mkdir -p /tmp/d /tmp/e && echo hi > /tmp/d/f && ln -s /etc /tmp/d/link && "
                  "echo hi > /tmp/e/f && ln -s ../../../etc /tmp/e/up").exit_code == 0
    dest = world_dir / "dest"
    dest.mkdir()
    with pytest.raises(UserError) as e:
        ws.get("/tmp/d", dest)
    assert e.value.message == ("refusing the archive from silod: d/link is a symlink to '/etc', outside the "
                               "destination; nothing was copied")
    with pytest.raises(UserError) as e:
        ws.get("/tmp/e", dest)
    assert e.value.message == ("refusing the archive from silod: e/up is a symlink to '../../../etc', outside the "
                               "destination; nothing was copied")
    r = cli("cp", f"{ws.name}:/tmp/d", str(dest))
    assert (r.returncode, r.stdout) == (11, "")
    assert r.stderr == ("silo: refusing the archive from silod: d/link is a symlink to '/etc', outside the "
                        "destination; nothing was copied\n")
    assert list(dest.iterdir()) == []
    # a link that stays inside is fine
    assert sh(ws, "mkdir /tmp/g && echo hi > /tmp/g/f && ln -s f /tmp/g/ok").exit_code == 0
    ws.get("/tmp/g", dest)
    assert os.readlink(dest / "g" / "ok") == "f" and (dest / "g" / "ok").read_text() == "hi\n"


# -- #12, #21: the daemon ----------------------------------------------------------------------


def test_the_daemons_sockets_are_unreachable_from_inside(ws: silo.Workspace, daemon: Daemon) -> None:
    for path in ("/run/silod", daemon.sockets, os.path.dirname(daemon.sockets), daemon.state):
        r = ws.exec(["ls", path])
        assert r.exit_code != 0 and b"No such file" in r.stderr, (path, r)
    probe = ("import socket, sys\n"
             "for path in sys.argv[1:]:\n"
             "    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
             "    try:\n"
             "        s.connect(path)\n"
             "        print('connected', path)\n"
             "    except OSError as e:\n"
             "        print(type(e).__name__)\n")
    r = ws.exec(["python3", "-c", probe, daemon.socket, os.path.join(daemon.sockets, "exec.sock"),
                 "/run/silod/silod.sock"])
    assert (r.exit_code, r.stdout.decode().split()) == (0, ["FileNotFoundError"] * 3), r
    r = sh(ws, "find / -path /proc -prune -o -type s -print; grep -c silod /proc/net/unix")
    assert r.stdout.decode() == "0\n", r  # no unix socket file anywhere, none named silod


@pytest.mark.parametrize("which", ["base", "sockets", "state", "tmp", "root", "link"])
def test_mapping_a_folder_that_holds_the_daemons_sockets_is_refused(daemon: Daemon, client: silo.Client,
                                                                    world_dir: Path, which: str) -> None:
    base = os.path.dirname(daemon.sockets)
    link = world_dir / "link"
    link.symlink_to(base)
    source = {"base": base, "sockets": daemon.sockets, "state": daemon.state, "tmp": "/tmp", "root": "/",
              "link": str(link)}[which]
    name = f"sec-{uuid.uuid4().hex[:8]}"
    before = sorted(w.name for w in client.list())
    r = cli("create", name, "-v", f"{source}:/d")
    assert (r.returncode, r.stdout) == (6, "")  # not allowed
    assert r.stderr == (f"silo: cannot map {source}: it holds silod's sockets or state, which no workspace may "
                        "reach; map a folder below it instead\n")
    assert sorted(w.name for w in client.list()) == before
    assert not os.path.exists(os.path.join(daemon.state, "workspaces", name))


def test_mapping_a_folder_beside_the_daemons_is_allowed(client: silo.Client, world_dir: Path) -> None:
    (world_dir / "f").write_text("shared\n")
    ws = client.create(f"sec-{uuid.uuid4().hex[:8]}", mounts=[f"{world_dir}:/d:ro"])
    try:
        ws.start()
        assert ws.exec(["cat", "/d/f"]).stdout == b"shared\n"
    finally:
        ws.remove(force=True)


def test_the_daemon_is_invisible_from_inside(ws: silo.Workspace, daemon: Daemon) -> None:
    assert daemon.proc is not None
    r = ws.exec(["ps", "-e", "-o", "pid=,comm="])
    seen = [line.split() for line in r.stdout.decode().splitlines()]
    assert seen[0] == ["1", "silo-init"], seen
    assert [comm for _, comm in seen[1:]] == ["ps"], seen
    r = sh(ws, f"cat /proc/1/comm; kill -0 {daemon.proc.pid} 2>&1; ls -d /proc/{daemon.proc.pid} 2>&1")
    text = r.stdout.decode()
    assert text.startswith("silo-init\n") and "No such process" in text and "No such file" in text, text


def test_an_exec_cannot_see_its_relay(ws: silo.Workspace) -> None:
    r = ws.exec(["grep", "PPid", "/proc/self/status"])
    assert r.stdout == b"PPid:\t0\n"
    r = ws.exec(["sh", "-c", "ps -e -o pid=,ppid=,comm="])
    rows = [line.split() for line in r.stdout.decode().splitlines()]
    by_comm = {comm: (int(pid), int(ppid)) for pid, ppid, comm in rows}
    assert sorted(by_comm) == ["ps", "sh", "silo-init"], rows  # nothing else: no relay in sight
    assert by_comm["silo-init"] == (1, 0) and by_comm["sh"][1] == 0 and by_comm["ps"][1] == by_comm["sh"][0]


@pytest.mark.parametrize("raw", ["..%2F..%2Fetc", "a%2Fb", "%2e%2e", "Upper", "x" * 64, "%C3%A9", "a%00b",
                                 "-x", ".hidden", "a..b", "%20"])
def test_hostile_names_in_api_paths_are_clear_refusals(daemon: Daemon, raw: str) -> None:
    with daemon.http() as h:
        for method, path in (("GET", f"/v1/workspaces/{raw}"), ("POST", f"/v1/workspaces/{raw}/start"),
                             ("DELETE", f"/v1/workspaces/{raw}"), ("DELETE", f"/v1/templates/{raw}")):
            r = h.request(method, path)
            assert r.status_code in (400, 404), (method, path, r.status_code, r.text)
            assert "Traceback" not in r.text
            if "/" not in raw.replace("%2F", "/"):  # a name reaches its route (else: no route, a plain 404)
                error = r.json()["error"]
                assert error["class"] in ("SpecError", "NotFoundError"), (path, error)
                assert "\n" not in error["message"]
        assert h.get("/v1/version").status_code == 200


def test_hostile_paths_in_file_requests_are_refused(ws: silo.Workspace, daemon: Daemon) -> None:
    with daemon.http() as h:
        for path in ("../../etc/shadow", "etc/shadow", "", "/etc/\0shadow"):
            r = h.get(f"/v1/workspaces/{ws.name}/files", params={"path": path})
            assert r.status_code == 400, (path, r.status_code, r.text)
            assert r.json()["error"]["message"].startswith("bad path"), r.text
        r = h.post(f"/v1/workspaces/{ws.name}/exec",
                   json={"argv": ["true"], "stdin": base64.b64encode(b"x").decode() + "!"})
        assert r.status_code == 400 and r.json()["error"]["class"] == "ProtocolError"
