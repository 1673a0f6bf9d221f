"""The workspaces one daemon owns: their lifecycle, storage, execs and supervision.

Every operation takes the caller's uid (``peer``, from the socket's peer credentials):
a workspace belongs to the uid that created it, and only that uid or root can see or
touch it (another user's workspace is reported as not existing). The state check of
each verb is :func:`silo.model.workspace.require`; the state is persisted by the
:class:`~silo.store.records.Store` on every transition; the layers are the
:class:`~silo.store.layers.Storage`'s.

Crash safety comes mostly from where things live. A workspace's mounts exist only in
its own mount namespace and its processes in its own pid namespace, whose init dies
with the daemon (``PDEATHSIG``); so a SIGKILLed daemon leaves no mount or process
behind, and the next one finds each record that says ``running`` with nothing behind
it, kills any straggler named by its pid file, removes its cgroup and writes the
truthful state (``stopped``, with the reason) before it starts anything again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from silo.daemon.runtime import Process, Runtime
from silo.engine import host as hostmod
from silo.engine import planner
from silo.model import plan as p
from silo.model.errors import (
    InternalError,
    NotFoundError,
    PermissionDenied,
    SiloError,
    SpecError,
    UserError,
    WorkspaceExists,
    WorkspaceStateError,
)
from silo.model.network import NetworkPolicy
from silo.model.spec import Isolation, Spec, User
from silo.model.workspace import (
    RestartPolicy,
    State,
    WorkspaceRecord,
    WorkspaceSpec,
    parse_name,
    require,
)
from silo.store.layers import Storage
from silo.store.records import Store

log = logging.getLogger("silod")

OUTPUT_CAP = 16 << 20  # bytes of stdout/stderr a captured exec keeps (the rest is read and dropped)
LOG_CAP = 8 << 20  # a workspace's log is cut to its last half beyond this, at start
STOP_TIMEOUT = 10.0
CHECKPOINT_TIMEOUT = 300.0  # seconds for runsc to write a gvisor workspace's memory image
RESTART_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass
class Running:
    proc: Process
    plan: p.Plan
    started: float
    stopping: bool = False
    supervisor: asyncio.Task[None] | None = None
    network: Any = None  # the KeeperClient of a workspace with a network (silo.net.keeper)


def _starttime(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].split()[19].decode()


def _check_links_allowed(policy: NetworkPolicy) -> None:
    # a rootless network has no address of its own on the host for another to reach
    if policy.links and os.geteuid() != 0:
        raise SpecError("links between workspaces need root: run silod as root, or drop --link")


def _check_traversable(state_dir: str) -> None:
    """A root daemon's workspaces build their overlays as their mapped root, not as host
    root: every directory above the state dir must let others through (o+x)."""
    path = os.path.dirname(os.path.abspath(state_dir))
    while True:
        with contextlib.suppress(FileNotFoundError):
            if not os.stat(path).st_mode & 0o001:
                raise UserError(f"the state directory {state_dir} is below {path}, which workspaces cannot "
                                f"traverse (their root is not host root): run 'chmod o+x {path}' or choose "
                                "another SILO_STATE_DIR")
        if path == "/":
            return
        path = os.path.dirname(path)


def _check_layer_level(spec: WorkspaceSpec, template: str, layers: Sequence[str]) -> None:
    """A template's layers are disks (vm) or file trees (process): a workspace uses its own kind."""
    from silo.backends.vm import disk

    vm = spec.isolation is Isolation.VM
    for layer in layers:
        if os.path.isfile(os.path.join(layer, disk.DISK)) != vm:
            made = "a VM workspace" if not vm else "a workspace at isolation 'process'"
            raise SpecError(f"template {template!r} was made from {made}: its files cannot be the layers of a "
                            f"workspace at isolation {spec.isolation.value!r}; use a template made at that level")


class Manager:
    def __init__(self, state_dir: str, run_dir: str, runtime: Runtime) -> None:
        self.state_dir = state_dir
        self.run_dir = run_dir
        self.runtime = runtime
        self.host = hostmod.host()
        if self.host.is_root:
            _check_traversable(state_dir)
        self.store = Store(state_dir)
        owner = (self.host.idmap_base, self.host.idmap_base) if self.host.is_root else None
        self.storage = Storage(state_dir, owner)
        self.running: dict[str, Running] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._pids = os.path.join(run_dir, "workspaces")
        os.makedirs(self._pids, mode=0o700, exist_ok=True)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._collecting = asyncio.Lock()

    # -- helpers ---------------------------------------------------------------------

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _collect(self) -> None:
        """In the background, one at a time: trash the layers and memory images nothing
        uses any more (Storage.gc: after rm, snapshot rm, restore, reset, template rm
        and at start) and delete what is in the trash."""
        async def collect() -> None:
            async with self._collecting:
                try:
                    await asyncio.to_thread(self.storage.gc)
                    await asyncio.to_thread(self.storage.empty_trash)
                except SiloError as e:
                    log.error("%s", e.message)

        self._background(collect())

    def record(self, peer: int, name: str) -> WorkspaceRecord:
        """``name``'s record if ``peer`` may see it; else the same error as a missing one."""
        parse_name(name)
        try:
            record = self.store.load(name)
        except NotFoundError:
            record = None
        if record is None or (peer != 0 and record.owner != peer):
            raise NotFoundError(f"no workspace named {name!r}: see 'silo ls'")
        return record

    def log_path(self, record: WorkspaceRecord) -> str:
        if record.spec.disposable:  # nothing of a disposable workspace is written to disk
            return os.path.join(self.run_dir, "logs", f"{record.name}.log")
        return os.path.join(self.store.workspace_dir(record.name), "log")

    def _open_log(self, record: WorkspaceRecord) -> int:
        """The workspace's log, opened for its init's (or machine's) output."""
        path = self.log_path(record)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _log(self, record: WorkspaceRecord, message: str) -> None:
        path = self.log_path(record)
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            with open(path, "a") as f:
                f.write(f"[silo {stamp}] {message}\n")

    def info(self, record: WorkspaceRecord, *, usage: bool = False) -> dict[str, Any]:
        run = self.running.get(record.name)
        snaps: list[dict[str, Any]] = []
        with contextlib.suppress(UserError):
            snaps = [{"tag": s.tag, "created": s.created, "memory": s.memory}
                     for s in self.storage.snapshots(record.name)]
        private = None
        if usage:
            with contextlib.suppress(UserError, OSError):
                private = self.storage.usage(record.name)
        return {"name": record.name, "state": record.state.value, "spec": record.spec.to_dict(),
                "owner": record.owner, "created": record.created, "updated": record.updated,
                "error": record.error, "pid": run.proc.pid if run else None, "template": record.template,
                "snapshots": snaps, "private_bytes": private,
                "network": self.network_stats(record.name) if usage else None,
                "memory": self.memory_stats(run) if run is not None else None,
                "gvisor": self.gvisor_info(record, run)}

    def gvisor_info(self, record: WorkspaceRecord, run: Running | None) -> dict[str, Any] | None:
        """A gvisor workspace's platform: its running sandbox's, else the cached verdict
        of the probe (never a probe here: this runs on the loop, for every listed record);
        and ``resumes``, the snapshot whose processes its next start resumes."""
        if record.spec.isolation is not Isolation.GVISOR:
            return None
        from silo.backends.gvisor import runsc

        resumes = None
        if run is None:
            with contextlib.suppress(UserError):
                resumes = self.storage.resumes(record.name)
        platform = runsc.platform_of(run.plan.process.argv) if run is not None else runsc.known(self.host.cache_dir)
        if platform is None and resumes is None:
            return None
        return {"platform": platform, "resumes": resumes}

    @staticmethod
    def memory_stats(run: Running) -> dict[str, Any] | None:
        """A running vm workspace's memory: the guest's RAM, what its balloon driver last
        reported (``guest``: the guest's own figures), and what its machine -- QEMU,
        virtiofsd and the supervisor -- uses on the host (``host_bytes``, from its cgroup)."""
        machine = run.proc.machine
        if machine is None or run.plan.vm is None:
            return None
        cgroup = run.proc.cgroup
        return {"ram_bytes": run.plan.vm.memory << 20, "guest": dict(machine.memory),
                "host_bytes": cgroup.memory_bytes() if cgroup is not None else None}

    def _check_sources(self, peer: int, spec: WorkspaceSpec) -> None:
        """A non-root caller of a root daemon maps only what it owns (the daemon reads as root);
        nobody maps a folder that holds silod's sockets or state (SECURITY.md #12, #21)."""
        private = [os.path.realpath(d) for d in (self.run_dir, self.state_dir, os.path.dirname(self.run_dir))]
        for mount in spec.mounts:
            if not os.path.exists(mount.source):
                raise NotFoundError(f"mount source {mount.source} does not exist: create it or fix the path")
            source = os.path.realpath(mount.source)
            if any(d == source or d.startswith(source.rstrip("/") + "/") for d in private):
                raise PermissionDenied(f"cannot map {mount.source}: it holds silod's sockets or state, which "
                                       "no workspace may reach; map a folder below it instead")
            if peer != 0 and os.stat(mount.source).st_uid != peer:
                raise PermissionDenied(f"cannot map {mount.source}: it is not yours (uid {peer})")
        if spec.root.startswith("/"):
            if not os.path.isdir(spec.root):
                raise NotFoundError(f"root directory {spec.root} does not exist: unpack an image there or "
                                    "use --root host")
            if peer != 0 and os.stat(spec.root).st_uid != peer:
                raise PermissionDenied(f"cannot use {spec.root} as a root: it is not yours (uid {peer})")

    # -- listing ---------------------------------------------------------------------

    def records(self, peer: int) -> list[WorkspaceRecord]:
        records, _corrupt = self.store.load_all()
        return sorted((r for r in records if peer == 0 or r.owner == peer), key=lambda r: r.name)

    # -- create / remove -------------------------------------------------------------

    async def create(self, peer: int, data: object) -> WorkspaceRecord:
        spec = WorkspaceSpec.from_dict(data)
        self._check_sources(peer, spec)
        _check_links_allowed(spec.network)
        template = spec.template
        base = spec.root
        if template is not None:
            info = self.template_of(peer, template)
            base = info.base
            _check_layer_level(spec, template, info.layers)
        async with self.lock(spec.name):
            now = time.time()
            record = WorkspaceRecord(spec=spec, state=State.CREATED, created=now, updated=now,
                                     template=template, owner=peer)
            self.store.create(record)  # claims the name, or WorkspaceExists
            try:
                await asyncio.to_thread(self.storage.create, spec.name, base, template)
            except BaseException:
                self.store.delete(spec.name)
                raise
            self._log(record, "created")
            return record

    async def remove(self, peer: int, name: str, force: bool) -> None:
        record = self.record(peer, name)
        if force and record.state in (State.RUNNING, State.PAUSED):
            await self.stop(peer, name, STOP_TIMEOUT)
            record = self.record(peer, name)
        async with self.lock(name):
            record = self.record(peer, name)
            require("rm", name, record.state)
            with contextlib.suppress(OSError, SiloError):
                self.runtime.reclaim_cgroup(name)
            # The record goes first: that is the commit point. A crash after it leaves
            # storage without a record, which recover() removes; the other order left a
            # record without storage (a broken workspace) when the crash fell in between.
            self.store.delete(name)
            with contextlib.suppress(OSError):
                os.unlink(self.log_path(record))
            try:
                await asyncio.to_thread(self.storage.remove, name)
            except SiloError as e:  # gone already; the next recover() retries the storage
                log.error("workspace %s is removed, but not yet its storage: %s", name, e.message)
            with contextlib.suppress(OSError):
                self.store.workspace_dir(name).rmdir()
            self._collect()
            self._locks.pop(name, None)

    # -- start / stop ----------------------------------------------------------------

    def _plan(self, record: WorkspaceRecord, level: Isolation | None = None, resume: str | None = None) -> p.Plan:
        """The plan of ``record``'s init; ``level`` builds its file system at another
        level (a stopped gvisor workspace's is copied at the process level); ``resume``,
        a gvisor workspace's memory image to restore (Storage.take_resume)."""
        stack = self.storage.stack(record.name)
        spec = record.spec.sandbox_spec(root=stack.base)
        if level is not None:
            spec = replace(spec, isolation=level)
        if record.spec.isolation is Isolation.VM:
            return self._plan_vm(record, spec, stack)
        if record.spec.disposable:
            layers = planner.Layers(lowers=stack.lowers)
        else:
            layers = planner.Layers(upper=stack.upper, work=stack.work, lowers=stack.lowers)
        return planner.plan_workspace(spec, layers, resume)

    def _plan_vm(self, record: WorkspaceRecord, spec: Spec, stack: Any) -> p.Plan:
        """A vm workspace's machine: its layers' disks (silo.backends.vm.disk), its own
        upper's disk on top unless it is disposable (then the guest writes to RAM, over
        the layers when it has any). An image root's chain starts with a copy of the
        image in the upper's disk (read-only under RAM when disposable)."""
        from silo.backends.vm import disk

        vm_dir = os.path.join(self.state_dir, "vm")
        key = os.path.join(vm_dir, disk.KEY)
        try:
            own_key = disk.disk_key(vm_dir) if record.spec.encrypted else None  # made the first time
            image = stack.base if stack.base != "host" else None  # an image root's directory
            disks = disk.layer_disks(stack.lowers)
            if image is not None and not disks:  # the chain's bottom: a copy of the image
                disks.append(disk.image_top(stack.upper, image, self.storage.owner, own_key))
            elif not record.spec.disposable:
                base = None if disks else disk.empty_base(vm_dir)
                disks.append(disk.ensure_top(stack.upper, base, self.storage.owner, own_key))
        except SiloError as e:
            raise UserError(f"workspace {record.name!r}: {e.message}") from None
        machine_id = hashlib.sha256(f"{record.name}\0{record.created!r}".encode()).hexdigest()[:32]
        return planner.plan_vm_workspace(spec, disks, not record.spec.disposable, machine_id,
                                         key if os.path.exists(key) else "", mem_lock=record.spec.diskless)

    async def start(self, peer: int, name: str) -> WorkspaceRecord:
        async with self.lock(name):
            record = self.record(peer, name)
            require("start", name, record.state)
            return await self._start(record)

    async def _start(self, record: WorkspaceRecord) -> WorkspaceRecord:
        name = record.name
        # A gvisor workspace restored to a snapshot --memory resumes its processes, once:
        # the image is taken off the stack now, whether the start succeeds or not.
        taken = (await asyncio.to_thread(self.storage.take_resume, name)
                 if record.spec.isolation is Isolation.GVISOR else None)
        if taken is None:
            return await self._launch(record, None)
        tag, image = taken
        try:
            return await self._launch(record, image)
        except SiloError as e:
            raise type(e)(f"workspace {name!r} could not resume the processes of snapshot {tag!r}: {e.message}; "
                          f"its files are the snapshot's: 'silo start {name}' starts it without them") from None

    async def _launch(self, record: WorkspaceRecord, resume: str | None) -> WorkspaceRecord:
        name = record.name
        # off the loop: a vm workspace's plan makes its disk (qemu-img, and mkfs.ext4 the
        # first time in a state directory)
        plan = await asyncio.to_thread(self._plan, record, None, resume)
        path = self.log_path(record)
        with contextlib.suppress(OSError):
            if os.path.getsize(path) > LOG_CAP:
                with open(path, "rb") as f:
                    f.seek(-LOG_CAP // 2, os.SEEK_END)
                    tail = f.read()
                with open(path, "wb") as f:
                    f.write(tail)
        keeper = await self._network_up(record) if plan.network is not None else None
        log_fd = self._open_log(record)
        try:
            if plan.vm is not None:
                proc = await self.runtime.start_vm(name, plan, log_fd, keeper)
            else:
                proc = await self.runtime.start_init(name, plan, log_fd, keeper)
        except BaseException as e:
            self._log(record, f"start failed: {getattr(e, 'message', e)}")
            if keeper is not None:
                await asyncio.to_thread(keeper.close)
            raise
        finally:
            os.close(log_fd)
        run = Running(proc, plan, time.time(), network=keeper)
        self.running[name] = run
        self._write_pid(name, proc.pid)
        try:
            record = self.store.transition(name, State.RUNNING, error=None)
        except BaseException:
            self.running.pop(name, None)
            await self.runtime.stop(proc, 0)
            self._remove_pid(name)
            raise
        self._log(record, f"{'resumed' if resume else 'started'} (init pid {proc.pid})")
        run.supervisor = asyncio.get_running_loop().create_task(self._supervise(name, run))
        if record.spec.on_start:
            self._background(self._on_start(record, run))
        return record

    async def _on_start(self, record: WorkspaceRecord, run: Running) -> None:
        assert record.spec.on_start is not None
        log_fd = self._open_log(record)
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            plan = planner.plan_join(run.plan, record.spec.on_start)
            proc = await self.runtime.join(run.proc, plan, (null, log_fd, log_fd))
        except UserError as e:
            self._log(record, f"on_start failed: {e.message}")
            return
        finally:
            os.close(log_fd)
            os.close(null)
        code = await proc.exited
        proc.close()
        self._log(record, f"on_start exited with {code}")

    async def _supervise(self, name: str, run: Running) -> None:
        """Notice an init that exits on its own: record it, restart it by policy."""
        code = await run.proc.exited
        if run.stopping:
            return
        async with self.lock(name):
            if self.running.get(name) is not run:
                return
            del self.running[name]
            run.proc.close()
            machine = run.proc.machine
            if machine is not None:
                machine.close()
            if run.proc.cgroup is not None:
                run.proc.cgroup.kill()
                run.proc.cgroup.destroy()
            await self._network_down(run)
            self._remove_pid(name)
            state, why = State.STOPPED, f"its init exited with {code}"
            if machine is not None:
                broken, reason = machine.down or (True, f"its VM's supervisor exited with {code}")
                if broken:
                    state, why = State.BROKEN, (f"its VM stopped unexpectedly: {reason} (its disk keeps what the "
                                                f"guest had written out); run 'silo stop {name}', then "
                                                f"'silo start {name}'")
                else:
                    why = f"its VM stopped: {reason}"
            try:
                record = self.store.transition(name, state, error=why)
            except UserError:
                return
            self._log(record, why)
            if state is State.BROKEN:
                return
        policy = record.spec.restart
        if policy is RestartPolicy.ALWAYS or (policy is RestartPolicy.ON_FAILURE and code != 0):
            healthy = time.time() - run.started > 60
            attempt = 0 if healthy else getattr(run, "attempt", 0) + 1
            await asyncio.sleep(RESTART_BACKOFF[min(attempt, len(RESTART_BACKOFF) - 1)])
            async with self.lock(name):
                try:
                    record = self.store.load(name)
                except UserError:
                    return
                if record.state is not State.STOPPED:
                    return
                try:
                    await self._start(record)
                except SiloError as e:
                    self.store.update(name, error=f"restart failed: {e.message}")
                    return
                new = self.running.get(name)
                if new is not None:
                    new.attempt = attempt  # type: ignore[attr-defined]

    # -- networks ----------------------------------------------------------------------

    def _links(self, record: WorkspaceRecord, policy: NetworkPolicy) -> dict[str, list[str]]:
        """The addresses of the workspaces ``policy`` links to: running, with a network,
        and the same owner's (another's is reported as missing)."""
        _check_links_allowed(policy)
        out: dict[str, list[str]] = {}
        for link in policy.links:
            other = self.record(record.owner, link)
            run = self.running.get(other.name)
            if run is None or run.network is None:
                raise WorkspaceStateError(f"linked workspace {link!r} is not running with a network: "
                                          f"start it first (silo start {link})")
            out[link] = [run.network.lease.guest4, run.network.lease.guest6]
        return out

    async def _network_up(self, record: WorkspaceRecord) -> Any:
        from silo.net.keeper import KeeperClient

        policy = record.spec.network
        links = self._links(record, policy)
        return await asyncio.to_thread(KeeperClient.start, policy, f"ws-{self.runtime.tag}-{record.name}", links,
                                       vm=record.spec.isolation is Isolation.VM,
                                       gvisor=record.spec.isolation is Isolation.GVISOR)

    async def _network_down(self, run: Running) -> None:
        if run.network is not None:
            keeper, run.network = run.network, None
            await asyncio.to_thread(keeper.close)

    def network_stats(self, name: str) -> dict[str, Any] | None:
        run = self.running.get(name)
        if run is None or run.network is None:
            return None
        try:
            stats: dict[str, Any] = run.network.stats()
        except SiloError as e:
            return {"error": e.message}
        return stats

    async def set_network(self, peer: int, name: str, untrusted: object) -> WorkspaceRecord:
        """Change a workspace's network policy; a running one's at once, without a restart
        (connections the new policy forbids are cut at their next packet)."""
        from silo.model.workspace import FieldError

        async with self.lock(name):
            record = self.record(peer, name)
            data = record.spec.to_dict()
            if not isinstance(untrusted, dict):
                raise SpecError("the network policy must be a JSON object like {\"mode\": \"internet\"}")
            kept = {k: v for k, v in record.spec.network.to_dict().items() if k != "allow"}
            data["network"] = untrusted if untrusted.get("mode") == "none" else {**kept, **untrusted}
            try:
                spec = WorkspaceSpec.from_dict(data)
            except FieldError as err:
                raise SpecError(err.message) from None
            policy = spec.network
            run = self.running.get(name)
            if run is not None:
                if run.network is None and policy.enabled:
                    raise WorkspaceStateError(f"workspace {name!r} runs without a network, and one cannot be "
                                              f"added live: stop it (silo stop {name}), set the policy, start it")
                if run.network is not None:
                    links = self._links(record, policy)
                    await asyncio.to_thread(run.network.set_policy, policy, links)
            record = self.store.update(name, spec=spec)
            self._log(record, f"network policy set to {policy.mode.value}")
            return record

    async def stop(self, peer: int, name: str, timeout: float | None) -> WorkspaceRecord:
        async with self.lock(name):
            record = self.record(peer, name)
            require("stop", name, record.state)
            return await self._stop(record, STOP_TIMEOUT if timeout is None else timeout)

    async def _stop(self, record: WorkspaceRecord, timeout: float) -> WorkspaceRecord:
        name = record.name
        run = self.running.pop(name, None)
        if run is not None:
            run.stopping = True
            code = await self.runtime.stop(run.proc, timeout)
            await self._network_down(run)
            self._log(record, f"stopped (init exited with {code})")
        self._remove_pid(name)
        return self.store.transition(name, State.STOPPED, error=None)

    async def restart(self, peer: int, name: str) -> WorkspaceRecord:
        async with self.lock(name):
            record = self.record(peer, name)
            require("restart", name, record.state)
            if record.state in (State.RUNNING, State.PAUSED):
                record = await self._stop(record, STOP_TIMEOUT)
            return await self._start(record)

    async def shutdown(self) -> None:
        """The daemon is stopping: stop every running workspace (truthfully recorded)."""
        for name in list(self.running):
            with contextlib.suppress(Exception):
                async with self.lock(name):
                    record = self.store.load(name)
                    await self._stop(record, 3.0)
        for task in list(self._tasks):
            task.cancel()
        self.store.close()

    # -- crash recovery --------------------------------------------------------------

    def _write_pid(self, name: str, pid: int) -> None:
        path = os.path.join(self._pids, name)
        with open(path + ".tmp", "w") as f:
            f.write(f"{pid} {_starttime(pid)}\n")
        os.replace(path + ".tmp", path)

    def _remove_pid(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self._pids, name))

    def _kill_straggler(self, name: str) -> None:
        path = os.path.join(self._pids, name)
        try:
            with open(path) as f:
                pid_text, start = f.read().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            return
        if _starttime(pid) == start:  # the same process, not a reused pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            for _ in range(100):
                if _starttime(pid) != start:
                    break
                time.sleep(0.01)
        self._remove_pid(name)

    def _has_storage(self, record: WorkspaceRecord) -> bool:
        """A record without storage: a create the crash cut between claiming the name and
        making the storage is forgotten (it never succeeded); any other is marked broken."""
        if self.storage.exists(record.name):
            return True
        if record.state is State.CREATED:
            log.warning("forgetting %s: its create was cut before its storage was made", record.name)
            self.store.delete(record.name)
        elif record.state is not State.BROKEN:
            self.store.transition(record.name, State.BROKEN, error="its storage is missing; remove it with "
                                  f"'silo rm {record.name}'")
        return False

    async def recover(self) -> None:
        """Bring every record to the truth after a previous daemon's end (or crash)."""
        await asyncio.to_thread(self.storage.recover)
        if os.geteuid() == 0 and os.path.isdir("/run/silo/net/leases"):
            # networks whose keeper died with a crashed daemon (or was killed)
            from silo.net import links

            await asyncio.to_thread(links.sweep)
        records, corrupt = self.store.load_all()
        # Storage without a record: a fork or import the crash cut before its record, or
        # an rm cut after it.
        known = {r.name for r in records} | {bad.path.parent.name for bad in corrupt}
        for orphan in set(self.storage.names()) - known:
            log.warning("removing the storage of %s: it has no record (an interrupted fork, import or rm)", orphan)
            await asyncio.to_thread(self.storage.remove, orphan)
        for bad in corrupt:
            log.error("%s", bad.message)
        records = [r for r in records if self._has_storage(r)]
        restart = []
        for record in records:
            self._kill_straggler(record.name)
            try:
                self.runtime.reclaim_cgroup(record.name)
            except (OSError, SiloError) as e:
                log.error("cannot remove the cgroup %s left by the last run: %s", record.name, e)
            if record.state in (State.RUNNING, State.PAUSED):
                self.store.transition(record.name, State.STOPPED,
                                      error="the daemon stopped while it ran, and its processes with it")
                self._log(record, "stopped: the daemon stopped while it ran")
                if record.spec.restart is RestartPolicy.ALWAYS:
                    restart.append(record.name)
        for name in os.listdir(self._pids):
            if not os.path.exists(os.path.join(self.state_dir, "workspaces", name)):
                self._kill_straggler(name)
        with contextlib.suppress(Exception):
            self.runtime.cgroups().sweep()
        for name in restart:
            async with self.lock(name):
                record = self.store.load(name)
                try:
                    await self._start(record)
                except SiloError as e:
                    log.error("cannot restart %s: %s", name, e.message)
                    self.store.update(name, error=f"restart failed: {e.message}")
        self._collect()

    # -- exec ------------------------------------------------------------------------

    def running_of(self, peer: int, name: str) -> Running:
        record = self.record(peer, name)
        require("exec", name, record.state, disposable=record.spec.disposable)
        run = self.running.get(name)
        if run is None:
            raise InternalError(f"workspace {name!r} is recorded as running but has no init")
        return run

    def join_plan(self, run: Running, argv: Sequence[str], env: Mapping[str, str] | None, workdir: str | None,
                  user: str | None, tty: bool = False, term: str | None = None,
                  winsize: tuple[int, int] = (0, 0)) -> p.Plan:
        uid = gid = None
        if user is not None:
            u = User.parse(user) if user != "root" else User(0, 0)
            uid, gid = u.uid, u.gid
        if workdir is not None and not workdir.startswith("/"):
            raise SpecError(f"bad working directory {workdir!r}: give an absolute path")
        plan = planner.plan_join(run.plan, argv, env=tuple((env or {}).items()), cwd=workdir, uid=uid, gid=gid,
                                 tty=tty, term=term)
        return replace(plan, process=replace(plan.process, winsize=winsize)) if tty else plan

    async def exec_captured(self, peer: int, name: str, argv: Sequence[str], env: Mapping[str, str] | None,
                            workdir: str | None, user: str | None, stdin: bytes,
                            timeout: float | None) -> dict[str, Any]:
        run = self.running_of(peer, name)
        plan = self.join_plan(run, argv, env, workdir, user)
        stdin_fd = os.memfd_create("silo-stdin", os.MFD_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        err_r, err_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        os.set_blocking(out_w, True)
        os.set_blocking(err_w, True)
        try:
            if stdin:
                os.write(stdin_fd, stdin)
                os.lseek(stdin_fd, 0, os.SEEK_SET)
            proc = await self.runtime.join(run.proc, plan, (stdin_fd, out_w, err_w))
        except BaseException:
            for fd in (out_r, err_r):
                os.close(fd)
            raise
        finally:
            for fd in (stdin_fd, out_w, err_w):
                os.close(fd)
        outs = [bytearray(), bytearray()]
        loop = asyncio.get_running_loop()
        done = [loop.create_future(), loop.create_future()]

        def reader(fd: int, i: int) -> None:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                loop.remove_reader(fd)
                if not done[i].done():
                    done[i].set_result(None)
                return
            if len(outs[i]) < OUTPUT_CAP:
                outs[i] += chunk[:OUTPUT_CAP - len(outs[i])]

        loop.add_reader(out_r, reader, out_r, 0)
        loop.add_reader(err_r, reader, err_r, 1)
        try:
            try:
                code = await asyncio.wait_for(asyncio.shield(proc.exited), timeout)
            except TimeoutError:
                code = await self.runtime.kill(proc, group=True)
            # The command's stdio may live on in what it left in the background.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*done), 0.5)
        finally:
            for fd in (out_r, err_r):
                loop.remove_reader(fd)
                os.close(fd)
            proc.close()
        return {"exit_code": code, "stdout": base64.b64encode(bytes(outs[0])).decode(),
                "stderr": base64.b64encode(bytes(outs[1])).decode()}

    # -- files -----------------------------------------------------------------------

    async def copier(self, peer: int, name: str, mode: str, path: str) -> tuple[Any, Any]:
        """The copy helper joined to the workspace (see :mod:`silo.backends.process.copier`;
        a vm workspace's runs in its guest: :mod:`silo.backends.vm.files`)."""
        from silo.backends.process import copier

        record = self.record(peer, name)
        require("cp", name, record.state, disposable=record.spec.disposable)
        if not path.startswith("/") or "\0" in path:
            raise SpecError(f"bad path {path!r} in the workspace: give an absolute path")
        run = self.running.get(name)
        if record.spec.isolation is Isolation.VM:
            from silo.backends.vm import files

            if run is not None:
                return await files.start(mode, path, run.proc, run.plan, self.runtime), None
            # Not running: its guest is booted for the copy alone (the host never reads
            # or writes a guest's disk), without a network; stopping it syncs the disk.
            plan = replace(await asyncio.to_thread(self._plan, record), network=None)
            log_fd = self._open_log(record)
            try:
                temp = await self.runtime.start_vm(name, plan, log_fd)
            finally:
                os.close(log_fd)
            self._log(record, f"booted for a copy ({mode} {path})")
            try:
                return await files.start(mode, path, temp, plan, self.runtime), temp
            except BaseException:
                await self.runtime.stop(temp, 0)
                raise
        if record.spec.isolation is Isolation.GVISOR:
            if run is not None:  # through the Sentry, which caches what the workspace's files are
                from silo.backends.vm import files

                return await files.start(mode, path, run.proc, run.plan, self.runtime,
                                         joined=lambda argv: self.join_plan(run, argv, None, None, None)), None
            # Stopped: the copier in a process-level sandbox on the same layers (the same
            # root, with the same ids on the host: no Sentry, no cache to go stale).
            plan = await asyncio.to_thread(self._plan, record, Isolation.PROCESS)
            return await copier.start(mode, path, None, plan, self.runtime)
        plan = run.plan if run is not None else self._plan(record)
        return await copier.start(mode, path, run.proc if run is not None else None, plan, self.runtime)

    # -- storage verbs ---------------------------------------------------------------

    async def _quiet(self, peer: int, name: str, verb: str) -> WorkspaceRecord:
        record = self.record(peer, name)
        require(verb, name, record.state, disposable=record.spec.disposable)
        return record

    async def snapshot(self, peer: int, name: str, tag: str | None, memory: bool = False) -> dict[str, Any]:
        async with self.lock(name):
            if memory:
                return await self._snapshot_memory(peer, name, tag)
            record = await self._quiet(peer, name, "snapshot")
            snap = await asyncio.to_thread(self.storage.snapshot, name, tag)
            self._log(record, f"snapshot {snap.tag}")
            return {"tag": snap.tag, "created": snap.created, "memory": False}

    async def _snapshot_memory(self, peer: int, name: str, tag: str | None) -> dict[str, Any]:
        """``snapshot --memory`` of a running gvisor workspace: ``runsc checkpoint`` saves
        its processes and ends its sandbox, so the files are snapshotted at rest, at the
        same instant; then the workspace resumes from that image (``runsc restore``) and
        runs on. Commands attached at that moment lose their client (their processes go
        on inside)."""
        from silo.backends.gvisor import runsc

        record = self.record(peer, name)
        if record.spec.isolation is not Isolation.GVISOR:
            raise UserError(f"'silo snapshot --memory' saves processes at isolation 'gvisor' only (runsc checkpoint); "
                            f"workspace {name!r} is at {record.spec.isolation.value!r}: drop --memory to snapshot "
                            f"its files (stop it first)")
        if record.spec.disposable:
            require("snapshot", name, record.state, disposable=True)
        run = self.running.get(name)
        if record.state is not State.RUNNING or run is None:
            raise WorkspaceStateError(f"workspace {name!r} is {record.state.value}: 'silo snapshot --memory' saves "
                                      f"a running workspace's processes; start it first (silo start {name}), or "
                                      f"drop --memory")
        tag = self.storage.new_tag(name, tag)
        if run.network is not None:
            # gVisor saves no TCP connection but over loopback, and a failed save ends the
            # sandbox: refuse first while one is open (one closed in the last minute, in
            # TIME_WAIT, is not listed: that save fails, and says why)
            _, tables = await self.runtime.run_joined(run.proc, planner.plan_join(run.plan, ["cat", *runsc.NET_TCP]),
                                                      10.0)
            count = runsc.open_connections(tables)
            if count:
                raise WorkspaceStateError(f"workspace {name!r} has {count} open TCP connection"
                                          f"{'s' if count > 1 else ''}, and gVisor cannot save those: close "
                                          f"{'them' if count > 1 else 'it'} and try again (its processes run on)")
        stage = await asyncio.to_thread(self.storage.memory_stage, name)
        run.stopping = True
        try:  # runsc's words go to the log, and name the reason of a refusal
            code, said = await self.runtime.run_joined(run.proc, planner.plan_runsc(
                run.plan, runsc.checkpoint_argv(run.plan.process.argv, stage)), CHECKPOINT_TIMEOUT)
            if code != 0:  # gVisor ends a sandbox whose save failed: give it a moment to
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(run.proc.exited), 5.0)
        except BaseException:
            run.stopping = False
            raise
        if said:
            self._log(record, "runsc checkpoint: " + said.decode(errors="replace").strip())
        if code == 0:
            record = await self._stop(record, STOP_TIMEOUT)
        else:
            self.storage.drop_memory_stage(name)
            why = runsc.checkpoint_refusal(said) or f"runsc exited with {code}; see 'silo logs {name}'"
            if not run.proc.exited.done():
                run.stopping = False
                raise WorkspaceStateError(f"gVisor could not save the processes of workspace {name!r} ({why}); "
                                          f"they run on")
            await self._stop(record, STOP_TIMEOUT)
            raise WorkspaceStateError(f"gVisor could not save the processes of workspace {name!r} ({why}), and a "
                                      f"failed save ends them (runsc's way); its files are kept: 'silo start "
                                      f"{name}' starts it again")
        snap = await asyncio.to_thread(self.storage.snapshot, name, tag, memory=True)
        self._log(record, f"snapshot {snap.tag} with its processes")
        try:
            await self._start(record)
        except SiloError as e:
            raise type(e)(f"snapshot {snap.tag!r} is saved, but {e.message}") from None
        return {"tag": snap.tag, "created": snap.created, "memory": True}

    def snapshots(self, peer: int, name: str) -> list[dict[str, Any]]:
        self.record(peer, name)
        return [{"tag": s.tag, "created": s.created, "memory": s.memory} for s in self.storage.snapshots(name)]

    async def delete_snapshot(self, peer: int, name: str, tag: str) -> None:
        async with self.lock(name):
            self.record(peer, name)
            await asyncio.to_thread(self.storage.delete_snapshot, name, tag)
            self._collect()

    async def restore(self, peer: int, name: str, tag: str) -> WorkspaceRecord:
        async with self.lock(name):
            record = await self._quiet(peer, name, "restore")
            await asyncio.to_thread(self.storage.restore, name, tag)
            self._log(record, f"restored snapshot {tag}")
            self._collect()
            return self.store.update(name)

    async def reset(self, peer: int, name: str) -> WorkspaceRecord:
        async with self.lock(name):
            record = await self._quiet(peer, name, "reset")
            await asyncio.to_thread(self.storage.reset, name)
            self._log(record, "reset")
            self._collect()
            return self.store.update(name)

    async def fork(self, peer: int, name: str, new_name: str) -> WorkspaceRecord:
        parse_name(new_name)
        async with self.lock(name), self.lock(new_name):
            record = await self._quiet(peer, name, "fork")
            spec = WorkspaceSpec.from_dict({**record.spec.to_dict(), "name": new_name})
            now = time.time()
            new = WorkspaceRecord(spec=spec, state=State.CREATED, created=now, updated=now,
                                  template=record.template, owner=peer)
            self.store.create(new)
            try:
                await asyncio.to_thread(self.storage.fork, name, new_name)
            except BaseException:
                self.store.delete(new_name)
                raise
            self._log(new, f"forked from {name}")
            return new

    async def diff(self, peer: int, name: str) -> list[dict[str, str]]:
        record = self.record(peer, name)
        if record.spec.isolation is Isolation.VM:
            raise UserError(f"'silo diff' does not read a VM workspace's disk (the host never mounts what its "
                            f"guest wrote): look inside with 'silo exec {name} -- ...'")
        changes = await asyncio.to_thread(self.storage.diff, name)
        return [{"kind": c.kind, "path": c.path} for c in changes]

    def logs(self, peer: int, name: str, tail: int | None) -> str:
        record = self.record(peer, name)
        try:
            with open(self.log_path(record), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return ""
        text = data.decode("utf-8", "replace")
        if tail is not None:
            text = "".join(text.splitlines(keepends=True)[-tail:]) if tail > 0 else ""
        return text

    # -- templates -------------------------------------------------------------------

    async def create_template(self, peer: int, tname: str, source: str) -> dict[str, Any]:
        parse_name(tname, "template name")
        async with self.lock(source):
            await self._quiet(peer, source, "template-create")
            info = await asyncio.to_thread(self.storage.create_template, tname, source, peer)
        return template_info(info)

    def template_of(self, peer: int, tname: str) -> Any:
        """Template ``tname`` if ``peer`` may use it (its maker or root); another's is
        reported as not existing, like another's workspace."""
        info = self.storage.template(tname)
        if peer not in (0, info.owner):
            raise NotFoundError(f"template {tname!r} does not exist: run 'silo template ls'")
        return info

    def templates(self, peer: int) -> list[dict[str, Any]]:
        return [template_info(t) for t in self.storage.templates() if peer in (0, t.owner)]

    async def remove_template(self, peer: int, tname: str) -> None:
        parse_name(tname, "template name")
        self.template_of(peer, tname)
        await asyncio.to_thread(self.storage.remove_template, tname)
        self._collect()

    # -- export / import -------------------------------------------------------------

    async def export(self, peer: int, name: str) -> AsyncIterator[bytes]:
        from silo.store import archive

        record = await self._quiet(peer, name, "export")
        if record.spec.isolation is Isolation.VM and self._encrypted_disks(name):
            raise UserError(f"workspace {name!r} has disks encrypted with this daemon's key, which never "
                            "leaves it, so an export could not be read anywhere else: export a workspace "
                            "created without --encrypt")
        r, w = os.pipe2(os.O_CLOEXEC)
        spec = record.spec.to_dict()

        def produce() -> None:
            with open(w, "wb") as out:
                archive.export(self.storage, name, spec, out)

        loop = asyncio.get_running_loop()
        producer = loop.run_in_executor(None, produce)

        async def stream() -> AsyncIterator[bytes]:
            with open(r, "rb", buffering=0) as src:
                while True:
                    chunk = await loop.run_in_executor(None, src.read, 1 << 20)
                    if not chunk:
                        break
                    yield chunk
            await producer

        return stream()

    def _encrypted_disks(self, name: str) -> bool:
        from silo.backends.vm import disk

        stack = self.storage.stack(name)
        return any(disk.layer_is_encrypted(layer) for layer in (stack.upper, *stack.lowers))

    async def import_(self, peer: int, path: str, name: str | None) -> WorkspaceRecord:
        from silo.store import archive

        if name is not None:
            parse_name(name)

        def run() -> tuple[str, dict[str, Any]]:
            with open(path, "rb") as src:
                return archive.import_(self.storage, src, name)

        new_name, spec_data = await asyncio.to_thread(run)
        try:
            spec = WorkspaceSpec.from_dict(spec_data, name=new_name)
            self._check_sources(peer, spec)
            now = time.time()
            record = WorkspaceRecord(spec=spec, state=State.CREATED, created=now, updated=now, owner=peer)
            self.store.create(record)
        except BaseException:
            await asyncio.to_thread(self.storage.remove, new_name)
            raise
        self._log(record, "imported")
        return record


def template_info(t: Any) -> dict[str, Any]:
    return {"name": t.name, "base": t.base, "from": t.source, "created": t.created, "layers": len(t.layers)}


__all__ = ["Manager", "Running", "WorkspaceExists"]
