"""Turns a :class:`~silo.model.spec.Spec` and a command into a :class:`~silo.model.plan.Plan`.

The planner checks everything that can be checked on the host before anything is
built (mount sources, root directory, profiles), so a bad spec fails with one clear
message and nothing half-made. It reads the host (:mod:`silo.engine.host`) but
changes nothing on it except silo's own cache and runtime directories.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from silo.engine import host as hostmod
from silo.model import plan as p
from silo.model import users
from silo.model.errors import NotFoundError, PrivilegeError, SpecError, UserError
from silo.model.network import VM_HOST4
from silo.model.spec import Isolation, Spec, check_vm_mounts

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# /proc entries hidden from process sandboxes (SECURITY.md #5, #14), after the OCI defaults.
PROC_MASKED = ("kcore", "keys", "timer_list", "timer_stats", "sched_debug", "latency_stats",
               "sysrq-trigger", "kallsyms", "kpagecount", "kpageflags", "kpagecgroup",
               "vmallocinfo", "acpi", "scsi", "asound", "firmware", "config.gz")
PROC_READONLY = ("sys", "bus", "fs", "irq")
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")


def _passwd(uid: int, gid: int, system: bool = False) -> bytes:
    """root, the sandbox's user, nobody; with ``system``, the host's system users (silo.model.users)."""
    return users.passwd(uid, gid, hostmod.system_accounts()[0] if system else ())


def _group(uid: int, gid: int, system: bool = False) -> bytes:
    """root, tty, the sandbox user's group, nogroup; with ``system``, the host's system groups."""
    return users.group(uid, gid, hostmod.system_accounts()[1] if system else ())


def _resolv_conf(server: str) -> bytes:
    return (b"# silo's resolver: it answers by the workspace's network policy\n"
            b"nameserver %s\noptions edns0\n" % server.encode())


def _hosts(hostname: str) -> bytes:
    return (f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n").encode()


def _check_source(source: str) -> bool:
    """Returns whether the mount source is a directory; raises if it is missing."""
    if not os.path.exists(source):
        raise NotFoundError(f"mount source {source} does not exist: create it or fix the path")
    return os.path.isdir(source)


def _root_dir(spec: Spec) -> str:
    """A ``--root DIR``'s real path; raises if it is not a directory."""
    root = os.path.realpath(spec.root)
    if not os.path.isdir(root):
        raise NotFoundError(f"root directory {spec.root} does not exist: unpack an image there or use --root host")
    return root


def _environment(spec: Spec, uid: int, term: str | None) -> tuple[tuple[str, str], ...]:
    env = {"PATH": DEFAULT_PATH, "HOME": "/root" if uid == 0 else "/home/user"}
    if term:
        env["TERM"] = term
    env.update(dict(spec.env))
    return tuple(env.items())


@dataclass(frozen=True)
class Layers:
    """A workspace's storage (see :mod:`silo.store.layers`): its writable ``upper`` and
    overlay ``work`` directories (one subdirectory per overlay target: ``root`` for
    ``/``, ``usr``, ..., nested for a nested target: ``var/lib/dpkg``) and its read-only
    layers, top first, stacked on the base. ``upper`` None keeps the writable layer in
    the sandbox's RAM (a disposable one)."""

    upper: str | None = None
    work: str | None = None
    lowers: tuple[str, ...] = ()


def plan_workspace(spec: Spec, layers: Layers, resume: str | None = None) -> p.Plan:
    """The plan of a workspace's init: the sandbox of ``spec`` on ``layers``, with no
    command (silo-init waits as its PID 1; commands join it later). ``resume``: a gvisor
    workspace's memory image (a directory), whose processes its sandbox restores.

    Unlike a one-shot sandbox, a root-run workspace on the host's root also gets
    copy-on-write views of the host's package state (:data:`~silo.engine.host.PACKAGE_STATE`),
    so apt and dpkg work in it and what they install stays in its layers."""
    if spec.isolation is Isolation.GVISOR:
        from silo.backends.gvisor import runsc

        return _plan_gvisor(spec, runsc.INIT_ARGV, None, False, layers, workspace=True, resume=resume)
    if resume is not None:
        raise SpecError(f"only a gvisor workspace resumes saved processes, not one at {spec.isolation.value!r}")
    if spec.isolation is not Isolation.PROCESS:
        raise SpecError(f"isolation {spec.isolation.value!r} cannot run a workspace: use 'process' or 'gvisor'")
    return _plan_process(spec, (), None, False, layers, package_state=True)


def plan_join(workspace: p.Plan, argv: Sequence[str], *, env: Sequence[tuple[str, str]] = (),
              cwd: str | None = None, uid: int | None = None, gid: int | None = None,
              tty: bool = False, term: str | None = None) -> p.Plan:
    """The plan of a command joining a running workspace started from ``workspace``:
    no operations, the workspace's identity and hardening, ``argv`` with the
    workspace's environment updated by ``env``."""
    if not argv:
        raise SpecError("no command given: add the command to run, like: silo exec NAME -- /bin/sh")
    if any("\0" in a for a in argv):
        raise SpecError("the command contains a NUL byte")
    proc = workspace.process
    if workspace.gvisor is not None:  # the workspace's commands' identity, not runsc's
        g = workspace.gvisor
        proc = replace(proc, uid=g.uid, gid=g.gid, cwd=g.cwd, env=g.env)
    merged = dict(proc.env)
    if term:
        merged["TERM"] = term
    merged.update(dict(env))
    if uid is not None and uid != proc.uid and len(workspace.uid_map) == 1 and workspace.uid_map[0].count == 1:
        raise PrivilegeError("a rootless workspace has one user: run the command without --user")
    uid = proc.uid if uid is None else uid
    gid = (uid if uid != proc.uid else proc.gid) if gid is None else gid
    if not (0 <= uid < 65536 and 0 <= gid < 65536):
        raise SpecError(f"user {uid}:{gid} is out of range: use ids from 0 to 65535")
    if workspace.gvisor is not None:
        return _join_gvisor(workspace, replace(proc, argv=tuple(argv), env=tuple(merged.items()),
                                                cwd=cwd or proc.cwd, uid=uid, gid=gid, tty=tty))
    process = replace(proc, argv=tuple(argv), env=tuple(merged.items()), cwd=cwd or proc.cwd,
                      uid=uid, gid=gid, tty=tty, init=True, new_session=True)
    # Header flags: the user namespace (become its root), pid (children join it).
    return replace(workspace, namespaces=("user", "pid"), ops=(), process=process)


def plan(spec: Spec, argv: Sequence[str], *, term: str | None = None, tty: bool = False,
         caller_env: dict[str, str] | None = None, caller_cwd: str | None = None) -> p.Plan:
    """The plan for running ``argv`` under ``spec``; ``tty`` asks for a pty made inside."""
    if not argv:
        raise SpecError("no command given: add the command to run, like: silo run -- /bin/sh")
    if any("\0" in a for a in argv):
        raise SpecError("the command contains a NUL byte")
    if spec.isolation is Isolation.APP:
        return _plan_app(spec, argv, caller_env or dict(os.environ), caller_cwd or os.getcwd(), tty)
    if spec.isolation is Isolation.VM:
        return _plan_vm(spec, argv, term, tty)
    if spec.isolation is Isolation.GVISOR:
        return _plan_gvisor(spec, argv, term, tty)
    return _plan_process(spec, argv, term, tty, Layers())


def _unplanned(ops: Sequence[p.Op], top: str, name: str) -> Iterator[str]:
    """``top/name`` and each directory on the way to it (``name`` may be nested) that
    ``ops`` does not make yet, looked up as the caller appends."""
    path = top
    for part in name.split("/"):
        path = f"{path}/{part}"
        if not any(isinstance(o, p.Mkdir) and o.path == path for o in ops):
            yield path


def _check_level(level: str, asked: Sequence[tuple[str, object]], why_root: str) -> None:
    """Refuse what ``level`` lacks yet (``asked``: option, whether given) and a caller
    who is not root."""
    missing = [what for what, given in asked if given]
    if missing:
        raise SpecError(f"{', '.join(missing)} with --isolation {level} is not available yet: drop it, "
                        "or use --isolation process")
    if not hostmod.host().is_root:
        raise PrivilegeError(f"--isolation {level} needs root for now ({why_root}): "
                             "run as root, or use --isolation process")


def _gvisor_filter(spec: Spec) -> str:
    """The command's seccomp program at the gvisor level, in hex for silo-init inside
    (runsc.init_argv): none for 'default' and 'unconfined', whose filter is gVisor's
    kernel itself (under runsc's filter on the host); a profile file compiled as at the
    process level, loaded into the Sentry for each command (runsc's own OCI seccomp
    would reach the container's first process only, never a 'runsc exec')."""
    if spec.seccomp in ("default", "unconfined"):
        return ""
    from silo.sys import seccomp

    return seccomp.compile_profile(spec.seccomp).hex()


def _gvisor_rlimits(spec: Spec) -> tuple[tuple[str, int, int], ...]:
    """The bundle's rlimits: the spec's, and ``--pids`` as RLIMIT_NPROC, which the
    Sentry enforces for every user inside, root too (no capability exempts it there),
    counting each user's tasks, threads included. A pids cgroup on the host would count
    the Sentry's and gofer's threads instead, not the workload's processes."""
    pids = spec.limits.pids
    if pids is None:
        return spec.rlimits
    own = next(((soft, hard) for name, soft, hard in spec.rlimits if name == "nproc"), (-1, -1))
    soft, hard = (pids if v < 0 else min(v, pids) for v in own)  # -1: unlimited
    return (*[r for r in spec.rlimits if r[0] != "nproc"], ("nproc", soft, hard))


def _plan_gvisor(spec: Spec, argv: Sequence[str], term: str | None, tty: bool, layers: Layers = Layers(),
                 workspace: bool = False, resume: str | None = None) -> p.Plan:
    """gVisor: ``runsc run`` of a bundle silo writes (silo.backends.gvisor.runsc), in
    the namespaces of a process-level sandbox -- its user namespace and id range
    included -- on the same root: the overlays and volume binds of :func:`_root_tree`,
    which runsc's gofer serves to the Sentry instead of a ``pivot_root``. runsc runs as
    that user namespace's root, so what the gofer writes has the sandbox's ids on the
    host, as at the process level; runsc's state, the bundle and its control socket
    (abstract, in the sandbox's own network namespace) are the sandbox's alone. A
    ``workspace``'s container runs silo-init as its PID 1, and its commands join it
    (:func:`plan_join`); with ``resume`` (a memory image of ``runsc checkpoint``) it is
    ``runsc restore`` of that image instead: the same bundle, the processes it saved."""
    from silo import native
    from silo.backends.gvisor import runsc

    _check_level("gvisor", (), "runsc's sandbox and gofer")
    h = hostmod.host()
    s = h.scratch
    uid, gid = spec.user.uid, spec.user.gid
    # With a network, runsc's netstack sits one hop behind the keeper's namespace, as a
    # vm level's guest does, and asks silo's resolver there (silo.net.keeper).
    tree = _root_tree(spec, layers, package_state=workspace, top=runsc.layer(h.cache_dir, native.built("silo-init")),
                      resolver=VM_HOST4)
    seccomp = _gvisor_filter(spec)
    if not workspace:
        # silo-init inside finds the command as at the process level (127 and 126 with
        # silo's messages, where runsc would fail with its own and 128) and reaps orphans
        argv = runsc.init_argv(argv, seccomp)
    ops = tree.ops
    if spec.workdir and not any(os.path.lexists(d + spec.workdir) for d in (f"{tree.upper}/root", *tree.lowers)):
        # a missing workdir is made the user's, as at the process level (runsc would make it root's)
        name = spec.workdir.strip("/")
        for path in _unplanned(ops, f"{tree.upper}/root", name):
            if not os.path.lexists(path):
                ops.append(p.Mkdir(path, 0o755, *((uid, gid) if path == f"{tree.upper}/root/{name}" else (-1, -1))))
    for m in spec.mounts:
        is_dir = _check_source(m.source)
        ops.append(p.Bind(m.source, m.target, tree.root, readonly=m.readonly, create="dir" if is_dir else "file"))
    # /tmp is the root's own directory, as at the process level (runsc would hide an
    # empty one under a tmpfs of the Sentry's, which 'silo cp' could not reach).
    mounts: list[dict[str, object]] = [
        {"destination": "/tmp", "type": "bind", "source": f"{tree.root}/tmp", "options": ["rbind", "rw"]}]
    env = _environment(spec, uid, term)
    process: dict[str, object] = {
        "user": {"uid": uid, "gid": gid}, "args": list(argv), "cwd": spec.workdir or "/",
        "env": [f"{k}={v}" for k, v in env], "noNewPrivileges": True,
    }
    if workspace:
        # the commands' environment comes with each 'runsc exec' (plan_join), whole
        process.update(user={"uid": 0, "gid": 0}, cwd="/", env=[])
    # -t: runsc makes the pty and hands its master to silo-init over this socket
    console = f"{s}/console" if tty else None
    if tty:
        process["terminal"] = True
    if spec.caps:
        process["capabilities"] = {k: [f"CAP_{c}" for c in spec.caps]
                                   for k in ("bounding", "effective", "permitted")}
    config = runsc.bundle(process, tree.root, mounts, spec.hostname, rlimits=_gvisor_rlimits(spec),
                          network=spec.network.enabled)
    # The sandbox's own devpts: the ptys runsc (a run's) and silo-setup (an exec's) make
    # for -t are not the host's (/dev/ptmx opens the devpts at /dev/pts beside it).
    ops += [p.Mkdir(f"{s}/bundle"), p.WriteFile(f"{s}/bundle/config.json", json.dumps(config).encode()),
            p.Mkdir(f"{s}/state"), p.Proc("/proc"), p.Devpts("/dev/pts")]
    if spec.network.enabled:
        # runsc (20221219) refuses a network in the host's namespace, which it tells by
        # /proc/sys/net/core/rmem_default existing: since Linux 6.x every namespace has
        # it. Hidden from runsc (not from the Sentry, whose /proc is its own).
        ops.append(p.Tmpfs("/proc/sys/net/core", "size=4k,mode=0555", readonly=True))
    if workspace:
        ops.append(p.Mkdir(f"{s}/exec"))
    platform = runsc.choose(h.cache_dir, hostmod.skeleton())
    launcher = p.Process(argv=runsc.argv(runsc.runsc(), f"{s}/state", f"{s}/bundle", platform,
                                         network=spec.network.enabled, restore=resume, console=console),
                         env=(("PATH", DEFAULT_PATH),),
                         cwd="/", uid=0, gid=0, no_new_privs=False,
                         seccomp="unconfined", init=True, harden=False, setgroups=h.is_root,
                         tty=tty, console=console or "")
    uid_map, gid_map = _id_maps(spec, h)
    return p.Plan(isolation="gvisor", namespaces=p.NAMESPACES, uid_map=uid_map, gid_map=gid_map, ops=tuple(ops),
                  process=launcher, memory=spec.limits.memory, cpus=spec.limits.cpus, timeout=spec.timeout,
                  gvisor=p.Gvisor(uid, gid, spec.workdir or "/", env, seccomp=seccomp) if workspace else None,
                  network=_network(spec))


def _join_gvisor(workspace: p.Plan, process: p.Process) -> p.Plan:
    """A command in a gvisor workspace: ``runsc exec`` of ``process`` (its argv, env,
    cwd and ids, in a process file the join writes first), run as the root of the
    workspace's user namespace, in its mount, pid and network namespaces (where
    runsc's state and control socket are). With ``tty`` runsc's stdio is the pty
    silo-setup makes (in the sandbox's own devpts), and the command's too."""
    from silo.backends.gvisor import runsc

    pid_file = f"{hostmod.host().scratch}/exec/{secrets.token_hex(8)}"
    assert workspace.gvisor is not None
    spec = runsc.exec_process(process.argv, process.env, process.cwd, process.uid, process.gid, process.tty,
                              workspace.gvisor.seccomp)
    joined = plan_runsc(workspace, runsc.exec_argv(workspace.process.argv, runsc.process_file(pid_file), pid_file))
    return replace(joined, ops=(p.WriteFile(runsc.process_file(pid_file), json.dumps(spec).encode(), 0o600),),
                   process=replace(joined.process, tty=process.tty),
                   gvisor=replace(workspace.gvisor, pid_file=pid_file))


def plan_runsc(workspace: p.Plan, argv: Sequence[str]) -> p.Plan:
    """``argv``, a runsc command line (exec, kill, checkpoint), run in the gvisor
    workspace (or one-shot run) whose init's plan is ``workspace``: as the root of its
    user namespace, in its mount, pid and network namespaces (where runsc's state and
    control socket are)."""
    relay = replace(workspace.process, argv=tuple(argv), env=(("PATH", DEFAULT_PATH),), cwd="/", uid=0, gid=0,
                    init=True, new_session=True, tty=False, console="", winsize=(0, 0))
    return replace(workspace, namespaces=("user", "pid"), ops=(), process=relay, gvisor=None)


VM_MEMORY = 512 << 20  # guest RAM when no --memory is given


def _plan_vm(spec: Spec, argv: Sequence[str], term: str | None, tty: bool) -> p.Plan:
    """A one-shot VM: the host's read-only system view over virtio-fs, a RAM overlay on it,
    the command run by the guest agent (silo.backends.vm)."""
    _check_vm(spec)
    vm = _vm_machine(spec)
    if spec.root != "host":  # the guest's view is the directory alone, under a RAM overlay
        vm = replace(vm, skeleton=_root_dir(spec), binds=(), own_root=True)
    uid, gid = spec.user.uid, spec.user.gid
    process = p.Process(argv=tuple(argv), env=_environment(spec, uid, term), cwd=spec.workdir or "/",
                        uid=uid, gid=gid, rlimits=spec.rlimits, tty=tty)
    return p.Plan(isolation="vm", namespaces=(), uid_map=(), gid_map=(), ops=(), process=process,
                  timeout=spec.timeout, vm=vm, network=_network(spec))


def plan_vm_workspace(spec: Spec, disks: Sequence[str], writable: bool, machine_id: str,
                      disk_key: str = "", *, mem_lock: bool = False) -> p.Plan:
    """The plan of a vm workspace's machine: a one-shot VM's, with the workspace's disk
    chain (``disks``, bottom first; see silo.backends.vm.disk), ``writable`` when its top
    is the guest's upper, the machine-id it keeps, and the daemon's disk key file (for
    the encrypted disks of the chain); ``mem_lock``: QEMU locks its memory (a diskless
    workspace). The process is what commands joining it start from (env, cwd, user)."""
    _check_vm(spec)
    vm = replace(_vm_machine(spec), disks=tuple(disks), disk_writable=writable, machine_id=machine_id,
                 disk_key=disk_key, mem_lock=mem_lock, image=spec.root != "host")
    uid, gid = spec.user.uid, spec.user.gid
    process = p.Process(argv=("/bin/sh",), env=_environment(spec, uid, None), cwd=spec.workdir or "/",
                        uid=uid, gid=gid, rlimits=spec.rlimits)
    return p.Plan(isolation="vm", namespaces=(), uid_map=(), gid_map=(), ops=(), process=process, vm=vm,
                  network=_network(spec))


def _check_vm(spec: Spec) -> None:
    _check_level("vm", (("--cap", spec.caps), ("--pids", spec.limits.pids), ("--seccomp", spec.seccomp != "default")),
                 "QEMU's jail and virtiofsd's view")


def _vm_machine(spec: Spec) -> p.Vm:
    from silo.backends.vm import accel, initramfs, kernel

    h = hostmod.host()
    k = kernel.find(spec.kernel, h.cache_dir)
    ird = initramfs.build(Path(k.modules), h.cache_dir, k.release)
    memory = max((spec.limits.memory or VM_MEMORY) >> 20, 128)
    cpus = max(1, math.ceil(spec.limits.cpus or 1))
    binds = tuple((name, "/" + name) for name, real in hostmod.system_dirs() if real)
    image = kernel.bootable(k.image, h.cache_dir)
    return p.Vm(kernel=image, initramfs=ird, accel=accel.choose(image, ird, h.cache_dir), memory=memory,
                cpus=cpus, skeleton=hostmod.skeleton(), binds=binds, rwsize=spec.tmpfs_size,
                jail_id=_qemu_id(), hostname=spec.hostname, volumes=_vm_volumes(spec),
                volume_ids=(h.idmap_base, h.idmap_count) if spec.mounts else (0, 0))


VM_VOLUMES_CMDLINE = 1024  # bytes of the guest's kernel command line (2048 in all) the volumes may take


def _vm_volumes(spec: Spec) -> tuple[tuple[str, str, bool, bool], ...]:
    """``-v`` at the vm level: each source checked as at the process level; the targets
    travel hex-encoded on the guest's kernel command line (silo.vol=), which is short."""
    check_vm_mounts(spec.mounts)
    volumes = [(m.source, m.target, m.readonly, _check_source(m.source)) for m in spec.mounts]
    if sum(len(" silo.vol=rw,d,") + 2 * len(target.encode()) for _, target, _, _ in volumes) > VM_VOLUMES_CMDLINE:
        raise SpecError(f"{len(volumes)} volumes with these targets do not fit a VM's kernel command line: "
                        "use fewer volumes or shorter target paths")
    return tuple(volumes)


def _qemu_id() -> int:
    """The unprivileged uid and gid QEMU runs as: ``SILO_VM_UID``, or the id just above
    the range root-run sandboxes map to."""
    raw = os.environ.get("SILO_VM_UID")
    if raw:
        try:
            uid = int(raw)
        except ValueError:
            raise SpecError(f"bad SILO_VM_UID {raw!r}: use a number, like 1000065536") from None
        if not 0 < uid < 2**32 - 1:
            raise SpecError(f"bad SILO_VM_UID {raw!r}: use a uid other than 0 and 4294967295")
        return uid
    base, count = hostmod.idmap_config()
    return base + count


def _id_maps(spec: Spec, h: hostmod.Host) -> tuple[tuple[p.IdMap, ...], tuple[p.IdMap, ...]]:
    if h.is_root:
        # SECURITY: host id 0 is never in the range (SECURITY.md #16).
        return (p.IdMap(0, h.idmap_base, h.idmap_count),), (p.IdMap(0, h.idmap_base, h.idmap_count),)
    return (p.IdMap(spec.user.uid, h.uid, 1),), (p.IdMap(spec.user.gid, h.gid, 1),)


def _real_dir(top: str, name: str) -> bool:
    """Whether ``top/name`` is a directory reached through directories only: a layer
    (an imported one: see silo.store.archive) may hold symbolic links, and a nested
    target's path must never follow one out of the layer."""
    path = top
    for part in name.split("/"):
        path = f"{path}/{part}"
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return False
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class _Tree:
    """A sandbox's root file system as plan operations: ``root``, the overlay of its
    base, and one overlay per ``shared`` host directory mounted at ``root/NAME``."""

    ops: list[p.Op]
    root: str
    shared: tuple[str, ...]
    upper: str  # the writable layer's directory (its root's files in ``upper/root``)
    lowers: tuple[str, ...]  # the root's read-only layers, top first, the base last


def _root_tree(spec: Spec, layers: Layers, package_state: bool, top: str | None = None,
               resolver: str = "127.0.0.53") -> _Tree:
    """The overlays of a process- or gvisor-level sandbox's root, on ``layers``; a
    workspace's (``package_state``) also shows the host's package state. ``top``: a
    read-only layer of silo's above all of the root's others (gvisor's mount points and
    init: silo.backends.gvisor.runsc.layer). ``resolver``: where silo's resolver
    answers a sandbox with a network (the keeper binds it: silo.net.keeper)."""
    h = hostmod.host()
    uid, gid = spec.user.uid, spec.user.gid
    scratch = h.scratch
    root = f"{scratch}/root"
    # The writable layer: in the scratch tmpfs (RAM), or a workspace's directories on
    # disk, made by the store and kept between starts (mkdir only what is missing).
    upper, work = (layers.upper, layers.work) if layers.upper and layers.work else (f"{scratch}/u", f"{scratch}/w")
    persistent = layers.upper is not None
    # A root-run workspace on the host's root shows the host's package state (see plan_workspace).
    packages = package_state and h.is_root and spec.root == "host"
    inodes = max(spec.tmpfs_size // 4096, 16384)
    ops: list[p.Op] = [
        p.MakePrivate(),
        p.Tmpfs(scratch, f"size={spec.tmpfs_size},nr_inodes={inodes},mode=0755"),
        p.Mkdir(root),
    ]

    def mkdir(path: str, mode: int = 0o755, owner: int = -1, group: int = -1) -> None:
        if not (persistent and os.path.isdir(path)):
            ops.append(p.Mkdir(path, mode, owner, group))

    def mkdirs(top: str, name: str, kept: bool = True) -> None:
        """``top/name`` and each directory on the way the plan does not make yet (``name``
        may be nested); in a workspace's storage (``kept``), only what is missing."""
        for path in _unplanned(ops, top, name):
            if kept and persistent and os.path.lexists(path):
                if not stat.S_ISDIR(os.lstat(path).st_mode):  # never made through a symlink
                    raise UserError(f"cannot start the workspace: {path} in its storage is not a directory; "
                                    "reset or remove the workspace")
                continue
            ops.append(p.Mkdir(path))

    def lowers_of(target: str) -> tuple[str, ...]:
        return tuple(f"{layer}/{target}" for layer in layers.lowers if _real_dir(layer, target))

    if not persistent:
        ops += [p.Mkdir(upper), p.Mkdir(work)]
    mkdir(f"{upper}/root")
    mkdir(f"{work}/root")
    # A workspace's first start seeds its files; later starts (and a stack that has
    # them already, from a template) keep what the workspace made of them.
    seed = not any(os.path.lexists(f"{d}/etc/passwd") for d in (f"{upper}/root", *lowers_of("root")))
    if spec.root == "host":
        lower = hostmod.skeleton(workspace=packages)
        if seed:
            mkdir(f"{upper}/root/etc")
            ops += [
                p.WriteFile(f"{upper}/root/etc/passwd", _passwd(uid, gid, packages)),
                p.WriteFile(f"{upper}/root/etc/group", _group(uid, gid, packages)),
            ]
    else:
        lower = _root_dir(spec)
        for d in ("proc", "dev"):
            mkdir(f"{upper}/root/{d}")
        mkdir(f"{upper}/root/tmp", 0o1777)
        if seed and os.path.isdir(os.path.join(lower, "etc")) and not os.path.islink(os.path.join(lower, "etc")):
            mkdir(f"{upper}/root/etc")
    if (seed and os.path.isdir(f"{upper}/root/etc")) or any(
            isinstance(o, p.Mkdir) and o.path == f"{upper}/root/etc" for o in ops):
        ops += [p.WriteFile(f"{upper}/root/etc/hosts", _hosts(spec.hostname)),
                p.WriteFile(f"{upper}/root/etc/hostname", (spec.hostname + "\n").encode())]
    if spec.network.enabled and (spec.root == "host" or os.path.isdir(os.path.join(lower, "etc"))):
        # silo's resolver, which the network's keeper binds inside the sandbox's namespace
        mkdirs(upper, "root/etc")
        ops.append(p.WriteFile(f"{upper}/root/etc/resolv.conf", _resolv_conf(resolver)))
    if uid != 0 and spec.root == "host" and seed:
        mkdir(f"{upper}/root/home")
        mkdir(f"{upper}/root/home/user", 0o755, uid, gid)
    # As root the lower layers the host's root owns are idmapped into the sandbox's user
    # namespace, so the sandbox's root may change (copy up) them, e.g. /usr. An image
    # already owned by silo's id range is used as it is, and so are a workspace's own
    # layers (written by the sandbox: its ids already).
    attach = f"{scratch}/l"
    idmap_root = h.is_root and os.stat(lower).st_uid == 0
    if h.is_root:
        ops.append(p.Mkdir(attach))
    if idmap_root:
        ops.append(p.Mkdir(f"{attach}/root"))

    def overlay(target: str, name: str, base: str, idmapped: bool, above: tuple[str, ...] = ()) -> None:
        own = lowers_of(name)
        marks = (*(f"{attach}/top" if h.is_root else "",) * len(above), *("",) * len(own),
                 f"{attach}/{name}" if idmapped else "")
        ops.append(p.Overlay(target, (*above, *own, base), f"{upper}/{name}", f"{work}/{name}",
                             idmapped=marks if any(marks) else ()))

    if top is not None and h.is_root:
        ops.append(p.Mkdir(f"{attach}/top"))
    overlay(root, "root", lower, idmap_root, () if top is None else (top,))
    shared: list[str] = []
    if spec.root == "host":
        # The host's system dirs, and a workspace's package state: a mount point in the
        # skeleton, the host's directory below the workspace's layers. A rootless
        # workspace gets no package state: a sandbox with one user cannot change what
        # the host's root owns, so it installs no packages.
        shared += [name for name, real in hostmod.system_dirs() if real]
        if packages:
            shared += hostmod.package_state_dirs()
        for name in shared:
            mkdirs(upper, name)
            mkdirs(work, name)
            if h.is_root:
                mkdirs(attach, name, kept=False)
            overlay(f"{root}/{name}", name, f"/{name}", h.is_root)
    return _Tree(ops, root, tuple(shared), upper, (*lowers_of("root"), lower))


def _plan_process(spec: Spec, argv: Sequence[str], term: str | None, tty: bool, layers: Layers,
                  package_state: bool = False) -> p.Plan:
    h = hostmod.host()
    uid, gid = spec.user.uid, spec.user.gid
    tree = _root_tree(spec, layers, package_state)
    ops, root = tree.ops, tree.root
    ops.append(p.Proc(f"{root}/proc"))
    # A fresh procfs shows what the host's shows: mask only what exists here.
    ops += [p.Mask(f"{root}/proc/{name}") for name in PROC_MASKED if os.path.lexists(f"/proc/{name}")]
    ops += [p.ReadOnly(f"{root}/proc/{name}") for name in PROC_READONLY if os.path.lexists(f"/proc/{name}")]
    ops.append(p.Tmpfs(f"{root}/dev", "mode=0755,size=65536,nr_inodes=256"))
    ops += [p.DevNode(f"/dev/{n}", f"{root}/dev/{n}") for n in DEV_NODES]
    ops += [p.Symlink("/proc/self/fd", f"{root}/dev/fd"), p.Symlink("/proc/self/fd/0", f"{root}/dev/stdin"),
            p.Symlink("/proc/self/fd/1", f"{root}/dev/stdout"),
            p.Symlink("/proc/self/fd/2", f"{root}/dev/stderr"), p.Symlink("pts/ptmx", f"{root}/dev/ptmx"),
            p.Mkdir(f"{root}/dev/pts"), p.Devpts(f"{root}/dev/pts"),
            p.Mkdir(f"{root}/dev/shm", 0o1777), p.Tmpfs(f"{root}/dev/shm", "mode=1777,size=67108864")]
    for m in spec.mounts:
        is_dir = _check_source(m.source)
        ops.append(p.Bind(m.source, m.target, root, readonly=m.readonly, create="dir" if is_dir else "file"))
    ops += [p.Hostname(spec.hostname), p.LoopbackUp(), p.PivotRoot(root)]
    uid_map, gid_map = _id_maps(spec, h)
    seccomp = spec.seccomp
    if seccomp not in ("default", "unconfined") and not os.path.isfile(seccomp):
        raise NotFoundError(
            f"seccomp profile {seccomp} does not exist: give a JSON profile file, 'default' or 'unconfined'")
    process = p.Process(
        argv=tuple(argv), env=_environment(spec, uid, term), cwd=spec.workdir or "/",
        uid=uid, gid=gid, caps=spec.caps, no_new_privs=True, seccomp=seccomp,
        rlimits=spec.rlimits, new_session=True, init=True, harden=True, setgroups=h.is_root, tty=tty,
    )
    return p.Plan(
        isolation=spec.isolation.value, namespaces=p.NAMESPACES, uid_map=uid_map, gid_map=gid_map,
        ops=tuple(ops), process=process, memory=spec.limits.memory, cpus=spec.limits.cpus,
        pids=spec.limits.pids, timeout=spec.timeout,
        network=_network(spec),
    )


def _network(spec: Spec) -> str | None:
    """A plan's network: the policy, for the keeper (silo.net.keeper), if it has one."""
    return json.dumps(spec.network.to_dict(), sort_keys=True) if spec.network.enabled else None


def keep_layout(keep: str, path: str) -> tuple[str, str]:
    """Upper and work directories under a ``--keep`` directory for one copy-on-write path."""
    name = path.strip("/").replace("/", "-") or "root"
    return os.path.join(keep, name, "upper"), os.path.join(keep, name, "work")


def _plan_app(spec: Spec, argv: Sequence[str], caller_env: dict[str, str], cwd: str, tty: bool) -> p.Plan:
    """App level: a copy-on-write view of $HOME and --cow paths. NOT a security boundary."""
    h = hostmod.host()
    home = caller_env.get("HOME") or os.path.expanduser("~")
    paths = []
    for path in (home, *spec.cow):
        real = os.path.realpath(path)
        if not os.path.isdir(real):
            raise NotFoundError(f"--cow path {path} is not a directory: give an existing directory")
        if real not in paths:
            paths.append(real)
    scratch = h.scratch
    ops: list[p.Op] = [p.MakePrivate()]
    if spec.keep is None:
        ops.append(p.Tmpfs(scratch, f"size={spec.tmpfs_size},mode=0700"))
    for i, path in enumerate(paths):
        if spec.keep is not None:
            upper, work = keep_layout(spec.keep, path)
        else:
            upper, work = f"{scratch}/u{i}", f"{scratch}/w{i}"
            ops += [p.Mkdir(upper), p.Mkdir(work)]
        ops.append(p.Overlay(path, (path,), upper, work, userxattr=not h.is_root))
    if spec.keep is None:
        ops.append(p.Unmount(scratch))
    ops.append(p.Proc("/proc"))  # of the app's own pid namespace
    env = dict(caller_env)
    env.update(dict(spec.env))
    # A pid namespace (and tini as its init) so nothing the app starts outlives it.
    namespaces = ("mnt", "pid") if h.is_root else ("user", "mnt", "pid")
    idmap = () if h.is_root else (p.IdMap(h.uid, h.uid, 1),)
    gidmap = () if h.is_root else (p.IdMap(h.gid, h.gid, 1),)
    process = p.Process(
        argv=tuple(argv), env=tuple(env.items()), cwd=spec.workdir or cwd, uid=h.uid, gid=h.gid,
        no_new_privs=False, seccomp="unconfined", new_session=True, init=True, harden=False,
        setgroups=False, tty=tty,
    )
    return p.Plan(isolation="app", namespaces=namespaces, uid_map=idmap, gid_map=gidmap, ops=tuple(ops),
                  process=process, timeout=spec.timeout)
