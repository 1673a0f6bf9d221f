"""Networks without root (issue 4, requirement 2): pasta carries the traffic, the same policy holds.

The unprivileged test user (``silotest``) runs ``silo run`` and its own rootless silod
against the test world (tests/networld.py, built by root): each mode's allow/deny
matrix, the host's own addresses, rebinding, allow lists, publish, a live change that
cuts a held connection, counters, and cleanup (no pasta, keeper or helper left after
stop, rm and a daemon crash). The sandbox's own attempts to change its network are in
tests/security/test_network_escape.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from networld import (
    DNS4,
    LAN4,
    LAN6,
    META4,
    PUBLIC4,
    PUBLIC4_B,
    PUBLIC6,
    World,
    host_address,
    netprobe_argv,
    parse_netprobe,
    serve_8000,
)
from users import PYTHON, SILO, User, peer_pid, usable_by

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the test world needs root; the sandboxes run as silotest")

NAME = "silotest"


@pytest.fixture(scope="module")
def user(unpriv_src: Path) -> Iterator[User]:
    base = Path(tempfile.mkdtemp(prefix="silo-netuser-"))
    os.chmod(base, 0o711)
    try:
        u = User(NAME, base / NAME, unpriv_src)
        if not usable_by(NAME):
            pytest.skip(f"{NAME} cannot run {PYTHON} (is the checkout readable by other users?)")
        if shutil.which("pasta") is None:
            pytest.fail("pasta is missing: scripts/install.sh installs Debian's passt")
        yield u
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)


@pytest.fixture(scope="module")
def listener() -> Iterator[int]:
    """A TCP port the host listens on, on all its addresses."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 0))
        s.listen(8)
        yield s.getsockname()[1]


def leftovers(user: User) -> list[str]:
    """The user's pasta, keeper and helper processes."""
    out = subprocess.run(["pgrep", "-u", user.name, "-a", "-f", "pasta|silo.net.keeper"], capture_output=True,
                         text=True).stdout
    return [ln for ln in out.splitlines() if "pgrep" not in ln]


def parent(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(ln for ln in f if ln.startswith("PPid:")).split()[1])


def wait_no_leftovers(user: User, seconds: float = 10) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := leftovers(user)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def probe(user: User, mode: str, *checks: str, options: tuple[str, ...] = ()) -> dict[str, str]:
    r = user.silo("run", "--network", mode, "--dns", DNS4, *options, "--", *netprobe_argv(*checks, timeout=1.0))
    assert r.returncode == 0, r.stderr
    return parse_netprobe(r.stdout)


def blocked(result: str) -> bool:
    return result in ("refused", "timeout") or result.startswith("unreachable")


def user_may_ping(user: User) -> bool:
    """pasta carries ICMP echo on the host's ping sockets: only if the host lets the user make them."""
    with open("/proc/sys/net/ipv4/ping_group_range") as f:
        low, high = (int(x) for x in f.read().split())
    return low <= user.pw.pw_gid <= high


PUBLIC = [f"tcp:{PUBLIC4}:80", f"tcp:[{PUBLIC6}]:80", f"udp:{PUBLIC4}:7", f"udp:[{PUBLIC6}]:7",
          "dns:public.test", "tcp:public.test:80"]
PRIVATE = [f"tcp:{LAN4}:80", f"tcp:[{LAN6}]:80", f"udp:{LAN4}:7", f"udp:[{LAN6}]:7", f"icmp:{LAN4}", f"icmp:[{LAN6}]",
           f"tcp:{META4}:80", f"udp:{META4}:7", "udp:224.0.0.251:5353", "udp:255.255.255.255:7", "udp:[ff0e::1]:7"]


def test_internet_mode_without_root_reaches_public_addresses_only(world: World, user: User, listener: int) -> None:
    host = f"tcp:{host_address()}:{listener}"
    got = probe(user, "internet", *PUBLIC, *PRIVATE, f"icmp:{PUBLIC4}", host, f"tcp:127.0.0.1:{listener}",
                "dns:rebind.test", "dns:meta.test", "dns:mixed.test")
    for check in PUBLIC:
        assert got[check].startswith("ok"), (check, got)
    assert got["dns:public.test"] == f"ok:{PUBLIC6},{PUBLIC4}"
    for check in PRIVATE:
        assert blocked(got[check]), (check, got[check])
    assert got[host] == "refused", got  # the host's own address: pasta would reach it; the policy refuses
    assert blocked(got[f"tcp:127.0.0.1:{listener}"]), got  # the sandbox's loopback is its own
    assert not got["dns:rebind.test"].startswith("ok") and not got["dns:meta.test"].startswith("ok"), got
    assert got["dns:mixed.test"] == f"ok:{PUBLIC4}", got
    # ICMP echo to the public host: carried when the host lets the user ping, never the LAN's
    assert got[f"icmp:{PUBLIC4}"].startswith("ok") == user_may_ping(user), got


def test_allow_mode_without_root(world: World, user: User) -> None:
    before = World.dns_counts().get("public-b.test.", 0)
    got = probe(user, "allow", "tcp:public.test:80", f"tcp:{PUBLIC4_B}:80", f"udp:{PUBLIC4_B}:7",
                f"tcp:{PUBLIC4}:7", "dns:public-b.test", f"tcp:{LAN4}:80",
                options=("--allow", "public.test:80", "--allow", f"{PUBLIC4_B}/32:7/udp"))
    assert got["tcp:public.test:80"] == "ok", got
    assert got[f"udp:{PUBLIC4_B}:7"] == "ok", got
    assert got[f"tcp:{PUBLIC4_B}:80"] == "refused", got
    assert got[f"tcp:{PUBLIC4}:7"] == "refused", got  # the name's address, on a port not listed
    assert got["dns:public-b.test"] == "nxdomain", got
    assert blocked(got[f"tcp:{LAN4}:80"]), got
    assert World.dns_counts().get("public-b.test.", 0) == before  # a refused name never went upstream


def test_full_mode_without_root_reaches_the_lan_and_the_host(world: World, user: User, listener: int) -> None:
    host = f"tcp:{host_address()}:{listener}"
    got = probe(user, "full", f"tcp:{LAN4}:80", f"udp:[{LAN6}]:7", f"tcp:{META4}:80", host)
    assert all(v == "ok" for v in got.values()), got


def test_one_shot_runs_without_root_leave_nothing(world: World, user: User) -> None:
    got = probe(user, "internet", f"tcp:{PUBLIC4}:80", options=("--bandwidth", "50mbit"))
    assert got == {f"tcp:{PUBLIC4}:80": "ok"}
    assert wait_no_leftovers(user) == []
    r = user.silo("run", "--network", "internet", "--dns", DNS4, "--", "sh", "-c", "kill -9 $$")
    assert r.returncode != 0
    assert wait_no_leftovers(user) == []


# -- workspaces of a rootless silod ----------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(user: User) -> Iterator[User]:
    user.start_daemon()
    try:
        yield user
    finally:
        user.stop_daemon()
    assert wait_no_leftovers(user) == []


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def ws_probe(user: User, name: str, *checks: str) -> dict[str, str]:
    r = user.silo("exec", name, "--", *netprobe_argv(*checks, timeout=2.0))
    assert r.returncode == 0, r.stderr
    return parse_netprobe(r.stdout)


SERVE_8000 = serve_8000("127.0.0.1")


def test_a_rootless_workspace_publishes_changes_live_and_counts(world: World, daemon: User) -> None:
    user = daemon
    name = fresh("netrl")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = user.silo("create", name, "--network", "internet", "--dns", DNS4, "-p", f"{port}:8000")
    assert r.returncode == 0, r.stderr
    try:
        assert user.silo("start", name).returncode == 0
        # publish: a host port reaches the workspace's 127.0.0.1:8000
        assert user.silo("exec", name, "--", "sh", "-c", SERVE_8000).returncode == 0
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"GET /hostname HTTP/1.0\r\n\r\n")
            body = b"".join(iter(lambda: c.recv(4096), b""))
        assert body.endswith(f"{name}\n".encode()), body
        # a held connection the new policy forbids is cut; an allowed one is not
        hold = subprocess.Popen(user.argv([SILO, "exec", name, "--", *netprobe_argv(f"hold:{PUBLIC4}:9000:8")]),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
        kept = subprocess.Popen(user.argv([SILO, "exec", name, "--", *netprobe_argv(f"hold:{PUBLIC4_B}:9000:3")]),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
        try:
            assert hold.stdout is not None and kept.stdout is not None
            assert json.loads(hold.stdout.readline()) == {"hold": "connected"}
            assert json.loads(kept.stdout.readline()) == {"hold": "connected"}
            r = user.silo("network", "set", name, "allow", "--allow", f"{PUBLIC4_B}/32")
            assert r.returncode == 0, r.stderr
            out, _ = hold.communicate(timeout=30)
            assert parse_netprobe(out)[f"hold:{PUBLIC4}:9000:8"].startswith("cut:"), out
            out, _ = kept.communicate(timeout=30)
            assert parse_netprobe(out)[f"hold:{PUBLIC4_B}:9000:3"] == "ok", out
        finally:
            for proc in (hold, kept):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        got = ws_probe(user, name, f"tcp:{PUBLIC4}:80", f"tcp:{PUBLIC4_B}:80", f"tcp:{LAN4}:80")
        assert got == {f"tcp:{PUBLIC4}:80": "refused", f"tcp:{PUBLIC4_B}:80": "ok", f"tcp:{LAN4}:80": "refused"}
        info = json.loads(user.silo("inspect", name).stdout)["network"]
        assert info["mode"] == "allow" and info["address"]["ipv4"] == "10.213.255.250", info
        assert info["bytes_out"] > 0 and info["bytes_in"] > 0, info
        refused = {(x["destination"], x["protocol"], x.get("port")) for x in info["refused"]}
        assert {(PUBLIC4, "tcp", 80), (LAN4, "tcp", 80)} <= refused, info
        # to none, live: nothing but loopback, and the published port is closed
        assert user.silo("network", "set", name, "none").returncode == 0
        assert ws_probe(user, name, f"tcp:{PUBLIC4_B}:80")[f"tcp:{PUBLIC4_B}:80"] in ("refused", "reset")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        assert user.silo("stop", name).returncode == 0
        assert wait_no_leftovers(user) == []
    finally:
        user.silo("rm", "-f", name)
    assert wait_no_leftovers(user) == []


def test_rootless_links_are_refused_clearly(daemon: User) -> None:
    r = daemon.silo("create", fresh("netlink"), "--network", "internet", "--link", "other")
    assert r.returncode != 0
    assert r.stderr.strip() == "silo: links between workspaces need root: run silod as root, or drop --link", r


def test_a_rootless_daemon_crash_leaves_nothing(world: World, daemon: User) -> None:
    user = daemon
    name = fresh("netcrash")
    assert user.silo("create", name, "--network", "internet", "--dns", DNS4).returncode == 0
    try:
        assert user.silo("start", name).returncode == 0
        assert len(leftovers(user)) == 3  # keeper, its helper, pasta
        # the keeper alone killed: its helper kills pasta; both killed: silod does
        keepers = {int(ln.split()[0]) for ln in leftovers(user) if "silo.net.keeper" in ln}
        keeper = next(pid for pid in keepers if parent(pid) not in keepers)  # not its forked helper
        os.kill(keeper, signal.SIGKILL)
        assert [ln for ln in wait_no_leftovers(user) if "pasta" in ln] == []
        assert user.silo("stop", name).returncode == 0
        assert user.silo("start", name).returncode == 0
        subprocess.run(["pkill", "-9", "-u", user.name, "-f", "silo.net.keeper"], check=False)
        assert user.silo("stop", name).returncode == 0
        assert wait_no_leftovers(user) == []
        assert user.silo("start", name).returncode == 0
        os.kill(peer_pid(user.socket), signal.SIGKILL)  # silod: the keeper sees its socket close
        assert wait_no_leftovers(user) == []
        # the CLI starts a new silod on demand, as it would for the user (stop_daemon stops it)
        assert user.silo("start", name).returncode == 0
        assert ws_probe(user, name, f"tcp:{PUBLIC4}:80") == {f"tcp:{PUBLIC4}:80": "ok"}
    finally:
        user.silo("rm", "-f", name)
    assert wait_no_leftovers(user) == []
