"""A sandbox's network policy: what a user asks for, validated into frozen values.

Modes (ARCHITECTURE.md): ``none`` (loopback only), ``internet`` (public addresses
only), ``allow`` (only the listed names, networks and ports) and ``full`` (NAT like a
normal host, the LAN included). ``publish`` maps host ports to the sandbox's,
``links`` names the workspaces it may reach. Pure data: the firewall that enforces it
is :mod:`silo.net`.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from silo.model.errors import SpecError


class Network(enum.Enum):
    NONE = "none"  # loopback only
    INTERNET = "internet"  # public addresses only: the LAN, the host and other workspaces blocked
    ALLOW = "allow"  # only what ``allow`` lists; names through silo's resolver
    FULL = "full"  # NAT like a normal host, the LAN included: an explicit opt-in


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_NAME_RE = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*\.?$")
_LINK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)bit\s*$", re.IGNORECASE)
_RATE_UNITS = {"": 1, "k": 1000, "m": 1000_000, "g": 1000_000_000}


def _port(untrusted: str, entry: str, what: str) -> tuple[int, str | None]:
    """``443`` or ``443/tcp`` -> (443, "tcp")."""
    number, _, proto = untrusted.partition("/")
    if proto not in ("", "tcp", "udp"):
        raise SpecError(f"bad {what} {entry!r}: the protocol after '/' is tcp or udp")
    if not number.isdigit() or not 1 <= int(number) <= 65535:
        raise SpecError(f"bad {what} {entry!r}: a port is a number from 1 to 65535")
    return int(number), proto or None


# A vm level's guest sits one hop behind the sandbox's namespace, on a tap: the same
# addresses in every namespace, from the one /30 and /64 no lease gets (silo.net.links);
# the vm level's guest (silo.backends.vm) and the sandbox's table (silo.net.rules) use them.
# The namespace forwards the guest's packets through the policy and masquerades them to
# its lease address; connections to the lease address are passed on to the guest.
VM_TAP = "tap0"
VM_HOST4, VM_GUEST4, VM_PREFIX4 = "10.213.255.253", "10.213.255.254", 30
VM_HOST6, VM_GUEST6, VM_PREFIX6 = "fd51:5110:0:3fff::1", "fd51:5110:0:3fff::2", 64

@dataclass(frozen=True)
class AllowEntry:
    """One ``allow`` entry: a domain name (``*.`` for its subdomains) or a network,
    optionally limited to a port (and protocol)."""

    target: str  # a lower-case name without the final dot, or a network like "203.0.113.0/24"
    port: int | None = None
    proto: str | None = None  # "tcp", "udp" or None for both

    @property
    def network(self) -> IPNetwork | None:
        """The network, or None for a name."""
        try:
            return ipaddress.ip_network(self.target)
        except ValueError:
            return None

    @classmethod
    def parse(cls, untrusted: str) -> AllowEntry:
        """``pypi.org``, ``*.example.org``, ``example.org:443``, ``203.0.113.0/24:443/tcp``,
        ``2001:db8::/32``, ``[2001:db8::1]:443``."""
        text = untrusted.strip()
        hint = "use a domain name, an address or a network, with an optional :PORT, like example.org:443"
        host, port_text = text, ""
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise SpecError(f"bad --allow {untrusted!r}: {hint}")
            port_text = rest[1:]
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
        port, proto = _port(port_text, untrusted, "--allow") if port_text else (None, None)
        try:
            net = ipaddress.ip_network(host, strict=False)
        except ValueError:
            net = None
        if net is not None:
            return cls(str(net), port, proto)
        if not host or not _NAME_RE.match(host) or len(host) > 253 or host.replace(".", "").isdigit():
            raise SpecError(f"bad --allow {untrusted!r}: {hint}")
        return cls(host.lower().rstrip("."), port, proto)

    def __str__(self) -> str:
        host = f"[{self.target}]" if ":" in self.target and self.port is not None else self.target
        if self.port is None:
            return host
        return f"{host}:{self.port}" + (f"/{self.proto}" if self.proto else "")


@dataclass(frozen=True)
class Publish:
    """A host port forwarded to a port inside the sandbox (TCP)."""

    host_port: int
    guest_port: int
    address: str = "127.0.0.1"  # where on the host it listens

    @classmethod
    def parse(cls, untrusted: str) -> Publish:
        """``8080:80``, ``0.0.0.0:8080:80``, ``[::1]:8080:80``, ``8080:80/tcp``."""
        text = untrusted.strip()
        hint = "use HOST_PORT:PORT or ADDRESS:HOST_PORT:PORT, like 8080:80"
        if text.endswith("/udp"):
            raise SpecError(f"bad publish {untrusted!r}: only TCP ports can be published")
        text = text.removesuffix("/tcp")
        address = "127.0.0.1"
        if text.startswith("["):
            address, sep, text = text[1:].partition("]")
            if not sep or not text.startswith(":"):
                raise SpecError(f"bad publish {untrusted!r}: {hint}")
            text = text[1:]
        parts = text.split(":")
        if len(parts) == 3:
            address, *parts = parts
        if len(parts) != 2:
            raise SpecError(f"bad publish {untrusted!r}: {hint}")
        try:
            address = str(ipaddress.ip_address(address))
        except ValueError:
            raise SpecError(f"bad publish {untrusted!r}: {address!r} is not an IP address") from None
        host_port, _ = _port(parts[0], untrusted, "publish")
        guest_port, _ = _port(parts[1], untrusted, "publish")
        return cls(host_port, guest_port, address)

    def __str__(self) -> str:
        address = f"[{self.address}]" if ":" in self.address else self.address
        return f"{address}:{self.host_port}:{self.guest_port}"


def parse_bandwidth(untrusted: str) -> int:
    """``10mbit``, ``500kbit``, ``1gbit`` -> bits per second."""
    match = _RATE_RE.match(untrusted)
    if not match or float(match.group(1)) <= 0:
        raise SpecError(f"bad bandwidth {untrusted!r}: use a rate like 10mbit (kbit, mbit or gbit)")
    value = int(float(match.group(1)) * _RATE_UNITS[match.group(2).lower()])
    if value < 8000:
        raise SpecError(f"bad bandwidth {untrusted!r}: the least is 8kbit")
    return value


def format_bandwidth(bits: int) -> str:
    for unit, scale in (("gbit", 1000_000_000), ("mbit", 1000_000), ("kbit", 1000)):
        if bits % scale == 0:
            return f"{bits // scale}{unit}"
    return f"{bits}bit"


def parse_link(untrusted: str) -> str:
    if not _LINK_RE.match(untrusted):
        raise SpecError(f"bad link {untrusted!r}: name a workspace, like db")
    return untrusted


def parse_dns(untrusted: str) -> str:
    try:
        return str(ipaddress.ip_address(untrusted.strip()))
    except ValueError:
        raise SpecError(f"bad dns server {untrusted!r}: use an IP address like 192.0.2.53") from None


def parse_mode(untrusted: str) -> Network:
    try:
        return Network(untrusted)
    except ValueError:
        values = ", ".join(m.value for m in Network)
        raise SpecError(f"unknown network mode {untrusted!r}: use one of {values}") from None


@dataclass(frozen=True)
class NetworkPolicy:
    mode: Network = Network.NONE
    allow: tuple[AllowEntry, ...] = ()
    publish: tuple[Publish, ...] = ()
    links: tuple[str, ...] = ()
    bandwidth: int | None = None  # bits per second, each direction
    dns: tuple[str, ...] = ()  # upstream servers of silo's resolver; the host's when empty

    def __post_init__(self) -> None:
        if self.allow and self.mode is not Network.ALLOW:
            raise SpecError(f"--allow needs the allow mode, not {self.mode.value!r}: use --network allow")
        if self.mode is Network.NONE:
            for given, what in ((self.publish, "publish"), (self.links, "links"),
                                (self.bandwidth, "bandwidth"), (self.dns, "dns")):
                if given:
                    raise SpecError(f"{what} needs a network: add --network internet (or allow, full)")
        ports = [p.host_port for p in self.publish]
        if len(set(ports)) != len(ports):
            raise SpecError("a host port is published twice: keep one")

    @property
    def enabled(self) -> bool:
        return self.mode is not Network.NONE

    def to_dict(self) -> dict[str, object]:
        """The policy shaped like ``silo.toml``'s ``[network]`` table (unset fields left out)."""
        out: dict[str, object] = {"mode": self.mode.value}
        if self.allow:
            out["allow"] = [str(a) for a in self.allow]
        if self.publish:
            out["publish"] = [str(p) for p in self.publish]
        if self.links:
            out["links"] = list(self.links)
        if self.bandwidth is not None:
            out["bandwidth"] = format_bandwidth(self.bandwidth)
        if self.dns:
            out["dns"] = list(self.dns)
        return out


def build_policy(mode: str | Network | None = None, *, allow: Iterable[str | AllowEntry] = (),
                 publish: Iterable[str | Publish] = (), links: Iterable[str] = (),
                 bandwidth: str | int | None = None, dns: Iterable[str] = ()) -> NetworkPolicy:
    """Validate CLI/SDK-style values. With no mode, ``allow`` entries ask for ``allow``
    and any other network option for ``internet`` (the default network)."""
    allow_t = tuple(a if isinstance(a, AllowEntry) else AllowEntry.parse(a) for a in allow)
    publish_t = tuple(p if isinstance(p, Publish) else Publish.parse(p) for p in publish)
    links_t = tuple(dict.fromkeys(parse_link(n) for n in links))
    dns_t = tuple(parse_dns(d) for d in dns)
    rate = bandwidth if isinstance(bandwidth, int) or bandwidth is None else parse_bandwidth(bandwidth)
    if mode is None:
        if allow_t:
            mode = Network.ALLOW
        elif publish_t or links_t or rate is not None or dns_t:
            mode = Network.INTERNET
        else:
            mode = Network.NONE
    net = mode if isinstance(mode, Network) else parse_mode(mode)
    return NetworkPolicy(net, allow_t, publish_t, links_t, rate, dns_t)


NETWORK_KEYS = ("mode", "allow", "publish", "links", "bandwidth", "dns")


def _strings(untrusted: object, key: str) -> list[str]:
    if not isinstance(untrusted, Sequence) or isinstance(untrusted, str) \
            or not all(isinstance(v, str) for v in untrusted):
        raise SpecError(f"[network] {key} must be a list of strings")
    return list(untrusted)


def policy_from_dict(untrusted: Mapping[str, object]) -> NetworkPolicy:
    """A ``[network]`` table (keys already checked against :data:`NETWORK_KEYS`)."""
    mode = untrusted.get("mode")
    if mode is not None and not isinstance(mode, str):
        raise SpecError('[network] mode must be a string like "internet"')
    bandwidth = untrusted.get("bandwidth")
    if bandwidth is not None and not isinstance(bandwidth, str):
        raise SpecError('[network] bandwidth must be a string like "10mbit"')
    return build_policy(mode, allow=_strings(untrusted.get("allow", []), "allow"),
                        publish=_strings(untrusted.get("publish", []), "publish"),
                        links=_strings(untrusted.get("links", []), "links"),
                        bandwidth=bandwidth, dns=_strings(untrusted.get("dns", []), "dns"))


@dataclass(frozen=True)
class Lease:
    """Where a sandbox's network sits: its addresses and the host side's."""

    index: int
    host4: str
    guest4: str
    host6: str
    guest6: str
    ifname: str  # the host side of the veth pair

    def to_dict(self) -> dict[str, object]:
        return {"index": self.index, "host4": self.host4, "guest4": self.guest4,
                "host6": self.host6, "guest6": self.guest6, "ifname": self.ifname}


__all__ = ["AllowEntry", "IPNetwork", "Lease", "Network", "NetworkPolicy", "Publish",
           "build_policy", "parse_bandwidth", "parse_mode", "policy_from_dict"]
