"""A sandbox's network without root: pasta carries the traffic, silo's policy holds inside.

Without root silo cannot make a network namespace owned by the host's user namespace
(the root design, :mod:`silo.net.links`), and the sandbox cannot be moved into one it
did not make. So a rootless sandbox is cloned into a network namespace of its own user
namespace, as before, and the keeper (:mod:`silo.net.keeper`) then, before the sandbox
is released:

1. forks an *inner helper* that joins the sandbox's user and network namespaces (the
   keeper's user owns that user namespace, so the helper holds every capability in
   it) and stays there: it applies the policy table (libnftables in that namespace),
   brings up loopback, sets the bandwidth cap, and makes the sockets the keeper needs
   inside (the resolver's, published ports' connections), handing them over by
   SCM_RIGHTS. Its requests come from the keeper only, one JSON datagram each;
2. starts ``pasta`` (Debian's ``passt``) on the same namespaces: a tap ``eth0`` with
   silo's addresses; what the sandbox sends leaves through pasta's ordinary sockets on
   the host. Its port forwarding both ways is off (``-t/-u/-T/-U none``) and the
   gateway is not mapped to the host's loopback (``--no-map-gw``); no DHCP, no RA.

The policy is the root one (:mod:`silo.net.rules`), plus the host's own addresses in
the blocked set (pasta would otherwise connect to them from the host). The sandbox's
processes cannot change it: the silo-setup of every sandbox drops CAP_NET_ADMIN from
the bounding set (``--cap NET_ADMIN`` with a network is refused), ``/proc/sys`` is
read-only, and a user namespace made inside would own nothing of this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from typing import Any

from silo.model.errors import SiloError
from silo.model.network import Lease
from silo.net import wire

# One slot of the root pool that root never hands out (links.SLOTS stops two short).
LEASE = Lease(index=-1, host4="10.213.255.249", guest4="10.213.255.250", host6="fd51:5110:0:ffff::1",
              guest6="fd51:5110:0:ffff::2", ifname="")
IFNAME = "eth0"


def host_addresses() -> list[str]:
    """Every address of the host's (blocked for the sandbox, except in ``full`` mode)."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        return sorted({str(a.get_attr("IFA_ADDRESS")).split("%")[0] for a in ipr.get_addr()
                       if a.get_attr("IFA_ADDRESS")})


def _has_default_route(ipr: Any, family: int) -> bool:
    return any(r.get_attr("RTA_DST") is None for r in ipr.get_routes(family=family, table=254))


def host_has_ipv6_route() -> bool:
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        return _has_default_route(ipr, socket.AF_INET6)


def open_socket(family: int, kind: int, bind: tuple[str, int] | None = None,
                listen: int | None = None) -> socket.socket:
    """A socket in the calling thread's network namespace, bound and listening if asked
    (the keeper's as root, the inner helper's rootless)."""
    sock = socket.socket(family, kind | socket.SOCK_CLOEXEC)
    try:
        if bind is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(bind)
        if listen is not None:
            sock.listen(listen)
    except OSError:
        sock.close()
        raise
    return sock


def pasta_argv(userns_fd: int, netns_fd: int, ipv6: bool) -> list[str]:
    lease = LEASE
    argv = ["pasta", "--foreground", "--quiet", "--config-net", "--ns-ifname", IFNAME,
            "--address", lease.guest4, "--netmask", "30", "--gateway", lease.host4]
    argv += ["--address", lease.guest6, "--gateway", lease.host6] if ipv6 else ["--ipv4-only"]
    argv += ["--no-map-gw", "--tcp-ports", "none", "--udp-ports", "none", "--tcp-ns", "none",
             "--udp-ns", "none", "--no-dhcp", "--no-dhcpv6", "--no-ra",
             "--userns", f"/proc/self/fd/{userns_fd}", "--netns", f"/proc/self/fd/{netns_fd}"]
    return argv


def start_pasta(userns_fd: int, netns_fd: int, ipv6: bool) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(pasta_argv(userns_fd, netns_fd, ipv6),
                                pass_fds=(userns_fd, netns_fd), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise SiloError("a network without root needs pasta: install Debian's passt package "
                        "(make install does), or run as root") from None


def pasta_error(proc: subprocess.Popen[bytes]) -> str:
    """pasta's complaint, once it has exited."""
    assert proc.stderr is not None
    data = b""
    with contextlib.suppress(OSError):
        while select.select([proc.stderr], [], [], 0)[0]:
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                break
            data += chunk
    lines = [ln for ln in data.decode(errors="replace").splitlines() if ln and "syslog" not in ln]
    return lines[-1] if lines else f"exit status {proc.returncode}"


# == the keeper's handle on the inner helper ====================================================


class Inner:
    """The keeper's side of the helper inside the sandbox's namespaces. ``run``/``list``
    make it stand in for a :class:`silo.net.nft.Nft` there."""

    def __init__(self, userns_fd: int, netns_fd: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child (coverage does not follow it)
            code = 1
            try:
                ours.close()
                keep = {theirs.fileno(), userns_fd, netns_fd}
                for fd in _open_fds():
                    if fd > 2 and fd not in keep:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                code = _serve(theirs, userns_fd, netns_fd)
            finally:
                os._exit(code)
        theirs.close()
        self.pid = pid
        self.sock = ours

    def call(self, message: dict[str, Any], fds: Sequence[int] = ()) -> tuple[Any, list[int]]:
        return wire.request(self.sock, message, "the sandbox's network helper", fds=fds, max_fds=1)

    def run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call({"op": "nft", "commands": commands})[0]
        return result

    def list(self, what: str, **names: Any) -> list[dict[str, Any]]:
        return self.run([{"list": {what: names}}])

    def socket(self, family: int, kind: int, bind: tuple[str, int] | None = None,
               listen: int | None = None) -> socket.socket:
        """A socket made in the sandbox's network namespace (bound, listening if asked)."""
        _, fds = self.call({"op": "socket", "family": family, "type": kind,
                            "bind": list(bind) if bind else None, "listen": listen})
        if len(fds) != 1:
            raise SiloError("the sandbox's network helper sent no socket")
        return socket.socket(fileno=fds[0])

    def wait_link(self, pasta: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        """Until pasta has configured ``eth0``; SiloError with pasta's reason if it exits."""
        deadline = time.monotonic() + timeout
        while True:
            if pasta.poll() is not None:
                raise SiloError(f"pasta could not set up the sandbox's network: {pasta_error(pasta)}")
            if self.call({"op": "link_ready"})[0]:
                return
            if time.monotonic() > deadline:
                raise SiloError(f"pasta did not set up the sandbox's network within {timeout:g} s")
            time.sleep(0.002)

    def configure(self, bandwidth: int | None) -> None:
        self.call({"op": "configure", "bandwidth": bandwidth})

    def watch(self, pid: int) -> None:
        """Have the helper kill ``pid`` (pasta) if the keeper dies without tearing down."""
        pidfd = os.pidfd_open(pid)
        try:
            self.call({"op": "watch"}, fds=[pidfd])
        finally:
            os.close(pidfd)

    def close(self) -> None:
        """Let the helper go (EOF) and reap it."""
        if self.pid <= 0:
            return
        self.sock.close()
        for _ in range(500):
            pid, _status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.002)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        self.pid = -1


def _open_fds() -> list[int]:
    try:
        return [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, 1024))


# == the inner helper (a forked child of the keeper) ===========================================


_PR_SET_DUMPABLE = 4


def _serve(sock: socket.socket, userns_fd: int, netns_fd: int) -> int:
    from silo.sys import kernel as sysk

    # forked from the keeper's event loop: pyroute2 here runs a loop of its own
    asyncio._set_running_loop(None)
    # SECURITY: nothing else running as this user may ptrace or read the helper. It
    # outlives the keeper only until it reads EOF from it (then it kills pasta too).
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    try:
        sysk.setns(userns_fd, sysk.CLONE_NEWUSER)
        sysk.setns(netns_fd, sysk.CLONE_NEWNET)
    except OSError as e:
        with contextlib.suppress(OSError):
            sock.send(json.dumps({"error": f"cannot enter the sandbox's network namespace: {e.strerror}"}).encode())
        return 1
    os.close(userns_fd)
    os.close(netns_fd)
    helper = _Helper()
    while True:
        try:
            data, got, _, _ = socket.recv_fds(sock, wire.MAX_MSG, 1)
        except InterruptedError:
            continue
        except OSError:
            data, got = b"", []
        if not data:
            helper.close()
            return 0
        fds: list[int] = []
        try:
            reply, fds = helper.handle(json.loads(data), got)
            out = json.dumps({"ok": reply}).encode()
        except SiloError as e:
            out = json.dumps({"error": e.message}).encode()
        except (OSError, ValueError, KeyError, TypeError) as e:
            out = json.dumps({"error": f"the sandbox's network helper failed: {e}"}).encode()
        try:
            socket.send_fds(sock, [out], fds) if fds else sock.send(out)
        except OSError:
            return 0
        finally:
            for fd in fds + got:
                os.close(fd)


class _Helper:
    def __init__(self) -> None:
        self.nft: Any = None
        self.watched = -1  # a pidfd of pasta

    def handle(self, msg: dict[str, Any], got: list[int]) -> tuple[Any, list[int]]:
        """The reply to ``msg`` and the fds to send with it; takes what it keeps of ``got``."""
        op = msg.get("op")
        if op == "nft":
            if self.nft is None:
                from silo.net.nft import Nft
                self.nft = Nft()  # made here: bound to the sandbox's namespace
            return self.nft.run(msg["commands"]), []
        if op == "socket":
            bind = (str(msg["bind"][0]), int(msg["bind"][1])) if msg.get("bind") else None
            listen = int(msg["listen"]) if msg.get("listen") is not None else None
            return True, [open_socket(int(msg["family"]), int(msg["type"]), bind, listen).detach()]
        if op == "link_ready":
            return _link_ready(), []
        if op == "configure":
            _configure(msg.get("bandwidth"))
            return True, []
        if op == "watch" and len(got) == 1:
            self.watched = got.pop()
            return True, []
        raise SiloError(f"unknown helper operation {op!r}")

    def close(self) -> None:
        if self.nft is not None:
            self.nft.close()
        if self.watched >= 0:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.watched, signal.SIGKILL)
            os.close(self.watched)


def _link_ready() -> bool:
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=IFNAME)
        if not links:
            return False
        addrs = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=links[0], family=socket.AF_INET)}
        if LEASE.guest4 not in addrs:
            return False
        return _has_default_route(ipr, socket.AF_INET)


def _configure(bandwidth: int | None) -> None:
    from pyroute2 import IPRoute

    from silo.net.links import add_tbf, write_sysctl
    # unprivileged ping sockets inside for every group of the sandbox's user namespace,
    # as the root design allows (pasta's own ping sockets on the host still need the
    # host's net.ipv4.ping_group_range to carry ICMP out)
    with contextlib.suppress(OSError, ValueError), open("/proc/self/gid_map") as f:
        spans = [[int(x) for x in line.split()] for line in f if line.strip()]
        low, high = min(s[0] for s in spans), max(s[0] + s[2] - 1 for s in spans)
        write_sysctl("net.ipv4.ping_group_range", f"{low} {high}")
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        if bandwidth:
            add_tbf(ipr, ipr.link_lookup(ifname=IFNAME)[0], int(bandwidth))
