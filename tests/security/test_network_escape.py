"""SECURITY.md #13: a sandbox with a network cannot reach the host, its LAN or the cloud
metadata service beyond its policy, and cannot change the policy from inside, as root
and without it (pasta, silo.net.rootless).

The sandboxes talk to the test world of tests/networld.py (network namespaces on this
machine); the full allow/deny matrix per mode is in tests/integration/test_network.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from networld import DNS4, LAN4, META4, PUBLIC4, World, netprobe_argv, parse_netprobe
from users import PYTHON, User, usable_by

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
SILO = str(REPO / ".venv" / "bin" / "silo")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="networks need root")


def silo_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SILO, "run", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("user", ["0", "1000"])
def test_the_sandbox_cannot_change_its_firewall_or_links(world: World, user: str) -> None:
    script = ("nft flush ruleset; echo nft=$?; ip link set eth0 down; echo link=$?; "
              "ip addr add 10.213.0.99/32 dev eth0; echo addr=$?; ip route del default; echo route=$?; "
              "ip link add x type dummy; echo add=$?")
    r = silo_run("--network", "internet", "-u", user, "--", "sh", "-c", script)
    assert dict(line.split("=") for line in r.stdout.split()) == {
        "nft": "1", "link": "2", "addr": "2", "route": "2", "add": "2"}, (r.stdout, r.stderr)
    assert "Operation not permitted" in r.stderr
    # and the policy still holds afterwards, in a sandbox that kept CAP_NET_RAW
    r = silo_run("--network", "internet", "--cap", "NET_RAW", "-u", user, "--",
                 *netprobe_argv(f"tcp:{LAN4}:80", f"tcp:{META4}:80", f"icmp:{LAN4}", f"tcp:{PUBLIC4}:80",
                                "--icmp", "raw", timeout=1.0))
    got = parse_netprobe(r.stdout)
    assert got[f"tcp:{LAN4}:80"] == "refused" and got[f"tcp:{META4}:80"] == "refused", got
    assert got[f"icmp:{LAN4}"] != "ok" and got[f"tcp:{PUBLIC4}:80"] == "ok", got


def test_net_admin_cannot_be_combined_with_a_network() -> None:
    r = silo_run("--network", "internet", "--cap", "NET_ADMIN", "--", "true")
    assert (r.returncode, r.stderr) == (125, "silo: --cap NET_ADMIN cannot be combined with a network policy: "
                                             "drop one of them\n"), r


def test_host_loopback_gateway_and_own_addresses_are_out_of_reach(world: World) -> None:
    # services the host offers on loopback and on every address
    lo = socket.socket()
    lo.bind(("127.0.0.1", 0))
    lo.listen(4)
    anyaddr = socket.socket()
    anyaddr.bind(("0.0.0.0", 0))
    anyaddr.listen(4)
    try:
        r = silo_run("--network", "internet", "--", "sh", "-c", "ip -4 route show default")
        gateway = r.stdout.split()[2]
        host_addrs = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
        checks = [f"tcp:127.0.0.1:{lo.getsockname()[1]}", f"tcp:{gateway}:{anyaddr.getsockname()[1]}",
                  *(f"tcp:{a}:{anyaddr.getsockname()[1]}" for a in host_addrs if ":" not in a),
                  f"icmp:{gateway}"]
        for mode in ("internet", "allow"):
            r = silo_run("--network", mode, "--", *netprobe_argv(*checks, timeout=1.0))
            got = parse_netprobe(r.stdout)
            for check in checks:
                assert got[check] != "ok", (mode, check, got)
    finally:
        lo.close()
        anyaddr.close()


@pytest.mark.parametrize("inside", ["0", "1000"])
def test_a_rootless_sandbox_cannot_change_its_network(world: World, unpriv_src: Path, inside: str) -> None:
    """Without root the sandbox's own user namespace owns its network namespace
    (silo.net.rootless): what stops it is that no capability survives silo-setup's
    bounding-set drop, /proc/sys is read-only, and a user namespace made inside (were
    it allowed) would own nothing of this one."""
    base = Path(tempfile.mkdtemp(prefix="silo-netsec-"))
    os.chmod(base, 0o711)
    try:
        user = User("silotest", base / "silotest", unpriv_src)
        if not usable_by(user.name):
            pytest.skip(f"{user.name} cannot run {PYTHON}")
        script = ("nft flush ruleset; echo nft=$?; ip link set eth0 down; echo link=$?; "
                  "ip addr add 10.213.0.99/32 dev eth0; echo addr=$?; ip route del default; echo route=$?; "
                  "echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter; echo sysctl=$?; "
                  "unshare -Urn true; echo userns=$?; grep CapEff /proc/self/status")
        r = user.silo("run", "--network", "internet", "-u", inside, "--", "sh", "-c", script)
        lines = r.stdout.split("\n")
        assert dict(ln.split("=") for ln in lines if "=" in ln) == {
            "nft": "1", "link": "2", "addr": "2", "route": "2", "sysctl": "2", "userns": "1"}, (r.stdout, r.stderr)
        assert "CapEff:\t0000000000000000" in r.stdout, r.stdout
        assert "Operation not permitted" in r.stderr and "Read-only file system" in r.stderr, r.stderr
        # and the policy still holds afterwards, with CAP_NET_RAW kept
        r = user.silo("run", "--network", "internet", "--dns", DNS4, "--cap", "NET_RAW", "-u", inside, "--",
                      *netprobe_argv(f"tcp:{LAN4}:80", f"tcp:{META4}:80", f"tcp:{PUBLIC4}:80", timeout=1.0))
        got = parse_netprobe(r.stdout)
        assert got == {f"tcp:{LAN4}:80": "refused", f"tcp:{META4}:80": "refused", f"tcp:{PUBLIC4}:80": "ok"}, got
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)
