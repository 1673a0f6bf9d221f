"""A fake "internet", "LAN" and "cloud metadata" on this machine for the network tests.

:class:`World` (root only) builds one network namespace ``silo-test-world-<pid>`` joined
to the current namespace by a veth pair (host side ``swt<pid>``, world side ``w0``), and
routes on the host so that the host, and workspaces the host routes or NATs, reach
these addresses through that veth and nothing leaves the machine:

==========================  ===========================================================
``PUBLIC4``/``PUBLIC4_B``   203.0.113.10 / 203.0.113.20 ("public internet", on ``w0``)
``PUBLIC6``/``PUBLIC6_B``   2001:db8:113::10 / 2001:db8:113::20 (on ``w0``)
``LAN4``/``LAN6``           192.168.77.10 / fd77:77::10 (a private LAN host, on ``lo``)
``META4``                   169.254.169.254 (cloud metadata, on ``lo``)
``HOST4``/``HOST6``         203.0.113.1/24, 2001:db8:113::1/64 on the host's ``swt<pid>``
==========================  ===========================================================

Host routes: 192.168.77.0/24 and 169.254.169.254/32 via 203.0.113.10, fd77:77::/64 via
2001:db8:113::10, all on ``swt<pid>`` (they go away with the interface).

One server process (``python networld.py serve``, run in the world namespace) answers on
every world address: HTTP on TCP 80 (``hello from <local address>``), echo on TCP and
UDP 7, a "hold" service on TCP 9000 (sends ``ready``, then echoes lines) and an
authoritative DNS server on UDP and TCP 53 for the zone in :data:`ZONE` (everything else
is NXDOMAIN; ``stats.test. TXT`` returns the query counts per name as JSON, see
:meth:`World.dns_counts`).

Tests use the session fixture ``world`` (``from networld import world  # noqa: F401``
in a conftest or test module; ``tests/`` is on ``sys.path`` through ``tests/conftest.py``)
or ``with World() as w:``. ``netprobe_argv``/``parse_netprobe`` run ``netprobe.py`` (the
probe for inside sandboxes) as ``python3 -c SOURCE``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PUBLIC4 = "203.0.113.10"
PUBLIC4_B = "203.0.113.20"
PUBLIC6 = "2001:db8:113::10"
PUBLIC6_B = "2001:db8:113::20"
LAN4 = "192.168.77.10"
LAN6 = "fd77:77::10"
META4 = "169.254.169.254"
HOST4 = "203.0.113.1"
HOST6 = "2001:db8:113::1"

#: The DNS server's address (any world address answers DNS; this is the one to configure).
DNS4 = PUBLIC4
DNS6 = PUBLIC6

HTTP_PORT = 80
ECHO_PORT = 7
HOLD_PORT = 9000
DNS_PORT = 53

#: Every address the world answers on.
WORLD_ADDRS = (PUBLIC4, PUBLIC4_B, PUBLIC6, PUBLIC6_B, LAN4, LAN6, META4)
#: Networks the host routes into the world (besides the veth's own 203.0.113.0/24, 2001:db8:113::/64).
HOST_ROUTES = (("192.168.77.0/24", PUBLIC4), (f"{META4}/32", PUBLIC4), ("fd77:77::/64", PUBLIC6))

NS_PREFIX = "silo-test-world-"
IF_PREFIX = "swt"
WORLD_IF = "w0"

DNS_TTL = 2
#: name -> list of (type, value, ttl); a CNAME's target records are added to the answer.
ZONE: dict[str, list[tuple[str, str, int]]] = {
    "public.test.": [("A", PUBLIC4, DNS_TTL), ("AAAA", PUBLIC6, DNS_TTL)],
    "public-b.test.": [("A", PUBLIC4_B, DNS_TTL), ("AAAA", PUBLIC6_B, DNS_TTL)],
    "cname.test.": [("CNAME", "public.test.", DNS_TTL)],
    "rebind.test.": [("A", LAN4, DNS_TTL), ("AAAA", LAN6, DNS_TTL)],
    "meta.test.": [("A", META4, DNS_TTL)],
    "mixed.test.": [("A", PUBLIC4, DNS_TTL), ("A", LAN4, DNS_TTL)],
    "long-ttl.test.": [("A", PUBLIC4_B, 3600)],
}
STATS_NAME = "stats.test."

HERE = Path(__file__).resolve().parent
NETPROBE = HERE / "netprobe.py"
READY_TIMEOUT = 10.0


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _world_namespaces() -> dict[str, int]:
    """Existing world namespaces -> the pid in their name."""
    try:
        names = os.listdir("/run/netns")
    except FileNotFoundError:
        return {}
    return {n: int(n[len(NS_PREFIX):]) for n in names if re.fullmatch(re.escape(NS_PREFIX) + r"\d+", n)}


def _world_links() -> dict[str, int]:
    """Host interfaces named like a world's veth -> the pid in their name."""
    return {n: int(n[len(IF_PREFIX):]) for n in os.listdir("/sys/class/net")
            if re.fullmatch(re.escape(IF_PREFIX) + r"\d+", n)}


def _kill_netns_pids(ns: str) -> None:
    proc = _run(["ip", "netns", "pids", ns], check=False)
    pids = [int(p) for p in proc.stdout.split() if p.isdigit()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _pid_alive(p) and not _is_zombie(p)]
        time.sleep(0.02)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return True
    return data[data.rindex(b")") + 2:].split()[0] == b"Z"


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class World:
    """The test world; ``with World() as w:`` builds it, leaving the block removes it all."""

    _active: World | None = None

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.ns = f"{NS_PREFIX}{self.pid}"
        self.host_if = f"{IF_PREFIX}{self.pid}"
        self.world_if = WORLD_IF
        self.server: subprocess.Popen[bytes] | None = None
        self._log_path: str | None = None

    # -- public helpers

    @property
    def server_pid(self) -> int | None:
        return self.server.pid if self.server is not None else None

    def exec_argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the world namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]

    @staticmethod
    def resolv_conf(server: str = DNS4) -> str:
        """A resolv.conf that sends every lookup to the world's DNS server."""
        return f"nameserver {server}\noptions timeout:1 attempts:2\n"

    @staticmethod
    def dns_query(name: str, rdtype: str = "A", server: str = DNS4, tcp: bool = False,
                  timeout: float = 2.0) -> Any:
        """Ask the world's DNS server directly (no resolver in between); the dnspython response."""
        import dns.message
        import dns.query

        q = dns.message.make_query(name, rdtype)
        if tcp:
            return dns.query.tcp(q, server, timeout=timeout)
        return dns.query.udp(q, server, timeout=timeout)

    @classmethod
    def dns_counts(cls, server: str = DNS4) -> dict[str, int]:
        """How many queries reached the world's DNS server, per name (``public.test.`` -> 3)."""
        import dns.rdatatype

        r = cls.dns_query(STATS_NAME, "TXT", server=server, tcp=True)
        for rrset in r.answer:
            if rrset.rdtype == dns.rdatatype.TXT:
                for rd in rrset:
                    counts: dict[str, int] = json.loads(b"".join(rd.strings).decode())
                    return counts
        raise RuntimeError(f"no TXT answer for {STATS_NAME}: {r}")

    # -- lifecycle

    def __enter__(self) -> World:
        if os.geteuid() != 0:
            raise PermissionError("the test world needs root")
        if World._active is not None:
            raise RuntimeError(f"a test world is already active in this process ({World._active.ns})")
        self.cleanup_stale()
        others = {n: p for n, p in _world_namespaces().items() if p != self.pid}
        if others:
            raise RuntimeError(f"another test world is running ({', '.join(others)}); worlds share "
                               "addresses and routes, so only one can exist at a time")
        if self.ns in _world_namespaces() or self.host_if in _world_links():
            self._teardown()  # leftovers of an earlier world of this process
        World._active = self
        try:
            self._build()
            self._start_server()
            self._check_reachable()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove everything the world made; safe to call more than once."""
        try:
            self._teardown()
        finally:
            if World._active is self:
                World._active = None

    @classmethod
    def cleanup_stale(cls) -> list[str]:
        """Remove worlds (namespaces, veths, their processes) left by dead test processes; what was removed."""
        removed = []
        for ns, pid in _world_namespaces().items():
            if not _pid_alive(pid):
                _kill_netns_pids(ns)
                _run(["ip", "link", "del", f"{IF_PREFIX}{pid}"], check=False)
                _run(["ip", "netns", "del", ns], check=False)
                removed.append(ns)
        for link, pid in _world_links().items():
            if not _pid_alive(pid):
                _run(["ip", "link", "del", link], check=False)
                removed.append(link)
        for log in Path(tempfile.gettempdir()).glob(f"{NS_PREFIX}*.log"):
            m = re.match(re.escape(NS_PREFIX) + r"(\d+)-", log.name)
            if m and not _pid_alive(int(m[1])):
                log.unlink(missing_ok=True)
                removed.append(str(log))
        return removed

    # -- internals

    def _build(self) -> None:
        ns, hif, wif = self.ns, self.host_if, self.world_if
        _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", hif, "type", "veth", "peer", "name", wif, "netns", ns])
        # Host side: per-interface settings only (they vanish with the interface).
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{hif}/disable_ipv6", "0")
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{hif}/accept_dad", "0")
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{hif}/accept_ra", "0")
        _write_sysctl(f"/proc/sys/net/ipv4/conf/{hif}/rp_filter", "2")
        _run(["ip", "addr", "add", f"{HOST4}/24", "dev", hif])
        _run(["ip", "-6", "addr", "add", f"{HOST6}/64", "dev", hif, "nodad"])
        _run(["ip", "link", "set", hif, "up"])
        # World side (its own namespace: nothing to restore).
        _run(["ip", "netns", "exec", ns, "sysctl", "-qw",
              "net.ipv4.icmp_echo_ignore_all=0",
              "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
              f"net.ipv4.conf.{wif}.rp_filter=0",
              "net.ipv6.conf.all.disable_ipv6=0", f"net.ipv6.conf.{wif}.disable_ipv6=0",
              f"net.ipv6.conf.{wif}.accept_dad=0", f"net.ipv6.conf.{wif}.accept_ra=0"])
        n = ["ip", "-n", ns]
        _run([*n, "link", "set", "lo", "up"])
        for a in (PUBLIC4, PUBLIC4_B):
            _run([*n, "addr", "add", f"{a}/24", "dev", wif])
        for a in (PUBLIC6, PUBLIC6_B):
            _run([*n, "-6", "addr", "add", f"{a}/64", "dev", wif, "nodad"])
        for a in (LAN4, META4):
            _run([*n, "addr", "add", f"{a}/32", "dev", "lo"])
        _run([*n, "-6", "addr", "add", f"{LAN6}/128", "dev", "lo"])
        _run([*n, "link", "set", wif, "up"])
        _run([*n, "route", "add", "default", "via", HOST4, "dev", wif])
        _run([*n, "-6", "route", "add", "default", "via", HOST6, "dev", wif])
        for net, via in HOST_ROUTES:
            fam = "-6" if ":" in net else "-4"
            _run(["ip", fam, "route", "add", net, "via", via, "dev", hif])

    def _start_server(self) -> None:
        fd, self._log_path = tempfile.mkstemp(prefix=f"{self.ns}-", suffix=".log")
        with os.fdopen(fd, "wb") as log:
            self.server = subprocess.Popen(
                self.exec_argv([sys.executable, str(Path(__file__).resolve()), "serve", "--parent", str(self.pid)]),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, cwd="/",
            )
        assert self.server.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT
        buf = b""
        while b"ready\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"the world's server was not ready in {READY_TIMEOUT} s: {self._log_tail()}")
            r, _, _ = select.select([self.server.stdout], [], [], left)
            if r:
                chunk = os.read(self.server.stdout.fileno(), 4096)
                if not chunk:
                    self.server.wait(5)
                    raise RuntimeError(f"the world's server exited with {self.server.returncode} "
                                       f"before it was ready: {self._log_tail()}")
                buf += chunk

    def _check_reachable(self) -> None:
        for addr in (PUBLIC4, PUBLIC6, LAN4, LAN6, META4):
            fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
            with socket.socket(fam, socket.SOCK_STREAM) as s:
                s.settimeout(3)
                try:
                    s.connect((addr, ECHO_PORT))
                except OSError as e:
                    raise RuntimeError(f"the host cannot reach the world at {addr}:{ECHO_PORT}: {e!r} "
                                       f"(routes: {_run(['ip', 'route', 'get', addr], check=False).stdout.strip()})"
                                       ) from e

    def _log_tail(self) -> str:
        if self._log_path is None:
            return ""
        try:
            return Path(self._log_path).read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def _teardown(self) -> None:
        if self.server is not None:
            if self.server.poll() is None:
                self.server.kill()
            self.server.wait(10)
            if self.server.stdout is not None:
                self.server.stdout.close()
            self.server = None
        if self._log_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._log_path)
            self._log_path = None
        if self.ns in _world_namespaces():
            _kill_netns_pids(self.ns)
        # Deleting the host end destroys the pair and every route through it at once
        # (a deleted namespace's devices go away later, in the kernel's cleanup work).
        if self.host_if in _world_links():
            _run(["ip", "link", "del", self.host_if], check=False)
        if self.ns in _world_namespaces():
            _run(["ip", "netns", "del", self.ns], check=False)


# -- the probe, as tests run it


def net_leftovers() -> dict[str, Any]:
    """What networks leave on the host: silo-N links, silo_N tables, keepers, leases."""
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    keepers = subprocess.run(["pgrep", "-f", "silo.net.keeper"], capture_output=True, text=True).stdout
    leases = os.listdir("/run/silo/net/leases") if os.path.isdir("/run/silo/net/leases") else []
    return {"links": [ln.split()[0] for ln in links.splitlines() if ln.startswith("silo-")],
            "tables": [t for t in tables.splitlines() if "silo_" in t],
            "keepers": keepers.split(), "leases": leases}


NOTHING = {"links": [], "tables": [], "keepers": [], "leases": []}


def blocked(result: str) -> bool:
    return result in ("refused", "timeout") or result.startswith("unreachable")


def host_address() -> str:
    """An IPv4 address of the host's own (not loopback, not the world's, not a sandbox's);
    the calling test is skipped when the host has none."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        addr = line.split()[3].split("/")[0]
        if not addr.startswith(("203.0.113.", "10.213.")):
            return addr
    import pytest
    pytest.skip("the host has no global IPv4 address of its own")


def netprobe_argv(*checks: str, timeout: float | None = None, python: str = "/usr/bin/python3") -> list[str]:
    """The argv that runs ``netprobe.py`` with ``checks`` (passed as ``-c SOURCE``, so no host path
    has to be visible in the sandbox)."""
    opts = ["--timeout", str(timeout)] if timeout is not None else []
    return [python, "-I", "-c", NETPROBE.read_text(), *opts, *checks]


def parse_netprobe(stdout: bytes | str) -> dict[str, str]:
    """The probe's result object (its last output line)."""
    text = stdout.decode("utf-8", "replace") if isinstance(stdout, bytes) else stdout
    lines = text.strip().splitlines()
    if not lines:
        raise AssertionError("netprobe printed nothing")
    result: dict[str, str] = json.loads(lines[-1])
    return result


def probe_in(ws: Any, *checks: str, timeout: float = 2.0) -> dict[str, str]:
    """The probe's findings from inside the workspace ``ws`` (a silo.Workspace)."""
    r = ws.exec(netprobe_argv(*checks, timeout=timeout))
    assert r.exit_code == 0, r
    return parse_netprobe(r.stdout)


def serve_8000(bind: str, tries: int = 100) -> str:
    """A shell line for inside a sandbox: Python's HTTP server of /etc on port 8000 at
    ``bind``, in the background, waited for (``tries`` x 50 ms) on the loopback."""
    return (f"cd /etc && (python3 -m http.server 8000 --bind {bind} >/dev/null 2>&1 &) && "
            f"python3 -c 'import socket,time\nfor _ in range({tries}):\n    try: socket.create_connection"
            "((\"127.0.0.1\", 8000)).close(); break\n    except OSError: time.sleep(0.05)'")


def http_get(port: int, path: str, wait: float = 20.0) -> bytes:
    """GET ``path`` from 127.0.0.1:``port`` (a published port), retried for ``wait``
    seconds until the answer is a 200; the last answer."""
    deadline = time.monotonic() + wait
    body = b""
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            body = b"".join(iter(lambda: c.recv(4096), b""))
            if b"200" in body.split(b"\r\n")[0]:
                return body
        time.sleep(0.2)
    return body


# -- the fixture


def world_fixture(scope: str = "session") -> Callable[..., Any]:
    """A pytest fixture (named ``world``) that yields a :class:`World`; skipped when not root."""
    import pytest

    def _world() -> Iterator[World]:
        if os.geteuid() != 0:
            pytest.skip("the network test world needs root (network namespaces, veth, routes)")
        with World() as w:
            yield w

    fixture: Callable[..., Any] = pytest.fixture(scope=scope, name="world")  # type: ignore[call-overload]
    made: Callable[..., Any] = fixture(_world)
    return made


# -- the server (runs inside the world namespace)


def _dns_answer(wire: bytes, counts: dict[str, int], lock: threading.Lock, udp: bool) -> bytes | None:
    import dns.exception
    import dns.flags
    import dns.message
    import dns.name
    import dns.opcode
    import dns.rcode
    import dns.rdataclass
    import dns.rdatatype
    import dns.rrset
    from dns.rdtypes.ANY.TXT import TXT

    try:
        q = dns.message.from_wire(wire)
    except dns.exception.DNSException:
        return None
    r = dns.message.make_response(q)
    r.flags |= dns.flags.AA
    r.flags &= ~dns.flags.RA
    if q.opcode() != dns.opcode.QUERY or len(q.question) != 1:
        r.set_rcode(dns.rcode.NOTIMP if q.opcode() != dns.opcode.QUERY else dns.rcode.FORMERR)
        return r.to_wire()
    question = q.question[0]
    name = question.name.to_text().lower()
    qtype = question.rdtype
    if name == STATS_NAME:
        if qtype in (dns.rdatatype.TXT, dns.rdatatype.ANY):
            with lock:
                data = json.dumps(counts, sort_keys=True).encode()
            chunks = [data[i:i + 255] for i in range(0, len(data), 255)]
            r.answer.append(dns.rrset.from_rdata(question.name, 0, TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks)))
    else:
        with lock:
            counts[name] = counts.get(name, 0) + 1
        owner = question.name
        records = ZONE.get(name)
        if records is None:
            r.set_rcode(dns.rcode.NXDOMAIN)
        seen = set()
        while records is not None and name not in seen:
            seen.add(name)
            matching = [x for x in records
                        if dns.rdatatype.from_text(x[0]) == qtype or qtype == dns.rdatatype.ANY
                        or (x[0] == "CNAME")]
            by_type: dict[tuple[str, int], list[str]] = {}
            for t, v, ttl in matching:
                by_type.setdefault((t, ttl), []).append(v)
            for (t, ttl), values in by_type.items():
                r.answer.append(dns.rrset.from_text_list(owner, ttl, "IN", t, values))
            cname = [v for t, v, _ in records if t == "CNAME"]
            if not cname or qtype == dns.rdatatype.CNAME:
                break
            name = cname[0].lower()
            owner = dns.name.from_text(name)
            records = ZONE.get(name)
    if not r.answer:
        r.authority.append(dns.rrset.from_text(
            "test.", DNS_TTL, "IN", "SOA", f"ns.test. hostmaster.test. 1 3600 600 86400 {DNS_TTL}"))
    limit = 65535
    if udp:
        limit = max(512, q.payload) if q.edns >= 0 else 512
    try:
        return r.to_wire(max_size=limit)
    except dns.exception.TooBig:
        r.answer.clear()
        r.authority.clear()
        r.flags |= dns.flags.TC
        return r.to_wire()


def _serve_tcp_conn(conn: socket.socket, port: int, counts: dict[str, int], lock: threading.Lock) -> None:
    local = conn.getsockname()[0]
    try:
        conn.settimeout(600)
        if port == HTTP_PORT:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            body = f"hello from {local}\n".encode()
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n" % len(body) + body)
            conn.shutdown(socket.SHUT_WR)
        elif port == ECHO_PORT:
            while chunk := conn.recv(65536):
                conn.sendall(chunk)
        elif port == HOLD_PORT:
            conn.sendall(b"ready\n")
            with conn.makefile("rb") as f:
                for line in f:
                    conn.sendall(line)
        elif port == DNS_PORT:
            with conn.makefile("rb") as f:
                while len(head := f.read(2)) == 2:
                    wire = f.read(int.from_bytes(head, "big"))
                    answer = _dns_answer(wire, counts, lock, udp=False)
                    if answer is None:
                        break
                    conn.sendall(len(answer).to_bytes(2, "big") + answer)
    except OSError:
        pass
    finally:
        conn.close()


def _set_parent_death_signal(parent: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def serve(parent: int | None = None) -> None:
    import selectors

    if parent is not None:
        _set_parent_death_signal(parent)
    counts: dict[str, int] = {}
    lock = threading.Lock()
    sel = selectors.DefaultSelector()
    for addr in WORLD_ADDRS:
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        for port in (HTTP_PORT, ECHO_PORT, HOLD_PORT, DNS_PORT):
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, port))
            s.listen(128)
            sel.register(s, selectors.EVENT_READ, ("tcp", port))
        for port in (ECHO_PORT, DNS_PORT):
            u = socket.socket(fam, socket.SOCK_DGRAM)
            u.bind((addr, port))
            sel.register(u, selectors.EVENT_READ, ("udp", port))
    import dns.message  # noqa: F401  (loaded before "ready", so the first query is quick)

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        for key, _ in sel.select():
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            kind, port = key.data
            try:
                if kind == "tcp":
                    conn, _ = sock.accept()
                    threading.Thread(target=_serve_tcp_conn, args=(conn, port, counts, lock), daemon=True).start()
                else:
                    data, peer = sock.recvfrom(65535)
                    reply = data if port == ECHO_PORT else _dns_answer(data, counts, lock, udp=True)
                    if reply is not None:
                        sock.sendto(reply, peer)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    print(f"world server: {kind} {port}: {e!r}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    if len(argv) >= 1 and argv[0] == "serve":
        parent = int(argv[2]) if len(argv) == 3 and argv[1] == "--parent" else None
        serve(parent)
        return 0
    if argv == ["cleanup"]:
        print("\n".join(World.cleanup_stale()))
        return 0
    print("usage: networld.py serve [--parent PID] | cleanup", file=sys.stderr)
    return 2


#: ``from networld import world`` in a conftest or test module makes the fixture available.
if __name__ != "__main__":
    try:
        world = world_fixture("module")  # a module at a time: test_networld makes its own
    except ImportError:  # pytest not installed: the module still works as a library and server
        pass

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
