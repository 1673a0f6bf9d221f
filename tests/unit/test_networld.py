"""The network tests' fake world (tests/networld.py) and probe (tests/netprobe.py), on the host.

Nothing here leaves the machine: every address probed is in the world's namespace, and
the one resolver lookup runs with a resolv.conf that names the world's DNS server
(bind-mounted in a private mount namespace).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time

import dns.rcode
import pytest

from networld import (
    DNS4,
    HOLD_PORT,
    LAN4,
    LAN6,
    META4,
    PUBLIC4,
    PUBLIC4_B,
    PUBLIC6,
    World,
    netprobe_argv,
    parse_netprobe,
)

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="the test world needs root (netns, veth, routes)")]


def hostport(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr


def probe(*checks: str, timeout: float = 1.5) -> dict[str, str]:
    proc = subprocess.run(netprobe_argv(*checks, timeout=timeout), capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr.decode()
    return parse_netprobe(proc.stdout)


def addresses(response: object) -> set[str]:
    return {rd.to_text() for rrset in response.answer for rd in rrset}  # type: ignore[attr-defined]


def leftovers(w: World, server_pid: int) -> list[str]:
    found = []
    if os.path.exists(f"/run/netns/{w.ns}"):
        found.append(f"netns {w.ns}")
    if os.path.exists(f"/sys/class/net/{w.host_if}"):
        found.append(f"link {w.host_if}")
    for fam, net in (("-4", "192.168.77.0/24"), ("-4", f"{META4}/32"), ("-4", "203.0.113.0/24"),
                     ("-6", "fd77:77::/64"), ("-6", "2001:db8:113::/64")):
        out = subprocess.run(["ip", fam, "route", "show", "exact", net], capture_output=True, text=True).stdout
        if out.strip():
            found.append(f"route {out.strip()}")
    if os.path.exists(f"/proc/{server_pid}"):
        found.append(f"server process {server_pid}")
    return found


def test_world_answers_and_leaves_nothing() -> None:
    started = time.monotonic()
    with World() as w:
        server_pid = w.server_pid
        assert server_pid is not None

        checks = [f"{kind}:{hostport(a)}{port}" for a in (PUBLIC4, PUBLIC6, LAN4, META4)
                  for kind, port in (("tcp", ":80"), ("udp", ":7"), ("icmp", ""), ("http", ":80"))]
        checks += [f"tcp:{PUBLIC4}:81", f"udp:{hostport(PUBLIC6)}:8", f"tcp:{hostport(LAN6)}:{HOLD_PORT}",
                   f"http:{PUBLIC4_B}:80"]
        res = probe(*checks)
        expected = {c: "ok" for c in checks}
        for a in (PUBLIC4, PUBLIC6, LAN4, META4):
            expected[f"http:{hostport(a)}:80"] = f"ok:hello from {a}"
        expected.update({f"tcp:{PUBLIC4}:81": "refused", f"udp:{hostport(PUBLIC6)}:8": "refused",
                         f"http:{PUBLIC4_B}:80": f"ok:hello from {PUBLIC4_B}"})
        assert res == expected

        hold = f"hold:{PUBLIC4}:{HOLD_PORT}:0.5"
        proc = subprocess.run(netprobe_argv(hold), capture_output=True, text=True, timeout=30)
        assert proc.stdout.splitlines() == ['{"hold": "connected"}', f'{{"{hold}": "ok"}}'], proc.stderr

        before = World.dns_counts()
        for tcp in (False, True):
            r = World.dns_query("public.test", "A", tcp=tcp)
            assert addresses(r) == {PUBLIC4}
            assert r.answer[0].ttl == 2
            assert addresses(World.dns_query("public.test", "AAAA", tcp=tcp)) == {PUBLIC6}
            assert addresses(World.dns_query("rebind.test", "A", tcp=tcp)) == {LAN4}
            assert addresses(World.dns_query("rebind.test", "AAAA", tcp=tcp)) == {LAN6}
            assert addresses(World.dns_query("cname.test", "A", tcp=tcp)) == {"public.test.", PUBLIC4}
            assert World.dns_query("nothing.test", "A", tcp=tcp).rcode() == dns.rcode.NXDOMAIN
        after = World.dns_counts()
        assert after["public.test."] - before.get("public.test.", 0) == 4
        assert after["cname.test."] - before.get("cname.test.", 0) == 2

        # The probe's dns: check through the system resolver, pointed at the world.
        fd, conf = tempfile.mkstemp(prefix="silo-test-resolv-")
        try:
            os.write(fd, w.resolv_conf(DNS4).encode())
            os.close(fd)
            os.chmod(conf, 0o644)
            names = ["public.test", "rebind.test", "cname.test", "meta.test", "nothing.test"]
            dns_proc = subprocess.run(
                ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                 'mount --bind "$0" /etc/resolv.conf && exec "$@"', conf,
                 *netprobe_argv(*[f"dns:{n}" for n in names])],
                capture_output=True, timeout=30)
            assert dns_proc.returncode == 0, dns_proc.stderr.decode()
            assert parse_netprobe(dns_proc.stdout) == {
                "dns:public.test": f"ok:{PUBLIC6},{PUBLIC4}",
                "dns:rebind.test": f"ok:{LAN4},{LAN6}",
                "dns:cname.test": f"ok:{PUBLIC6},{PUBLIC4}",
                "dns:meta.test": f"ok:{META4}",
                "dns:nothing.test": "nxdomain",
            }
        finally:
            os.unlink(conf)

    assert leftovers(w, server_pid) == []
    w.close()  # idempotent
    assert time.monotonic() - started < 5


def test_cleanup_stale_removes_dead_worlds() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    ns, link = f"silo-test-world-{dead.pid}", f"swt{dead.pid}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "link", "add", link, "type", "veth", "peer", "name", "w0", "netns", ns], check=True)
        removed = World.cleanup_stale()
        assert ns in removed
        assert not os.path.exists(f"/run/netns/{ns}")
        assert not os.path.exists(f"/sys/class/net/{link}")
    finally:
        subprocess.run(["ip", "link", "del", link], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
