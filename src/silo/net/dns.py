"""silo's DNS resolver for a workspace's network: names by policy, no rebinding, pins first.

Role. A workspace with a network has its own network namespace, whose
``/etc/resolv.conf`` names 127.0.0.53. The workspace's keeper makes a UDP socket and a
listening TCP socket in that namespace (a socket keeps the namespace it was made in)
and hands them to :meth:`Resolver.serve_udp` and :meth:`Resolver.serve_tcp`. The
resolver runs in the keeper's event loop, in the host's namespace, so the sockets it
makes for its upstream queries reach the host's resolvers (or a test's).

Trust. Every byte read from the workspace's sockets is hostile and stays
``untrusted_*`` until dnspython has parsed it and :meth:`Resolver._answer` has checked
the header and the one question; nothing from the client is forwarded but that
question (a fresh upstream query is built, with its own random id; the client's id
goes back on the reply only). Parse errors of any class are a FORMERR or a dropped
datagram, never a traceback. The upstreams are trusted to answer honestly, not to
know which addresses a workspace may reach: the rebinding defence applies to them.

Per query, in order:

1. **Local names** (:attr:`DnsPolicy.local`: linked workspaces), as ``NAME.`` and
   ``NAME.silo.``, are answered here in every mode (A/AAAA, TTL 5, AA; NOERROR and no
   records for other types), never forwarded, never stripped, never pinned. Other
   names under ``silo.`` are NXDOMAIN here: the zone is silo's, nothing to ask upstream.
2. **Mode allow**: a name that no :attr:`DnsPolicy.allow_names` entry matches is
   NXDOMAIN at once, with an Extended DNS Error 15 (Blocked, RFC 8914) when the query
   had EDNS, counted in ``stats["refused"]`` and :attr:`Resolver.refused_names`.
3. **Forwarding** to the upstreams in order, UDP then TCP on TC, ``timeout`` per try;
   a timeout, a bad reply (wrong id or question, unparsable) or an upstream SERVFAIL,
   REFUSED, FORMERR or NOTIMP moves to the next one. None left: SERVFAIL.
4. **Rebinding defence** (modes internet and allow): A/AAAA records inside
   :attr:`DnsPolicy.blocked` are removed from every section (an IPv4-mapped AAAA is
   judged by its IPv4 address), and SVCB/HTTPS address hints are dropped (RFC 9460
   makes them optional; a client then asks A/AAAA, which pass through here). When an
   A/AAAA question is left with no address, the reply is NOERROR with an empty
   answer, with EDE 15 under EDNS. Mode full changes nothing.
5. **Pinning** (mode allow): the addresses of the answer's CNAME chain from the
   question's name are handed to ``pin([(address, seconds), ...])`` *before* the reply
   is sent, so a connect right after the answer finds them in the firewall. Seconds
   are ``max(ttl, 5)`` (a TTL-0 answer must stay usable for the connect that follows)
   and at most a day (:data:`MAX_PIN_TTL`; the reply's TTLs are cut to it too, so no
   client caches an address longer than it is pinned). Address records off that
   chain, and in the authority and additional sections, are removed: in allow mode
   every address in a reply is a pinned one. If ``pin`` raises, the reply is SERVFAIL.
   A keeper that limits names to ports (``example.org:443``) gives ``pin_named``
   instead: it is also told the question's name (the one the allow list matched).

The resolver keeps no global state; several can share a process. It never blocks the
event loop except in ``pin``, which the keeper provides.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import ipaddress
import logging
import secrets
import socket
from collections.abc import Callable, Mapping, Sequence

import dns.asyncbackend
import dns.asyncquery
import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.rdtypes.ANY.CNAME import CNAME
from dns.rdtypes.svcbbase import ParamKey, SVCBBase

log = logging.getLogger(__name__)

MODES = ("internet", "allow", "full")
LOCAL_TTL = 5
MIN_PIN_TTL = 5  # a TTL-0 answer stays pinned long enough for the connect that follows it
MAX_PIN_TTL = 86400
MAX_UDP = 4096  # the largest datagram read from a client, and the largest UDP reply
MAX_TCP = 65535
UPSTREAM_PAYLOAD = 1232  # the EDNS buffer size asked of upstreams (DNS flag day 2020)
TCP_IDLE = 10.0
MAX_TCP_CLIENTS = 32
MAX_UDP_INFLIGHT = 256
MAX_REFUSED_NAMES = 256
MAX_CHAIN = 16
BLOCKED_TEXT = "blocked by silo network policy"
SILO_ZONE = dns.name.from_text("silo.")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Pin = Callable[[Sequence[tuple[str, int]]], None]
PinNamed = Callable[[str, Sequence[tuple[str, int]]], None]

_ADDRESS_TYPES = frozenset({dns.rdatatype.A, dns.rdatatype.AAAA})
_HINTS = frozenset({ParamKey.IPV4HINT, ParamKey.IPV6HINT})
_UPSTREAM_OK = frozenset({dns.rcode.NOERROR, dns.rcode.NXDOMAIN})
_HEADER = 12
_QR = int(dns.flags.QR)
_OPCODE_MASK = 0x7800
_STATS = ("queries", "refused", "stripped", "upstream_errors", "malformed", "pin_errors", "dropped")


def _parse_name(text: str, what: str) -> dns.name.Name:
    if not isinstance(text, str) or not text.strip(".").strip():
        raise ValueError(f"{what}: {text!r} is not a DNS name")
    try:
        return dns.name.from_text(text)
    except Exception:  # dnspython raises a class per defect
        raise ValueError(f"{what}: {text!r} is not a DNS name") from None


@dataclasses.dataclass(frozen=True)
class DnsPolicy:
    """What a workspace may resolve. Checked when made: ValueError for anything malformed.

    ``allow_names`` (mode allow): ``pypi.org`` is that name, ``*.example.org`` any name
    below example.org but not example.org itself; case and a final dot do not matter.
    ``blocked``: answers inside these networks are removed (modes internet and allow).
    ``local``: names silo answers itself in every mode, as ``NAME.`` and ``NAME.silo.``.
    """

    mode: str
    allow_names: tuple[str, ...] = ()
    blocked: tuple[IPNetwork, ...] = ()
    local: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _Rules(self)


class _Rules:
    """A :class:`DnsPolicy` compiled for lookups (dnspython names compare case-insensitively)."""

    def __init__(self, policy: DnsPolicy) -> None:
        if policy.mode not in MODES:
            raise ValueError(f"unknown DNS policy mode {policy.mode!r}: use one of {', '.join(MODES)}")
        self.mode = policy.mode
        self.exact: set[dns.name.Name] = set()
        self.below: set[dns.name.Name] = set()
        for text in policy.allow_names:
            name = _parse_name(text, "allow_names")
            if b"*" in name.labels[1:] or (name.labels[0] == b"*" and len(name.labels) < 3):
                raise ValueError(f"allow_names: {text!r}: '*' is only the first label of '*.domain'")
            if name.labels[0] == b"*":
                self.below.add(name.parent())
            else:
                self.exact.add(name)
        for net in policy.blocked:
            if not isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network):
                raise ValueError(f"blocked: {net!r} is not an IPv4Network or IPv6Network")
        self.blocked4 = tuple(n for n in policy.blocked if isinstance(n, ipaddress.IPv4Network))
        self.blocked6 = tuple(n for n in policy.blocked if isinstance(n, ipaddress.IPv6Network))
        self.local: dict[dns.name.Name, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        for key, addresses in policy.local.items():
            name = _parse_name(key, "local")
            if isinstance(addresses, str):
                raise ValueError(f"local: the addresses of {key!r} are a tuple of strings")
            try:
                ips = [ipaddress.ip_address(a) for a in addresses]
                silo_name = dns.name.Name(name.labels[:-1] + SILO_ZONE.labels)
            except ValueError:
                raise ValueError(f"local: {key!r}: {addresses!r} are not IP addresses") from None
            except Exception:
                raise ValueError(f"local: {key!r} is too long a name") from None
            entry = (tuple(str(a) for a in ips if a.version == 4), tuple(str(a) for a in ips if a.version == 6))
            self.local[name] = self.local[silo_name] = entry

    def allows(self, name: dns.name.Name) -> bool:
        if name in self.exact:
            return True
        return any(dns.name.Name(name.labels[i:]) in self.below for i in range(1, len(name.labels) - 1))

    def blocks(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:  # ::ffff:10.0.0.1 is reached as 10.0.0.1
                return any(ip.ipv4_mapped in n for n in self.blocked4) or any(ip in n for n in self.blocked6)
            return any(ip in n for n in self.blocked6)
        return any(ip in n for n in self.blocked4)


def _header_reply(untrusted: bytes, rcode: dns.rcode.Rcode) -> bytes | None:
    """A bare reply (no sections) to a message whose header is all that can be read."""
    if len(untrusted) < _HEADER or untrusted[2] << 8 & _QR:
        return None
    flags = int.from_bytes(untrusted[2:4], "big")
    flags = _QR | (flags & (_OPCODE_MASK | dns.flags.RD)) | int(rcode)
    return untrusted[:2] + flags.to_bytes(2, "big") + bytes(8)


def _chain(qname: dns.name.Name, answer: Sequence[dns.rrset.RRset]) -> set[dns.name.Name]:
    """The names of the CNAME chain from ``qname`` in ``answer`` (bounded, loops cut)."""
    targets = {r.name: rd.target for r in answer if r.rdtype == dns.rdatatype.CNAME
               for rd in r if isinstance(rd, CNAME)}
    chain, name = {qname}, qname
    for _ in range(MAX_CHAIN):
        target = targets.get(name)
        if target is None or target in chain:
            break
        chain.add(target)
        name = target
    return chain


def _without_hints(rrset: dns.rrset.RRset) -> dns.rrset.RRset | None:
    kept: list[dns.rdata.Rdata] = []
    for rd in rrset:
        if isinstance(rd, SVCBBase) and _HINTS & set(rd.params):
            try:
                rd = rd.replace(params={k: v for k, v in rd.params.items() if k not in _HINTS})
            except ValueError:  # "mandatory" names a hint: the record cannot go without it
                continue
        kept.append(rd)
    return dns.rrset.from_rdata_list(rrset.name, rrset.ttl, kept) if kept else None


class Resolver:
    """One workspace's resolver; see the module docstring for what it answers and how.

    ``upstreams`` are (IP address, port) pairs, tried in order (a host name is a
    ValueError: resolving it would need a resolver). ``pin`` (mode allow only) is called
    synchronously with the addresses of an answer before it is sent; without one,
    nothing is pinned. ``pin_named(name, addresses)`` may replace it, ``name`` being
    the question's (lower case, no final dot). ``timeout`` bounds each try of each upstream (a TC retry over TCP
    gets its own). ``tcp_idle`` and ``max_tcp_clients`` bound the TCP side: a
    connection quiet that long is closed, and one more than the limit is closed at once.

    Accounting, for the keeper to read: :attr:`stats` counts ``queries`` (messages
    received, good or not), ``refused`` (names the policy refused), ``stripped``
    (address records removed as blocked), ``upstream_errors`` (failed tries of an
    upstream), ``malformed`` (FORMERR or dropped), ``pin_errors`` and ``dropped``
    (datagrams over the size or in-flight limit, connections over the limit).
    :attr:`refused_names` counts refusals per name (lower case, no final dot, escaped
    as in zone files); it holds the first 256 names only, so a workspace cannot grow it.
    """

    def __init__(self, upstreams: Sequence[tuple[str, int]], policy: DnsPolicy,
                 pin: Pin | None = None, timeout: float = 2.0, *, pin_named: PinNamed | None = None,
                 tcp_idle: float = TCP_IDLE, max_tcp_clients: int = MAX_TCP_CLIENTS) -> None:
        if not upstreams:
            raise ValueError("the resolver needs at least one upstream")
        if pin is not None and pin_named is not None:
            raise ValueError("give the resolver pin or pin_named, not both")
        self.upstreams = tuple((str(ipaddress.ip_address(host)), int(port)) for host, port in upstreams)
        if not all(0 < port < 65536 for _, port in self.upstreams):
            raise ValueError(f"an upstream port is out of range: {upstreams!r}")
        self.policy = policy
        self._rules = _Rules(policy)
        self.pin = pin
        self.pin_named = pin_named
        self.timeout = timeout
        self.tcp_idle = tcp_idle
        self.max_tcp_clients = max_tcp_clients
        self.stats: dict[str, int] = dict.fromkeys(_STATS, 0)
        self.refused_names: collections.Counter[str] = collections.Counter()
        self._backend = dns.asyncbackend.get_backend("asyncio")

    def set_policy(self, policy: DnsPolicy) -> None:
        """Replace the policy; queries that arrive from now on follow it."""
        self._rules = _Rules(policy)
        self.policy = policy

    # -- transports --------------------------------------------------------------------

    async def serve_udp(self, sock: socket.socket) -> None:
        """Answer datagrams on ``sock`` (bound) until cancelled; the socket stays the caller's."""
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    untrusted_data, peer = await loop.sock_recvfrom(sock, MAX_UDP + 1)
                except OSError as e:
                    if e.errno in (errno.EBADF, errno.ENOTSOCK):
                        raise
                    continue
                if len(untrusted_data) > MAX_UDP or len(tasks) >= MAX_UDP_INFLIGHT:
                    self.stats["dropped"] += 1
                    continue
                task = loop.create_task(self._udp_one(sock, untrusted_data, peer))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            await _cancel_all(tasks)

    async def _udp_one(self, sock: socket.socket, untrusted_data: bytes, peer: tuple[str, int]) -> None:
        reply = await self._answer(untrusted_data, tcp=False)
        if reply is not None:
            with contextlib.suppress(OSError):
                await asyncio.get_running_loop().sock_sendto(sock, reply, peer)

    async def serve_tcp(self, sock: socket.socket) -> None:
        """Accept connections on ``sock`` (listening) until cancelled; 2-byte length framing."""
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    conn, _ = await loop.sock_accept(sock)
                except OSError as e:
                    if e.errno in (errno.EBADF, errno.ENOTSOCK, errno.EINVAL):
                        raise
                    await asyncio.sleep(0.1)  # EMFILE and the like: do not spin
                    continue
                if len(tasks) >= self.max_tcp_clients:
                    self.stats["dropped"] += 1
                    conn.close()
                    continue
                task = loop.create_task(self._tcp_conn(conn))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            await _cancel_all(tasks)

    async def _tcp_conn(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=conn)
        except OSError:
            conn.close()
            return
        try:
            while True:
                async with asyncio.timeout(self.tcp_idle):
                    head = await reader.readexactly(2)
                    untrusted_data = await reader.readexactly(int.from_bytes(head, "big"))
                reply = await self._answer(untrusted_data, tcp=True)
                if reply is None:
                    continue
                writer.write(len(reply).to_bytes(2, "big") + reply)
                async with asyncio.timeout(self.tcp_idle):
                    await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, OSError):
            pass  # idle, gone, or not reading its replies: the connection ends
        finally:
            writer.close()
            try:
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
            except Exception:
                writer.transport.abort()

    # -- answering ---------------------------------------------------------------------

    async def _answer(self, untrusted_data: bytes, *, tcp: bool) -> bytes | None:
        """The reply to one message from the workspace, or None to send nothing."""
        self.stats["queries"] += 1
        try:
            return await self._answer_checked(untrusted_data, tcp)
        except Exception as e:  # one query must never stop the server
            log.warning("dns: a query failed: %s: %s", type(e).__name__, e)
            return _header_reply(untrusted_data, dns.rcode.SERVFAIL)

    async def _answer_checked(self, untrusted_data: bytes, tcp: bool) -> bytes | None:
        if len(untrusted_data) < _HEADER or untrusted_data[2] << 8 & _QR:
            self.stats["malformed"] += 1
            return None  # no header to answer, or a reply (never answer those: no loops)
        if dns.opcode.from_flags(int.from_bytes(untrusted_data[2:4], "big")) != dns.opcode.QUERY:
            return _header_reply(untrusted_data, dns.rcode.NOTIMP)
        try:
            query = dns.message.from_wire(untrusted_data)
        except Exception:  # dnspython raises a class per defect (TSIG without a key included)
            self.stats["malformed"] += 1
            return _header_reply(untrusted_data, dns.rcode.FORMERR)
        if len(query.question) != 1:
            self.stats["malformed"] += 1
            return _header_reply(untrusted_data, dns.rcode.FORMERR)
        # Checked: a QUERY with one question; the name is a parsed dns.name.Name.
        question = query.question[0]
        response = dns.message.make_response(query, recursion_available=True)
        _edns(response, query, ede=False)
        if query.edns > 0:
            response.set_rcode(dns.rcode.BADVERS)
        elif question.rdclass != dns.rdataclass.IN or (
                dns.rdatatype.is_metatype(question.rdtype) and question.rdtype != dns.rdatatype.ANY):
            response.set_rcode(dns.rcode.NOTIMP)
        else:
            await self._resolve(query, question, response)
        if tcp:
            size = MAX_TCP
        elif query.edns >= 0:
            size = max(512, min(query.payload, MAX_UDP))
        else:
            size = 512
        return response.to_wire(max_size=size, prefer_truncation=True)

    async def _resolve(self, query: dns.message.Message, question: dns.rrset.RRset,
                       response: dns.message.Message) -> None:
        rules = self._rules  # this query follows the policy it arrived under
        name = question.name
        local = rules.local.get(name)
        if local is not None:
            response.flags |= dns.flags.AA
            v4, v6 = local
            addresses = {dns.rdatatype.A: v4, dns.rdatatype.AAAA: v6}.get(question.rdtype, ())
            if addresses:
                response.answer.append(
                    dns.rrset.from_text_list(name, LOCAL_TTL, dns.rdataclass.IN, question.rdtype, addresses))
            return
        if name.is_subdomain(SILO_ZONE):
            response.flags |= dns.flags.AA
            response.set_rcode(dns.rcode.NXDOMAIN)
            return
        if rules.mode == "allow" and not rules.allows(name):
            self.stats["refused"] += 1
            key = name.to_text(omit_final_dot=True).lower()
            if key in self.refused_names or len(self.refused_names) < MAX_REFUSED_NAMES:
                self.refused_names[key] += 1
            response.set_rcode(dns.rcode.NXDOMAIN)
            _edns(response, query, ede=True)
            return
        upstream = await self._forward(query, question)
        if upstream is None:
            response.set_rcode(dns.rcode.SERVFAIL)
            return
        self._fill(rules, query, question, upstream, response)

    def _fill(self, rules: _Rules, query: dns.message.Message, question: dns.rrset.RRset,
              upstream: dns.message.Message, response: dns.message.Message) -> None:
        """Copy an upstream's reply into ``response`` through the rebinding defence and pins."""
        response.set_rcode(upstream.rcode())
        sections = [[r for r in s if r.rdclass == dns.rdataclass.IN]
                    for s in (upstream.answer, upstream.authority, upstream.additional)]
        counts = [0, 0, 0]
        if rules.mode != "full":
            for i, section in enumerate(sections):
                sections[i], counts[i] = self._strip(rules, section)
        answer, authority, additional = sections
        chain = _chain(question.name, answer)
        if rules.mode == "allow":  # only the chain's addresses, and those are pinned
            answer = [r for r in answer if r.rdtype not in _ADDRESS_TYPES or r.name in chain]
            authority = [r for r in authority if r.rdtype not in _ADDRESS_TYPES]
            additional = [r for r in additional if r.rdtype not in _ADDRESS_TYPES]
        emptied = counts[0] and question.rdtype in _ADDRESS_TYPES and not any(
            r.rdtype == question.rdtype and r.name in chain for r in answer)
        if emptied:  # NODATA, and say why
            answer, authority, additional = [], [], []
            response.set_rcode(dns.rcode.NOERROR)
            _edns(response, query, ede=True)
        if rules.mode == "allow" and answer and not self._pinned(question.name, answer):
            response.set_rcode(dns.rcode.SERVFAIL)
            return
        response.answer, response.authority, response.additional = answer, authority, additional
        wants_ad = query.flags & dns.flags.AD or query.ednsflags & dns.flags.DO
        if upstream.flags & dns.flags.AD and wants_ad and not any(counts):
            response.flags |= dns.flags.AD

    def _strip(self, rules: _Rules, section: list[dns.rrset.RRset]) -> tuple[list[dns.rrset.RRset], int]:
        out: list[dns.rrset.RRset] = []
        stripped = 0
        for rrset in section:
            kept: dns.rrset.RRset | None = rrset
            if rrset.rdtype in _ADDRESS_TYPES:
                rdatas = [rd for rd in rrset if not rules.blocks(rd.to_text())]
                stripped += len(rrset) - len(rdatas)
                if len(rdatas) < len(rrset):
                    kept = dns.rrset.from_rdata_list(rrset.name, rrset.ttl, rdatas) if rdatas else None
            elif rrset.rdtype in (dns.rdatatype.SVCB, dns.rdatatype.HTTPS):
                kept = _without_hints(rrset)
            if kept is not None:
                out.append(kept)
        self.stats["stripped"] += stripped
        return out, stripped

    def _pinned(self, qname: dns.name.Name, answer: list[dns.rrset.RRset]) -> bool:
        """Pin the answer's addresses (all on the chain by now); False if the keeper failed."""
        seconds: dict[str, int] = {}
        for rrset in answer:
            if rrset.rdtype in _ADDRESS_TYPES:
                rrset.update_ttl(MAX_PIN_TTL)
                ttl = min(max(rrset.ttl, MIN_PIN_TTL), MAX_PIN_TTL)
                for rd in rrset:
                    address = str(ipaddress.ip_address(rd.to_text()))
                    seconds[address] = max(seconds.get(address, 0), ttl)
        if not seconds:
            return True
        try:
            if self.pin_named is not None:
                self.pin_named(qname.to_text(omit_final_dot=True).lower(), list(seconds.items()))
            elif self.pin is not None:
                self.pin(list(seconds.items()))
        except Exception as e:  # never hand out an address the firewall does not know
            self.stats["pin_errors"] += 1
            log.warning("dns: pinning %d addresses failed: %s: %s", len(seconds), type(e).__name__, e)
            return False
        return True

    async def _forward(self, query: dns.message.Message,
                       question: dns.rrset.RRset) -> dns.message.Message | None:
        """The first acceptable reply of the upstreams to the question, or None."""
        upstream_query = dns.message.make_query(
            question.name, question.rdtype, use_edns=0, payload=UPSTREAM_PAYLOAD,
            want_dnssec=bool(query.ednsflags & dns.flags.DO), id=secrets.randbelow(1 << 16))
        upstream_query.flags |= query.flags & dns.flags.CD
        for host, port in self.upstreams:
            try:
                reply = await self._exchange(upstream_query, host, port)
            except Exception as e:  # timeouts, refused connections, replies that do not parse
                self.stats["upstream_errors"] += 1
                log.debug("dns: upstream %s port %d: %s: %s", host, port, type(e).__name__, e)
                continue
            if not _is_reply_to(upstream_query, reply) or reply.rcode() not in _UPSTREAM_OK:
                self.stats["upstream_errors"] += 1
                continue
            return reply
        return None

    async def _exchange(self, query: dns.message.Message, host: str, port: int) -> dns.message.Message:
        try:
            async with asyncio.timeout(self.timeout):
                return await dns.asyncquery.udp(
                    query, host, self.timeout, port, ignore_unexpected=True, raise_on_truncation=True,
                    ignore_errors=True, backend=self._backend)  # ignore_errors: wait past spoofs
        except dns.message.Truncated:
            async with asyncio.timeout(self.timeout):
                return await dns.asyncquery.tcp(query, host, self.timeout, port, backend=self._backend)


def _is_reply_to(query: dns.message.Message, reply: dns.message.Message) -> bool:
    if reply.id != query.id or not reply.flags & dns.flags.QR or len(reply.question) != 1:
        return False
    ours, theirs = query.question[0], reply.question[0]
    return (theirs.name, theirs.rdtype, theirs.rdclass) == (ours.name, ours.rdtype, ours.rdclass)


def _edns(response: dns.message.Message, query: dns.message.Message, *, ede: bool) -> None:
    """EDNS on the reply iff the query had it (DO echoed); with EDE 15 when ``ede``."""
    if query.edns < 0:
        return
    options: list[dns.edns.Option] = [dns.edns.EDEOption(dns.edns.EDECode.BLOCKED, BLOCKED_TEXT)] if ede else []
    response.use_edns(0, query.ednsflags & dns.flags.DO, MAX_UDP, options=options)


async def _cancel_all(tasks: set[asyncio.Task[None]]) -> None:
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


__all__ = ["MODES", "DnsPolicy", "Resolver"]
