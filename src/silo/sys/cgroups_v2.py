"""cgroup v2 (unified hierarchy) manager.

Placement: ``<base>/silo/<name>``. As root ``base`` is the cgroup2 mount; rootless it is
the parent of this process's own cgroup when the user owns it (a delegated subtree such as
systemd's ``user@UID.service/app.slice``). Controllers are enabled lazily, once per
manager, in ``<base>/cgroup.subtree_control`` and ``<base>/silo/cgroup.subtree_control``.

Limits: ``memory.max`` (+ ``memory.swap.max`` = 0 and ``memory.oom.group`` = 1 when
present), ``cpu.max`` = "quota 100000", ``pids.max``. One inotify fd watches
``memory.events`` and ``pids.events``; :meth:`V2Cgroup.limit_hit` reads the counters.

Must not: touch cgroups outside ``<base>/silo``; block for more than a few milliseconds.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from silo.model.errors import InternalError
from silo.sys import cgroups_common as c

_FIX_ROOTLESS = (
    "run as root, or start silo inside a delegated cgroup "
    "(e.g. `systemd-run --user --scope -p Delegate=yes ...`)"
)


class V2Cgroup:
    """One sandbox's cgroup on the unified hierarchy."""

    def __init__(
        self, manager: V2Manager, name: str, path: str, fds: list[int], watched: tuple[str, ...]
    ) -> None:
        self.name = name
        self.path = path
        self._manager = manager
        self._fds = fds
        self._watched = watched
        self._gone = False

    def __repr__(self) -> str:
        return f"V2Cgroup({self.path!r})"

    def add(self, pid: int) -> None:
        """Move ``pid`` (its whole thread group) into this cgroup."""
        # SECURITY: only the spawner writes here; the sandbox's uid cannot (mode 0o755).
        self._manager.fs.write(f"{self.path}/cgroup.procs", str(pid))

    def event_fds(self) -> list[int]:
        """The inotify fd (if any limit with an events file was set); readable on a change."""
        return list(self._fds)

    def limit_hit(self) -> str | None:
        """Which limit was hit: "memory" (an OOM kill happened), "pids" (fork refused), or None.

        Drains the event fd, so a level-triggered selector does not spin.
        """
        for fd in self._fds:
            c.drain(fd)
        if "memory" in self._watched:
            ev = c.read_keyed(f"{self.path}/memory.events")
            if ev.get("oom_kill", 0) > 0 or ev.get("oom_group_kill", 0) > 0:
                return "memory"
        if "pids" in self._watched:
            if c.read_keyed(f"{self.path}/pids.events").get("max", 0) > 0:
                return "pids"
        return None

    def memory_bytes(self) -> int | None:
        if self._gone:
            return None
        try:
            return int(c.read_file(f"{self.path}/memory.current"))
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """SIGKILL every process: ``cgroup.kill`` (Linux 5.14+), else the procs loop."""
        if self._gone:
            return
        if self._manager.has_kill:
            try:
                self._manager.fs.write(f"{self.path}/cgroup.kill", "1")
                return
            except FileNotFoundError:
                if os.path.isdir(self.path):
                    self._manager.has_kill = False
                else:
                    return
        c.kill_procs(f"{self.path}/cgroup.procs")

    @property
    def removed(self) -> bool:
        """True once :meth:`destroy` removed it."""
        return self._gone

    def destroy(self) -> None:
        """Close the event fd and remove the cgroup; idempotent, never raises for ENOENT."""
        c.close_fds(self._fds)
        if self._gone:
            return
        if c.remove_cgroup(self._manager.fs, self.path, wait=True):
            self._gone = True
            self._manager.live.discard(self.name)


class V2Manager:
    """Creates sandbox cgroups under ``<base>/silo`` on a cgroup2 hierarchy.

    ``base`` is None when no usable (writable) subtree exists; every ``create`` then
    raises :class:`LimitUnavailable` with ``why_not`` as the reason.

    ``subdir`` replaces ``silo`` in the placement (tests use their own, so that sweeping
    never touches cgroups of sandboxes that other silo processes are running). ``fs`` is
    the seam for a fake tree. ``live`` holds the names of this manager's cgroups that are
    not yet destroyed; ``sweep`` skips them and anything younger than ``min_age`` seconds
    (another spawner may have created it and not yet moved a process in).
    """

    version = "v2"

    def __init__(
        self,
        mount: str,
        base: str | None,
        *,
        uid: int | None = None,
        why_not: str = "",
        fs: c.CgroupFs = c.REAL_FS,
        subdir: str = c.SILO_DIR,
    ) -> None:
        self.mount = mount
        self.base = base
        self.uid = os.geteuid() if uid is None else uid
        self.why_not = why_not
        self.fs = fs
        c.check_name(subdir)
        self.subdir = subdir
        self.live: set[str] = set()
        self.has_kill = True
        self._enabled: set[str] = set()
        self._ready = False  # <base>/silo exists
        self._has_swap: bool | None = None
        self._has_oom_group: bool | None = None

    def __repr__(self) -> str:
        return f"V2Manager(mount={self.mount!r}, base={self.base!r})"

    @property
    def silo_dir(self) -> str | None:
        return None if self.base is None else f"{self.base}/{self.subdir}"

    # -- controllers

    def _enable(self, controllers: list[str]) -> None:
        """Make ``controllers`` available to children of ``<base>/silo`` (cached)."""
        missing = [x for x in controllers if x not in self._enabled]
        if not missing and self._ready:
            return
        what = missing[0] if missing else "resources"
        if self.base is None:
            raise c.unavailable(what, self.why_not, _FIX_ROOTLESS)
        base, silo = self.base, f"{self.base}/{self.subdir}"
        offered = c.read_file(f"{base}/cgroup.controllers").split()
        for ctl in missing:
            if ctl not in offered:
                raise c.unavailable(
                    ctl,
                    f"the cgroup v2 '{ctl}' controller is not available in {base} "
                    "(not delegated, or bound to a cgroup v1 hierarchy)",
                    "enable it in the parent's cgroup.subtree_control or delegate it "
                    "(systemd: Delegate=yes)",
                )
        self._subtree(base, missing, what)
        try:
            self.fs.mkdir(silo)
        except FileExistsError:
            pass
        except OSError as exc:
            raise self._denied(what, base, exc) from exc
        self._ready = True
        self._subtree(silo, missing, what)
        self._enabled.update(missing)

    def _subtree(self, parent: str, ctls: list[str], what: str) -> None:
        """Enable ``ctls`` in ``parent``'s cgroup.subtree_control (those not yet on)."""
        try:
            have = c.read_file(f"{parent}/cgroup.subtree_control").split()
            todo = [x for x in ctls if x not in have]
            if todo:  # read first: rewriting an enabled controller is not free
                # SECURITY: enables controllers for silo's own subtree only; the base's
                # other children see them offered, never forced on.
                self.fs.write(f"{parent}/cgroup.subtree_control", " ".join(f"+{x}" for x in todo))
        except OSError as exc:
            raise self._denied(what, parent, exc) from exc

    def _denied(self, ctl: str, where: str, exc: OSError) -> Exception:
        if c.is_permission(exc):
            return c.unavailable(
                ctl,
                f"the cgroup v2 subtree {where} is not writable by uid {self.uid}",
                _FIX_ROOTLESS,
            )
        if exc.errno == errno.EBUSY:
            return c.unavailable(
                ctl,
                f"cannot enable the '{ctl}' controller in {where}: it holds processes "
                "(cgroup v2's no-internal-processes rule)",
                "run silo from a leaf cgroup below a delegated subtree",
            )
        return c.unavailable(ctl, f"{where}: {exc.strerror}", "check the cgroup2 mount")

    # -- lifecycle

    def create(
        self, name: str, memory: int | None, cpus: float | None, pids: int | None
    ) -> V2Cgroup:
        """Create ``<base>/silo/<name>`` with the limits asked for; nothing left on failure."""
        c.check_name(name)
        c.check_limits(memory, cpus, pids)
        ctls = c.wanted(memory, cpus, pids)
        if self.base is None:
            raise c.unavailable(ctls[0] if ctls else "resources", self.why_not, _FIX_ROOTLESS)
        self._enable(ctls)
        path = f"{self.base}/{self.subdir}/{name}"
        try:
            try:
                self.fs.mkdir(path)
            except FileNotFoundError:  # someone removed <base>/silo: set it up again
                self._enabled.clear()
                self._ready = False
                self._enable(ctls)
                self.fs.mkdir(path)
        except FileExistsError:
            raise InternalError(f"cgroup {path} already exists (duplicate sandbox name)") from None
        except OSError as exc:
            raise self._denied(ctls[0] if ctls else "resources", path, exc) from exc
        fds: list[int] = []
        try:
            watched = self._write_limits(path, memory, cpus, pids)
            if watched:
                fds.append(c.inotify_watch(f"{path}/{w}.events" for w in watched))
        except BaseException:
            c.close_fds(fds)
            c.remove_cgroup(self.fs, path, wait=False)
            raise
        self.live.add(name)
        return V2Cgroup(self, name, path, fds, watched)

    def _write_limits(
        self, path: str, memory: int | None, cpus: float | None, pids: int | None
    ) -> tuple[str, ...]:
        watched: list[str] = []
        if memory is not None:
            self._write("memory", f"{path}/memory.max", str(memory))
            if self._has_swap is not False:
                self._has_swap = self._write_optional(f"{path}/memory.swap.max", "0")
            if self._has_oom_group is not False:
                self._has_oom_group = self._write_optional(f"{path}/memory.oom.group", "1")
            watched.append("memory")
        if cpus is not None:
            self._write("cpu", f"{path}/cpu.max", f"{c.cpu_quota_us(cpus)} {c.CPU_PERIOD_US}")
        if pids is not None:
            self._write("pids", f"{path}/pids.max", str(pids))
            watched.append("pids")
        return tuple(watched)

    def _write(self, ctl: str, path: str, value: str) -> None:
        try:
            self.fs.write(path, value)
        except FileNotFoundError as exc:
            self._enabled.discard(ctl)  # someone disabled it behind our back; recheck next time
            raise c.unavailable(
                ctl,
                f"{os.path.basename(path)} is missing: the '{ctl}' controller is not "
                f"enabled for {os.path.dirname(path)}",
                "enable it in the parents' cgroup.subtree_control",
            ) from exc
        except OSError as exc:
            raise c.unavailable(
                ctl,
                f"writing {value!r} to {path} failed: {exc.strerror}",
                "check the limit's value",
            ) from exc

    def _write_optional(self, path: str, value: str) -> bool:
        """Write a file the kernel may not have; False when it does not exist."""
        try:
            self.fs.write(path, value)
        except FileNotFoundError:
            return False
        return True

    def sweep(self, *, min_age: float = 5.0) -> int:
        """Remove empty leftover cgroups under ``<base>/silo``; returns how many."""
        if self.silo_dir is None:
            return 0
        return c.sweep_dirs(self.fs, [self.silo_dir], self.live, min_age)

    def reclaim(self, name: str) -> None:
        c.check_name(name)
        if self.silo_dir is not None:
            c.reclaim_dirs(self.fs, [f"{self.silo_dir}/{name}"])
        self.live.discard(name)


def own_cgroup(proc_self_cgroup: str) -> str | None:
    """This process's path on the unified hierarchy (the ``0::`` line), or None."""
    for line in proc_self_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


def choose_base(
    mount: str,
    proc_self_cgroup: str,
    uid: int,
    writable: Callable[[str], bool] = lambda p: os.access(p, os.W_OK),
) -> tuple[str | None, str]:
    """Where silo's subtree goes: (base, reason-if-none).

    Root: the mount itself. Rootless: the parent of our own cgroup if we may write its
    ``cgroup.procs`` and ``cgroup.subtree_control`` and create directories in it.
    """
    if uid == 0:
        return mount, ""
    own = own_cgroup(proc_self_cgroup)
    if own is None:
        return None, "this process is not on the cgroup v2 hierarchy"
    parent = os.path.dirname(own.rstrip("/")) if own != "/" else "/"
    base = mount if parent == "/" else f"{mount}{parent}"
    ok = all(writable(p) for p in (base, f"{base}/cgroup.procs", f"{base}/cgroup.subtree_control"))
    if not ok:
        return None, (
            f"no delegated cgroup v2 subtree is writable by uid {uid} "
            f"(own cgroup {own}, parent {base} is not writable)"
        )
    return base, ""
