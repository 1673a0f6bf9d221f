"""Workspaces and users (issue 3): rootless daemons of two users, and a root daemon's peer rule.

* ``silotest`` and ``silotest2`` (created here when missing) each run their own rootless
  silod (``runuser``, a clean environment, private state and socket dirs); one user's
  workspaces are unreachable and invisible to the other.
* A root silod of the test, its sockets loosened to 0666 by the test (a stand-in for the
  ``silo`` group of /run/silod): a non-root client sees and touches only its own
  workspaces, whatever it asks for (SECURITY.md #21).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemons import Daemon, private_daemon
from procs import comm

import silo
from users import PYTHON, User, usable_by

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.skip("the users tests create users and run daemons as them", allow_module_level=True)

USERS = ("silotest", "silotest2")


@pytest.fixture(scope="module")
def users(unpriv_src: Path) -> Iterator[tuple[User, User]]:
    base = Path(tempfile.mkdtemp(prefix="silo-users-"))
    os.chmod(base, 0o711)
    made = []
    try:
        for name in USERS:
            user = User(name, base / name, unpriv_src)
            if not usable_by(name):
                pytest.skip(f"{name} cannot run {PYTHON} (is the checkout readable by other users?)")
            user.start_daemon()
            made.append(user)
        yield made[0], made[1]
    finally:
        for user in made:
            user.stop_daemon()
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def listing(user: User) -> list[dict[str, Any]]:
    r = user.silo("ls", "--json")
    assert r.returncode == 0, r
    return list(json.loads(r.stdout))


def host_uids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("Uid:"))
    return [int(x) for x in line.split()[1:]]


# -- two rootless users --------------------------------------------------------------------------


def test_a_user_runs_a_rootless_workspace(users: tuple[User, User]) -> None:
    alice, _ = users
    name = fresh("alice")
    assert alice.silo("create", name).returncode == 0
    try:
        assert alice.silo("start", name).returncode == 0
        r = alice.silo("exec", name, "--", "sh", "-c", "id -u; echo hi > /root/f; cat /root/f")
        assert (r.returncode, r.stdout) == (0, "0\nhi\n"), r
        info = next(w for w in listing(alice) if w["name"] == name)
        assert (info["owner"], info["state"]) == (alice.uid, "running")
        assert comm(info["pid"]) == "silo-init"
        assert host_uids(info["pid"]) == [alice.uid] * 4  # root inside is the user outside
        written = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(alice.state, "workspaces", name))
                   for f in fs if f == "f"]
        assert written and all(os.stat(p).st_uid == alice.uid for p in written)
        assert alice.silo("stop", name).returncode == 0
        assert alice.silo("start", name).returncode == 0
        assert alice.silo("exec", name, "--", "cat", "/root/f").stdout == "hi\n"
    finally:
        alice.silo("rm", "-f", name)


CONNECT = """
import socket, sys
for path, kind in ((sys.argv[1], socket.SOCK_STREAM), (sys.argv[2], socket.SOCK_SEQPACKET)):
    s = socket.socket(socket.AF_UNIX, kind)
    try:
        s.connect(path)
        print("connected")
    except OSError as e:
        print(type(e).__name__, e.errno)
"""


def test_another_user_cannot_reach_a_users_daemon(users: tuple[User, User]) -> None:
    alice, bob = users
    name = fresh("alice")
    assert alice.silo("create", name).returncode == 0
    try:
        r = bob.run_cmd([PYTHON, "-c", CONNECT, alice.socket, os.path.join(alice.run, "exec.sock")])
        assert r.stdout.split("\n")[:2] == ["PermissionError 13", "PermissionError 13"], r
        for argv in (("ls", "--json"), ("inspect", name), ("exec", name, "--", "true"), ("rm", "-f", name)):
            r = bob.silo(*argv, SILO_DAEMON_DIR=alice.run)
            # refused as not allowed (6; 125 for exec, whose own codes are the command's), and no
            # daemon of bob's started in alice's directory
            assert r.returncode == (125 if argv[0] == "exec" else 6), r
            assert r.stderr == f"silo: you may not use silod at {alice.socket}: it is another user's; use your own " \
                               "(unset SILO_DAEMON_DIR), or ask for the group of the system daemon ('silo')\n", r
            assert name not in r.stdout
        assert name in [w["name"] for w in listing(alice)]
    finally:
        alice.silo("rm", "-f", name)


def test_users_do_not_see_each_others_workspaces(users: tuple[User, User]) -> None:
    alice, bob = users
    name = fresh("same")
    assert alice.silo("create", name).returncode == 0
    try:
        assert name not in [w["name"] for w in listing(bob)]
        assert bob.silo("inspect", name).stderr == f"silo: no workspace named '{name}': see 'silo ls'\n"
        # the same name is free in bob's daemon, and it is bob's own workspace
        assert bob.silo("create", name).returncode == 0
        for user, word in ((alice, "alice"), (bob, "bob")):
            assert user.silo("start", name).returncode == 0
            assert user.silo("exec", name, "--", "sh", "-c", f"echo {word} > /root/who").returncode == 0
        assert alice.silo("exec", name, "--", "cat", "/root/who").stdout == "alice\n"
        assert bob.silo("exec", name, "--", "cat", "/root/who").stdout == "bob\n"
        owners = {u.name: next(w["owner"] for w in listing(u) if w["name"] == name) for u in (alice, bob)}
        assert owners == {alice.name: alice.uid, bob.name: bob.uid}
    finally:
        alice.silo("rm", "-f", name)
        bob.silo("rm", "-f", name)


# -- a root daemon and a non-root client ---------------------------------------------------------

API = """
import json, sys
import httpx
req = json.load(sys.stdin)
out = []
with httpx.Client(transport=httpx.HTTPTransport(uds=req["socket"]), base_url="http://silod", timeout=60) as h:
    for method, path, body in req["calls"]:
        r = h.request(method, path, json=body)
        try:
            data = r.json()
        except ValueError:
            data = r.text
        out.append([r.status_code, data])
print(json.dumps(out))
"""

EXEC = r"""
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
null = os.open(os.devnull, os.O_RDWR)
socket.send_fds(s, [b"name\0" + sys.argv[2].encode() + b"\0arg\0id\0"], [null, null, null])
print(s.recv(4096).decode())
"""


@pytest.fixture(scope="module")
def root_daemon() -> Iterator[Daemon]:
    with private_daemon() as d:
        os.chmod(d.sockets, 0o711)
        for sock in ("silod.sock", "exec.sock"):
            os.chmod(os.path.join(d.sockets, sock), 0o666)
        yield d


@pytest.fixture(scope="module")
def roots(root_daemon: Daemon) -> Iterator[silo.Workspace]:
    """A running workspace of root's, holding a secret, in the root daemon."""
    with silo.Client(root_daemon.socket, autostart=False) as client:
        ws = client.create(fresh("root"))
        try:
            ws.start()
            assert ws.exec(["sh", "-c", "echo root-secret > /root/secret"]).exit_code == 0
            yield ws
        finally:
            ws.remove(force=True)


@pytest.fixture(scope="module")
def guest(users: tuple[User, User]) -> User:
    return users[0]


def api_as(user: User, daemon: Daemon, *calls: tuple[str, str, object]) -> list[tuple[int, Any]]:
    r = user.run_cmd([PYTHON, "-c", API], stdin=json.dumps({"socket": daemon.socket, "calls": calls}))
    assert r.returncode == 0, r.stderr[-2000:]
    return [(status, body) for status, body in json.loads(r.stdout)]


def test_a_non_root_client_sees_none_of_roots_workspaces(root_daemon: Daemon, roots: silo.Workspace,
                                                        guest: User) -> None:
    name = roots.name
    missing = {"error": {"class": "NotFoundError", "message": f"no workspace named '{name}': see 'silo ls'"}}
    ws = f"/v1/workspaces/{name}"
    replies = api_as(guest, root_daemon,
                     ("GET", "/v1/workspaces", None), ("GET", ws, None), ("POST", f"{ws}/stop", None),
                     ("POST", f"{ws}/exec", {"argv": ["cat", "/root/secret"]}), ("GET", f"{ws}/files?path=/root", None),
                     ("GET", f"{ws}/snapshots", None), ("GET", f"{ws}/diff", None), ("GET", f"{ws}/logs", None),
                     ("GET", f"{ws}/export", None), ("POST", f"{ws}/fork", {"name": fresh("stolen")}),
                     ("POST", "/v1/templates", {"name": fresh("stolen"), "from": name}), ("DELETE", ws, None))
    assert replies[0] == (200, [])
    for reply in replies[1:]:
        assert reply == (404, missing)
    r = guest.run_cmd([PYTHON, "-c", EXEC, os.path.join(root_daemon.sockets, "exec.sock"), name])
    assert r.stdout.strip() == f"error NotFoundError no workspace named '{name}': see 'silo ls'", r
    info = roots.info()
    assert info.state.value == "running" and roots.exec(["cat", "/root/secret"]).stdout == b"root-secret\n"
    everything = silo.Client(root_daemon.socket, autostart=False).list()
    assert [w.name for w in everything if w.name.startswith("stolen")] == []


def test_a_non_root_client_has_its_own_workspaces(root_daemon: Daemon, roots: silo.Workspace, guest: User) -> None:
    name = fresh("guest")
    ws = f"/v1/workspaces/{name}"
    try:
        (created, started, ran, listed) = api_as(
            guest, root_daemon, ("POST", "/v1/workspaces", {"spec": {"name": name}}), ("POST", f"{ws}/start", None),
            ("POST", f"{ws}/exec", {"argv": ["sh", "-c", "id -u; ls /root"]}), ("GET", "/v1/workspaces", None))
        assert created[0] == 201 and created[1]["owner"] == guest.uid
        assert started[0] == 200 and started[1]["state"] == "running"
        assert ran[0] == 200 and ran[1]["exit_code"] == 0
        assert [w["name"] for w in listed[1]] == [name]
        pid = started[1]["pid"]
        assert comm(pid) == "silo-init" and 0 not in host_uids(pid)  # never host root, even from a root daemon
        everything = {w.name: w.owner for w in silo.Client(root_daemon.socket, autostart=False).list()}
        assert everything[name] == guest.uid and everything[roots.name] == 0
    finally:
        api_as(guest, root_daemon, ("DELETE", f"{ws}?force=true", None))


def test_a_non_root_client_maps_only_its_own_folders(root_daemon: Daemon, guest: User) -> None:
    mine, roots_dir = Path(tempfile.mkdtemp(prefix="silo-guest-")), Path(tempfile.mkdtemp(prefix="silo-root-"))
    try:
        os.chown(mine, guest.uid, guest.pw.pw_gid)
        os.chmod(roots_dir, 0o755)
        name = fresh("guest")
        (refused, made) = api_as(
            guest, root_daemon,
            ("POST", "/v1/workspaces", {"spec": {"name": name, "mount": [f"{roots_dir}:/data"]}}),
            ("POST", "/v1/workspaces", {"spec": {"name": name, "mount": [f"{mine}:/data"]}}))
        assert refused == (403, {"error": {"class": "PermissionDenied", "message":
                                           f"cannot map {roots_dir}: it is not yours (uid {guest.uid})"}})
        assert made[0] == 201
        api_as(guest, root_daemon, ("DELETE", f"/v1/workspaces/{name}", None))
    finally:
        shutil.rmtree(mine, ignore_errors=True)
        shutil.rmtree(roots_dir, ignore_errors=True)


@pytest.fixture
def roots_template(root_daemon: Daemon, roots: silo.Workspace) -> Iterator[str]:
    """A template root made from a stopped copy of root's workspace (it holds root's secret)."""
    with silo.Client(root_daemon.socket, autostart=False) as client:
        copy = fresh("rootcopy")
        roots.stop()
        try:
            client.get(roots.name).fork(copy)
            tname = fresh("roott")
            client.create_template(tname, from_=copy)
            yield tname
        finally:
            roots.start()
            for name in (copy,):
                with contextlib.suppress(silo.NotFoundError):
                    client.get(name).remove(force=True)
            with contextlib.suppress(silo.NotFoundError):
                client.remove_template(tname)


def test_a_non_root_client_cannot_remove_roots_template(root_daemon: Daemon, roots_template: str,
                                                        guest: User) -> None:
    [(status, _), (_, listed)] = api_as(guest, root_daemon, ("DELETE", f"/v1/templates/{roots_template}", None),
                                        ("GET", "/v1/templates", None))
    assert status in (403, 404)
    assert roots_template not in json.dumps(listed), "another's template is listed"
    assert roots_template in [t.name for t in silo.Client(root_daemon.socket, autostart=False).templates()]


def test_a_non_root_client_cannot_read_roots_template(root_daemon: Daemon, roots_template: str,
                                                      guest: User) -> None:
    name = fresh("guest")
    ws = f"/v1/workspaces/{name}"
    try:
        spec = {"name": name, "root": roots_template}
        replies = api_as(guest, root_daemon, ("POST", "/v1/workspaces", {"spec": spec}),
                         ("POST", f"{ws}/start", None), ("POST", f"{ws}/exec", {"argv": ["cat", "/root/secret"]}))
        assert replies[0][0] in (403, 404), replies
        assert "cm9vdC1zZWNyZXQK" not in json.dumps(replies)  # base64 of root's secret
    finally:
        api_as(guest, root_daemon, ("DELETE", f"{ws}?force=true", None))
