"""The firewall and pasta command lines silo builds, as data (silo.net.rules, silo.net.rootless)."""

from __future__ import annotations

import itertools
from typing import Any

from silo.model.network import build_policy
from silo.net import rootless, rules


def block_elements(cmds: list[dict[str, Any]], family: str) -> list[Any]:
    out: list[Any] = []
    for cmd in cmds:
        elem = cmd.get("add", {}).get("element")
        if elem and elem["name"] == f"block{family}":
            out += elem["elem"]
    return out


def test_the_hosts_own_addresses_join_the_blocked_set_unless_already_covered() -> None:
    cmds = rules.guest_policy(build_policy("internet"), host=["192.0.2.2", "10.0.0.5", "2001:db8::7", "fd00::2"])
    v4, v6 = block_elements(cmds, "4"), block_elements(cmds, "6")
    assert "192.0.2.2" in v4 and "2001:db8::7" in v6
    # inside a blocked range already: an overlapping interval would make nftables refuse the set
    assert "10.0.0.5" not in v4 and "fd00::2" not in v6
    assert len(v4) == len(rules.BLOCKED4) + 1 and len(v6) == len(rules.BLOCKED6) + 1


def test_without_host_addresses_the_blocked_set_is_the_special_ranges() -> None:
    cmds = rules.guest_policy(build_policy("allow", allow=["public.test"]))
    assert len(block_elements(cmds, "4")) == len(rules.BLOCKED4)


def test_pasta_forwards_nothing_and_maps_no_gateway_to_the_host() -> None:
    argv = rootless.pasta_argv(7, 8, ipv6=True)
    pairs = set(itertools.pairwise(argv))
    for opt in ("--tcp-ports", "--udp-ports", "--tcp-ns", "--udp-ns"):
        assert (opt, "none") in pairs, opt
    assert {"--no-map-gw", "--no-dhcp", "--no-dhcpv6", "--no-ra", "--foreground"} <= set(argv)
    assert ("--userns", "/proc/self/fd/7") in pairs and ("--netns", "/proc/self/fd/8") in pairs
    assert ("--address", rootless.LEASE.guest6) in pairs
    v4only = rootless.pasta_argv(7, 8, ipv6=False)
    assert "--ipv4-only" in v4only and rootless.LEASE.guest6 not in v4only
