"""The firewall of a sandbox's network, as nftables JSON commands (pure data, no I/O).

Two tables per sandbox:

* ``inet silo`` inside the sandbox's own network namespace holds the policy. Its
  output chain checks *every* packet the sandbox sends (not only the first of a
  connection), so a live policy change cuts connections it now forbids at their next
  packet: TCP gets a reset, the rest an ICMP "administratively prohibited". Only
  packets answering a connection made *to* the sandbox (``ct direction reply``) skip
  the policy; the host decides who may connect in. The sandbox's processes hold no
  CAP_NET_ADMIN over this namespace (it belongs to silo, not to their user namespace),
  so they cannot change it.
* ``inet silo_N`` in the host's namespace guards the host end of the veth: no
  spoofed source, no connection to the host itself (except in ``full`` mode), no
  traffic to another sandbox unless linked, and the NAT out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any

from silo.model.network import (
    VM_GUEST4,
    VM_GUEST6,
    VM_TAP,
    AllowEntry,
    IPNetwork,
    Lease,
    Network,
    NetworkPolicy,
)

Cmd = dict[str, Any]

TABLE = "silo"
IFPREFIX = "silo-"

# Destinations `internet` and `allow` never reach (the names resolved in `allow` mode
# included: DNS rebinding). Documentation ranges (192.0.2.0/24, 198.51.100.0/24,
# 203.0.113.0/24, 2001:db8::/32) count as public: the tests' "internet" lives there.
BLOCKED4 = tuple(ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4",
))
BLOCKED6 = tuple(ipaddress.IPv6Network(n) for n in (
    "::/127", "::ffff:0:0/96", "64:ff9b:1::/48", "100::/64", "2001::/32", "2002::/16",
    "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
))
BLOCKED: tuple[IPNetwork, ...] = (*BLOCKED4, *BLOCKED6)

_ND = ["nd-neighbor-solicit", "nd-neighbor-advert", "nd-router-solicit", "mld-listener-report",
       "mld2-listener-report"]


def _elem(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Any:
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _match(left: Any, right: Any, op: str = "==") -> Cmd:
    return {"match": {"op": op, "left": left, "right": right}}


def _daddr(family: str) -> Any:
    return {"payload": {"protocol": "ip" if family == "4" else "ip6", "field": "daddr"}}


def _saddr(family: str) -> Any:
    return {"payload": {"protocol": "ip" if family == "4" else "ip6", "field": "saddr"}}


_L4 = {"meta": {"key": "l4proto"}}
_DPORT = {"payload": {"protocol": "th", "field": "dport"}}


def _rule(chain: str, *expr: Cmd, table: str = TABLE) -> Cmd:
    return {"add": {"rule": {"family": "inet", "table": table, "chain": chain, "expr": list(expr)}}}


def _set(name: str, kind: Any, flags: Sequence[str] = (), table: str = TABLE, **extra: Any) -> Cmd:
    body: dict[str, Any] = {"family": "inet", "table": table, "name": name, "type": kind, **extra}
    if flags:
        body["flags"] = list(flags)
    return {"add": {"set": body}}


def _elements(name: str, elems: list[Any], table: str = TABLE) -> list[Cmd]:
    if not elems:
        return []
    return [{"add": {"element": {"family": "inet", "table": table, "name": name, "elem": elems}}}]


def _family(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    return "4" if net.version == 4 else "6"


def _addr_type(family: str) -> str:
    return "ipv4_addr" if family == "4" else "ipv6_addr"


# -- the sandbox's own table ----------------------------------------------------------------


def guest_base() -> list[Cmd]:
    """What the sandbox's table keeps across policy changes: counters, the record of
    refused destinations, the chains' skeleton."""
    cmds: list[Cmd] = [{"add": {"table": {"family": "inet", "name": TABLE}}}]
    for name in ("tx", "rx"):
        cmds.append({"add": {"counter": {"family": "inet", "table": TABLE, "name": name}}})
    for f in ("4", "6"):
        refused: dict[str, Any] = {"size": 4096, "stmt": [{"counter": None}]}
        cmds.append(_set(f"refused{f}", [_addr_type(f), "inet_proto", "inet_service"], (), **refused))
        cmds.append(_set(f"refusedp{f}", [_addr_type(f), "inet_proto"], (), **refused))
        cmds.append(_set(f"block{f}", _addr_type(f), ["interval"]))
        cmds.append(_set(f"allow{f}", _addr_type(f), ["interval"]))
        cmds.append(_set(f"allowp{f}", [_addr_type(f), "inet_proto", "inet_service"], ["interval"]))
        cmds.append(_set(f"links{f}", _addr_type(f)))
        cmds.append(_set(f"pinned{f}", _addr_type(f), ["timeout"]))
        cmds.append(_set(f"pinnedp{f}", [_addr_type(f), "inet_proto", "inet_service"], ["timeout"]))
    hooks = (("out", "output"), ("in", "input"), ("fwd", "forward"))
    for chain, hook in hooks:
        cmds.append({"add": {"chain": {"family": "inet", "table": TABLE, "name": chain, "type": "filter",
                                       "hook": hook, "prio": 0, "policy": "accept"}}})
    for chain in ("check", "pass", "refuse"):
        cmds.append({"add": {"chain": {"family": "inet", "table": TABLE, "name": chain}}})
    return cmds


def vm_nat() -> list[Cmd]:
    """The sandbox's table's NAT for a vm level's guest (kept across policy changes):
    what the guest sends leaves from the lease address; new connections to it (a link's,
    a published port's come from the keeper on the tap) are passed to the guest."""
    cmds: list[Cmd] = []
    for chain, hook, prio in (("pre", "prerouting", -100), ("post", "postrouting", 100)):
        cmds.append({"add": {"chain": {"family": "inet", "table": TABLE, "name": chain, "type": "nat",
                                       "hook": hook, "prio": prio, "policy": "accept"}}})
    from_outside = _match({"meta": {"key": "iifname"}}, "eth0")
    for f, guest in (("4", VM_GUEST4), ("6", VM_GUEST6)):
        family = "ip" if f == "4" else "ip6"
        icmp = "icmp" if f == "4" else "icmpv6"
        nfproto = _match({"meta": {"key": "nfproto"}}, "ipv4" if f == "4" else "ipv6")
        dnat = {"dnat": {"family": family, "addr": guest}}
        cmds.append(_rule("pre", from_outside, nfproto, _match(_L4, {"set": ["tcp", "udp"]}), dnat))
        cmds.append(_rule("pre", from_outside, _match({"payload": {"protocol": icmp, "field": "type"}},
                                                      "echo-request"), dnat))
        cmds.append(_rule("post", _match(_saddr(f), guest), _match({"meta": {"key": "oifname"}}, "eth0"),
                          {"masquerade": None}))
    return cmds


def _protos(entry: AllowEntry) -> tuple[str, ...]:
    return (entry.proto,) if entry.proto else ("tcp", "udp")


def guest_policy(policy: NetworkPolicy, links: Iterable[str] = (),
                 pins: Iterable[tuple[str, int, Sequence[tuple[str, int]]]] = (),
                 host: Iterable[str] = ()) -> list[Cmd]:
    """Replace the policy part of the sandbox's table (one transaction with the rest).

    ``links``: addresses of the linked workspaces. ``pins``: resolved addresses still
    allowed, as (address, seconds left, [(proto, port)] or [] for any port). ``host``:
    the host's own addresses, blocked here too when nothing on the host guards them
    (rootless: :mod:`silo.net.rootless`)."""
    cmds: list[Cmd] = [{"flush": {"chain": {"family": "inet", "table": TABLE, "name": c}}}
                       for c in ("out", "in", "fwd", "check", "pass", "refuse")]
    for f in ("4", "6"):
        for name in ("block", "allow", "allowp", "links", "pinned", "pinnedp"):
            cmds.append({"flush": {"set": {"family": "inet", "table": TABLE, "name": f"{name}{f}"}}})
    mode = policy.mode
    host_nets = [ipaddress.ip_network(a) for a in host]
    for f, nets in (("4", BLOCKED4), ("6", BLOCKED6)):
        own = [n for n in host_nets if _family(n) == f and not any(n.subnet_of(b) for b in nets)]  # type: ignore[arg-type]
        cmds += _elements(f"block{f}", [_elem(n) for n in (*nets, *own)])
    link_nets = [ipaddress.ip_network(a) for a in links]
    for f in ("4", "6"):
        cmds += _elements(f"links{f}", [str(n.network_address) for n in link_nets if _family(n) == f])
        entries = [e for e in policy.allow if (n := e.network) is not None and _family(n) == f]
        cmds += _elements(f"allow{f}", [_elem(ipaddress.ip_network(e.target)) for e in entries if e.port is None])
        cmds += _elements(f"allowp{f}", [{"concat": [_elem(ipaddress.ip_network(e.target)), p, e.port]}
                                         for e in entries if e.port is not None for p in _protos(e)])
    cmds += pin_elements(pins)

    # What the sandbox sends: from its own processes (output), or from a vm level's
    # guest through the tap (forward); the keeper's own traffic to the guest passes.
    tap = _match({"meta": {"key": "iifname"}}, VM_TAP)
    out: list[Cmd] = [
        _rule("out", _match({"meta": {"key": "oif"}}, "lo"), {"accept": None}),
        _rule("out", _match({"meta": {"key": "oifname"}}, VM_TAP), {"accept": None}),
        _rule("out", {"jump": {"target": "check"}}),
        _rule("fwd", tap, {"jump": {"target": "check"}}),
        _rule("fwd", {"counter": "rx"}),
        _rule("check", _match({"ct": {"key": "direction"}}, "reply"), {"jump": {"target": "pass"}}),
        _rule("check", _match({"payload": {"protocol": "icmpv6", "field": "type"}}, {"set": _ND}),
              {"accept": None}),
    ]
    if mode in (Network.INTERNET, Network.ALLOW):
        for f in ("4", "6"):
            out.append(_rule("check", _match(_daddr(f), f"@links{f}"), {"jump": {"target": "pass"}}))
    if mode is Network.ALLOW:
        out += _pass_listed("allow")
    if mode in (Network.INTERNET, Network.ALLOW):
        for f in ("4", "6"):
            out.append(_rule("check", _match(_daddr(f), f"@block{f}"), {"jump": {"target": "refuse"}}))
    if mode is Network.ALLOW:
        out += _pass_listed("pinned")  # after the blocked ranges: a resolved name never reaches them
    last = "pass" if mode in (Network.INTERNET, Network.FULL) else "refuse"
    out.append(_rule("check", {"jump": {"target": last}}))

    refuse: list[Cmd] = []
    for f, proto in (("4", "ipv4"), ("6", "ipv6")):
        refuse.append(_rule("refuse", _match({"meta": {"key": "nfproto"}}, proto),
                            _match(_L4, {"set": ["tcp", "udp"]}),
                            {"set": {"op": "add", "elem": {"concat": [_daddr(f), _L4, _DPORT]},
                                     "set": f"@refused{f}"}}))
        refuse.append(_rule("refuse", _match({"meta": {"key": "nfproto"}}, proto),
                            _match(_L4, {"set": ["tcp", "udp"]}, "!="),
                            {"set": {"op": "add", "elem": {"concat": [_daddr(f), _L4]}, "set": f"@refusedp{f}"}}))
    refuse.append(_rule("refuse", _match(_L4, "tcp"), {"reject": {"type": "tcp reset"}}))
    refuse.append(_rule("refuse", {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}))

    rest = [
        _rule("pass", {"counter": "tx"}, {"accept": None}),
        _rule("in", _match({"meta": {"key": "iif"}}, "lo"), {"accept": None}),
        _rule("in", {"counter": "rx"}),
    ]
    return cmds + out + refuse + rest


def _pass_listed(sets: str) -> list[Cmd]:
    """Rules passing what the sets ``SETS4/6`` (addresses) and ``SETSp4/6`` (address,
    protocol, port) hold."""
    out = []
    for f in ("4", "6"):
        out.append(_rule("check", _match(_daddr(f), f"@{sets}{f}"), {"jump": {"target": "pass"}}))
        out.append(_rule("check", _match({"concat": [_daddr(f), _L4, _DPORT]}, f"@{sets}p{f}"),
                         {"jump": {"target": "pass"}}))
    return out


def pin_elements(pins: Iterable[tuple[str, int, Sequence[tuple[str, int]]]]) -> list[Cmd]:
    """Add resolved addresses to the pinned sets: (address, seconds, [(proto, port)] or
    [] for any port)."""
    cmds: list[Cmd] = []
    for addr, seconds, ports in pins:
        f = "4" if ipaddress.ip_address(addr).version == 4 else "6"
        if ports:
            cmds += _elements(f"pinnedp{f}", [{"elem": {"val": {"concat": [addr, p, port]}, "timeout": seconds}}
                                              for p, port in ports])
        else:
            cmds += _elements(f"pinned{f}", [{"elem": {"val": addr, "timeout": seconds}}])
    return cmds


# -- the host's table -------------------------------------------------------------------------


def host_table(lease: Lease) -> str:
    return f"silo_{lease.index}"


def host_rules(lease: Lease, policy: NetworkPolicy, links: Iterable[str] = ()) -> list[Cmd]:
    """The host side of one sandbox's veth, replaced whole (one transaction)."""
    t = host_table(lease)
    ifname = lease.ifname
    cmds: list[Cmd] = [
        {"add": {"table": {"family": "inet", "name": t}}},
        {"delete": {"table": {"family": "inet", "name": t}}},
        {"add": {"table": {"family": "inet", "name": t}}},
        {"add": {"chain": {"family": "inet", "table": t, "name": "fwd", "type": "filter", "hook": "forward",
                           "prio": 0, "policy": "accept"}}},
        {"add": {"chain": {"family": "inet", "table": t, "name": "in", "type": "filter", "hook": "input",
                           "prio": 0, "policy": "accept"}}},
        {"add": {"chain": {"family": "inet", "table": t, "name": "post", "type": "nat", "hook": "postrouting",
                           "prio": 100, "policy": "accept"}}},
    ]
    iif = _match({"meta": {"key": "iifname"}}, ifname)
    to_sandbox = _match({"meta": {"key": "oifname"}}, IFPREFIX + "*")
    link_addrs = [ipaddress.ip_address(a) for a in links]
    cmds += [
        _rule("fwd", _match({"ct": {"key": "state"}}, {"set": ["established", "related"]}), {"accept": None}, table=t),
        _rule("fwd", iif, _match({"meta": {"key": "nfproto"}}, "ipv4"), _match(_saddr("4"), lease.guest4, "!="),
              {"drop": None}, table=t),
        _rule("fwd", iif, _match({"meta": {"key": "nfproto"}}, "ipv6"), _match(_saddr("6"), lease.guest6, "!="),
              {"drop": None}, table=t),
    ]
    for addr in link_addrs:
        f = "4" if addr.version == 4 else "6"
        cmds.append(_rule("fwd", iif, to_sandbox, _match(_daddr(f), str(addr)), {"accept": None}, table=t))
    cmds += [
        _rule("fwd", iif, to_sandbox, {"drop": None}, table=t),
        _rule("in", iif, _match({"ct": {"key": "state"}}, {"set": ["established", "related"]}), {"accept": None},
              table=t),
        _rule("in", iif, _match({"payload": {"protocol": "icmpv6", "field": "type"}}, {"set": _ND}),
              {"accept": None}, table=t),
        _rule("in", iif, {"accept" if policy.mode is Network.FULL else "drop": None}, table=t),
        _rule("post", _match(_saddr("4"), lease.guest4), _match({"meta": {"key": "oifname"}}, IFPREFIX + "*", "!="),
              {"masquerade": None}, table=t),
        _rule("post", _match(_saddr("6"), lease.guest6), _match({"meta": {"key": "oifname"}}, IFPREFIX + "*", "!="),
              {"masquerade": None}, table=t),
    ]
    return cmds


def delete_host_rules(index: int) -> list[Cmd]:
    t = f"silo_{index}"
    return [{"add": {"table": {"family": "inet", "name": t}}}, {"delete": {"table": {"family": "inet", "name": t}}}]
