"""Network benchmarks (issue 4): TCP throughput and connection setup latency from a
sandbox through silo's policy, beside the same veth path without filtering.

Root only. Builds, for the length of the run and nothing beyond this machine:

* a test host: the network namespace ``silo-bench-srv`` joined to the host by a veth
  (host side ``sbsrv0`` 198.51.100.1/24, server ``eth0`` 198.51.100.10/24, default route
  back via 198.51.100.1), running ``iperf3 -s`` and a TCP server on port 9 that accepts
  and closes;
* the baseline: the network namespace ``silo-bench-raw`` joined to the host by a veth
  (host side ``sbraw0`` 10.214.0.1/30, inside ``eth0`` 10.214.0.2/30, default route via
  10.214.0.1) with the host's masquerade for 10.214.0.0/30 in an nft table of its own
  (``inet silo_bench``): the path a sandbox's packets take (veth, forwarding, NAT), with
  no filter rules on it.

Then, interleaved in rounds, ``silo run --network internet -- iperf3 -c ...`` against
``ip netns exec silo-bench-raw iperf3 -c ...``, and a Python loop of TCP connect()s to the
test host in both; and, for information, ``silo run`` of ``/bin/true`` with and without a
network.

Without root (requirement 2), as the unprivileged user ``SILO_BENCH_USER`` (``silotest``,
which ``make test`` creates): ``silo run --network internet`` (pasta, the policy in the
sandbox's namespace) against raw ``pasta`` with the same options and no filter rules,
to the same test host, interleaved the same way. Everything is removed afterwards, also
when something fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from measure import one_line
from report import REPO, table

SILO = str(REPO / ".venv" / "bin" / "silo")
PYTHON = "/usr/bin/python3"  # the host's, visible inside a sandbox

SRV_NS, RAW_NS = "silo-bench-srv", "silo-bench-raw"
SRV_IF, RAW_IF = "sbsrv0", "sbraw0"
SRV_HOST, SRV_ADDR, SRV_NET = "198.51.100.1", "198.51.100.10", "198.51.100.0/24"
RAW_HOST, RAW_ADDR, RAW_NET = "10.214.0.1", "10.214.0.2", "10.214.0.0/30"
NFT_TABLE = "silo_bench"
IPERF_PORT, ACCEPT_PORT = 5201, 9

# Budgets of issue 4, requirement 5.
THROUGHPUT_RATIO = 0.8
CONNECT_ADDED_MS = 1.0

CONNECTS, WARMUP_CONNECTS = 200, 20

ACCEPT_SERVER = (
    "import socket,sys\n"
    "s=socket.socket()\n"
    "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    "s.bind((sys.argv[1],int(sys.argv[2])))\n"
    "s.listen(1024)\n"
    "while True:\n"
    "    c,_=s.accept()\n"
    "    c.close()\n"
)

# connect() alone is timed (the SYN, SYN-ACK and ACK: what a policy can add to);
# socket() and close() are not.
CONNECT_LOOP = (
    "import socket,sys,time\n"
    "a=(sys.argv[1],int(sys.argv[2]))\n"
    "out=[]\n"
    "for _ in range(int(sys.argv[3])):\n"
    "    s=socket.socket()\n"
    "    t=time.perf_counter_ns()\n"
    "    s.connect(a)\n"
    "    out.append(time.perf_counter_ns()-t)\n"
    "    s.close()\n"
    "print(' '.join(map(str,out)))\n"
)

Budget = tuple[str, str, str, str]

WHAT_TPUT = "TCP throughput through the policy"
LIMIT_TPUT = f"≥ {THROUGHPUT_RATIO} x the veth path without filtering"
WHAT_CONNECT = "added TCP connection setup latency"
LIMIT_CONNECT = f"≤ {CONNECT_ADDED_MS:g} ms (median)"
WHAT_RL_TPUT = "rootless: TCP throughput through the policy"
LIMIT_RL_TPUT = f"≥ {THROUGHPUT_RATIO} x raw pasta without filtering"
WHAT_RL_CONNECT = "rootless: added TCP connection setup latency"

BENCH_USER = os.environ.get("SILO_BENCH_USER", "silotest")
# raw pasta as silo starts it (silo.net.rootless.pasta_argv), running the command itself
RAW_PASTA = ("pasta", "--quiet", "--config-net", "--address", "10.213.255.250", "--netmask", "30",
             "--gateway", "10.213.255.249", "--no-map-gw", "--tcp-ports", "none", "--udp-ports", "none",
             "--tcp-ns", "none", "--udp-ns", "none", "--no-dhcp", "--no-dhcpv6", "--no-ra", "--")


def _sh(*argv: str, check: bool = True, stdin: str | None = None, timeout: float = 60) -> str:
    proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}: exit code {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()[-300:]}")
    return proc.stdout


def _missing() -> str | None:
    """Why this part cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (a sandbox's network is made as root)"
    for tool in ("iperf3", "ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.path.exists(PYTHON):
        return f"{PYTHON} is missing"
    if not os.path.exists(SILO):
        return f"{SILO} is missing: run `make install`"
    return None


class TestNet:
    """The test host and the unfiltered baseline; ``close`` removes whatever was made."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.made_table = False

    def _ns_exec(self, ns: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def _veth(self, ns: str, ifname: str, host: str, inside: str, prefix: int) -> None:
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", ifname, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _sh("ip", "addr", "add", f"{host}/{prefix}", "dev", ifname)
        _sh("ip", "link", "set", ifname, "up")
        _sh(*self._ns_exec(ns, "ip", "link", "set", "lo", "up"))
        _sh(*self._ns_exec(ns, "ip", "addr", "add", f"{inside}/{prefix}", "dev", "eth0"))
        _sh(*self._ns_exec(ns, "ip", "link", "set", "eth0", "up"))
        _sh(*self._ns_exec(ns, "ip", "route", "add", "default", "via", host))

    def _wait_listening(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server for port {port} exited with {proc.returncode}")
            out = _sh(*self._ns_exec(SRV_NS, "ss", "-Hltn", f"sport = :{port}"), check=False)
            if out.strip():
                return
            time.sleep(0.05)
        raise RuntimeError(f"nothing listens on {SRV_ADDR}:{port} after 10 s")

    def open(self) -> None:
        self.close()  # leftovers of a run that was killed
        for net in (SRV_NET, RAW_NET):
            if _sh("ip", "route", "show", net).strip():
                raise RuntimeError(f"the host has a route for {net} already")
        self._veth(SRV_NS, SRV_IF, SRV_HOST, SRV_ADDR, 24)
        self._veth(RAW_NS, RAW_IF, RAW_HOST, RAW_ADDR, 30)
        self.made_table = True
        _sh("nft", "-f", "-", stdin=(
            f"table inet {NFT_TABLE} {{\n"
            "  chain post {\n"
            "    type nat hook postrouting priority 100; policy accept;\n"
            f"    ip saddr {RAW_NET} oifname != \"{RAW_IF}\" masquerade\n"
            "  }\n"
            "}\n"))
        route = _sh("ip", "route", "get", SRV_ADDR)  # nothing may leave this machine
        if f"dev {SRV_IF}" not in route:
            raise RuntimeError(f"{SRV_ADDR} is not routed to {SRV_IF}: {route.strip()}")
        null = subprocess.DEVNULL
        iperf = subprocess.Popen(self._ns_exec(SRV_NS, "iperf3", "-s", "-B", SRV_ADDR, "-p", str(IPERF_PORT)),
                                 stdin=null, stdout=null, stderr=null)
        self.procs.append(iperf)
        accept = subprocess.Popen(self._ns_exec(SRV_NS, PYTHON, "-c", ACCEPT_SERVER, SRV_ADDR, str(ACCEPT_PORT)),
                                  stdin=null, stdout=null, stderr=null)
        self.procs.append(accept)
        self._wait_listening(IPERF_PORT, iperf)
        self._wait_listening(ACCEPT_PORT, accept)

    def close(self) -> None:
        for proc in self.procs:  # `ip netns exec` execs the server: the pid is the server's
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)
        self.procs.clear()
        for ifname in (SRV_IF, RAW_IF):
            if os.path.exists(f"/sys/class/net/{ifname}"):
                _sh("ip", "link", "del", ifname, check=False)
        for ns in (SRV_NS, RAW_NS):
            if os.path.exists(f"/run/netns/{ns}"):
                # servers left by a run that was killed: only ever in our own namespaces
                for pid in _sh("ip", "netns", "pids", ns, check=False).split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
                _sh("ip", "netns", "del", ns, check=False)
        if self.made_table or NFT_TABLE in _sh("nft", "list", "tables", check=False).split():
            _sh("nft", "delete", "table", "inet", NFT_TABLE, check=False)
            self.made_table = False

    # --- the two ways to reach the test host

    def in_silo(self, *argv: str) -> list[str]:
        return [SILO, "run", "--network", "internet", "--", *argv]

    def in_raw(self, *argv: str) -> list[str]:
        return self._ns_exec(RAW_NS, *argv)

    # --- and without root, as BENCH_USER

    @staticmethod
    def _as_user(*argv: str) -> list[str]:
        home = pwd.getpwnam(BENCH_USER).pw_dir
        return ["runuser", "-u", BENCH_USER, "--", "env", "-i", "PATH=/usr/bin:/bin", f"HOME={home}", *argv]

    def in_silo_rootless(self, *argv: str) -> list[str]:
        return self._as_user(SILO, "run", "--network", "internet", "--", *argv)

    def in_pasta(self, *argv: str) -> list[str]:
        return self._as_user(*RAW_PASTA, *argv)


def _iperf(argv: list[str], seconds: int) -> float:
    """bits/s received by the server, from ``iperf3 -J``."""
    out = _sh(*argv, timeout=seconds + 60)
    data = json.loads(out)
    if "error" in data:
        raise RuntimeError(f"iperf3: {data['error']}")
    return float(data["end"]["sum_received"]["bits_per_second"])


def _connects(argv: list[str]) -> list[float]:
    """Seconds per connect(), the warm-up ones left out."""
    out = _sh(*argv, timeout=120).split()
    if len(out) != CONNECTS:
        raise RuntimeError(f"the connect loop printed {len(out)} times, not {CONNECTS}")
    return [int(x) / 1e9 for x in out[WARMUP_CONNECTS:]]


def _spawn_time(argv: list[str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=60)
    took = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit code {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace').strip()[-200:]}")
    return took


def _gbit(bps: float) -> str:
    return f"{bps / 1e9:.2f}"


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f}"


def run(progress: Callable[[str], None], quick: bool) -> tuple[list[str], list[Budget]]:
    """(report sections, budgets as (what, measured, limit, verdict))."""
    why = _missing()
    if why:
        return [], [(WHAT_TPUT, "—", LIMIT_TPUT, f"not measured: {why}"),
                    (WHAT_CONNECT, "—", LIMIT_CONNECT, f"not measured: {why}")]
    rounds = 2 if quick else 5
    seconds = 3
    budgets: list[Budget] = []
    sections: list[str] = []
    net = TestNet()
    try:
        progress(f"network: test host {SRV_NS} ({SRV_ADDR}), baseline {RAW_NS}")
        net.open()
        iperf_c = ("iperf3", "-c", SRV_ADDR, "-p", str(IPERF_PORT), "-t", str(seconds), "-J")
        loop = (PYTHON, "-c", CONNECT_LOOP, SRV_ADDR, str(ACCEPT_PORT), str(CONNECTS))
        # one run of each way first: the CLI server, caches, the ARP entries
        _sh(*net.in_silo(*loop), timeout=120)
        with open("/proc/sys/net/ipv4/ip_forward") as f:  # silo turns it on with its first network
            if f.read().strip() != "1":
                raise RuntimeError("net.ipv4.ip_forward is off after a sandbox with a network ran")
        _sh(*net.in_raw(*loop), timeout=120)

        tput, conn = _rounds(progress, "network", rounds, net.in_silo, net.in_raw, iperf_c, loop, seconds)
        t_silo, t_raw = statistics.median(tput["silo"]), statistics.median(tput["raw"])
        c_silo, c_raw = statistics.median(conn["silo"]), statistics.median(conn["raw"])
        ratio = t_silo / t_raw
        added = c_silo - c_raw

        n = 5 if quick else 10
        progress(f"network: silo run /bin/true with and without a network ({n} each)")
        with_net, without = [], []
        for _ in range(2):
            _spawn_time(net.in_silo("/bin/true"))
            _spawn_time([SILO, "run", "--", "/bin/true"])
        for _ in range(n):
            with_net.append(_spawn_time(net.in_silo("/bin/true")))
            without.append(_spawn_time([SILO, "run", "--", "/bin/true"]))
        s_net, s_none = statistics.median(with_net), statistics.median(without)

        sections.append(
            "## Network: throughput and connection setup\n\n"
            f"A test host in its own network namespace ({SRV_ADDR}, veth to the host), reached from "
            "a one-shot sandbox with `silo run --network internet` (veth, the policy table in the "
            "sandbox's netns, the host's table with NAT) and from a namespace on the same kind of "
            f"veth path with the host's masquerade and no filter rules ({RAW_NET}). "
            f"Interleaved in {rounds} rounds; medians.\n\n"
            + table(["", "silo `--network internet`", "veth, no filtering", "silo / raw"],
                    [[f"TCP throughput, `iperf3 -t {seconds}` (Gbit/s)", _gbit(t_silo), _gbit(t_raw),
                      f"{ratio:.2f}"],
                     [f"TCP connect() (µs; {rounds} x {CONNECTS - WARMUP_CONNECTS})", _us(c_silo), _us(c_raw),
                      f"{added * 1e6:+.0f} µs"]],
                    right={1, 2, 3})
            + "\n\nThroughput per round (Gbit/s; both iperf3 ends share this machine's CPUs): silo "
            + ", ".join(_gbit(x) for x in tput["silo"]) + "; no filtering "
            + ", ".join(_gbit(x) for x in tput["raw"]) + ". connect() is timed alone (socket() and "
            "close() are not), to a server in the test host that accepts and closes."
            + "\n\nThe cost of making a network (information, no budget): `silo run -- /bin/true`, "
            f"median of {n}, interleaved.\n\n"
            + table(["", "median ms"],
                    [["`silo run --network internet -- /bin/true`", f"{s_net * 1000:.1f}"],
                     ["`silo run -- /bin/true`", f"{s_none * 1000:.1f}"],
                     ["difference", f"{(s_net - s_none) * 1000:.1f}"]], right={1}))
        budgets.append((WHAT_TPUT, f"{_gbit(t_silo)} Gbit/s = {ratio:.2f} x {_gbit(t_raw)} Gbit/s",
                        LIMIT_TPUT, "PASS" if ratio >= THROUGHPUT_RATIO else "FAIL"))
        budgets.append((WHAT_CONNECT, f"{added * 1000:.3f} ms ({_us(c_silo)} µs vs {_us(c_raw)} µs)",
                        LIMIT_CONNECT, "PASS" if added * 1000 <= CONNECT_ADDED_MS else "FAIL"))
    except Exception as e:
        why = f"not measured: {one_line(e)}"
        budgets = [(WHAT_TPUT, "—", LIMIT_TPUT, why), (WHAT_CONNECT, "—", LIMIT_CONNECT, why)]
        sections = []
    try:
        if not budgets or budgets[0][1] == "—":
            raise RuntimeError("the root measurement failed")
        # pasta's throughput swings widely from run to run on 2 CPUs: longer runs
        section, rl_budgets = _rootless(progress, net, rounds, 3 if quick else 10)
        sections.append(section)
        budgets += rl_budgets
    except Exception as e:
        why = f"not measured: {one_line(e)}"
        budgets += [(WHAT_RL_TPUT, "—", LIMIT_RL_TPUT, why), (WHAT_RL_CONNECT, "—", LIMIT_CONNECT, why)]
    finally:
        try:
            net.close()
        except Exception as e:  # say so; the report is still worth having
            print(f"bench: network: cleanup failed: {one_line(e)}", file=sys.stderr, flush=True)
    return sections, budgets


def _rounds(progress: Callable[[str], None], label: str, rounds: int, silo: Callable[..., list[str]],
            raw: Callable[..., list[str]], iperf_c: tuple[str, ...], loop: tuple[str, ...],
            seconds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Throughput (bits/s per round) and connect() times of the two ways, interleaved."""
    tput: dict[str, list[float]] = {"silo": [], "raw": []}
    conn: dict[str, list[float]] = {"silo": [], "raw": []}
    ways = {"silo": silo, "raw": raw}
    for r in range(rounds):
        order = ("silo", "raw") if r % 2 == 0 else ("raw", "silo")
        for way in order:
            tput[way].append(_iperf(ways[way](*iperf_c), seconds))
        for way in order:
            conn[way] += _connects(ways[way](*loop))
        progress(f"{label}: round {r + 1}/{rounds}: silo {_gbit(tput['silo'][-1])} Gbit/s, "
                 f"raw {_gbit(tput['raw'][-1])} Gbit/s")
    return tput, conn


def _rootless(progress: Callable[[str], None], net: TestNet, rounds: int, seconds: int) -> tuple[str, list[Budget]]:
    try:
        pwd.getpwnam(BENCH_USER)
    except KeyError:
        raise RuntimeError(f"no user {BENCH_USER!r} to run as (make test creates it; or set SILO_BENCH_USER)") from None
    if shutil.which("pasta") is None:
        raise RuntimeError("pasta is missing (make install installs passt)")
    progress(f"network: without root, as {BENCH_USER}: silo (pasta + policy) against raw pasta")
    iperf_c = ("iperf3", "-c", SRV_ADDR, "-p", str(IPERF_PORT), "-t", str(seconds), "-J")
    loop = (PYTHON, "-c", CONNECT_LOOP, SRV_ADDR, str(ACCEPT_PORT), str(CONNECTS))
    _sh(*net.in_silo_rootless(*loop), timeout=120)
    _sh(*net.in_pasta(*loop), timeout=120)
    tput, conn = _rounds(progress, "network (rootless)", rounds, net.in_silo_rootless, net.in_pasta, iperf_c,
                         loop, seconds)
    t_silo, t_raw = statistics.median(tput["silo"]), statistics.median(tput["raw"])
    c_silo, c_raw = statistics.median(conn["silo"]), statistics.median(conn["raw"])
    ratio, added = t_silo / t_raw, c_silo - c_raw
    n = 5
    spawn: dict[str, list[float]] = {"silo": [], "raw": []}
    for _ in range(n):
        spawn["silo"].append(_spawn_time(net.in_silo_rootless("/bin/true")))
        spawn["raw"].append(_spawn_time(net.in_pasta("/bin/true")))
    s_silo, s_raw = statistics.median(spawn["silo"]), statistics.median(spawn["raw"])
    section = (
        "## Network without root: pasta\n\n"
        f"The same test host, reached as the unprivileged user `{BENCH_USER}` from `silo run --network "
        "internet` (pasta carries the traffic; silo's policy table sits in the sandbox's namespace) and "
        "from raw `pasta` with the same options and no filter rules, running the client itself. "
        f"Interleaved in {rounds} rounds; medians. pasta copies every packet through user space, so both "
        "are far below the veth path above.\n\n"
        + table(["", "silo rootless", "raw pasta", "silo / raw"],
                [[f"TCP throughput, `iperf3 -t {seconds}` (Gbit/s)", _gbit(t_silo), _gbit(t_raw), f"{ratio:.2f}"],
                 [f"TCP connect() (µs; {rounds} x {CONNECTS - WARMUP_CONNECTS})", _us(c_silo), _us(c_raw),
                  f"{added * 1e6:+.0f} µs"],
                 [f"`/bin/true` with the network (ms, median of {n}; information)", f"{s_silo * 1000:.0f}",
                  f"{s_raw * 1000:.0f}", f"{(s_silo - s_raw) * 1000:+.0f} ms"]],
                right={1, 2, 3})
        + "\n\nThroughput per round (Gbit/s): silo " + ", ".join(_gbit(x) for x in tput["silo"])
        + "; raw pasta " + ", ".join(_gbit(x) for x in tput["raw"]) + ".")
    budgets: list[Budget] = [
        (WHAT_RL_TPUT, f"{_gbit(t_silo)} Gbit/s = {ratio:.2f} x {_gbit(t_raw)} Gbit/s", LIMIT_RL_TPUT,
         "PASS" if ratio >= THROUGHPUT_RATIO else "FAIL"),
        (WHAT_RL_CONNECT, f"{added * 1000:.3f} ms ({_us(c_silo)} µs vs {_us(c_raw)} µs)", LIMIT_CONNECT,
         "PASS" if added * 1000 <= CONNECT_ADDED_MS else "FAIL"),
    ]
    return section, budgets
