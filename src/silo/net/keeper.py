"""The keeper of one sandbox's network: a small process per sandbox with a network.

Started by whoever starts the sandbox (the spawner for ``silo run``, silod for a
workspace) with one end of a SEQPACKET socket pair. It

1. takes a lease (:mod:`silo.net.links`), makes a new network namespace owned by the
   host's user namespace (so nothing inside the sandbox holds CAP_NET_ADMIN over it),
   the veth pair, the addresses and routes, the host's NAT and guard table and the
   sandbox's policy table (:mod:`silo.net.rules`);
2. binds silo's resolver (:mod:`silo.net.dns`) on 127.0.0.53:53 *inside* that
   namespace, while its upstream sockets stay in the host's;
3. sends ``ready`` with the namespace's fd (SCM_RIGHTS); the sandbox is cloned into it;

A vm level's guest sits one hop behind that namespace, on a tap whose fd is sent too;
a gvisor level's sandbox too, on a veth whose far end the owner's ``attach`` (as root:
with runsc's own network namespace, before the sandbox is released) moves there: runsc
must own the namespace whose link its netstack takes, and then the policy sees its
packets as forwarded ones, as a guest's. ``ready`` carries no namespace then.

Without root (:mod:`silo.net.rootless`) step 1 waits: ``ready`` carries no namespace,
the sandbox is cloned into one of its own, and its owner sends ``attach`` with the
sandbox's user and network namespaces before releasing it; the keeper then sets up
pasta, the policy and the resolver there. Then, either way, it
4. serves DNS, published ports (a TCP proxy: listens on the host, connects to
   127.0.0.1:PORT inside), pins resolved names into the firewall, and answers
   ``set`` (a live policy change), ``stats`` and ``stop`` on the socket;
5. tears everything down at ``stop``, at EOF (its owner died) or at SIGTERM.

Messages are JSON objects, one per datagram: ``{"op": "set", "policy": {...},
"links": {...}}``, ``{"op": "attach"}`` (with two fds), ``{"op": "stats"}``,
``{"op": "stop"}``; replies ``{"ok": ...}`` or ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from silo.model import network
from silo.model.errors import SiloError
from silo.model.network import Lease, Network, NetworkPolicy, policy_from_dict
from silo.net import wire

RESOLVER = "127.0.0.53"


def _host_upstreams(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    out = []
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    out.append((str(ipaddress.ip_address(parts[1].split("%")[0])), 53))
    return out or [("127.0.0.1", 53)]


# == the owner's side ======================================================================


class KeeperClient:
    """The owner's handle on a running keeper."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket, netns_fd: int | None,
                 lease: Lease, tap_fd: int | None = None, gvisor: bool = False) -> None:
        self.proc = proc
        self.sock = sock
        self.netns_fd = netns_fd
        self.tap_fd = tap_fd  # vm: the guest's tap in the namespace, for QEMU
        self.lease = lease
        self.gvisor = gvisor  # gvisor: runsc's namespace is linked at attach
        self.pasta = -1  # rootless: a pidfd of the keeper's pasta, killed at close if still there

    @classmethod
    def start(cls, policy: NetworkPolicy, key: str, links: Mapping[str, Sequence[str]] | None = None,
              timeout: float = 20.0, vm: bool = False, gvisor: bool = False) -> KeeperClient:
        """Start a keeper and wait until the network is up (as root) or ready to attach
        (rootless: :meth:`attach` once the sandbox is cloned); SiloError with its reason if not.
        ``vm``: for a vm level's guest, which joins through a tap (:attr:`tap_fd`; root only).
        ``gvisor``: for runsc, whose own namespace :meth:`attach` links (root only)."""
        rootless = os.geteuid() != 0
        if rootless and (vm or gvisor):
            raise SiloError(f"a network for --isolation {'vm' if vm else 'gvisor'} needs root: run silod as root")
        if rootless and links:
            raise SiloError("links between workspaces need root: run silod as root, or drop --link")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "PYTHONPATH")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__)))), *sys.path) if p)
        proc = subprocess.Popen([sys.executable, "-m", "silo.net.keeper",
                                 str(theirs.fileno())], pass_fds=[theirs.fileno()], env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        fds: list[int] = []
        try:
            ours.sendall(json.dumps({"policy": policy.to_dict(), "key": key, "rootless": rootless, "vm": vm,
                                     "gvisor": gvisor,
                                     "links": {k: list(v) for k, v in (links or {}).items()}}).encode())
            ours.settimeout(timeout)
            msg, fds, _, _ = socket.recv_fds(ours, wire.MAX_MSG, 2)
            netns_fd = fds[0] if fds else None
            tap_fd = fds[1] if len(fds) > 1 else None
            ours.settimeout(None)
            reply: dict[str, Any] = json.loads(msg) if msg else {
                "error": "the network keeper exited before its network was up"}
            if "error" in reply:
                raise SiloError(reply["error"])
            if netns_fd is None and not rootless and not gvisor:
                raise SiloError("the network keeper sent no namespace")
            if vm and tap_fd is None:
                raise SiloError("the network keeper sent no tap for the VM")
            lease = Lease(**reply["ok"]["lease"])
        except BaseException as e:
            for fd in fds:
                os.close(fd)
            ours.close()  # EOF: a keeper still setting up tears down and exits
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if isinstance(e, (OSError, ValueError, KeyError, TypeError)) and not isinstance(e, SiloError):
                raise SiloError(f"the network keeper failed: {e}") from None
            raise
        return cls(proc, ours, netns_fd, lease, tap_fd, gvisor)

    def attach(self, pid: int) -> None:
        """Rootless: set up the network in the namespaces of the cloned, not yet released
        sandbox ``pid``; gvisor: link its network namespace (runsc's) to the keeper's; a
        no-op otherwise (as root the sandbox was cloned into the keeper's namespace)."""
        if self.gvisor:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                self.call({"op": "attach"}, timeout=10.0, fds=[fd])
            finally:
                os.close(fd)
            return
        if self.netns_fd is not None:
            return
        fds = [os.open(f"/proc/{pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC) for ns in ("user", "net")]
        try:
            pasta = self.call({"op": "attach"}, timeout=30.0, fds=fds)
        finally:
            for fd in fds:
                os.close(fd)
        with contextlib.suppress(OSError, TypeError):
            self.pasta = os.pidfd_open(int(pasta))

    def call(self, message: dict[str, Any], timeout: float = 10.0, fds: Sequence[int] = ()) -> Any:
        return wire.request(self.sock, message, "the workspace's network keeper", timeout, fds)[0]

    def set_policy(self, policy: NetworkPolicy, links: Mapping[str, Sequence[str]] | None = None) -> None:
        self.call({"op": "set", "policy": policy.to_dict(),
                   "links": {k: list(v) for k, v in (links or {}).items()}})

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call({"op": "stats"})
        return result

    def close(self) -> None:
        """Stop the keeper and wait until everything it made is gone."""
        for fd in (self.netns_fd, self.tap_fd):
            if fd is not None:
                os.close(fd)
        self.netns_fd = self.tap_fd = None
        with contextlib.suppress(OSError, SiloError, ValueError):
            self.call({"op": "stop"})
        self.sock.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.pasta >= 0:  # the keeper and its helper both killed: pasta is left to us
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.pasta, signal.SIGKILL)
                select.select([self.pasta], [], [], 5)
            os.close(self.pasta)
            self.pasta = -1


# == the keeper's side =====================================================================


@dataclass
class _Pin:
    expires: float
    names: set[str] = field(default_factory=set)


class Keeper:
    def __init__(self, ctrl: socket.socket, config: dict[str, Any]) -> None:
        self.ctrl = ctrl
        self.policy = policy_from_dict(config["policy"])
        self.key = str(config["key"])
        self.links: dict[str, list[str]] = {str(k): list(v) for k, v in config.get("links", {}).items()}
        self.rootless = bool(config.get("rootless"))
        self.vm = bool(config.get("vm"))  # a vm level's guest behind a tap (root only)
        self.gvisor = bool(config.get("gvisor"))  # runsc's netstack behind a veth (root only)
        self.tap = -1
        self.host_addrs: list[str] = []  # blocked in the sandbox's table (rootless)
        self.inner: Any = None  # rootless: silo.net.rootless.Inner
        self.pasta: subprocess.Popen[bytes] | None = None
        self.ipv6 = True  # rootless: whether pasta carries IPv6 (the host has a route)
        self.lease: Lease | None = None
        self.host_ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.guest_ns = -1
        self.guest_nft: Any = None
        self.host_nft: Any = None
        self.resolver: Any = None
        self.dns_socks: list[socket.socket] = []
        self.pins: dict[str, _Pin] = {}
        self.proxies: list[asyncio.base_events.Server] = []
        self.stopping: asyncio.Event | None = None
        self.tasks: list[asyncio.Task[None]] = []

    # -- setting up and tearing down ------------------------------------------------------

    def setup(self) -> None:
        from silo.net import links, rules
        from silo.net.nft import Nft
        from silo.sys import kernel as sysk

        if self.rootless:
            from silo.net import rootless
            self.lease = rootless.LEASE
            self.host_addrs = rootless.host_addresses()
            self.ipv6 = rootless.host_has_ipv6_route()
            return
        self.lease = lease = links.acquire(self.key)
        links.enable_forwarding()
        sysk.unshare(sysk.CLONE_NEWNET)
        self.guest_ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        sysk.setns(self.host_ns, sysk.CLONE_NEWNET)
        links.create_veth(lease, self.guest_ns, self.policy.bandwidth)
        self.host_nft = Nft()
        self.host_nft.run(rules.host_rules(lease, self.policy, self._link_addrs()))
        with links.in_netns(self.guest_ns):
            links.configure_guest(lease, self.policy.bandwidth)
            if self.vm:
                self.tap = links.create_tap()
            elif self.gvisor:
                links.create_gvisor_link()
            self.guest_nft = Nft()
            self.guest_nft.run(rules.guest_base() + self._guest_policy() + (rules.vm_nat() if self.behind else []))
        self.dns_socks = [self._guest_socket(socket.SOCK_DGRAM, bind=(RESOLVER, 53)),
                          self._guest_socket(socket.SOCK_STREAM, bind=(RESOLVER, 53), listen=32)]
        if self.behind:  # the guest asks the namespace's end of its tap
            self.dns_socks += [self._guest_socket(socket.SOCK_DGRAM, bind=(network.VM_HOST4, 53)),
                               self._guest_socket(socket.SOCK_STREAM, bind=(network.VM_HOST4, 53), listen=32)]

    @property
    def behind(self) -> bool:
        """Whether the sandbox's traffic comes one hop behind the namespace (vm, gvisor)."""
        return self.vm or self.gvisor

    def attach_gvisor(self, netns_fd: int) -> None:
        """gvisor: move the veth's far end into runsc's namespace ``netns_fd``."""
        from silo.net import links
        if not self.gvisor or self.guest_ns < 0:
            raise SiloError("this network has no gvisor link to attach")

        def move() -> None:
            with links.in_netns(self.guest_ns):
                links.move_gvisor_end(netns_fd)
        # a thread of its own: pyroute2's calls run an event loop, and this one's is busy
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(move).result()

    def attach(self, userns_fd: int, netns_fd: int) -> None:
        """Rootless: the network in the sandbox's own namespaces (:mod:`silo.net.rootless`)."""
        from silo.net import rootless, rules
        if not self.rootless or self.inner is not None:
            raise SiloError("this network is attached already")
        self.inner = rootless.Inner(userns_fd, netns_fd)
        self.pasta = rootless.start_pasta(userns_fd, netns_fd, self.ipv6)
        self.inner.watch(self.pasta.pid)
        self.inner.wait_link(self.pasta)
        assert self.pasta.stderr is not None
        err = self.pasta.stderr.fileno()
        loop = asyncio.get_running_loop()

        def drain() -> None:  # pasta's complaints after start-up: read and drop
            with contextlib.suppress(OSError):
                if os.read(err, 65536):
                    return
            loop.remove_reader(err)
        loop.add_reader(err, drain)
        self.inner.configure(self.policy.bandwidth)
        self.guest_nft = self.inner
        self.guest_nft.run(rules.guest_base() + self._guest_policy())
        self.dns_socks = [self._guest_socket(socket.SOCK_DGRAM, bind=(RESOLVER, 53)),
                          self._guest_socket(socket.SOCK_STREAM, bind=(RESOLVER, 53), listen=32)]
        self._start_dns()

    def _guest_socket(self, kind: int, bind: tuple[str, int] | None = None, listen: int | None = None,
                      family: int = socket.AF_INET) -> socket.socket:
        """A socket in the sandbox's network namespace (bound, and listening, if asked)."""
        from silo.net import links, rootless
        if self.rootless:
            if self.inner is None:
                raise SiloError("the sandbox's network is not attached yet")
            sock: socket.socket = self.inner.socket(family, kind, bind, listen)
        else:
            with links.in_netns(self.guest_ns):
                sock = rootless.open_socket(family, kind, bind, listen)
        sock.setblocking(False)
        return sock

    def _link_addrs(self) -> list[str]:
        return [a for addrs in self.links.values() for a in addrs]

    def _guest_policy(self, pins: Sequence[tuple[str, int, list[tuple[str, int]]]] = ()) -> list[Any]:
        from silo.net import rules
        host = self.host_addrs if self.policy.mode is not Network.FULL else ()
        return rules.guest_policy(self.policy, self._link_addrs(), pins, host)

    def teardown(self) -> None:
        from silo.net import links
        for sock in self.dns_socks:
            sock.close()
        self.dns_socks = []
        for server in self.proxies:
            server.close()
        if self.guest_nft is not None and self.guest_nft is not self.inner:
            self.guest_nft.close()
        self.guest_nft = None
        if self.inner is not None:  # the helper leaves at EOF (and kills pasta)
            self.inner.close()
            self.inner = None
        if self.pasta is not None:
            self.pasta.terminate()
            try:
                self.pasta.wait(5)
            except subprocess.TimeoutExpired:
                self.pasta.kill()
                self.pasta.wait()
            if self.pasta.stderr is not None:
                self.pasta.stderr.close()
            self.pasta = None
        if self.lease is not None and not self.rootless:
            with contextlib.suppress(Exception):
                links.cleanup(self.lease.index)
            links.release(self.lease)
        self.lease = None
        if self.host_nft is not None:
            self.host_nft.close()
        if self.guest_ns >= 0:
            os.close(self.guest_ns)
            self.guest_ns = -1
        if self.tap >= 0:
            os.close(self.tap)
            self.tap = -1

    # -- the policy ---------------------------------------------------------------------

    def _dns_policy(self) -> Any:
        from silo.net import dns, rules
        names = tuple(sorted({e.target for e in self.policy.allow if e.network is None}))
        local = {name: tuple(addrs) for name, addrs in self.links.items()}
        # `none` set live on a running network: the resolver answers nothing but links
        mode = "allow" if self.policy.mode is Network.NONE else self.policy.mode.value
        return dns.DnsPolicy(mode=mode, allow_names=names, blocked=rules.BLOCKED, local=local)

    def _ports_for(self, name: str) -> list[tuple[str, int]] | None:
        """The ports a resolved ``name`` may be reached on ([] any), None if not allowed."""
        out: list[tuple[str, int]] = []
        found = False
        for entry in self.policy.allow:
            if entry.network is not None:
                continue
            target = entry.target
            if name == target or (target.startswith("*.") and name.endswith(target[1:])):
                found = True
                if entry.port is None:
                    return []
                out += [(p, entry.port) for p in ((entry.proto,) if entry.proto else ("tcp", "udp"))]
        return out if found else None

    def _pins_left(self) -> list[tuple[str, int, list[tuple[str, int]]]]:
        now = time.monotonic()
        out = []
        for addr, pin in list(self.pins.items()):
            left = int(pin.expires - now)
            if left <= 0:
                del self.pins[addr]
                continue
            ports: list[tuple[str, int]] = []
            allowed = False
            for name in pin.names:
                p = self._ports_for(name)
                if p is None:
                    continue
                if not p:
                    ports, allowed = [], True
                    break
                ports += p
                allowed = True
            if allowed:
                out.append((addr, left, sorted(set(ports))))
        return out

    def pin(self, name: str, records: Sequence[tuple[str, int]]) -> None:
        """Let the sandbox reach ``records`` (address, seconds) of an allowed ``name``."""
        from silo.net import rules
        ports = self._ports_for(name.lower().rstrip("."))
        if ports is None:
            ports = []  # reached through a CNAME of an allowed name
        now = time.monotonic()
        for addr, ttl in records:
            entry = self.pins.setdefault(addr, _Pin(now + ttl))
            entry.expires = max(entry.expires, now + ttl)
            entry.names.add(name.lower().rstrip("."))
        cmds = rules.pin_elements((addr, ttl, ports) for addr, ttl in records)
        if cmds and self.guest_nft is not None:
            self.guest_nft.run(cmds)

    def set_policy(self, policy: NetworkPolicy, new_links: dict[str, list[str]]) -> None:
        from silo.net import rules
        assert self.lease is not None
        to_none = policy.mode is Network.NONE  # drops published ports; the cap stays till stop
        if not to_none and (policy.publish != self.policy.publish or policy.bandwidth != self.policy.bandwidth):
            raise SiloError("published ports and the bandwidth cap change at the next start, not live: "
                            "stop and start the workspace")
        old_policy, old_links = self.policy, self.links
        self.policy, self.links = policy, new_links
        try:
            if self.guest_nft is not None:
                self.guest_nft.run(self._guest_policy(self._pins_left()))
            if self.host_nft is not None:
                self.host_nft.run(rules.host_rules(self.lease, policy, self._link_addrs()))
        except SiloError:
            self.policy, self.links = old_policy, old_links
            raise
        if self.resolver is not None:
            self.resolver.set_policy(self._dns_policy())
        if to_none:
            for server in self.proxies:
                server.close()
            self.proxies = []

    def stats(self) -> dict[str, Any]:
        from silo.net import rules
        counters: dict[str, dict[str, int]] = {}
        refused: list[dict[str, Any]] = []
        # one listing holds the named counters and the refused sets with their elements
        listing = self.guest_nft.list("table", family="inet", name=rules.TABLE) if self.guest_nft else []
        for item in listing:
            if "counter" in item:
                c = item["counter"]
                counters[c["name"]] = {"bytes": c.get("bytes", 0), "packets": c.get("packets", 0)}
            elif "set" in item and item["set"]["name"].startswith("refused"):
                refused += [_refusal(elem) for elem in item["set"].get("elem", [])]
        refused.sort(key=lambda r: -r["attempts"])
        assert self.lease is not None
        out: dict[str, Any] = {
            "mode": self.policy.mode.value,
            "policy": self.policy.to_dict(),
            "address": {"ipv4": self.lease.guest4, "ipv6": self.lease.guest6},
            "bytes_out": counters.get("tx", {}).get("bytes", 0),
            "bytes_in": counters.get("rx", {}).get("bytes", 0),
            "packets_out": counters.get("tx", {}).get("packets", 0),
            "packets_in": counters.get("rx", {}).get("packets", 0),
            "refused_attempts": sum(r["attempts"] for r in refused),
            "refused": refused[:100],
        }
        if self.resolver is not None:
            out["dns"] = dict(self.resolver.stats)
            names = getattr(self.resolver, "refused_names", {})
            out["dns_refused_names"] = dict(names) if names else {}
        return out

    # -- serving ------------------------------------------------------------------------

    async def serve(self) -> None:
        from silo.net import dns
        loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        upstreams = [(a, 53) for a in self.policy.dns] or _host_upstreams()
        self.resolver = dns.Resolver(upstreams, self._dns_policy(), pin_named=self.pin)
        if self.dns_socks:
            self._start_dns()
        self.ctrl.setblocking(False)
        loop.add_reader(self.ctrl.fileno(), self._on_ctrl)
        try:
            await self.stopping.wait()
        finally:
            loop.remove_reader(self.ctrl.fileno())
            for task in self.tasks:
                task.cancel()
            for task in self.tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _start_dns(self) -> None:
        for udp, tcp in zip(self.dns_socks[::2], self.dns_socks[1::2], strict=True):
            self.tasks += [asyncio.create_task(self.resolver.serve_udp(udp)),
                           asyncio.create_task(self.resolver.serve_tcp(tcp))]

    def _on_ctrl(self) -> None:
        assert self.stopping is not None
        fds: list[int] = []
        try:
            data, fds, _, _ = socket.recv_fds(self.ctrl, wire.MAX_MSG, 2)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.stopping.set()
            return
        try:
            msg = json.loads(data)
            op = msg.get("op")
            if op == "set":
                links = {str(k): [str(a) for a in v] for k, v in msg.get("links", {}).items()}
                self.set_policy(policy_from_dict(msg["policy"]), links)
                reply: dict[str, Any] = {"ok": True}
            elif op == "attach" and self.gvisor:
                if len(fds) != 1:
                    raise ValueError("attach needs runsc's network namespace")
                self.attach_gvisor(fds[0])
                reply = {"ok": True}
            elif op == "attach":
                if len(fds) != 2:
                    raise ValueError("attach needs the sandbox's user and network namespaces")
                self.attach(fds[0], fds[1])
                assert self.pasta is not None
                reply = {"ok": self.pasta.pid}
            elif op == "stats":
                reply = {"ok": self.stats()}
            elif op == "stop":
                self.stopping.set()
                reply = {"ok": True}
            else:
                reply = {"error": f"unknown keeper operation {op!r}"}
        except SiloError as e:
            reply = {"error": e.message}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            reply = {"error": f"bad keeper request: {e}"}
        except Exception as e:  # never leave the owner waiting for a reply
            reply = {"error": f"the network keeper failed: {type(e).__name__}: {e}"}
        finally:
            for fd in fds:
                os.close(fd)
        with contextlib.suppress(OSError):
            self.ctrl.send(json.dumps(reply).encode())

    async def start_proxies(self) -> None:
        for pub in self.policy.publish:
            family = socket.AF_INET6 if ":" in pub.address else socket.AF_INET
            try:
                server = await asyncio.start_server(self._proxy_handler(pub.guest_port), pub.address,
                                                    pub.host_port, family=family, reuse_address=True)
            except OSError as e:
                raise SiloError(f"cannot publish {pub}: port {pub.host_port} on {pub.address} is taken or "
                                f"not available ({e.strerror}): choose another host port") from None
            self.proxies.append(server)

    @property
    def target(self) -> str:
        """Where a published port is connected to inside: the sandbox's loopback, or a
        vm or gvisor level's guest."""
        return network.VM_GUEST4 if self.behind else "127.0.0.1"

    def _proxy_handler(self, port: int) -> Any:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            loop = asyncio.get_running_loop()
            try:
                inner = self._guest_socket(socket.SOCK_STREAM)
            except (OSError, SiloError):
                writer.close()
                return
            try:
                await asyncio.wait_for(loop.sock_connect(inner, (self.target, port)), 5)
                r2, w2 = await asyncio.open_connection(sock=inner)
            except (TimeoutError, OSError):
                inner.close()
                writer.close()
                return
            await asyncio.gather(_pump(reader, w2), _pump(r2, writer), return_exceptions=True)

        return handle


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.close()


def _refusal(elem: Any) -> dict[str, Any]:
    val = elem.get("elem", elem) if isinstance(elem, dict) else elem
    counter = {}
    if isinstance(val, dict) and "val" in val:
        counter = val.get("counter", {})
        val = val["val"]
    parts = val.get("concat", [val]) if isinstance(val, dict) else [val]
    out: dict[str, Any] = {"destination": parts[0], "protocol": parts[1] if len(parts) > 1 else None}
    if len(parts) > 2:
        out["port"] = parts[2]
    out["attempts"] = counter.get("packets", 0)
    return out


def main(argv: list[str]) -> int:
    ctrl = socket.socket(fileno=int(argv[1]))
    ctrl.set_inheritable(False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    data = ctrl.recv(wire.MAX_MSG)
    if not data:
        return 0
    keeper: Keeper | None = None
    try:
        keeper = Keeper(ctrl, json.loads(data))
        keeper.setup()
        assert keeper.lease is not None

        async def run() -> None:
            assert keeper is not None and keeper.lease is not None
            await keeper.start_proxies()
            socket.send_fds(ctrl, [json.dumps({"ok": {"lease": keeper.lease.to_dict()}}).encode()],
                            [] if keeper.gvisor else [fd for fd in (keeper.guest_ns, keeper.tap) if fd >= 0])
            await keeper.serve()

        asyncio.run(run())
    except Exception as e:  # report (after cleaning up), never leave the owner waiting
        if keeper is not None:
            keeper.teardown()
            keeper = None
        message = e.message if isinstance(e, SiloError) else f"the network keeper failed: {type(e).__name__}: {e}"
        with contextlib.suppress(OSError):
            ctrl.send(json.dumps({"error": message}).encode())
    finally:
        if keeper is not None:
            keeper.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))


__all__ = ["RESOLVER", "Keeper", "KeeperClient", "Network"]
