"""Network probe run inside a sandbox (host's /usr/bin/python3, standard library only).

    python3 netprobe.py [--timeout S] [--icmp auto|dgram|raw] CHECK [CHECK ...]

CHECK is ``tcp:HOST:PORT``, ``udp:HOST:PORT`` (sends ``ping``, expects the echo),
``icmp:HOST``, ``dns:NAME`` (``getaddrinfo`` through the system resolver),
``http:HOST:PORT`` (``GET /``) or ``hold:HOST:PORT:SECONDS`` (the only check when used).
HOST is an IPv4 literal, an IPv6 literal in brackets (``tcp:[2001:db8::1]:80``) or a name.

Prints one JSON object, CHECK -> result: ``ok`` (``ok:ADDR,ADDR`` for dns, ``ok:BODY`` for
http), ``refused``, ``reset``, ``unreachable:ERRNO`` (EHOSTUNREACH, ENETUNREACH, EACCES,
EPERM), ``timeout``, ``nxdomain``, ``dnsfail:EAI_*``, ``nosocket`` (no ICMP socket could be
made), ``http:STATUS`` (an answer other than 200), ``error:...`` otherwise. Checks run
concurrently, so many blocked checks cost about one timeout.

``hold`` connects to the world's hold service (port 9000), reads ``ready``, prints
``{"hold": "connected"}`` at once, then sends ``x`` every 0.2 s and reads the echo until
SECONDS pass: ``ok``, or ``cut:ERRNO`` / ``cut:timeout`` / ``cut:eof`` at the first failure.

ICMP uses an unprivileged ping socket (SOCK_DGRAM); with ``--icmp auto`` (the default) a
raw socket is tried when that is refused (net.ipv4.ping_group_range excludes the caller).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import sys
import threading
import time
from typing import Any

UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES, errno.EPERM}


class CheckError(Exception):
    pass


def errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def classify(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, socket.gaierror):
        return gai_result(e)
    if isinstance(e, ConnectionRefusedError) or getattr(e, "errno", None) == errno.ECONNREFUSED:
        return "refused"
    if isinstance(e, ConnectionResetError) or getattr(e, "errno", None) == errno.ECONNRESET:
        return "reset"
    if isinstance(e, OSError) and e.errno in UNREACHABLE:
        return "unreachable:" + errname(e)
    if isinstance(e, OSError) and e.errno == errno.ETIMEDOUT:
        return "timeout"
    if isinstance(e, OSError) and e.errno is not None:
        return "error:" + errname(e)
    if isinstance(e, CheckError):
        return "error:" + str(e)
    return f"error:{type(e).__name__}:{e}"


def gai_result(e: socket.gaierror) -> str:
    if e.errno == socket.EAI_NONAME:
        return "nxdomain"
    names = {getattr(socket, n): n for n in dir(socket) if n.startswith("EAI_")}
    return "dnsfail:" + names.get(e.errno, str(e.errno))


def split_host_port(rest: str) -> tuple[str, str]:
    """``HOST:REST`` or ``[V6]:REST`` -> (host, rest)."""
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0 or rest[end + 1:end + 2] not in (":", ""):
            raise CheckError("badcheck")
        return rest[1:end], rest[end + 2:]
    host, _, tail = rest.partition(":")
    return host, tail


def resolve(host: str, port: int, kind: int) -> tuple[int, tuple[Any, ...]]:
    """(family, sockaddr) for a literal or a name (the first getaddrinfo answer)."""
    infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, kind)
    fam, _, _, _, addr = infos[0]
    return fam, addr


def with_deadline(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def tcp_connect(host: str, port: int, timeout: float) -> socket.socket:
    fam, addr = resolve(host, port, socket.SOCK_STREAM)
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(addr)
    except BaseException:
        s.close()
        raise
    return s


def check_tcp(host: str, port: int, timeout: float) -> str:
    tcp_connect(host, port, timeout).close()
    return "ok"


def check_udp(host: str, port: int, timeout: float) -> str:
    fam, addr = resolve(host, port, socket.SOCK_DGRAM)
    deadline = time.monotonic() + timeout
    payload = b"ping\n"
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.connect(addr)  # so ICMP errors (port unreachable -> ECONNREFUSED) are reported
        while True:
            s.send(payload)
            s.settimeout(min(0.5, with_deadline(deadline)))
            try:
                data = s.recv(65535)
            except TimeoutError:
                with_deadline(deadline)
                continue
            return "ok" if data == payload else "error:badecho"


def icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def icmp_socket(fam: int, mode: str) -> tuple[socket.socket, bool] | None:
    """(socket, is_raw), or None when no ICMP socket may be made."""
    proto = socket.IPPROTO_ICMPV6 if fam == socket.AF_INET6 else socket.IPPROTO_ICMP
    kinds = {"dgram": [socket.SOCK_DGRAM], "raw": [socket.SOCK_RAW]}.get(mode, [socket.SOCK_DGRAM, socket.SOCK_RAW])
    for kind in kinds:
        try:
            return socket.socket(fam, kind, proto), kind == socket.SOCK_RAW
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EPROTONOSUPPORT):
                raise
    return None


def check_icmp(host: str, timeout: float, mode: str) -> str:
    fam, addr = resolve(host, 0, socket.SOCK_DGRAM)
    made = icmp_socket(fam, mode)
    if made is None:
        return "nosocket"
    s, raw = made
    v6 = fam == socket.AF_INET6
    req_type, reply_type = (128, 129) if v6 else (8, 0)
    ident = os.getpid() & 0xFFFF
    deadline = time.monotonic() + timeout
    with s:
        s.connect(addr)  # errors (unreachable, prohibited) reach us; raw sockets see only this peer
        seq = 0
        while True:
            seq += 1
            body = b"silo-netprobe"
            head = struct.pack("!BBHHH", req_type, 0, 0, ident, seq)
            csum = 0 if v6 else icmp_checksum(head + body)  # the kernel fills ICMPv6's
            s.send(struct.pack("!BBHHH", req_type, 0, csum, ident, seq) + body)
            resend = time.monotonic() + 0.5
            while True:
                s.settimeout(max(0.01, min(resend, deadline) - time.monotonic()))
                try:
                    data = s.recv(65535)
                except TimeoutError:
                    with_deadline(deadline)
                    break  # send again
                if raw and not v6:
                    data = data[(data[0] & 0x0F) * 4:]
                if len(data) < 8:
                    continue
                rtype, _, _, rid, rseq = struct.unpack("!BBHHH", data[:8])
                # A ping socket's id is its port, rewritten by the kernel; only raw replies need the id check.
                if rtype == reply_type and rseq <= seq and (not raw or rid == ident):
                    return "ok"


def check_dns(name: str, timeout: float) -> str:
    box: dict[str, str] = {}

    def run() -> None:
        try:
            infos = socket.getaddrinfo(name, None, socket.AF_UNSPEC, socket.SOCK_STREAM)
            box["r"] = "ok:" + ",".join(sorted({str(i[4][0]) for i in infos}))
        except BaseException as e:
            box["r"] = classify(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    return box.get("r", "timeout")


def check_http(host: str, port: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    with tcp_connect(host, port, timeout) as s:
        hosthdr = f"[{host}]" if ":" in host else host
        s.sendall(f"GET / HTTP/1.0\r\nHost: {hosthdr}\r\nUser-Agent: silo-netprobe\r\n\r\n".encode())
        data = b""
        while True:
            s.settimeout(with_deadline(deadline))
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, sep, body = data.partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].split()
    if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        return "error:badresponse"
    if parts[1] != b"200":
        return "http:" + parts[1].decode("ascii", "replace")
    return "ok:" + body.decode("utf-8", "replace").strip()


def check_hold(host: str, port: int, seconds: float, timeout: float) -> str:
    s = tcp_connect(host, port, timeout)
    with s, s.makefile("rb") as f:
        s.settimeout(timeout)
        if f.readline() != b"ready\n":
            return "error:notready"
        sys.stdout.write(json.dumps({"hold": "connected"}) + "\n")
        sys.stdout.flush()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.2)
            try:
                s.sendall(b"x\n")
                line = f.readline()
            except TimeoutError:
                return "cut:timeout"
            except OSError as e:
                return "cut:" + errname(e)
            if line != b"x\n":
                return "cut:eof" if not line else "cut:badecho"
    return "ok"


def run_check(check: str, timeout: float, icmp_mode: str) -> str:
    kind, _, rest = check.partition(":")
    try:
        if kind == "dns":
            if not rest:
                raise CheckError("badcheck")
            return check_dns(rest, timeout)
        host, tail = split_host_port(rest)
        if not host:
            raise CheckError("badcheck")
        if kind == "icmp":
            if tail:
                raise CheckError("badcheck")
            return check_icmp(host, timeout, icmp_mode)
        if kind == "hold":
            port_s, _, secs = tail.partition(":")
            return check_hold(host, int(port_s), float(secs), timeout)
        if not tail.isdigit():
            raise CheckError("badcheck")
        port = int(tail)
        if kind == "tcp":
            return check_tcp(host, port, timeout)
        if kind == "udp":
            return check_udp(host, port, timeout)
        if kind == "http":
            return check_http(host, port, timeout)
        raise CheckError("badcheck")
    except ValueError:
        return "error:badcheck"
    except BaseException as e:
        return classify(e)


def main(argv: list[str]) -> int:
    timeout = 1.5
    icmp_mode = "auto"
    checks: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--timeout":
            timeout = float(next(it, "1.5"))
        elif arg == "--icmp":
            icmp_mode = next(it, "auto")
        else:
            checks.append(arg)
    if not checks or icmp_mode not in ("auto", "dgram", "raw"):
        sys.stderr.write(__doc__ or "")
        return 2
    if any(c.startswith("hold:") for c in checks) and len(checks) > 1:
        sys.stderr.write("netprobe: hold must be the only check\n")
        return 2
    results: dict[str, str] = {}

    def worker(c: str) -> None:
        results[c] = run_check(c, timeout, icmp_mode)

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in checks]
    for t in threads:
        t.start()
    extra = 0.0
    if checks[0].startswith("hold:"):
        try:
            extra = float(checks[0].rsplit(":", 1)[1])
        except ValueError:
            pass
    deadline = time.monotonic() + timeout + 2 + extra
    for t in threads:
        t.join(max(0, deadline - time.monotonic()))
    out = {c: results.get(c, "timeout") for c in checks}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)  # lookups still stuck in the resolver must not hold the exit


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
