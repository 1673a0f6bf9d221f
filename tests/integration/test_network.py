"""Network policies (issue 4) against a test world built on this machine (tests/networld.py).

The world: a "public" host at 203.0.113.10/.20 and 2001:db8:113::10/::20 serving HTTP
(80), echo (7, TCP and UDP), a hold server (9000) and DNS; a "LAN" host at
192.168.77.10 / fd77:77::10; "metadata" at 169.254.169.254. Nothing leaves the machine:
every sandbox's resolver is pointed at the world's DNS with ``--dns``.

Each mode's full allow/deny matrix is asserted from inside a one-shot sandbox (TCP,
UDP, ICMP, DNS, IPv4 and IPv6); workspaces add live policy changes (a held connection
is cut), published ports, links, counters and cleanup after stop, rm and a daemon crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from daemons import REPO, Daemon, private_daemon

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
    net_leftovers,
    netprobe_argv,
    parse_netprobe,
    probe_in,
    serve_8000,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the test world needs root")

SILO = str(REPO / ".venv" / "bin" / "silo")


def run_probe(mode: str, *checks: str, options: tuple[str, ...] = (), timeout: float = 1.0) -> dict[str, str]:
    dns = () if mode == "none" else ("--dns", DNS4)
    r = subprocess.run([SILO, "run", "--network", mode, *dns, *options, "--", *netprobe_argv(*checks, timeout=timeout)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return parse_netprobe(r.stdout)


MATRIX = [f"tcp:{PUBLIC4}:80", f"tcp:[{PUBLIC6}]:80", f"udp:{PUBLIC4}:7", f"udp:[{PUBLIC6}]:7",
          f"icmp:{PUBLIC4}", f"icmp:[{PUBLIC6}]", "dns:public.test", "tcp:public.test:80",
          f"tcp:{LAN4}:80", f"tcp:[{LAN6}]:80", f"udp:{LAN4}:7", f"udp:[{LAN6}]:7", f"icmp:{LAN4}", f"icmp:[{LAN6}]",
          f"tcp:{META4}:80", f"udp:{META4}:7", "dns:rebind.test", "dns:meta.test", "dns:mixed.test",
          "udp:224.0.0.251:5353", "udp:255.255.255.255:7", "udp:[ff0e::1]:7"]


def test_internet_mode_reaches_public_addresses_only(world: World) -> None:
    got = run_probe("internet", *MATRIX, f"tcp:{host_address()}:22", f"tcp:{host_address()}:{silod_port()}")
    for check in MATRIX[:8]:
        assert got[check].startswith("ok"), (check, got)
    assert got["dns:public.test"] == f"ok:{PUBLIC6},{PUBLIC4}"
    for check in MATRIX[8:16] + MATRIX[19:]:
        assert blocked(got[check]), (check, got[check])
    # DNS rebinding: the private answers are stripped; only the public one is left
    assert not got["dns:rebind.test"].startswith("ok"), got
    assert not got["dns:meta.test"].startswith("ok"), got
    assert got["dns:mixed.test"] == f"ok:{PUBLIC4}", got
    # the host's own addresses: silently dropped at the host (no service answers)
    for check, result in got.items():
        if check.startswith(f"tcp:{host_address()}"):
            assert result == "timeout", (check, result)


def silod_port() -> int:
    """A TCP port the host listens on (on all addresses) during the test."""
    return _LISTENER.getsockname()[1]


_LISTENER = socket.socket()
_LISTENER.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
_LISTENER.bind(("0.0.0.0", 0))
_LISTENER.listen(8)


def test_the_host_listener_is_reachable_from_the_host_itself() -> None:
    # the control for the "host's own addresses are dropped" assertions above and below
    with socket.create_connection((host_address(), silod_port()), timeout=2):
        pass


def test_allow_mode_reaches_only_the_listed_names_networks_and_ports(world: World) -> None:
    before = World.dns_counts()
    got = run_probe("allow", "tcp:public.test:80", "dns:cname.test", f"tcp:{PUBLIC4}:7", f"tcp:{PUBLIC4_B}:7",
                    f"udp:{PUBLIC4_B}:7", f"tcp:{PUBLIC4_B}:80", "dns:public-b.test", f"tcp:{LAN4}:80",
                    f"tcp:{META4}:80", f"icmp:{PUBLIC4_B}", "dns:rebind.test", f"tcp:{host_address()}:{silod_port()}",
                    options=("--allow", "public.test", "--allow", "cname.test", "--allow", "rebind.test",
                             "--allow", f"{PUBLIC4_B}/32:7"))
    assert got["tcp:public.test:80"] == "ok", got  # resolved through silo's resolver, then pinned
    assert got["dns:cname.test"] == f"ok:{PUBLIC6},{PUBLIC4}", got  # the CNAME's target comes with it
    assert got[f"tcp:{PUBLIC4_B}:7"] == "ok" and got[f"udp:{PUBLIC4_B}:7"] == "ok", got  # a CIDR with its port
    assert got[f"tcp:{PUBLIC4_B}:80"] == "refused", got  # ... and no other port
    assert got["dns:public-b.test"] == "nxdomain", got  # a name not listed is not resolved
    assert blocked(got[f"tcp:{LAN4}:80"]) and blocked(got[f"tcp:{META4}:80"]), got
    assert blocked(got[f"icmp:{PUBLIC4_B}"]), got
    assert not got["dns:rebind.test"].startswith("ok"), got  # allowed name, private answer: stripped
    assert blocked(got[f"tcp:{host_address()}:{silod_port()}"]), got
    after = World.dns_counts()
    assert after.get("public-b.test.", 0) == before.get("public-b.test.", 0)  # never forwarded


def test_allow_mode_refuses_an_address_nobody_resolved(world: World) -> None:
    # public.test's address, connected to without asking silo's resolver first
    got = run_probe("allow", f"tcp:{PUBLIC4}:80", f"udp:{PUBLIC4}:7", options=("--allow", "public.test"))
    assert got == {f"tcp:{PUBLIC4}:80": "refused", f"udp:{PUBLIC4}:7": "unreachable:EPERM"}, got


def test_allow_mode_port_of_a_name(world: World) -> None:
    got = run_probe("allow", "tcp:public.test:80", "tcp:public.test:7", options=("--allow", "public.test:7"))
    assert got == {"tcp:public.test:80": "refused", "tcp:public.test:7": "ok"}, got


def test_full_mode_reaches_the_lan_too(world: World) -> None:
    got = run_probe("full", *MATRIX[:16])
    for check in MATRIX[:16]:
        assert got[check].startswith("ok"), (check, got)


def test_none_mode_is_loopback_only(world: World) -> None:
    got = run_probe("none", f"tcp:{PUBLIC4}:80", f"tcp:[{PUBLIC6}]:80", f"udp:{PUBLIC4}:7", f"tcp:{LAN4}:80",
                    "dns:public.test")
    assert got[f"tcp:{PUBLIC4}:80"] == "unreachable:ENETUNREACH"
    assert got[f"tcp:[{PUBLIC6}]:80"] == "unreachable:ENETUNREACH"
    assert got["dns:public.test"].startswith("dnsfail"), got


def test_bad_network_options_are_one_line_errors() -> None:
    for args, message in (
        (["--network", "lan"], "unknown network mode 'lan': use one of none, internet, allow, full"),
        (["--network", "internet", "--allow", "x.org"], "--allow needs the allow mode, not 'internet': "
                                                        "use --network allow"),
        (["--allow", "a b"], "bad --allow 'a b': use a domain name, an address or a network, with an optional "
                             ":PORT, like example.org:443"),
        (["-p", "8080:80/udp"], "bad publish '8080:80/udp': only TCP ports can be published"),
        (["--network", "none", "-p", "8080:80"], "publish needs a network: add --network internet (or allow, full)"),
        (["--bandwidth", "fast"], "bad bandwidth 'fast': use a rate like 10mbit (kbit, mbit or gbit)"),
    ):
        r = subprocess.run([SILO, "run", *args, "--", "true"], capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stderr) == (125, f"silo: {message}\n"), (args, r)
    assert net_leftovers() == NOTHING


def test_one_shot_runs_leave_nothing(world: World) -> None:
    for mode in ("internet", "allow", "full"):
        r = subprocess.run([SILO, "run", "--network", mode, "--", "true"], capture_output=True, timeout=60)
        assert r.returncode == 0, r
    assert net_leftovers() == NOTHING


def test_a_published_port_that_is_taken_is_refused_and_leaves_nothing() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        r = subprocess.run([SILO, "run", "--network", "internet", "-p", f"{port}:80", "--", "true"],
                           capture_output=True, text=True, timeout=60)
    finally:
        taken.close()
    assert r.returncode == 125 and f"port {port} on 127.0.0.1 is taken" in r.stderr and r.stderr.count("\n") == 1, r
    assert net_leftovers() == NOTHING


# -- workspaces ---------------------------------------------------------------------------------


@pytest.fixture
def client(daemon: Daemon) -> Iterator[silo.Client]:
    with silo.Client(daemon.socket, autostart=False) as c:
        names: list[str] = []
        c.made = names  # type: ignore[attr-defined]
        yield c
        for name in names:
            with contextlib.suppress(silo.SiloError):
                c.get(name).remove(force=True)
    assert net_leftovers() == NOTHING


def make(client: silo.Client, name: str, **options: Any) -> silo.Workspace:
    client.made.append(name)  # type: ignore[attr-defined]
    ws = client.create(name, dns=[DNS4], **options)
    ws.start()
    return ws


SERVE_8000 = serve_8000("::")


def test_live_policy_change_cuts_forbidden_connections(world: World, client: silo.Client, daemon: Daemon) -> None:
    ws = make(client, "netlive", network="internet")
    env = {**os.environ, **daemon.env}
    hold = subprocess.Popen([SILO, "exec", "netlive", "--", *netprobe_argv(f"hold:{PUBLIC4}:9000:8")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert hold.stdout is not None
        assert json.loads(hold.stdout.readline()) == {"hold": "connected"}
        kept = subprocess.Popen([SILO, "exec", "netlive", "--", *netprobe_argv(f"hold:{PUBLIC4_B}:9000:3")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert kept.stdout is not None
        assert json.loads(kept.stdout.readline()) == {"hold": "connected"}
        info = ws.set_network("allow", allow=[f"{PUBLIC4_B}/32"])
        assert info.network is not None and info.network["mode"] == "allow"
        out, _ = hold.communicate(timeout=30)
        assert parse_netprobe(out)[f"hold:{PUBLIC4}:9000:8"].startswith("cut:"), out
        out, _ = kept.communicate(timeout=30)
        assert parse_netprobe(out)[f"hold:{PUBLIC4_B}:9000:3"] == "ok", out  # still allowed: not cut
    finally:
        for proc in (hold,):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    got = probe_in(ws, f"tcp:{PUBLIC4}:80", f"tcp:{PUBLIC4_B}:80")
    assert got == {f"tcp:{PUBLIC4}:80": "refused", f"tcp:{PUBLIC4_B}:80": "ok"}
    # and back, without a restart; the saved spec follows
    ws.set_network("internet")
    assert probe_in(ws, f"tcp:{PUBLIC4}:80") == {f"tcp:{PUBLIC4}:80": "ok"}
    assert ws.info().spec.network.mode.value == "internet"
    ws.set_network("none")
    assert probe_in(ws, f"tcp:{PUBLIC4}:80")[f"tcp:{PUBLIC4}:80"] in ("refused", "reset")


def test_counters_and_refusals_in_inspect(world: World, client: silo.Client) -> None:
    ws = make(client, "netcount", network="internet")
    probe_in(ws, f"http:{PUBLIC4}:80", f"tcp:{LAN4}:80", f"tcp:{META4}:80", f"udp:{LAN4}:7")
    net = ws.info().network
    assert net is not None
    assert net["bytes_out"] > 0 and net["bytes_in"] > 0, net
    refused = {(r["destination"], r["protocol"], r.get("port")) for r in net["refused"]}
    assert {(LAN4, "tcp", 80), (META4, "tcp", 80), (LAN4, "udp", 7)} <= refused, net
    assert net["refused_attempts"] >= 3
    r = subprocess.run([SILO, "inspect", "netcount"], capture_output=True, text=True, env={**os.environ})
    assert json.loads(r.stdout)["network"]["address"]["ipv4"].startswith("10.213."), r


def test_publish_maps_a_host_port_into_the_workspace(world: World, client: silo.Client) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ws = make(client, "netpub", network="internet", publish=[f"{port}:8000"])
    assert ws.exec(["sh", "-c", SERVE_8000]).exit_code == 0
    deadline = time.monotonic() + 10
    body = b""
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2) as c:
            c.sendall(b"GET /hostname HTTP/1.0\r\n\r\n")
            body = b"".join(iter(lambda: c.recv(4096), b""))
            if b"200" in body.split(b"\r\n")[0]:
                break
        time.sleep(0.1)
    assert body.endswith(b"netpub\n"), body


def test_links_let_one_workspace_reach_another_by_name(world: World, client: silo.Client) -> None:
    db = make(client, "netdb", network="internet")
    assert db.exec(["sh", "-c", SERVE_8000]).exit_code == 0
    app = make(client, "netapp", network="internet", links=["netdb"])
    other = make(client, "netother", network="full")
    addr = db.info().network["address"]["ipv4"]  # type: ignore[index]
    addr6 = db.info().network["address"]["ipv6"]  # type: ignore[index]
    got = probe_in(app, "tcp:netdb:8000", f"tcp:{addr}:8000", f"tcp:[{addr6}]:8000", "dns:netdb")
    assert got["tcp:netdb:8000"] == "ok" and got[f"tcp:{addr}:8000"] == "ok", got
    got = probe_in(other, f"tcp:{addr}:8000", "dns:netdb")
    assert blocked(got[f"tcp:{addr}:8000"]), got  # even `full` does not reach an unlinked workspace
    r = client.get("netapp")
    r.stop()
    client.get("netdb").stop()
    with pytest.raises(silo.WorkspaceStateError, match="linked workspace 'netdb' is not running"):
        r.start()


def test_stop_rm_and_a_daemon_crash_leave_nothing(world: World) -> None:
    with private_daemon() as d, silo.Client(d.socket, autostart=False) as c:
        ws = c.create("netcrash", network="internet", dns=[DNS4])
        ws.start()
        assert net_leftovers()["links"]
        ws.stop()
        assert net_leftovers() == NOTHING
        ws.start()
        d.kill()  # SIGKILL: the keeper sees its owner's socket close and tears down
        deadline = time.monotonic() + 10
        while net_leftovers() != NOTHING and time.monotonic() < deadline:
            time.sleep(0.1)
        assert net_leftovers() == NOTHING
        d.start()
        with silo.Client(d.socket, autostart=False) as c2:
            c2.get("netcrash").start()
            assert probe_in(c2.get("netcrash"), f"tcp:{PUBLIC4}:80") == {f"tcp:{PUBLIC4}:80": "ok"}
            c2.get("netcrash").remove(force=True)
    assert net_leftovers() == NOTHING


def test_a_killed_keeper_is_swept_by_the_next_daemon(world: World) -> None:
    with private_daemon() as d, silo.Client(d.socket, autostart=False) as c:
        ws = c.create("netkeeper", network="internet", dns=[DNS4])
        ws.start()
        pids = net_leftovers()["keepers"]
        assert len(pids) == 1
        os.kill(int(pids[0]), signal.SIGKILL)
        ws.remove(force=True)
        d.kill()
        d.start()  # recover() sweeps slots whose keeper is dead
    assert net_leftovers() == NOTHING


ECHO_MB = ("import socket, threading, time\n"
           "s = socket.create_connection(('203.0.113.10', 7), timeout=20)\n"
           "data = b'x' * (1 << 20)\n"
           "got = 0\n"
           "t0 = time.monotonic()\n"
           "threading.Thread(target=s.sendall, args=(data,), daemon=True).start()\n"
           "while got < len(data):\n"
           "    chunk = s.recv(65536)\n"
           "    if not chunk: break\n"
           "    got += len(chunk)\n"
           "print(got, round(time.monotonic() - t0, 3))\n")


def test_bandwidth_cap_slows_traffic_both_ways(world: World) -> None:
    def timed(*options: str) -> float:
        r = subprocess.run([SILO, "run", "--network", "internet", *options, "--", "python3", "-c", ECHO_MB],
                           capture_output=True, text=True, timeout=60)
        got, seconds = r.stdout.split()
        assert int(got) == 1 << 20, r
        return float(seconds)

    free = timed()
    capped = timed("--bandwidth", "8mbit")  # 1 MiB = 8.4 Mbit: about a second each way
    assert free < 0.5 and capped > 0.9, (free, capped)
