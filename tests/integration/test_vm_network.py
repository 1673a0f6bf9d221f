"""Networks at isolation vm (issue 5, requirement 5): the guest's NIC is a tap in the
sandbox's own network namespace, so the process level's policy holds for it.

Real TCG boots against the test world (tests/networld.py); nothing leaves the machine.
The guest's packets are forwarded by the namespace through the same policy chain its
own processes would go through, then masqueraded to the lease address. The refusals
differ in one way by design: a local process is refused with EPERM when its packet is
rejected on output, a guest's forwarded packet with an ICMP "administratively
prohibited", which the guest's kernel reports as EHOSTUNREACH; both count as blocked.
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
from silo.model.network import VM_HOST4
from vmtools import nothing_left, vm_processes

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="vm networks and the test world need root")]

SILO = str(REPO / ".venv" / "bin" / "silo")
PROBE_TIMEOUT = 1.5


def leftovers() -> dict[str, object]:
    deadline = time.monotonic() + 10
    while (net_leftovers() != NOTHING or vm_processes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return {**net_leftovers(), "vm": vm_processes()}


def vm_run_probe(mode: str, *checks: str, options: tuple[str, ...] = ()) -> dict[str, str]:
    r = subprocess.run([SILO, "run", "--isolation", "vm", "--network", mode, "--dns", DNS4, *options, "--",
                        *netprobe_argv(*checks, timeout=PROBE_TIMEOUT)],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return parse_netprobe(r.stdout)


def test_a_one_shot_vm_gets_the_internet_policy(world: World) -> None:
    host = host_address()
    got = vm_run_probe("internet", f"tcp:{PUBLIC4}:80", f"tcp:[{PUBLIC6}]:80", f"udp:{PUBLIC4}:7",
                       f"icmp:{PUBLIC4}", "dns:public.test", f"tcp:{LAN4}:80", f"tcp:[{LAN6}]:80", f"udp:{LAN4}:7",
                       f"icmp:{LAN4}", f"tcp:{META4}:80", "dns:rebind.test", "dns:mixed.test", f"tcp:{host}:22")
    for check in (f"tcp:{PUBLIC4}:80", f"tcp:[{PUBLIC6}]:80", f"udp:{PUBLIC4}:7", f"icmp:{PUBLIC4}"):
        assert got[check] == "ok", (check, got)
    assert got["dns:public.test"] == f"ok:{PUBLIC6},{PUBLIC4}", got  # silo's resolver, on the tap's far end
    for check in (f"tcp:{LAN4}:80", f"tcp:[{LAN6}]:80", f"udp:{LAN4}:7", f"icmp:{LAN4}", f"tcp:{META4}:80"):
        assert blocked(got[check]), (check, got)
    assert got[f"tcp:{LAN4}:80"] == "refused", got  # TCP reset by the namespace's policy
    assert got[f"udp:{LAN4}:7"] == "unreachable:EHOSTUNREACH", got  # ICMP admin-prohibited (see above)
    assert not got["dns:rebind.test"].startswith("ok") and got["dns:mixed.test"] == f"ok:{PUBLIC4}", got
    assert got[f"tcp:{host}:22"] == "timeout", got  # the host itself: dropped on the host's side
    assert leftovers() == {**NOTHING, "vm": []}


def test_a_one_shot_vm_in_allow_mode_reaches_only_what_is_listed(world: World) -> None:
    got = vm_run_probe("allow", "tcp:public.test:80", f"tcp:{PUBLIC4_B}:80", f"tcp:{PUBLIC4_B}:7",
                       "dns:public-b.test", options=("--allow", "public.test", "--allow", f"{PUBLIC4_B}/32:7"))
    assert got == {"tcp:public.test:80": "ok", f"tcp:{PUBLIC4_B}:80": "refused", f"tcp:{PUBLIC4_B}:7": "ok",
                   "dns:public-b.test": "nxdomain"}, got


@pytest.fixture
def client(world: World) -> Iterator[silo.Client]:
    with private_client() as c:
        yield c
    assert leftovers() == {**NOTHING, "vm": []}


SERVE_8000 = serve_8000("::", tries=400)


def test_a_vm_workspace_network_policy_publish_links_live_changes_and_cleanup(client: silo.Client) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name = f"vmnet-{uuid.uuid4().hex[:6]}"
    ws = client.create(name, isolation="vm", network="internet", dns=[DNS4], publish=[f"{port}:8000"])
    ws.start()
    got = probe_in(ws, f"http:{PUBLIC4}:80", f"tcp:{LAN4}:80", "dns:public.test", timeout=PROBE_TIMEOUT)
    assert got == {f"http:{PUBLIC4}:80": f"ok:hello from {PUBLIC4}", f"tcp:{LAN4}:80": "refused",
                   "dns:public.test": f"ok:{PUBLIC6},{PUBLIC4}"}, got
    net = ws.info().network
    assert net is not None and net["bytes_out"] > 0 and net["bytes_in"] > 0, net
    assert (LAN4, "tcp", 80) in {(r["destination"], r["protocol"], r.get("port")) for r in net["refused"]}, net
    # the guest's loopback works (the server checks itself on 127.0.0.1), and a published
    # port reaches the guest's service from the host
    assert ws.exec(["sh", "-c", SERVE_8000]).exit_code == 0
    assert http_get(port, "/hostname").endswith(f"{name}\n".encode())
    # a process-level workspace linked to it reaches it by name, at the lease address
    app = client.create("app", network="internet", dns=[DNS4], links=[name])
    app.start()
    addr4, addr6 = net["address"]["ipv4"], net["address"]["ipv6"]
    got = probe_in(app, f"tcp:{addr4}:8000", f"tcp:[{addr6}]:8000", f"dns:{name}", timeout=PROBE_TIMEOUT)
    assert got == {f"tcp:{addr4}:8000": "ok", f"tcp:[{addr6}]:8000": "ok", f"dns:{name}": f"ok:{addr4},{addr6}"}, got
    # a live change holds for the guest at once, no restart
    ws.set_network("allow", allow=[f"{PUBLIC4_B}/32"])
    got = probe_in(ws, f"tcp:{PUBLIC4}:80", f"tcp:{PUBLIC4_B}:80", timeout=PROBE_TIMEOUT)
    assert got == {f"tcp:{PUBLIC4}:80": "refused", f"tcp:{PUBLIC4_B}:80": "ok"}, got
    app.remove(force=True)
    ws.stop()
    assert leftovers() == {**NOTHING, "vm": []}  # the keeper took its namespace, veth and lease; the tap went with QEMU


def test_a_daemon_crash_leaves_no_vm_network(client: silo.Client) -> None:
    d: Daemon = client.daemon  # type: ignore[attr-defined]
    ws = client.create("vmcrash", isolation="vm", network="internet", dns=[DNS4])
    ws.start()
    assert net_leftovers()["links"] and vm_processes()
    d.kill()  # SIGKILL: the supervisor and QEMU die with silod, the keeper at its socket's EOF
    assert leftovers() == {**NOTHING, "vm": []}
    nothing_left()
    d.start()
    with silo.Client(d.socket, autostart=False) as c2:
        again = c2.get("vmcrash")
        again.start()
        assert probe_in(again, f"tcp:{PUBLIC4}:80", timeout=PROBE_TIMEOUT) == {f"tcp:{PUBLIC4}:80": "ok"}
        again.remove(force=True)


SPOOF = "203.0.113.77"


def test_a_guest_root_that_rewires_its_nic_still_meets_the_policy(world: World) -> None:
    # SECURITY.md #13: the guest owns its kernel, so its root may change eth0 at will; what
    # leaves the tap is checked in the namespace, and only the guest's own address is
    # masqueraded: a spoofed source never gets out (the host's table drops it).
    before = shlex.join(netprobe_argv(f"tcp:{PUBLIC4}:80", timeout=2))
    after = shlex.join(netprobe_argv(f"tcp:{PUBLIC4}:80", f"tcp:{LAN4}:80", timeout=2))
    script = (f"{before} && ip addr add {SPOOF}/32 dev eth0 && "
              f"ip route replace default via {VM_HOST4} src {SPOOF} && "
              f"ip route replace {LAN4}/32 via {VM_HOST4} src {SPOOF} && {after}")
    r = subprocess.run([SILO, "run", "--isolation", "vm", "--network", "internet", "--dns", DNS4, "--",
                        "sh", "-c", script], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    control, got = (parse_netprobe(line) for line in r.stdout.splitlines())
    assert control == {f"tcp:{PUBLIC4}:80": "ok"}  # the same connection, from the guest's own address
    assert got[f"tcp:{PUBLIC4}:80"] == "timeout", got  # spoofed: never masqueraded, dropped on the host
    assert blocked(got[f"tcp:{LAN4}:80"]), got
    assert leftovers() == {**NOTHING, "vm": []}
