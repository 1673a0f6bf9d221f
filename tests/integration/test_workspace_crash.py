"""silod SIGKILLed at random points of random workspace operations (issue 3's crash test).

A few persistent workspaces go through ~200 random operations (create, start, an exec
that writes a counter, stop, snapshot, restore, fork, rm). About every tenth operation a
thread SIGKILLs the daemon 0-50 ms after the operation was sent; the daemon is started
again and the test checks that it tells the truth:

* every workspace that should exist does, and none appears from nowhere (an interrupted
  create, fork or rm may or may not have happened: both are accepted);
* the states: nothing ``running`` whose pid is dead; what ran before the crash is
  ``stopped`` with an error, or running again when its policy is ``restart = "always"``;
* no leftovers: no ``silo-init``/``silo-setup`` of this daemon but the running
  workspaces' inits, no cgroup ``ws-NAME`` of a workspace that is not running, no mount
  of the state dir in the host's mount table;
* the data: each workspace's counter is a value the test wrote with an exec that
  returned 0 (or, when that exec or a restore was interrupted, one of the candidates).

The seed is printed on failure; ``SILO_CRASH_SEED=N`` replays a run.
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from daemons import Daemon
from procs import comm, settle

import silo
from silo import DaemonUnavailable, InternalError, NotFoundError

pytestmark = [pytest.mark.root, pytest.mark.slow]

if os.geteuid() != 0:
    pytest.skip("the crash test runs a root silod", allow_module_level=True)

OPERATIONS = 200
KILL_EVERY = 10  # on average
MAX_WORKSPACES = 4
TYPICAL_MS = {"create": 5, "start": 10, "write": 20, "stop": 7, "snapshot": 5, "restore": 7, "fork": 9, "rm": 8}
Value = int | None  # the counter in /root/c; None: never written


@dataclass
class Known:
    """What the test knows of one workspace: its state and the values its counter may hold."""

    state: str
    values: set[Value]
    snapshots: dict[str, set[Value]] = field(default_factory=dict)
    always: bool = False


@dataclass
class Pending:
    """An operation the daemon was killed during: it may or may not have happened."""

    op: str
    name: str
    other: str | None = None  # the new workspace of a fork or a create, the tag of a snapshot
    values: set[Value] = field(default_factory=set)  # a write's new value, a restore's snapshot


def our_processes(base: str) -> set[int]:
    """silo-init/silo-setup processes of this daemon's workspaces (their mounts name its state dir)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or comm(int(entry)) not in ("silo-init", "silo-setup"):
            continue
        try:
            with open(f"/proc/{entry}/mountinfo") as f:
                if base in f.read():
                    found.add(int(entry))
        except OSError:
            continue
    return found


def cgroups_of(name: str) -> list[str]:
    return glob.glob(f"/sys/fs/cgroup/*/silo*/ws-*-{name}")


def remove_empty_cgroups(prefix: str) -> None:
    """This test's own leftovers (its names start with ``prefix``), so a failure leaks nothing."""
    for path in cgroups_of(f"{prefix}*"):
        with contextlib.suppress(OSError):
            os.rmdir(path)


def read_counter(ws: silo.Workspace) -> Value:
    r = ws.exec(["cat", "/root/c"])
    if r.exit_code != 0:
        assert b"No such file" in r.stderr, r
        return None
    return int(r.stdout)


class Crasher:
    def __init__(self, daemon: Daemon, seed: int, limits: dict[str, int]) -> None:
        self.daemon = daemon
        self.limits = limits
        self.base = os.path.dirname(daemon.state)
        self.rng = random.Random(seed)
        self.seed = seed
        self.client = silo.Client(daemon.socket, autostart=False)
        self.known: dict[str, Known] = {}
        self.counter = 0
        self.tags = 0
        self.history: list[str] = []
        self.crashes = 0
        self.cut: list[str] = []  # operations a crash interrupted
        self.prefix = f"c{uuid.uuid4().hex[:6]}"

    def fail(self, message: str) -> str:
        return f"{message} (seed {self.seed}; last operations: {self.history[-12:]})"

    # -- operations: each returns the call to make and what is uncertain if it is cut short ---------

    def new_name(self) -> str:
        return f"{self.prefix}-{uuid.uuid4().hex[:6]}"

    def choose(self) -> tuple[str, Callable[[], None], Pending]:
        rng, known = self.rng, self.known
        quiet = [n for n, k in known.items() if k.state in ("created", "stopped")]
        running = [n for n, k in known.items() if k.state == "running"]
        choices: list[str] = []
        if len(known) < MAX_WORKSPACES:
            choices += ["create"]
        if quiet:
            choices += ["start"] * 3 + ["snapshot"]
            if len(known) < MAX_WORKSPACES + 1:
                choices += ["fork"]
            if any(known[n].snapshots for n in quiet):
                choices += ["restore"]
        if running:
            choices += ["write"] * 4 + ["stop"] * 2
        removable = [n for n in known if not known[n].always]
        if len(removable) > 2:
            choices += ["rm"]
        op = rng.choice(choices)
        plain: dict[str, tuple[list[str], Callable[[str], None]]] = {
            "start": (quiet, self.start), "stop": (running, self.stop), "rm": (removable, self.remove)}
        if op in plain:
            pool, act = plain[op]
            name = rng.choice(pool)
            return op, lambda: act(name), Pending(op, name)
        if op == "create":
            name = self.new_name()
            return op, lambda: self.create(name), Pending(op, name, name)
        if op == "write":
            name = rng.choice(running)
            self.counter += 1
            value = self.counter
            return op, lambda: self.write(name, value), Pending(op, name, values={value})
        if op == "snapshot":
            name = rng.choice(quiet)
            self.tags += 1
            tag = f"s{self.tags}"
            return op, lambda: self.snapshot(name, tag), Pending(op, name, tag)
        if op == "restore":
            name = rng.choice([n for n in quiet if known[n].snapshots])
            tag = rng.choice(sorted(known[name].snapshots))
            return op, lambda: self.restore(name, tag), Pending(op, name, tag, set(known[name].snapshots[tag]))
        name, new = rng.choice(quiet), self.new_name()  # fork
        return op, lambda: self.fork(name, new), Pending(op, name, new)

    def create(self, name: str) -> None:
        always = not any(k.always for k in self.known.values())
        self.client.create(name, restart="always" if always else "no", **self.limits)  # type: ignore[arg-type]
        self.known[name] = Known("created", {None}, always=always)

    def start(self, name: str) -> None:
        self.client.get(name).start()
        self.known[name].state = "running"

    def write(self, name: str, value: int) -> None:
        r = self.client.get(name).exec(["sh", "-c", f"head -c 2097152 /dev/urandom > /root/blob.{value % 3} && "
                                               f"echo {value} > /root/c.new && mv -f /root/c.new /root/c"])
        assert r.exit_code == 0, self.fail(f"the write to {name} failed: {r}")
        self.known[name].values = {value}

    def stop(self, name: str) -> None:
        self.client.get(name).stop(timeout=2)
        self.known[name].state = "stopped"

    def snapshot(self, name: str, tag: str) -> None:
        self.client.get(name).snapshot(tag)
        self.known[name].snapshots[tag] = set(self.known[name].values)

    def restore(self, name: str, tag: str) -> None:
        self.client.get(name).restore(tag)
        self.known[name].values = set(self.known[name].snapshots[tag])

    def fork(self, name: str, new: str) -> None:
        self.client.get(name).fork(new)
        self.known[new] = Known("created", set(self.known[name].values), always=self.known[name].always)

    def remove(self, name: str) -> None:
        self.client.get(name).remove(force=True)
        del self.known[name]

    # -- one step --------------------------------------------------------------------------------

    def step(self) -> None:
        op, call, pending = self.choose()
        kill = self.rng.random() < 1 / KILL_EVERY
        self.history.append(f"{op} {pending.name}{' ' + pending.other if pending.other else ''}"
                            f"{' (killed)' if kill else ''}")
        if not kill:
            call()
            return
        # Operations take 5-30 ms here: aim most kills inside one, some a little after.
        delay = self.rng.uniform(0, TYPICAL_MS[op] * 1.5e-3) if self.rng.random() < 0.8 else self.rng.uniform(0, 0.05)
        killer = threading.Timer(delay, self.daemon.kill)
        killer.start()
        try:
            call()
            cut: Pending | None = None
        except (InternalError, DaemonUnavailable) as e:
            assert "cannot reach silod" in e.message, self.fail(f"{op} failed: {e.message}")
            cut = pending
            self.cut.append(op)
        killer.join()
        self.crashes += 1
        before = {n: k.state for n, k in self.known.items()}
        self.daemon.start()
        self.check_after_restart(before, cut)
        self.check_data()

    # -- the checks -------------------------------------------------------------------------------

    def infos(self) -> dict[str, silo.WorkspaceInfo]:
        return {i.name: i for i in self.client.list() if i.name.startswith(self.prefix)}

    def reconcile(self, infos: dict[str, silo.WorkspaceInfo], cut: Pending | None) -> set[str]:
        """Fold what an interrupted operation may have done into ``known``; the names it touched."""
        touched = set()
        if cut is not None:
            touched = {cut.name} | ({cut.other} if cut.op in ("create", "fork") and cut.other else set())
            k = self.known.get(cut.name)
            if cut.op == "write" and k is not None:
                k.values |= cut.values
            elif cut.op == "restore" and k is not None:
                k.values |= cut.values
            elif cut.op == "snapshot" and k is not None and cut.other is not None:
                tags = {s.tag for s in infos[cut.name].snapshots} if cut.name in infos else set()
                if cut.other in tags:
                    k.snapshots[cut.other] = set(k.values)
            elif cut.op in ("create", "fork") and cut.other in infos:
                source = self.known.get(cut.name) if cut.op == "fork" else None
                self.known[cut.other] = Known("created", set(source.values) if source else {None},
                                              always=infos[cut.other].spec.restart.value == "always")
            elif cut.op == "rm" and cut.name not in infos:
                self.known.pop(cut.name, None)
        missing = set(self.known) - set(infos)
        assert not missing, self.fail(f"workspaces vanished in a crash: {sorted(missing)}")
        extra = set(infos) - set(self.known)
        assert not extra, self.fail(f"workspaces appeared from nowhere: {sorted(extra)}")
        return touched

    def check_after_restart(self, before: dict[str, str], cut: Pending | None) -> None:
        infos = self.infos()
        touched = self.reconcile(infos, cut)
        for name, info in infos.items():
            state = info.state.value
            assert state != "broken", self.fail(f"{name} is broken after a crash: {info.error}")
            if state == "running":
                assert info.pid is not None and comm(info.pid) == "silo-init", self.fail(
                    f"{name} is recorded running, but its pid {info.pid} is not a live silo-init")
            else:
                assert info.pid is None, self.fail(f"{name} is {state} with a pid {info.pid}")
            if name not in touched and name in before:
                was = before[name]
                if was == "running" and self.known[name].always:
                    want = "running"
                else:
                    want = "stopped" if was == "running" else was
                assert state == want, self.fail(f"{name} was {was} before the crash and is {state} after it")
                if was == "running" and want == "stopped":
                    assert info.error, self.fail(f"{name} was stopped by the crash, but says no error")
            self.known[name].state = state
        running = {info.pid for info in infos.values() if info.state.value == "running"}
        procs = settle(lambda: our_processes(self.base), lambda found: found == running)
        assert procs == running, self.fail(f"silo processes of this daemon {sorted(procs)} are not the running "
                                           f"workspaces' inits {sorted(running)}")
        for name, info in infos.items():
            if info.state.value != "running":
                assert not cgroups_of(name), self.fail(f"{name} is {info.state.value} but has cgroups "
                                                       f"{cgroups_of(name)}")
        with open("/proc/self/mountinfo") as f:
            assert self.daemon.state not in f.read(), self.fail("the state dir is mounted in the host's namespace")

    def check_data(self) -> None:
        for name, k in self.known.items():
            ws = self.client.get(name)
            if k.state != "running":
                ws.start()
                k.state = "running"
            value = read_counter(ws)
            assert value in k.values, self.fail(f"{name}'s counter is {value}, expected one of {k.values}")
            k.values = {value}

    def close(self) -> None:
        with contextlib.suppress(DaemonUnavailable):  # the daemon may be down: the fixture cleans up then
            for name in list(self.known) + [n for n in self.infos() if n not in self.known]:
                with contextlib.suppress(NotFoundError):
                    self.client.get(name).remove(force=True)
        self.client.close()
        remove_empty_cgroups(self.prefix)


def revive(daemon: Daemon, prefix: str) -> None:
    """Bring the module's daemon back after a test that may have left it down."""
    if daemon.proc is None or daemon.proc.poll() is not None:
        remove_empty_cgroups(prefix)
        daemon.proc = None
        daemon.start()


@pytest.mark.parametrize("limits", [
    pytest.param({}, id="no-limits"),
    pytest.param({"pids": 512}, id="pids-limit"),
])
def test_random_operations_with_daemon_crashes(daemon: Daemon, limits: dict[str, int]) -> None:
    seed = int(os.environ.get("SILO_CRASH_SEED") or random.randrange(1 << 30))
    crasher = Crasher(daemon, seed, limits)
    started = time.monotonic()
    try:
        for _ in range(OPERATIONS):
            try:
                crasher.step()
            except silo.SiloError as e:  # name the seed and the history, to replay it with SILO_CRASH_SEED
                raise AssertionError(crasher.fail(f"{type(e).__name__}: {e.message}")) from e
        # and one crash at rest, with everything running that ran
        crasher.history.append("kill at rest")
        before = {n: k.state for n, k in crasher.known.items()}
        daemon.kill()
        daemon.start()
        crasher.check_after_restart(before, None)
        crasher.check_data()
    finally:
        revive(daemon, crasher.prefix)
        crasher.close()
    assert crasher.crashes >= OPERATIONS // KILL_EVERY // 2, crasher.fail("too few crashes to mean anything")
    assert len(crasher.cut) >= 2, crasher.fail("the crashes interrupted almost no operation")
    assert our_processes(crasher.base) == set()
    assert not [g for name in crasher.known for g in cgroups_of(name)]
    print(f"seed {seed}: {OPERATIONS} operations, {crasher.crashes} crashes "
          f"(interrupting {sorted(crasher.cut)}), {time.monotonic() - started:.1f} s")


def test_a_create_cut_before_its_storage_is_forgotten_and_lost_storage_is_broken(daemon: Daemon) -> None:
    """A crash between a create's record and its storage (the window the random test once
    hit): the next daemon forgets that create; a record whose storage vanished otherwise
    is marked broken, and rm still removes it."""
    prefix = f"c{uuid.uuid4().hex[:6]}"
    cut, lost = f"{prefix}-cut", f"{prefix}-lost"
    with silo.Client(daemon.socket, autostart=False) as client:
        for name in (cut, lost):
            client.create(name)
        client.get(lost).start()
        client.get(lost).stop()
        try:
            daemon.kill()
            for name in (cut, lost):  # leave only the record, as a crash before the storage would
                ws_dir = os.path.join(daemon.state, "workspaces", name)
                for entry in os.listdir(ws_dir):
                    if entry != "record.json":
                        path = os.path.join(ws_dir, entry)
                        if os.path.isdir(path) and not os.path.islink(path):
                            shutil.rmtree(path)
                        else:
                            os.unlink(path)
            daemon.start()
            infos = {i.name: i for i in client.list() if i.name.startswith(prefix)}
            assert sorted(infos) == [lost]
            assert infos[lost].state.value == "broken"
            assert infos[lost].error == f"its storage is missing; remove it with 'silo rm {lost}'"
            client.get(lost).remove()
            assert not os.path.exists(os.path.join(daemon.state, "workspaces", cut))
        finally:
            revive(daemon, prefix)
            for name in (cut, lost):
                with contextlib.suppress(NotFoundError):
                    client.get(name).remove(force=True)


@pytest.mark.parametrize("restart", ["no", "always"])
def test_a_workspace_with_limits_starts_again_after_a_crash(daemon: Daemon, restart: str) -> None:
    prefix = f"c{uuid.uuid4().hex[:6]}"
    name = f"{prefix}-limited"
    with silo.Client(daemon.socket, autostart=False) as client:
        ws = client.create(name, pids=64, restart=restart)
        try:
            first = ws.start().pid
            assert cgroups_of(name)
            daemon.kill()
            daemon.start()
            info = ws.info()
            if restart == "always":
                assert info.state.value == "running" and info.pid not in (None, first)
                assert comm(info.pid) == "silo-init"
            else:
                assert (info.state.value, info.pid) == ("stopped", None) and info.error
                assert cgroups_of(name) == [], "a stopped workspace keeps its cgroup"
                ws.start()
            assert ws.exec(["true"]).exit_code == 0
        finally:
            revive(daemon, prefix)
            with contextlib.suppress(NotFoundError):
                ws.remove(force=True)
            remove_empty_cgroups(prefix)
