"""Networks at isolation gvisor (issue 6, requirement 2): runsc's netstack sits one hop
behind the sandbox's namespace, as a vm level's guest does, so the process level's
policy holds for it.

runsc runs in a network namespace of its own (its user namespace owns it: runsc takes
the link over with packet sockets), linked by a veth to the keeper's namespace, where
the policy's table forwards, checks and masquerades what the Sentry sends. The test
world (tests/networld.py) stands in for the LAN and the internet; nothing leaves the
machine. As at the vm level, a refused UDP or ICMP packet comes back as an ICMP
"administratively prohibited", which the Sentry reports as EHOSTUNREACH, where a
process-level sandbox gets EPERM; both count as blocked.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest
from daemons import REPO, Daemon, private_client

import silo
from networld import (
    DNS4,
    LAN4,
    LAN6,
    META4,
    NOTHING,
    PUBLIC4,
    PUBLIC4_B,
    PUBLIC6,
    World,
    blocked,
    host_address,
    http_get,
    net_leftovers,
    netprobe_argv,
    parse_netprobe,
    probe_in,
    serve_8000,
)

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="gvisor networks and the test world need root")]

SILO = str(REPO / ".venv" / "bin" / "silo")
PROBE_TIMEOUT = 1.5


def runsc_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if "runsc" in line.split(" ")[0]]


def leftovers() -> dict[str, object]:
    deadline = time.monotonic() + 10
    while (net_leftovers() != NOTHING or runsc_processes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return {**net_leftovers(), "runsc": runsc_processes()}


def gvisor_run(mode: str, *argv: str, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SILO, "run", "--isolation", "gvisor", "--network", mode, "--dns", DNS4, *options,
                           "--", *argv], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def run_probe(mode: str, *checks: str, options: tuple[str, ...] = ()) -> dict[str, str]:
    r = gvisor_run(mode, *netprobe_argv(*checks, timeout=PROBE_TIMEOUT), options=options)
    assert r.returncode == 0, r.stderr
    return parse_netprobe(r.stdout)


def test_a_one_shot_gvisor_run_gets_the_internet_policy(world: World) -> None:
    host = host_address()
    got = run_probe("internet", f"tcp:{PUBLIC4}:80", f"tcp:[{PUBLIC6}]:80", f"udp:{PUBLIC4}:7",
                    f"icmp:{PUBLIC4}", "dns:public.test", f"tcp:{LAN4}:80", f"tcp:[{LAN6}]:80", f"udp:{LAN4}:7",
                    f"icmp:{LAN4}", f"tcp:{META4}:80", "dns:rebind.test", "dns:mixed.test", f"tcp:{host}:22")
    for check in (f"tcp:{PUBLIC4}:80", f"tcp:[{PUBLIC6}]:80", f"udp:{PUBLIC4}:7", f"icmp:{PUBLIC4}"):
        assert got[check] == "ok", (check, got)
    assert got["dns:public.test"] == f"ok:{PUBLIC6},{PUBLIC4}", got  # silo's resolver, on the link's far end
    for check in (f"tcp:{LAN4}:80", f"tcp:[{LAN6}]:80", f"udp:{LAN4}:7", f"icmp:{LAN4}", f"tcp:{META4}:80"):
        assert blocked(got[check]), (check, got)
    assert got[f"tcp:{LAN4}:80"] == "refused", got  # TCP reset by the namespace's policy
    assert not got["dns:rebind.test"].startswith("ok") and got["dns:mixed.test"] == f"ok:{PUBLIC4}", got
    assert got[f"tcp:{host}:22"] == "timeout", got  # the host itself: dropped on the host's side
    assert leftovers() == {**NOTHING, "runsc": []}


def test_a_one_shot_gvisor_run_in_allow_mode_reaches_only_what_is_listed(world: World) -> None:
    got = run_probe("allow", "tcp:public.test:80", f"tcp:{PUBLIC4_B}:80", f"tcp:{PUBLIC4_B}:7",
                    "dns:public-b.test", options=("--allow", "public.test", "--allow", f"{PUBLIC4_B}/32:7"))
    assert got == {"tcp:public.test:80": "ok", f"tcp:{PUBLIC4_B}:80": "refused", f"tcp:{PUBLIC4_B}:7": "ok",
                   "dns:public-b.test": "nxdomain"}, got


def test_runsc_holds_the_link_not_the_policy(world: World) -> None:
    # runsc's namespace holds only the veth's far end; the policy's table is in the
    # keeper's namespace, which runsc's user namespace does not own: the Sentry's root
    # with every capability changes nothing there.
    r = gvisor_run("internet", "sh", "-c", "cat /proc/net/dev; cat /etc/resolv.conf")
    assert r.returncode == 0, r.stderr
    assert "eth0" in r.stdout and "nameserver 10.213.255.253" in r.stdout, r.stdout
    script = shlex.join(netprobe_argv(f"tcp:{LAN4}:80", f"tcp:{PUBLIC4}:80", timeout=PROBE_TIMEOUT))
    r = gvisor_run("internet", "sh", "-c", script, options=("--cap", "NET_RAW"))
    assert r.returncode == 0, r.stderr
    got = parse_netprobe(r.stdout)
    assert got == {f"tcp:{LAN4}:80": "refused", f"tcp:{PUBLIC4}:80": "ok"}, got


@pytest.fixture
def client(world: World) -> Iterator[silo.Client]:
    with private_client() as c:
        yield c
    assert leftovers() == {**NOTHING, "runsc": []}


SERVE_8000 = serve_8000("0.0.0.0", tries=400)


def test_a_gvisor_workspace_network_policy_publish_links_live_changes_and_cleanup(client: silo.Client) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name = f"gvnet-{uuid.uuid4().hex[:6]}"
    ws = client.create(name, isolation="gvisor", network="internet", dns=[DNS4], publish=[f"{port}:8000"])
    ws.start()
    got = probe_in(ws, f"http:{PUBLIC4}:80", f"tcp:{LAN4}:80", "dns:public.test", timeout=PROBE_TIMEOUT)
    assert got == {f"http:{PUBLIC4}:80": f"ok:hello from {PUBLIC4}", f"tcp:{LAN4}:80": "refused",
                   "dns:public.test": f"ok:{PUBLIC6},{PUBLIC4}"}, got
    net = ws.info().network
    assert net is not None and net["bytes_out"] > 0 and net["bytes_in"] > 0, net
    assert (LAN4, "tcp", 80) in {(r["destination"], r["protocol"], r.get("port")) for r in net["refused"]}, net
    # a published port reaches the Sentry's service from the host
    assert ws.exec(["sh", "-c", SERVE_8000]).exit_code == 0
    assert http_get(port, "/hostname").endswith(f"{name}\n".encode())
    # a process-level workspace linked to it reaches it by name, at the lease address
    app = client.create("app", network="internet", dns=[DNS4], links=[name])
    app.start()
    addr4 = net["address"]["ipv4"]
    got = probe_in(app, f"tcp:{addr4}:8000", f"dns:{name}", timeout=PROBE_TIMEOUT)
    assert got[f"tcp:{addr4}:8000"] == "ok" and got[f"dns:{name}"].startswith(f"ok:{addr4}"), got
    # a live change holds at once, no restart
    ws.set_network("allow", allow=[f"{PUBLIC4_B}/32"])
    got = probe_in(ws, f"tcp:{PUBLIC4}:80", f"tcp:{PUBLIC4_B}:80", timeout=PROBE_TIMEOUT)
    assert got == {f"tcp:{PUBLIC4}:80": "refused", f"tcp:{PUBLIC4_B}:80": "ok"}, got
    app.remove(force=True)
    ws.stop()
    assert leftovers() == {**NOTHING, "runsc": []}  # the keeper took its namespace, veth and lease
    ws.start()  # and the next start links a new namespace
    assert probe_in(ws, f"tcp:{PUBLIC4_B}:80", timeout=PROBE_TIMEOUT) == {f"tcp:{PUBLIC4_B}:80": "ok"}
    ws.stop()


def test_a_daemon_crash_leaves_no_gvisor_network(client: silo.Client) -> None:
    d: Daemon = client.daemon  # type: ignore[attr-defined]
    ws = client.create("gvcrash", isolation="gvisor", network="internet", dns=[DNS4])
    ws.start()
    assert net_leftovers()["links"] and runsc_processes()
    d.kill()  # SIGKILL: runsc dies with the workspace's init, the keeper at its socket's EOF
    assert leftovers() == {**NOTHING, "runsc": []}
    d.start()
    with silo.Client(d.socket, autostart=False) as c2:
        again = c2.get("gvcrash")
        again.start()
        assert probe_in(again, f"tcp:{PUBLIC4}:80", timeout=PROBE_TIMEOUT) == {f"tcp:{PUBLIC4}:80": "ok"}
        again.remove(force=True)


def test_snapshot_memory_of_a_workspace_with_a_network(client: silo.Client) -> None:
    """A saved service resumes behind a new link, at the same address and published port.
    gVisor saves no TCP connection but over loopback, and a failed save ends the sandbox:
    silo refuses while one is open (read from the Sentry's /proc/net/tcp), and the
    workspace runs on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ws = client.create("gvsave", isolation="gvisor", network="internet", dns=[DNS4], publish=[f"{port}:8000"])
    ws.start()
    assert ws.exec(["sh", "-c", SERVE_8000]).exit_code == 0
    address = (ws.info().network or {})["address"]
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        time.sleep(0.5)
        with pytest.raises(silo.WorkspaceStateError, match=r"^workspace 'gvsave' has 1 open TCP connection, and "
                                                             r"gVisor cannot save those: close it and try again"):
            ws.snapshot("busy", memory=True)
        assert ws.info().state.value == "running"
    time.sleep(0.5)  # the host closed first: the Sentry's end is closed, not in TIME_WAIT
    assert ws.snapshot("served", memory=True).memory
    # the same server process answers behind the new link
    assert http_get(port, "/hostname").endswith(b"gvsave\n")
    assert ws.info().network["address"] == address  # type: ignore[index]
    assert probe_in(ws, f"tcp:{PUBLIC4}:80", f"tcp:{LAN4}:80", timeout=PROBE_TIMEOUT) == {
        f"tcp:{PUBLIC4}:80": "ok", f"tcp:{LAN4}:80": "refused"}
    assert [s.tag for s in ws.snapshots()] == ["served"]
    ws.stop()
    assert leftovers() == {**NOTHING, "runsc": []}
    ws.restore("served")
    ws.start()
    assert http_get(port, "/hostname").endswith(b"gvsave\n")
    ws.remove(force=True)
