"""silo's DNS resolver (silo.net.dns) against fake upstreams on 127.0.0.1, no root.

Each test runs one event loop: fake upstreams built with dnspython (UDP and TCP, every
query they see logged), a Resolver serving its own UDP and TCP sockets, and dnspython
(or a raw socket) as the workspace's client. What they prove: the policy (allow,
wildcards, local names, live changes), the rebinding defence, pins made before the
reply leaves, forwarding (ids, timeouts, TC, bad upstream replies), and that hostile
packets neither crash the server nor stop it answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.asyncquery
import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from silo.net.dns import DnsPolicy, Resolver

LO = "127.0.0.1"
BLOCKED = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "fc00::/7"))
LINKS = {"db": ("10.213.0.6", "fd51:5110::6")}
PUBLIC = "93.184.216.34"


def rr(name: str, ttl: int, rdtype: str, *rdatas: str) -> dns.rrset.RRset:
    return dns.rrset.from_text_list(name, ttl, "IN", rdtype, list(rdatas))


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


# -- a fake upstream ---------------------------------------------------------------------


@dataclass
class Upstream:
    """Answers from ``zone`` ((name, type) -> answer section), NXDOMAIN otherwise.

    ``behaviour``: ``answer``; ``silent`` (reads, never replies); ``refused``;
    ``wrong_id`` / ``wrong_question`` (a reply that is not to the query);
    ``tc`` (UDP replies are empty with TC set, TCP answers)."""

    zone: dict[tuple[str, str], list[dns.rrset.RRset]] = field(default_factory=dict)
    behaviour: str = "answer"
    seen: list[tuple[str, str, str, int]] = field(default_factory=list)  # (transport, name, type, id)
    address: tuple[str, int] = (LO, 0)

    def reply(self, data: bytes, transport: str) -> bytes | None:
        query = dns.message.from_wire(data)
        q = query.question[0]
        name = q.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(q.rdtype)
        self.seen.append((transport, name, rdtype, query.id))
        if self.behaviour == "silent":
            return None
        response = dns.message.make_response(query, recursion_available=True)
        if self.behaviour == "refused":
            response.set_rcode(dns.rcode.REFUSED)
        elif self.behaviour == "tc" and transport == "udp":
            response.flags |= dns.flags.TC
        elif (name, rdtype) in self.zone:
            response.answer = list(self.zone[name, rdtype])
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
        if self.behaviour == "wrong_id":
            response.id ^= 1
        elif self.behaviour == "wrong_question":
            response.question = [dns.rrset.RRset(dns.name.from_text("other.example."), q.rdclass, q.rdtype)]
            response.answer = [rr("other.example.", 60, "A", PUBLIC)]
        return response.to_wire()

    def names(self) -> list[str]:
        return [name for _, name, _, _ in self.seen]


class _UdpServer(asyncio.DatagramProtocol):
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.upstream.reply(data, "udp")
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


@contextlib.asynccontextmanager
async def upstreams(*ups: Upstream) -> AsyncIterator[None]:
    """Start the fake upstreams, each on one random port for both UDP and TCP."""
    loop = asyncio.get_running_loop()
    closers: list[Callable[[], Any]] = []

    async def on_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: Upstream) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                reply = up.reply(await reader.readexactly(size), "tcp")
                if reply is not None:
                    writer.write(len(reply).to_bytes(2, "big") + reply)
                    await writer.drain()
        writer.close()

    for up in ups:
        udp, tcp = _listening_pair()
        transport, _ = await loop.create_datagram_endpoint(lambda up=up: _UdpServer(up), sock=udp)
        server = await asyncio.start_server(lambda r, w, up=up: on_tcp(r, w, up), sock=tcp)
        up.address = udp.getsockname()
        closers += [transport.close, server.close]
    try:
        yield
    finally:
        for close in closers:
            close()


# -- the resolver under test ---------------------------------------------------------------


@dataclass
class Served:
    resolver: Resolver
    port: int

    async def ask(self, name: str, rdtype: str = "A", *, edns: bool = True, tcp: bool = False,
                  qid: int | None = None, timeout: float = 5.0) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype, use_edns=0 if edns else False)
        if qid is not None:
            query.id = qid
        if tcp:
            return await dns.asyncquery.tcp(query, LO, timeout, self.port)
        return await dns.asyncquery.udp(query, LO, timeout, self.port)


def _listening_pair() -> tuple[socket.socket, socket.socket]:
    """A bound UDP socket and a listening TCP socket on the same random port."""
    for _ in range(20):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((LO, 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.bind(udp.getsockname())
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(64)
        udp.setblocking(False)
        tcp.setblocking(False)
        return udp, tcp
    raise RuntimeError("no free port pair")


@contextlib.asynccontextmanager
async def serving(policy: DnsPolicy, ups: Sequence[Upstream], pin: Callable[..., None] | None = None,
                  timeout: float = 1.0, **kw: Any) -> AsyncIterator[Served]:
    resolver = Resolver([u.address for u in ups], policy, pin, timeout, **kw)
    udp, tcp = _listening_pair()
    tasks = [asyncio.create_task(resolver.serve_udp(udp)), asyncio.create_task(resolver.serve_tcp(tcp))]
    try:
        yield Served(resolver, udp.getsockname()[1])
        for task in tasks:
            assert not task.done(), f"a server stopped: {task}"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        udp.close()
        tcp.close()


def addresses(message: dns.message.Message) -> list[str]:
    return [rd.to_text() for r in message.answer if r.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) for rd in r]


def ede(message: dns.message.Message) -> list[tuple[int, str | None]]:
    return [(o.code, o.text) for o in message.options if isinstance(o, dns.edns.EDEOption)]


class Pins:
    def __init__(self) -> None:
        self.calls: list[list[tuple[str, int]]] = []

    def __call__(self, pins: Sequence[tuple[str, int]]) -> None:
        self.calls.append(list(pins))


def allow(*names: str, **kw: Any) -> DnsPolicy:
    return DnsPolicy("allow", names, BLOCKED, **kw)


INTERNET = DnsPolicy("internet", blocked=BLOCKED)


# -- forwarding ----------------------------------------------------------------------------


def test_forwards_keeps_the_client_id_and_asks_upstream_with_its_own():
    up = Upstream({("www.example.com", "A"): [rr("www.example.com.", 60, "A", PUBLIC)]})

    async def test() -> None:
        async with upstreams(up), serving(INTERNET, [up]) as s:
            replies = [await s.ask("WwW.Example.COM.", qid=4242) for _ in range(5)]
            for reply in replies:
                assert reply.id == 4242
                assert reply.rcode() == dns.rcode.NOERROR
                assert addresses(reply) == [PUBLIC]
                assert reply.question[0].name.labels[:3] == (b"WwW", b"Example", b"COM")  # mirrored, case kept
            assert len(up.seen) == 5
            assert any(qid != 4242 for _, _, _, qid in up.seen)
            assert s.resolver.stats["queries"] == 5

    run(test)


@pytest.mark.parametrize("behaviour", ["wrong_id", "wrong_question"])
def test_a_reply_that_is_not_to_our_query_is_not_believed(behaviour):
    up = Upstream({("a.example", "A"): [rr("a.example.", 60, "A", PUBLIC)]}, behaviour=behaviour)

    async def test() -> None:
        async with upstreams(up), serving(INTERNET, [up], timeout=0.3) as s:
            reply = await s.ask("a.example")
            assert reply.rcode() == dns.rcode.SERVFAIL
            assert addresses(reply) == []
            assert up.names() == ["a.example"]
            assert s.resolver.stats["upstream_errors"] == 1

    run(test)


def test_upstream_timeout_tries_the_next_upstream():
    dead = Upstream(behaviour="silent")
    good = Upstream({("a.example", "A"): [rr("a.example.", 60, "A", PUBLIC)]})

    async def test() -> None:
        async with upstreams(dead, good), serving(INTERNET, [dead, good], timeout=0.3) as s:
            start = time.monotonic()
            reply = await s.ask("a.example")
            assert time.monotonic() - start >= 0.25
            assert addresses(reply) == [PUBLIC]
            assert dead.names() == good.names() == ["a.example"]
            assert s.resolver.stats["upstream_errors"] == 1

    run(test)


def test_an_upstream_refusing_sends_the_query_to_the_next():
    refusing = Upstream(behaviour="refused")
    good = Upstream({("a.example", "A"): [rr("a.example.", 60, "A", PUBLIC)]})

    async def test() -> None:
        async with upstreams(refusing, good), serving(INTERNET, [refusing, good]) as s:
            assert addresses(await s.ask("a.example")) == [PUBLIC]
            assert refusing.names() == good.names() == ["a.example"]

    run(test)


def test_all_upstreams_dead_is_servfail_within_their_timeouts():
    dead = [Upstream(behaviour="silent"), Upstream(behaviour="silent")]

    async def test() -> None:
        async with upstreams(*dead), serving(INTERNET, dead, timeout=0.25) as s:
            start = time.monotonic()
            reply = await s.ask("a.example")
            elapsed = time.monotonic() - start
            assert reply.rcode() == dns.rcode.SERVFAIL
            assert 0.45 <= elapsed < 0.25 * 2 + 0.5
            assert [u.names() for u in dead] == [["a.example"], ["a.example"]]
            assert s.resolver.stats["upstream_errors"] == 2

    run(test)


def test_truncated_upstream_reply_is_asked_again_over_tcp():
    up = Upstream({("a.example", "A"): [rr("a.example.", 60, "A", PUBLIC)]}, behaviour="tc")

    async def test() -> None:
        async with upstreams(up), serving(INTERNET, [up]) as s:
            reply = await s.ask("a.example")
            assert addresses(reply) == [PUBLIC]
            assert [t for t, _, _, _ in up.seen] == ["udp", "tcp"]

    run(test)


def test_a_reply_too_big_for_the_client_is_truncated_and_whole_over_tcp():
    many = [f"203.0.113.{i}" for i in range(1, 61)]
    up = Upstream({("big.example", "A"): [rr("big.example.", 60, "A", *many)]})

    async def test() -> None:
        async with upstreams(up), serving(INTERNET, [up]) as s:
            small = await s.ask("big.example", edns=False)
            assert small.flags & dns.flags.TC
            whole = await s.ask("big.example", tcp=True)
            assert sorted(addresses(whole)) == sorted(many)
            assert not whole.flags & dns.flags.TC

    run(test)


def test_tcp_serves_several_queries_on_one_connection():
    up = Upstream({("a.example", "A"): [rr("a.example.", 60, "A", PUBLIC)],
                   ("b.example", "AAAA"): [rr("b.example.", 60, "AAAA", "2001:db8::1")]})

    async def test() -> None:
        async with upstreams(up), serving(INTERNET, [up]) as s:
            reader, writer = await asyncio.open_connection(LO, s.port)
            for qid, (name, rdtype) in enumerate([("a.example", "A"), ("b.example", "AAAA"), ("c.example", "A")]):
                wire = dns.message.make_query(name, rdtype, id=qid).to_wire()
                writer.write(len(wire).to_bytes(2, "big") + wire)
            got = {}
            for _ in range(3):
                size = int.from_bytes(await reader.readexactly(2), "big")
                reply = dns.message.from_wire(await reader.readexactly(size))
                got[reply.id] = reply
            assert addresses(got[0]) == [PUBLIC]
            assert addresses(got[1]) == ["2001:db8::1"]
            assert got[2].rcode() == dns.rcode.NXDOMAIN
            writer.close()

    run(test)


# -- policy ----------------------------------------------------------------------------------


def test_allow_mode_refuses_other_names_with_nxdomain_and_ede_without_asking_upstream():
    up = Upstream({("evil.example", "A"): [rr("evil.example.", 60, "A", PUBLIC)]})

    async def test() -> None:
        async with upstreams(up), serving(allow("pypi.org"), [up]) as s:
            reply = await s.ask("Evil.Example")
            assert reply.rcode() == dns.rcode.NXDOMAIN
            assert addresses(reply) == []
            assert ede(reply) == [(dns.edns.EDECode.BLOCKED, "blocked by silo network policy")]
            plain = await s.ask("evil.example", edns=False)
            assert plain.rcode() == dns.rcode.NXDOMAIN
            assert plain.edns == -1
            assert up.seen == []
            assert s.resolver.stats["refused"] == 2
            assert s.resolver.refused_names == {"evil.example": 2}

    run(test)


def test_allow_names_exact_and_wildcard_case_and_final_dot():
    names = ["a.example.org", "a.b.example.org", "example.org", "xexample.org", "pypi.org", "www.pypi.org",
             "pypi.org.evil.example"]
    up = Upstream({(n, "A"): [rr(n + ".", 60, "A", PUBLIC)] for n in names})

    async def test() -> None:
        async with upstreams(up), serving(allow("*.EXAMPLE.org", "PyPI.org."), [up]) as s:
            results = {n: (await s.ask(n.upper())).rcode() for n in names}
            assert results == {
                "a.example.org": dns.rcode.NOERROR, "a.b.example.org": dns.rcode.NOERROR,
                "example.org": dns.rcode.NXDOMAIN, "xexample.org": dns.rcode.NXDOMAIN,
                "pypi.org": dns.rcode.NOERROR, "www.pypi.org": dns.rcode.NXDOMAIN,
                "pypi.org.evil.example": dns.rcode.NXDOMAIN,
            }
            assert sorted(up.names()) == ["a.b.example.org", "a.example.org", "pypi.org"]

    run(test)


def test_refused_names_are_a_bounded_record():
    async def test() -> None:
        up = Upstream()
        async with upstreams(up), serving(allow(), [up]) as s:
            for i in range(300):
                await s.ask(f"n{i}.example")
            await s.ask("n0.example")
            assert s.resolver.stats["refused"] == 301
            assert len(s.resolver.refused_names) == 256
            assert s.resolver.refused_names["n0.example"] == 2

    run(test)


def test_set_policy_takes_effect_on_the_next_query():
    up = Upstream({("a.example", "A"): [rr("a.example.", 60, "A", PUBLIC)]})

    async def test() -> None:
        async with upstreams(up), serving(INTERNET, [up]) as s:
            assert addresses(await s.ask("a.example")) == [PUBLIC]
            s.resolver.set_policy(allow("pypi.org"))
            assert (await s.ask("a.example")).rcode() == dns.rcode.NXDOMAIN
            s.resolver.set_policy(allow("a.example"))
            assert addresses(await s.ask("a.example")) == [PUBLIC]
            assert len(up.seen) == 2

    run(test)


@pytest.mark.parametrize("mode", ["internet", "allow", "full"])
def test_local_names_are_answered_here_in_every_mode(mode):
    up = Upstream({("db", "A"): [rr("db.", 60, "A", PUBLIC)], ("db.silo", "A"): [rr("db.silo.", 60, "A", PUBLIC)]})
    pins = Pins()

    async def test() -> None:
        policy = DnsPolicy(mode, (), BLOCKED, LINKS)
        async with upstreams(up), serving(policy, [up], pins) as s:
            a = await s.ask("db.")
            assert addresses(a) == ["10.213.0.6"] and a.answer[0].ttl == 5
            assert a.flags & dns.flags.AA
            aaaa = await s.ask("DB.Silo.", "AAAA", tcp=True)
            assert addresses(aaaa) == ["fd51:5110::6"]
            assert aaaa.answer[0].name.labels[:2] == (b"DB", b"Silo")
            mx = await s.ask("db.silo.", "MX")
            assert mx.rcode() == dns.rcode.NOERROR and mx.answer == []
            other = await s.ask("web.silo.")
            assert other.rcode() == dns.rcode.NXDOMAIN
            assert up.seen == []
            assert pins.calls == []

    run(test)


# -- rebinding defence and pins -------------------------------------------------------------


def test_allowed_name_answering_a_blocked_address_is_nodata_and_not_pinned():
    up = Upstream({("rebind.example", "A"): [rr("rebind.example.", 60, "A", "10.1.2.3")],
                   ("rebind.example", "AAAA"): [rr("rebind.example.", 60, "AAAA", "::ffff:10.1.2.3")],
                   ("via.example", "A"): [rr("via.example.", 60, "CNAME", "db.corp."),
                                          rr("db.corp.", 60, "A", "169.254.169.254")]})
    pins = Pins()

    async def test() -> None:
        async with upstreams(up), serving(allow("rebind.example", "via.example"), [up], pins) as s:
            for name, rdtype in (("rebind.example", "A"), ("rebind.example", "AAAA"), ("via.example", "A")):
                reply = await s.ask(name, rdtype)
                assert reply.rcode() == dns.rcode.NOERROR
                assert reply.answer == []
                assert ede(reply) == [(dns.edns.EDECode.BLOCKED, "blocked by silo network policy")]
            assert pins.calls == []
            assert s.resolver.stats["stripped"] == 3

    run(test)


def test_mixed_answer_keeps_only_the_public_address_in_internet_mode():
    up = Upstream({("mixed.example", "A"): [rr("mixed.example.", 60, "A", "127.0.0.1", PUBLIC, "169.254.169.254")]})

    async def test() -> None:
        async with upstreams(up), serving(INTERNET, [up]) as s:
            reply = await s.ask("mixed.example")
            assert addresses(reply) == [PUBLIC]
            assert ede(reply) == []
            assert s.resolver.stats["stripped"] == 2

    run(test)


def test_full_mode_strips_nothing_and_pins_nothing():
    up = Upstream({("lan.example", "A"): [rr("lan.example.", 60, "A", "10.1.2.3", PUBLIC)]})
    pins = Pins()

    async def test() -> None:
        async with upstreams(up), serving(DnsPolicy("full", blocked=BLOCKED), [up], pins) as s:
            assert sorted(addresses(await s.ask("lan.example"))) == ["10.1.2.3", PUBLIC]
            assert s.resolver.stats["stripped"] == 0
            s.resolver.set_policy(INTERNET)
            assert addresses(await s.ask("lan.example")) == [PUBLIC]
            assert pins.calls == []

    run(test)


def test_https_address_hints_are_dropped_unless_full():
    https = rr("svc.example.", 60, "HTTPS", '1 . alpn="h2" ipv4hint="10.0.0.1,93.184.216.34"')
    up = Upstream({("svc.example", "HTTPS"): [https]})

    async def test() -> None:
        async with upstreams(up), serving(INTERNET, [up]) as s:
            text = (await s.ask("svc.example", "HTTPS")).answer[0][0].to_text()
            assert "alpn" in text and "ipv4hint" not in text
            s.resolver.set_policy(DnsPolicy("full", blocked=BLOCKED))
            assert "ipv4hint" in (await s.ask("svc.example", "HTTPS")).answer[0][0].to_text()

    run(test)


def test_cname_chain_addresses_are_pinned_and_strays_removed():
    up = Upstream({("pypi.org", "A"): [
        rr("pypi.org.", 300, "CNAME", "dualstack.python.map.fastly.net."),
        rr("dualstack.python.map.fastly.net.", 30, "A", "151.101.0.223", "151.101.64.223"),
        rr("stray.example.", 30, "A", "198.18.0.1"),
    ]})
    pins = Pins()

    async def test() -> None:
        async with upstreams(up), serving(allow("pypi.org"), [up], pins) as s:
            reply = await s.ask("pypi.org")
            assert sorted(addresses(reply)) == ["151.101.0.223", "151.101.64.223"]
            assert any(r.rdtype == dns.rdatatype.CNAME for r in reply.answer)
            assert [sorted(c) for c in pins.calls] == [[("151.101.0.223", 30), ("151.101.64.223", 30)]]

    run(test)


def test_pin_gets_ttl_floor_and_cap_and_runs_before_the_reply_is_sent():
    up = Upstream({("zero.example", "A"): [rr("zero.example.", 0, "A", PUBLIC)],
                   ("long.example", "AAAA"): [rr("long.example.", 10**6, "AAAA", "2001:db8::1")]})

    async def test() -> None:
        loop = asyncio.get_running_loop()
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.setblocking(False)
        client.bind((LO, 0))
        calls: list[tuple[list[tuple[str, int]], bool]] = []

        def pin(pins: Sequence[tuple[str, int]]) -> None:
            try:
                client.recv(4096, socket.MSG_PEEK)
                arrived = True
            except BlockingIOError:
                arrived = False
            calls.append((list(pins), arrived))

        async with upstreams(up), serving(allow("zero.example", "long.example"), [up], pin) as s:
            replies = []
            for name, rdtype in (("zero.example", "A"), ("long.example", "AAAA")):
                await loop.sock_sendto(client, dns.message.make_query(name, rdtype).to_wire(), (LO, s.port))
                replies.append(dns.message.from_wire(await loop.sock_recv(client, 4096)))
            assert calls == [([(PUBLIC, 5)], False), ([("2001:db8::1", 86400)], False)]
            assert replies[0].answer[0].ttl == 0
            assert replies[1].answer[0].ttl == 86400
        client.close()

    run(test)


def test_pin_failing_is_servfail_without_addresses():
    up = Upstream({("pypi.org", "A"): [rr("pypi.org.", 60, "A", PUBLIC)]})

    def pin(pins: Sequence[tuple[str, int]]) -> None:
        raise OSError("nft: no such set")

    async def test() -> None:
        async with upstreams(up), serving(allow("pypi.org"), [up], pin) as s:
            reply = await s.ask("pypi.org")
            assert reply.rcode() == dns.rcode.SERVFAIL
            assert addresses(reply) == []
            assert s.resolver.stats["pin_errors"] == 1

    run(test)


def test_pin_is_only_called_in_allow_mode():
    up = Upstream({("a.example", "A"): [rr("a.example.", 60, "A", PUBLIC)]})
    pins = Pins()

    async def test() -> None:
        async with upstreams(up), serving(INTERNET, [up], pins) as s:
            assert addresses(await s.ask("a.example")) == [PUBLIC]
            assert pins.calls == []
            s.resolver.set_policy(allow("a.example"))
            assert addresses(await s.ask("a.example")) == [PUBLIC]
            assert pins.calls == [[(PUBLIC, 60)]]

    run(test)


def test_pin_named_is_told_the_allowed_name_the_addresses_came_from():
    up = Upstream({("www.example.org", "A"): [rr("www.example.org.", 60, "CNAME", "cdn.example.net."),
                                              rr("cdn.example.net.", 60, "A", PUBLIC)]})
    calls: list[tuple[str, list[tuple[str, int]]]] = []

    async def test() -> None:
        async with upstreams(up), serving(allow("*.example.org"), [up],
                                          pin_named=lambda name, pins: calls.append((name, list(pins)))) as s:
            assert addresses(await s.ask("WWW.Example.org.")) == [PUBLIC]
            assert calls == [("www.example.org", [(PUBLIC, 60)])]

    run(test)
    with pytest.raises(ValueError):
        Resolver([(LO, 53)], INTERNET, Pins(), pin_named=lambda name, pins: None)


def test_two_resolvers_in_one_process_keep_their_own_policy_and_counters():
    up = Upstream({("a.example", "A"): [rr("a.example.", 60, "A", PUBLIC)]})

    async def test() -> None:
        async with upstreams(up), serving(allow(), [up]) as closed, serving(INTERNET, [up]) as open_:
            assert (await closed.ask("a.example")).rcode() == dns.rcode.NXDOMAIN
            assert addresses(await open_.ask("a.example")) == [PUBLIC]
            assert closed.resolver.stats["refused"] == 1 and open_.resolver.stats["refused"] == 0

    run(test)


# -- hostile input -----------------------------------------------------------------------------


def _two_questions() -> bytes:
    query = dns.message.make_query("a.example", "A", id=7)
    query.question.append(dns.rrset.RRset(dns.name.from_text("b.example."), dns.rdataclass.IN, dns.rdatatype.A))
    return query.to_wire()


def _query(name: str, rdtype: str = "A", rdclass: str = "IN", **kw: Any) -> bytes:
    return dns.message.make_query(name, rdtype, rdclass, id=7, **kw).to_wire()


def test_malformed_datagrams_get_formerr_or_nothing_and_the_server_keeps_answering():
    up = Upstream({("a.example", "A"): [rr("a.example.", 60, "A", PUBLIC)]})
    notify = dns.message.make_query("a.example", "SOA", id=7)
    notify.set_opcode(dns.opcode.NOTIFY)
    reply_packet = dns.message.make_response(dns.message.make_query("a.example", "A", id=7)).to_wire()
    expected = {
        b"": None,
        b"\x00\x07" + bytes(9): None,  # 11 bytes: no header
        reply_packet: None,  # a response: never answered
        _two_questions(): dns.rcode.FORMERR,
        _query("a.example")[:20]: dns.rcode.FORMERR,  # cut in the question
        _query("a.example") + b"junk": dns.rcode.FORMERR,
        _query("a.example", rdclass="CH"): dns.rcode.NOTIMP,
        _query("a.example", "AXFR"): dns.rcode.NOTIMP,
        notify.to_wire(): dns.rcode.NOTIMP,
        _query("a.example", use_edns=1): dns.rcode.BADVERS,
        _query("a.example") + bytes(4097): None,  # larger than a datagram is read
    }
    rng = random.Random(4)
    noise = [rng.randbytes(rng.randrange(0, 600)) for _ in range(300)]

    async def test() -> None:
        loop = asyncio.get_running_loop()
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.setblocking(False)
        client.bind((LO, 0))
        async with upstreams(up), serving(INTERNET, [up]) as s:
            for packet, rcode in expected.items():
                await loop.sock_sendto(client, packet, (LO, s.port))
                try:
                    async with asyncio.timeout(0.2):
                        answer = await loop.sock_recv(client, 65535)
                except TimeoutError:
                    assert rcode is None, f"no reply to {packet[:24]!r}"
                    continue
                assert rcode is not None, f"a reply to {packet[:24]!r}"
                reply = dns.message.from_wire(answer)
                assert reply.id == 7 and reply.rcode() == rcode, (packet[:24], dns.rcode.to_text(reply.rcode()))
            for packet in noise:
                await loop.sock_sendto(client, packet, (LO, s.port))
            await asyncio.sleep(0.2)
            assert addresses(await s.ask("a.example")) == [PUBLIC]
            assert addresses(await s.ask("a.example", tcp=True)) == [PUBLIC]
            assert s.resolver.stats["malformed"] >= 4
        client.close()

    run(test)


def test_hostile_tcp_framing_does_not_stop_the_server():
    up = Upstream({("a.example", "A"): [rr("a.example.", 60, "A", PUBLIC)]})

    async def test() -> None:
        async with upstreams(up), serving(INTERNET, [up]) as s:
            # a huge length, then too few bytes and a close
            _, writer = await asyncio.open_connection(LO, s.port)
            writer.write(b"\xff\xff" + bytes(100))
            await writer.drain()
            writer.close()
            # a huge length with that many bytes of garbage: FORMERR, and the connection stays usable
            reader, writer = await asyncio.open_connection(LO, s.port)
            garbage = b"\x00\x09\x01\x00" + random.Random(1).randbytes(65531)  # a query's header, then noise
            wire = _query("a.example")
            writer.write(b"\xff\xff" + garbage + b"\x00\x00" + len(wire).to_bytes(2, "big") + wire)
            replies = []
            for _ in range(2):
                size = int.from_bytes(await reader.readexactly(2), "big")
                replies.append(dns.message.from_wire(await reader.readexactly(size)))
            assert (replies[0].id, replies[0].rcode()) == (9, dns.rcode.FORMERR)
            assert addresses(replies[1]) == [PUBLIC]
            writer.close()
            assert addresses(await s.ask("a.example", tcp=True)) == [PUBLIC]
            assert addresses(await s.ask("a.example")) == [PUBLIC]

    run(test)


def test_tcp_idle_connections_are_closed_and_the_count_is_bounded():
    up = Upstream({("a.example", "A"): [rr("a.example.", 60, "A", PUBLIC)]})

    async def test() -> None:
        async with upstreams(up), serving(INTERNET, [up], tcp_idle=0.3, max_tcp_clients=2) as s:
            idle = [await asyncio.open_connection(LO, s.port) for _ in range(2)]
            await asyncio.sleep(0.05)
            extra_reader, _ = await asyncio.open_connection(LO, s.port)
            async with asyncio.timeout(0.2):
                assert await extra_reader.read() == b""  # over the limit: closed at once
            start = time.monotonic()
            async with asyncio.timeout(2):
                for reader, _ in idle:
                    assert await reader.read() == b""
            assert 0.1 < time.monotonic() - start < 1.0
            assert addresses(await s.ask("a.example", tcp=True)) == [PUBLIC]

    run(test)


# -- the policy's own checks ----------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    {"mode": "none"},
    {"mode": "allow", "allow_names": ("*",)},
    {"mode": "allow", "allow_names": ("*.",)},
    {"mode": "allow", "allow_names": ("a.*.example",)},
    {"mode": "allow", "allow_names": ("",)},
    {"mode": "allow", "allow_names": ("a..example",)},
    {"mode": "internet", "blocked": ("10.0.0.0/8",)},
    {"mode": "internet", "local": {"db": ("not-an-address",)}},
    {"mode": "internet", "local": {"db": "10.0.0.1"}},
])
def test_a_malformed_policy_is_refused(kw):
    with pytest.raises(ValueError):
        DnsPolicy(**kw)
