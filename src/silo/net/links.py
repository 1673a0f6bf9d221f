"""The links of a sandbox's network as root: leases, the veth pair, addresses, routes,
the bandwidth cap (pyroute2; no ``ip`` processes).

A lease is a numbered slot, a file ``/run/silo/net/leases/N`` holding the pid of the
keeper (:mod:`silo.net.keeper`) that owns it, made with O_EXCL. Slot N gives the veth
``silo-N`` and the addresses 10.213.0.0/16 split in /30s (host .1, sandbox .2) and
fd51:5110:0:N::/64 (host ::1, sandbox ::2). A slot whose keeper is dead is taken over:
its leftovers (the veth, the host's table ``silo_N``) are removed first.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import ipaddress
import os
import struct
from collections.abc import Iterator
from typing import Any

from pyroute2 import IPRoute

from silo.model import network
from silo.model.errors import SiloError
from silo.model.network import Lease
from silo.net import rules
from silo.net.nft import Nft
from silo.sys import kernel as sysk
from silo.sys.cgroups_common import read_file, write_file

LEASE_DIR = "/run/silo/net/leases"
POOL4 = ipaddress.IPv4Network("10.213.0.0/16")
SLOTS = POOL4.num_addresses // 4 - 2


def lease_for(index: int) -> Lease:
    base4 = POOL4.network_address + 4 * index
    return Lease(index=index, host4=str(base4 + 1), guest4=str(base4 + 2),
                 host6=f"fd51:5110:0:{index:x}::1", guest6=f"fd51:5110:0:{index:x}::2",
                 ifname=f"{rules.IFPREFIX}{index}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip() or "0")
    except (OSError, ValueError):
        return None


def acquire(key: str) -> Lease:
    """A free slot for this keeper (the same one for the same key when it is free)."""
    os.makedirs(LEASE_DIR, mode=0o700, exist_ok=True)
    start = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % SLOTS
    for step in range(SLOTS):
        index = (start + step) % SLOTS + 1
        path = f"{LEASE_DIR}/{index}"
        owner = _owner(path)
        if owner is not None and (owner == 0 or _alive(owner)):
            continue
        if owner is not None:  # a dead keeper's slot: clean it, then race for it
            cleanup(index)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return lease_for(index)
    raise SiloError("no free network slot: too many sandboxes with a network are running")


def release(lease: Lease) -> None:
    path = f"{LEASE_DIR}/{lease.index}"
    if _owner(path) == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def cleanup(index: int) -> None:
    """Remove a slot's host-side leftovers (veth, table); quiet when there are none."""
    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=f"{rules.IFPREFIX}{index}")
        for link in links:
            with contextlib.suppress(Exception):
                ipr.link("del", index=link)
    with Nft() as nft, contextlib.suppress(SiloError):
        nft.run(rules.delete_host_rules(index))


def sweep() -> list[int]:
    """Clean every slot whose keeper is dead (a crashed keeper or daemon); the slots."""
    swept = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(LEASE_DIR):
            if not name.isdigit():
                continue
            owner = _owner(f"{LEASE_DIR}/{name}")
            if owner is not None and owner != 0 and _alive(owner):
                continue
            cleanup(int(name))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{LEASE_DIR}/{name}")
            swept.append(int(name))
    return swept


def write_sysctl(name: str, value: str) -> None:
    """Write a sysctl of the calling thread's network namespace (or a global one)."""
    write_file("/proc/sys/" + name.replace(".", "/"), value)


def read_sysctl(name: str) -> str:
    return read_file("/proc/sys/" + name.replace(".", "/")).strip()


def enable_forwarding() -> None:
    """Turn on the host's IPv4 and IPv6 forwarding (NAT needs both), once.

    Turning on IPv6 forwarding makes Linux ignore router advertisements on interfaces
    that take them only as a host (accept_ra=1); those are set to 2 first, so the
    host keeps its IPv6 routes (Docker's documentation asks users to do this by hand)."""
    if read_sysctl("net.ipv4.ip_forward") != "1":
        write_sysctl("net.ipv4.ip_forward", "1")
    if read_sysctl("net.ipv6.conf.all.forwarding") != "1":
        for name in os.listdir("/proc/sys/net/ipv6/conf"):
            if name in ("all", "lo"):
                continue
            with contextlib.suppress(OSError):
                if read_sysctl(f"net.ipv6.conf.{name}.accept_ra") == "1":
                    write_sysctl(f"net.ipv6.conf.{name}.accept_ra", "2")
        write_sysctl("net.ipv6.conf.all.forwarding", "1")


@contextlib.contextmanager
def in_netns(fd: int) -> Iterator[None]:
    """Run the block with the calling thread in the network namespace ``fd``."""
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        sysk.setns(fd, sysk.CLONE_NEWNET)
        try:
            yield
        finally:
            sysk.setns(back, sysk.CLONE_NEWNET)
    finally:
        os.close(back)


def add_tbf(ipr: Any, index: int, rate: int) -> None:
    # burst: at least one MTU and ~10 ms of traffic; queue up to 50 ms
    burst = max(rate // 8 // 100, 16 * 1024)
    try:
        ipr.tc("add", "tbf", index, rate=f"{rate}bit", burst=burst, latency="50ms")
    except Exception as e:  # pyroute2's NetlinkError
        if getattr(e, "code", None) in (errno.ENOENT, errno.EOPNOTSUPP):
            raise SiloError("the bandwidth cap needs the kernel's tbf qdisc (sch_tbf), which "
                            "is not available here: drop --bandwidth") from None
        raise


def create_veth(lease: Lease, netns_fd: int, bandwidth: int | None) -> None:
    """The veth pair: ``silo-N`` here (the host side), ``eth0`` in ``netns_fd``."""
    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname=lease.ifname, kind="veth", peer={"ifname": "eth0", "net_ns_fd": netns_fd})
        except Exception as e:  # pyroute2's NetlinkError
            if getattr(e, "code", None) == errno.EEXIST:
                raise SiloError(f"the network interface {lease.ifname} exists already: "
                                "run 'silo network sweep' or remove it with 'ip link del'") from None
            raise
        index = ipr.link_lookup(ifname=lease.ifname)[0]
        with contextlib.suppress(OSError):
            write_sysctl(f"net.ipv6.conf.{lease.ifname}.accept_ra", "0")
            # no duplicate address detection: the link is new and point to point, and a
            # tentative link-local address delays the first neighbour solicitations
            write_sysctl(f"net.ipv6.conf.{lease.ifname}.accept_dad", "0")
        ipr.addr("add", index=index, address=lease.host4, prefixlen=30)
        ipr.addr("add", index=index, address=lease.host6, prefixlen=64, flags=0x02)  # IFA_F_NODAD
        ipr.link("set", index=index, state="up")
        if bandwidth:
            add_tbf(ipr, index, bandwidth)


def configure_guest(lease: Lease, bandwidth: int | None) -> None:
    """Inside the sandbox's namespace (the calling thread is in it): lo, eth0, routes."""
    with contextlib.suppress(OSError):
        write_sysctl("net.ipv6.conf.all.accept_dad", "0")
        write_sysctl("net.ipv6.conf.default.accept_dad", "0")
        write_sysctl("net.ipv6.conf.eth0.accept_dad", "0")
        write_sysctl("net.ipv6.conf.eth0.accept_ra", "0")
    # unprivileged ping (ICMP datagram sockets), as Debian's systemd allows on a host
    write_sysctl("net.ipv4.ping_group_range", "0 2147483647")
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        eth = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=eth, address=lease.guest4, prefixlen=30)
        ipr.addr("add", index=eth, address=lease.guest6, prefixlen=64, flags=0x02)
        ipr.link("set", index=eth, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=lease.host4)
        ipr.route("add", dst="::/0", gateway=lease.host6, family=10)
        if bandwidth:
            add_tbf(ipr, eth, bandwidth)


TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
GVISOR_PEER = "silo-gvisor"  # the far end of gvisor's veth until it moves into runsc's namespace


def _guest_link(ipr: Any) -> None:
    """Inside the sandbox's namespace: the near end of the link to a guest one hop
    behind it (network.VM_TAP, which exists), its addresses, and forwarding."""
    write_sysctl("net.ipv4.ip_forward", "1")
    write_sysctl("net.ipv6.conf.all.forwarding", "1")
    with contextlib.suppress(OSError):
        write_sysctl(f"net.ipv6.conf.{network.VM_TAP}.accept_dad", "0")
    tap = ipr.link_lookup(ifname=network.VM_TAP)[0]
    ipr.addr("add", index=tap, address=network.VM_HOST4, prefixlen=network.VM_PREFIX4)
    ipr.addr("add", index=tap, address=network.VM_HOST6, prefixlen=network.VM_PREFIX6, flags=0x02)
    ipr.link("set", index=tap, state="up")


def create_tap() -> int:
    """Inside the sandbox's namespace (the calling thread is in it): the vm level's tap
    (network.VM_TAP) with its host side's addresses, the forwarding its guest needs; the
    tap's fd, which QEMU is given. The tap goes when the last fd of it is closed."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", network.VM_TAP.encode(), IFF_TAP | IFF_NO_PI))
        with IPRoute() as ipr:
            _guest_link(ipr)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_gvisor_link() -> None:
    """Inside the sandbox's namespace (the calling thread is in it): the gvisor level's
    link, a veth pair whose near end plays the vm level's tap (network.VM_TAP, its
    addresses: one set of rules serves both) and whose far end (:data:`GVISOR_PEER`)
    waits here, down, until runsc's namespace exists (:func:`move_gvisor_end`)."""
    with IPRoute() as ipr:
        ipr.link("add", ifname=network.VM_TAP, kind="veth", peer={"ifname": GVISOR_PEER})
        _guest_link(ipr)


def move_gvisor_end(netns_fd: int) -> None:
    """From the sandbox's namespace (the calling thread is in it): the far end of
    gvisor's veth into runsc's namespace ``netns_fd`` as ``eth0``, with the guest's
    addresses and default routes, which runsc's netstack takes over at its start."""
    with IPRoute() as ipr:
        peer = ipr.link_lookup(ifname=GVISOR_PEER)
        if not peer:
            raise SiloError("the gvisor sandbox's network link is gone (attached twice?)")
        ipr.link("set", index=peer[0], net_ns_fd=netns_fd, ifname="eth0")
    with in_netns(netns_fd):
        for name in ("all", "default", "eth0"):
            with contextlib.suppress(OSError):
                write_sysctl(f"net.ipv6.conf.{name}.accept_dad", "0")
                write_sysctl(f"net.ipv6.conf.{name}.accept_ra", "0")
        with IPRoute() as ipr:
            # runsc gives the Sentry a loopback only when the namespace's is up
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            eth = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth, address=network.VM_GUEST4, prefixlen=network.VM_PREFIX4)
            ipr.addr("add", index=eth, address=network.VM_GUEST6, prefixlen=network.VM_PREFIX6, flags=0x02)
            ipr.link("set", index=eth, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=network.VM_HOST4)
            ipr.route("add", dst="::/0", gateway=network.VM_HOST6, family=10)
