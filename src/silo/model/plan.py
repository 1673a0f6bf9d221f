"""Plans: the immutable list of operations a backend executes to build a sandbox.

A plan is pure data (after bubblewrap's "parse into setup operations, then execute").
The engine builds it from a :class:`~silo.model.spec.Spec`; ``silo plan`` prints it;
unit tests diff it; ``silo-setup`` (``src/silo/native/setup.c``), which executes it,
has a fixed vocabulary, one function per operation class below, and nothing else.

Paths in mount operations are seen from the sandbox's own mount namespace *before*
``pivot_root``: ``/`` is still the host's root. ``Bind.target`` and the targets of
other operations under ``Plan.new_root`` are opened relative to the new root's
directory fd without following symlinks out of it (CVE-2021-30465).

Wire form: each operation is sent to the spawner as ``(name, field, field, ...)``
with only str/int/bool/bytes/tuple/None, so it can be framed with ``marshal``.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields
from typing import Any, ClassVar, Union

from silo.model.errors import ProtocolError


@dataclass(frozen=True)
class MakePrivate:
    """Stop mount propagation between the sandbox and the host (SECURITY.md #15)."""

    name: ClassVar[str] = "make-private"


@dataclass(frozen=True)
class Tmpfs:
    target: str
    options: str = "mode=0755"
    readonly: bool = False
    name: ClassVar[str] = "tmpfs"


@dataclass(frozen=True)
class Mkdir:
    path: str
    mode: int = 0o755
    uid: int = -1  # -1: leave the owner as created
    gid: int = -1
    name: ClassVar[str] = "mkdir"


@dataclass(frozen=True)
class Symlink:
    target: str
    path: str
    name: ClassVar[str] = "symlink"


@dataclass(frozen=True)
class WriteFile:
    path: str
    data: bytes
    mode: int = 0o644
    name: ClassVar[str] = "write-file"


@dataclass(frozen=True)
class Overlay:
    """An overlay of ``lower`` (read-only, host paths) under ``upper``.

    ``idmapped``, when given, has one attach point per lower layer: the spawner hands
    the sandbox a read-only clone of each lower layer idmapped into the sandbox's user
    namespace (host root's files appear as the sandbox root's, so it can change them:
    the overlay copies them up, the host's stay untouched), attached there and used
    as the layer instead; an empty attach point leaves that layer as it is (a
    workspace's own frozen layers, already owned by the sandbox's ids). Root-run
    sandboxes only: an unprivileged caller cannot idmap the host's filesystems.
    """

    target: str
    lower: tuple[str, ...]
    upper: str
    work: str
    userxattr: bool = True  # needed when mounted inside a user namespace
    idmapped: tuple[str, ...] = ()
    name: ClassVar[str] = "overlay"


@dataclass(frozen=True)
class Bind:
    """Bind ``source`` (a host path) onto ``target`` (inside ``within``).

    ``within`` is the directory the target is resolved in without leaving it;
    ``create`` makes a missing target as a ``"dir"`` or ``"file"``.
    """

    source: str
    target: str
    within: str
    readonly: bool = True
    recursive: bool = True
    create: str = "dir"
    name: ClassVar[str] = "bind"


@dataclass(frozen=True)
class DevNode:
    """Bind a host device node onto ``target``, a path in the sandbox's own fresh /dev tmpfs."""

    source: str
    target: str
    name: ClassVar[str] = "dev-node"


@dataclass(frozen=True)
class Proc:
    target: str
    name: ClassVar[str] = "proc"


@dataclass(frozen=True)
class Devpts:
    target: str
    name: ClassVar[str] = "devpts"


@dataclass(frozen=True)
class Mask:
    """Hide a path: a file gets /dev/null bound over it, a directory an empty read-only tmpfs."""

    path: str
    name: ClassVar[str] = "mask"


@dataclass(frozen=True)
class ReadOnly:
    """Re-bind a path onto itself read-only (e.g. ``/proc/sys``)."""

    path: str
    name: ClassVar[str] = "read-only"


@dataclass(frozen=True)
class Unmount:
    """Lazily detach a mount (the scratch tmpfs once overlays hold references to it)."""

    path: str
    name: ClassVar[str] = "unmount"


@dataclass(frozen=True)
class PivotRoot:
    new_root: str
    name: ClassVar[str] = "pivot-root"


@dataclass(frozen=True)
class Hostname:
    hostname: str
    name: ClassVar[str] = "hostname"


@dataclass(frozen=True)
class LoopbackUp:
    name: ClassVar[str] = "loopback-up"


Op = Union[  # noqa: UP007 - a runtime alias, kept readable
    MakePrivate, Tmpfs, Mkdir, Symlink, WriteFile, Overlay, Bind, DevNode, Proc, Devpts, Mask,
    ReadOnly, Unmount, PivotRoot, Hostname, LoopbackUp,
]
OP_CLASSES: dict[str, type[Any]] = {
    cls.name: cls
    for cls in (MakePrivate, Tmpfs, Mkdir, Symlink, WriteFile, Overlay, Bind, DevNode, Proc, Devpts, Mask,
                ReadOnly, Unmount, PivotRoot, Hostname, LoopbackUp)
}

NAMESPACES = ("user", "mnt", "pid", "ipc", "uts", "net", "cgroup")


_FIELDS: dict[type[Any], tuple[str, ...]] = {}
_WIRE_CACHE: list[tuple[tuple[Any, ...], tuple[Any, ...]]] = []


def _ops_wire(ops: tuple[Op, ...]) -> tuple[Any, ...]:
    """Wire form of an ops tuple; the last few are cached by identity (a Sandbox sends
    the same ops with every run)."""
    for cached_ops, wire in _WIRE_CACHE:
        if cached_ops is ops:
            return wire
    out = []
    for op in ops:
        names = _FIELDS.get(type(op))
        if names is None:
            names = _FIELDS[type(op)] = tuple(f.name for f in fields(op))
        out.append((op.name, *(getattr(op, n) for n in names)))
    wire = tuple(out)
    _WIRE_CACHE.insert(0, (ops, wire))
    del _WIRE_CACHE[8:]
    return wire


@dataclass(frozen=True)
class IdMap:
    """One ``uid_map``/``gid_map`` line: ``inside outside count``."""

    inside: int
    outside: int
    count: int = 1


@dataclass(frozen=True)
class Process:
    """The command and the identity it runs with, applied last, just before exec."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str
    uid: int
    gid: int
    caps: tuple[str, ...] = ()
    no_new_privs: bool = True
    seccomp: str = "default"  # "default", "unconfined" or a host path to a profile
    rlimits: tuple[tuple[str, int, int], ...] = ()
    new_session: bool = True
    init: bool = True  # run under the minimal init as PID 1
    harden: bool = True  # drop capabilities, no_new_privs, seccomp; False only at the app level
    setgroups: bool = True  # False when the user namespace denies setgroups (rootless)
    tty: bool = False  # stdio is a pty made in the sandbox's own devpts; the master goes to the client
    winsize: tuple[int, int] = (0, 0)  # the pty's rows and columns from the start (0, 0: left to the client)
    # With tty: a unix socket path where the command (runsc --console-socket) hands over
    # the master of a pty it made itself; silo-init takes it there instead of silo-setup
    # making one.
    console: str = ""


@dataclass(frozen=True)
class Vm:
    """The machine of a ``vm``-level sandbox: what QEMU boots and what the guest sees."""

    kernel: str  # what QEMU boots: the uncompressed kernel (PVH entry) or the bzImage
    initramfs: str  # silo's guest initramfs for that kernel (silo.backends.vm.initramfs)
    accel: str  # "kvm" or "tcg" (silo.backends.vm.accel's probe)
    memory: int  # MiB of guest RAM
    cpus: int  # vCPUs
    # The guest's read-only root view, shared over virtio-fs: the skeleton at "/" and the
    # host's system directories bound onto it (name relative to /, host path).
    skeleton: str
    binds: tuple[tuple[str, str], ...]
    rwsize: int  # bytes of the guest's RAM overlay
    jail_id: int  # the unprivileged uid and gid QEMU runs as (silo.backends.vm.machine._jail)
    hostname: str = "silo"  # given to the guest with each run (agent IDENTITY), not at boot
    # A workspace's disk chain (silo.backends.vm.disk), bottom first; the top is the
    # guest's writable upper when ``disk_writable``, else the chain is a read-only layer
    # under the RAM overlay (a disposable workspace on layers). Empty: RAM only.
    disks: tuple[str, ...] = ()
    disk_writable: bool = False
    machine_id: str = ""  # 32 hex digits a workspace keeps across boots; empty: a new one each run
    disk_key: str = ""  # the daemon's disk key file, when a disk of the chain may be encrypted (LUKS)
    mem_lock: bool = False  # QEMU's memory locked (a diskless workspace: none of it may reach swap)
    # The root is the disk chain itself (an image root: Xenon): no host view, no virtiofsd.
    image: bool = False
    # Volumes (``-v``): (host source, guest target, read-only, a directory), shared by a
    # second virtiofsd in a user namespace that maps the guest's ids 0.. onto the host's
    # ``volume_ids`` (first, count): the process level's mapping (SECURITY.md #16).
    volumes: tuple[tuple[str, str, bool, bool], ...] = ()
    volume_ids: tuple[int, int] = (0, 0)
    # The view is the caller's root directory, not the host's system (a one-shot
    # ``--root DIR``): its own /etc, so silo sends no user database.
    own_root: bool = False


@dataclass(frozen=True)
class Gvisor:
    """A gvisor workspace's (or a command's in it) part of the plan: the commands'
    default identity, directory and environment (the container's PID 1 is silo-init,
    as root, and the plan's own process is runsc's),
    and, for a command, the file ``runsc exec`` writes its pid inside to."""

    uid: int
    gid: int
    cwd: str
    env: tuple[tuple[str, str], ...] = ()  # the commands' environment (runsc's own is PATH alone)
    pid_file: str = ""
    seccomp: str = ""  # the commands' compiled seccomp program, in hex (silo-init loads it inside)


def _vm_from_wire(untrusted: Any) -> Vm:
    (kernel, initramfs, accel, memory, cpus, skeleton, binds, rwsize, jail_id, hostname, disks, disk_writable,
     machine_id, disk_key, mem_lock, image, volumes, volume_ids, own_root) = untrusted
    first, count = volume_ids
    return Vm(str(kernel), str(initramfs), str(accel), int(memory), int(cpus), str(skeleton),
              tuple((str(name), str(source)) for name, source in binds), int(rwsize), int(jail_id),
              str(hostname), tuple(str(d) for d in disks), bool(disk_writable), str(machine_id), str(disk_key),
              bool(mem_lock), bool(image),
              tuple((str(src), str(dst), bool(ro), bool(is_dir)) for src, dst, ro, is_dir in volumes),
              (int(first), int(count)), bool(own_root))


@dataclass(frozen=True)
class Plan:
    """Everything a backend needs; built by the engine, never by a backend."""

    isolation: str
    namespaces: tuple[str, ...]
    uid_map: tuple[IdMap, ...]
    gid_map: tuple[IdMap, ...]
    ops: tuple[Op, ...]
    process: Process
    memory: int | None = None
    cpus: float | None = None
    pids: int | None = None
    timeout: float | None = None
    network: str | None = None  # the network policy as JSON (silo.model.network); None: loopback only
    vm: Vm | None = None  # the machine, at the vm level
    gvisor: Gvisor | None = None  # a gvisor workspace's commands (silo.backends.gvisor.runsc)

    def describe(self) -> list[str]:
        """Human-readable lines, one per operation (``silo plan``)."""
        lines = [f"isolation {self.isolation}", f"unshare {' '.join(self.namespaces) or '-'}"]
        for kind, maps in (("uid", self.uid_map), ("gid", self.gid_map)):
            for m in maps:
                lines.append(f"map {kind} {m.inside} -> host {m.outside} (count {m.count})")
        for key in ("memory", "cpus", "pids", "timeout"):
            value = getattr(self, key)
            if value is not None:
                lines.append(f"limit {key} {value}")
        if self.network is not None:
            lines.append(f"network {self.network}")
        if self.vm is not None:
            v = self.vm
            lines.append(f"vm accel={v.accel} memory={v.memory}M cpus={v.cpus} kernel={v.kernel} "
                         f"initramfs={v.initramfs}")
            lines.append(f"vm root {v.skeleton} + {' '.join(f'/{n}={s}' for n, s in v.binds)} (read-only, virtio-fs)")
        for op in self.ops:
            args = []
            for f in fields(op):
                value = getattr(op, f.name)
                if isinstance(value, bytes):
                    value = f"<{len(value)} bytes>"
                args.append(f"{f.name}={value!r}" if not isinstance(value, str) else f"{f.name}={value}")
            lines.append(f"{op.name} {' '.join(args)}".rstrip())
        p = self.process
        lines.append(f"identity uid={p.uid} gid={p.gid} caps={','.join(p.caps) or 'none'} "
                     f"no_new_privs={p.no_new_privs} seccomp={p.seccomp}")
        for name, soft, hard in p.rlimits:
            lines.append(f"rlimit {name} {soft}:{hard}")
        lines.append(f"env {' '.join(k for k, _ in p.env)}")
        lines.append(f"exec cwd={p.cwd} {' '.join(p.argv)}")
        return lines

    def to_wire(self) -> tuple[Any, ...]:
        return (
            self.isolation,
            self.namespaces,
            tuple(astuple(m) for m in self.uid_map),
            tuple(astuple(m) for m in self.gid_map),
            _ops_wire(self.ops),
            astuple(self.process),
            self.memory,
            self.cpus,
            self.pids,
            self.timeout,
            self.network,
            None if self.vm is None else astuple(self.vm),
            None if self.gvisor is None else astuple(self.gvisor),
        )

    @classmethod
    def from_wire(cls, untrusted: Any) -> Plan:
        """Rebuild a plan from :meth:`to_wire` data; shape errors raise ProtocolError."""
        try:
            iso, nss, um, gm, ops, proc, memory, cpus, pids, timeout, network, vm, gvisor = untrusted
            if network is not None and not isinstance(network, str):
                raise TypeError("the network policy is not a string")
            built_ops = []
            for item in ops:
                op_cls = OP_CLASSES[item[0]]
                built_ops.append(op_cls(*item[1:]))
            p = Process(*proc)
            return cls(
                str(iso), tuple(nss), tuple(IdMap(*m) for m in um), tuple(IdMap(*m) for m in gm),
                tuple(built_ops), p, memory, cpus, pids, timeout, network,
                None if vm is None else _vm_from_wire(vm),
                None if gvisor is None else Gvisor(int(gvisor[0]), int(gvisor[1]), str(gvisor[2]),
                                                   tuple((str(k), str(v)) for k, v in gvisor[3]), str(gvisor[4]),
                                                   str(gvisor[5])),
            )
        except (TypeError, ValueError, KeyError, IndexError) as e:
            raise ProtocolError(f"malformed plan: {e}") from None
