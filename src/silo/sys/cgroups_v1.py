"""cgroup v1 (legacy, one hierarchy per controller) manager.

Placement: ``<mount of controller>/silo/<name>`` for each of ``memory``, ``cpu``, ``pids``
that a limit was asked for (``/sys/fs/cgroup/memory/silo/<name>`` on Debian's hybrid
layout). A sandbox's pid is added to every one of them.

Limits: ``memory.limit_in_bytes`` (+ ``memory.memsw.limit_in_bytes`` when swap accounting
exists), ``cpu.cfs_period_us`` = 100000 and ``cpu.cfs_quota_us``, ``pids.max``.

Events: v1 has no ``memory.oom.group``; the kernel kills one task on OOM. An eventfd
registered through ``cgroup.event_control`` + ``memory.oom_control`` wakes the spawner,
which then calls :meth:`V1Cgroup.kill`. For pids, an inotify watch on ``pids.events`` is
used only if a one-time probe shows the kernel notifies that file on this hierarchy
(Linux 6.13+ stopped notifying it on v1); :meth:`V1Cgroup.limit_hit` reads the counter
either way.

Must not: touch cgroups outside ``<mount>/silo``; block for more than a few milliseconds.
"""

from __future__ import annotations

import os
import select

from silo.model.errors import InternalError
from silo.sys import cgroups_common as c

_FIX = "run as root or use a cgroup v2 system with delegation"
PROBE_NAME = "_probe-pids-notify"

# Per pids mount: does the kernel notify pids.events on fork refusal? (probed once)
_PIDS_NOTIFY: dict[str, bool] = {}


class V1Cgroup:
    """One sandbox's cgroups, one directory per controller hierarchy."""

    def __init__(
        self,
        manager: V1Manager,
        name: str,
        dirs: dict[str, str],
        oom_fd: int | None,
        pids_fd: int | None,
    ) -> None:
        self.name = name
        self.dirs = dirs
        self._manager = manager
        self._oom_fd = oom_fd
        self._pids_fd = pids_fd
        self._oom_seen = False

    def __repr__(self) -> str:
        return f"V1Cgroup({self.dirs!r})"

    def add(self, pid: int) -> None:
        """Move ``pid`` (its whole thread group) into the cgroup of every hierarchy."""
        for path in self.dirs.values():
            # SECURITY: only the spawner writes here; the sandbox's uid cannot (mode 0o755).
            self._manager.fs.write(f"{path}/cgroup.procs", str(pid))

    def event_fds(self) -> list[int]:
        """The OOM eventfd (memory) and the pids.events inotify fd (when notified)."""
        return [fd for fd in (self._oom_fd, self._pids_fd) if fd is not None]

    def limit_hit(self) -> str | None:
        """Which limit was hit: "memory" (OOM killer ran or is running), "pids" (fork refused).

        Drains the event fds, so a level-triggered selector does not spin.
        """
        if self._oom_fd is not None and c.drain(self._oom_fd):
            self._oom_seen = True
        if self._pids_fd is not None:
            c.drain(self._pids_fd)
        mem = self.dirs.get("memory")
        if mem is not None:
            if self._oom_seen:
                return "memory"
            ctl = c.read_keyed(f"{mem}/memory.oom_control")
            if ctl.get("oom_kill", 0) > 0 or ctl.get("under_oom", 0) > 0:
                return "memory"
        pids = self.dirs.get("pids")
        if pids is not None and c.read_keyed(f"{pids}/pids.events").get("max", 0) > 0:
            return "pids"
        return None

    def memory_bytes(self) -> int | None:
        mem = self.dirs.get("memory")
        if mem is None:
            return None
        try:
            return int(c.read_file(f"{mem}/memory.usage_in_bytes"))
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """SIGKILL every process (v1 has no ``cgroup.kill``: procs loop, pidfd-checked)."""
        for path in self.dirs.values():
            c.kill_procs(f"{path}/cgroup.procs")

    @property
    def removed(self) -> bool:
        """True once :meth:`destroy` removed it."""
        return not self.dirs

    def destroy(self) -> None:
        """Close fds and remove every directory; idempotent, never raises for ENOENT."""
        fds = [fd for fd in (self._oom_fd, self._pids_fd) if fd is not None]
        self._oom_fd = self._pids_fd = None
        c.close_fds(fds)
        for ctl, path in list(self.dirs.items()):
            if c.remove_cgroup(self._manager.fs, path, wait=True):
                del self.dirs[ctl]
        if not self.dirs:
            self._manager.live.discard(self.name)


class V1Manager:
    """Creates sandbox cgroups under ``<mount>/silo`` of each v1 controller hierarchy.

    ``mounts`` maps a controller name to its hierarchy's mount point (from mountinfo);
    a missing key means the controller is not mounted.

    ``subdir`` replaces ``silo`` in the placement (tests use their own, so that sweeping
    never touches cgroups of sandboxes that other silo processes are running). ``fs`` is
    the seam for a fake tree. ``live`` holds the names of this manager's cgroups that are
    not yet destroyed; ``sweep`` skips them and anything younger than ``min_age`` seconds
    (another spawner may have created it and not yet moved a process in).
    """

    version = "v1"

    def __init__(
        self,
        mounts: dict[str, str],
        *,
        uid: int | None = None,
        fs: c.CgroupFs = c.REAL_FS,
        subdir: str = c.SILO_DIR,
    ) -> None:
        self.mounts = dict(mounts)
        self.uid = os.geteuid() if uid is None else uid
        self.fs = fs
        c.check_name(subdir)
        self.subdir = subdir
        self.live: set[str] = set()
        self._ready: set[str] = set()
        self._has_memsw: bool | None = None

    def __repr__(self) -> str:
        return f"V1Manager({self.mounts!r})"

    def _mount(self, ctl: str) -> str:
        mount = self.mounts.get(ctl)
        if mount is None:
            raise c.unavailable(
                ctl,
                f"the cgroup v1 '{ctl}' controller is not mounted",
                f"mount it (mount -t cgroup -o {ctl} cgroup /sys/fs/cgroup/{ctl}) or use cgroup v2",
            )
        return mount

    def _silo(self, ctl: str) -> str:
        """``<mount>/silo`` for ``ctl``, created on first use."""
        silo = f"{self._mount(ctl)}/{self.subdir}"
        if ctl not in self._ready:
            try:
                self.fs.mkdir(silo)
            except FileExistsError:
                pass
            except OSError as exc:
                raise self._denied(ctl, exc) from exc
            self._ready.add(ctl)
        return silo

    def _denied(self, ctl: str, exc: OSError) -> Exception:
        if c.is_permission(exc):
            return c.unavailable(
                ctl, f"the cgroup v1 '{ctl}' controller is not writable by uid {self.uid}", _FIX
            )
        return c.unavailable(ctl, f"the cgroup v1 '{ctl}' hierarchy: {exc}", _FIX)

    def create(
        self, name: str, memory: int | None, cpus: float | None, pids: int | None
    ) -> V1Cgroup:
        """Create ``<mount>/silo/<name>`` per needed controller; nothing left on failure."""
        c.check_name(name)
        c.check_limits(memory, cpus, pids)
        ctls = c.wanted(memory, cpus, pids)
        if not ctls:
            raise c.unavailable(
                "resources",
                "no limit was asked for, and cgroup v1 needs a controller to hold processes",
                "ask for a limit",
            )
        for ctl in ctls:
            self._mount(ctl)  # all mounted? (before creating anything)
        parents: dict[str, str] = {}
        dirs: dict[str, str] = {}
        fds: list[int] = []
        oom_fd = pids_fd = None
        try:
            for ctl in ctls:
                parents[ctl] = self._silo(ctl)
                path = f"{parents[ctl]}/{name}"
                try:
                    try:
                        self.fs.mkdir(path)
                    except FileNotFoundError:  # someone removed <mount>/silo: recreate it
                        self._ready.discard(ctl)
                        self._silo(ctl)
                        self.fs.mkdir(path)
                except FileExistsError:
                    raise InternalError(
                        f"cgroup {path} already exists (duplicate sandbox name)"
                    ) from None
                except OSError as exc:
                    raise self._denied(ctl, exc) from exc
                dirs[ctl] = path
            if memory is not None:
                oom_fd = self._limit_memory(dirs["memory"], memory)
                fds.append(oom_fd)
            if cpus is not None:
                cpu = dirs["cpu"]
                self._write("cpu", f"{cpu}/cpu.cfs_period_us", str(c.CPU_PERIOD_US))
                self._write("cpu", f"{cpu}/cpu.cfs_quota_us", str(c.cpu_quota_us(cpus)))
            if pids is not None:
                path = dirs["pids"]
                self._write("pids", f"{path}/pids.max", str(pids))
                if self._pids_notify(parents["pids"]):
                    pids_fd = c.inotify_watch([f"{path}/pids.events"])
                    fds.append(pids_fd)
        except BaseException:
            c.close_fds(fds)
            for path in dirs.values():
                c.remove_cgroup(self.fs, path, wait=False)
            raise
        self.live.add(name)
        return V1Cgroup(self, name, dirs, oom_fd, pids_fd)

    def _limit_memory(self, path: str, memory: int) -> int:
        self._write("memory", f"{path}/memory.limit_in_bytes", str(memory))
        if self._has_memsw is None:
            self._has_memsw = os.path.exists(f"{path}/memory.memsw.limit_in_bytes")
        if self._has_memsw:
            # memory+swap = memory: the sandbox cannot push its excess to swap.
            self._write("memory", f"{path}/memory.memsw.limit_in_bytes", str(memory))
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            cfd = os.open(f"{path}/memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._write("memory", f"{path}/cgroup.event_control", f"{efd} {cfd}")
            finally:
                os.close(cfd)  # the kernel holds its own reference once registered
        except BaseException:
            os.close(efd)
            raise
        return efd

    def _write(self, ctl: str, path: str, value: str) -> None:
        try:
            self.fs.write(path, value)
        except OSError as exc:
            raise c.unavailable(
                ctl,
                f"writing {value!r} to {path} failed: {exc.strerror}",
                "check the limit's value and the parent cgroup's limits",
            ) from exc

    def _pids_notify(self, silo: str) -> bool:
        if silo not in _PIDS_NOTIFY:
            _PIDS_NOTIFY[silo] = probe_pids_notify(self.fs, silo)
        return _PIDS_NOTIFY[silo]

    def sweep(self, *, min_age: float = 5.0) -> int:
        """Remove empty leftover cgroups under every ``<mount>/silo``; returns how many."""
        parents = [
            f"{m}/{self.subdir}" for k, m in self.mounts.items() if k in ("memory", "cpu", "pids")
        ]
        return c.sweep_dirs(self.fs, parents, self.live, min_age)

    def reclaim(self, name: str) -> None:
        c.check_name(name)
        c.reclaim_dirs(self.fs, [f"{m}/{self.subdir}/{name}" for k, m in self.mounts.items()
                                 if k in ("memory", "cpu", "pids")])
        self.live.discard(name)


def probe_pids_notify(fs: c.CgroupFs, silo: str) -> bool:
    """Does this kernel notify ``pids.events`` when a fork is refused? (~2 ms, once).

    A child joins a probe cgroup with ``pids.max`` = 1 and forks; kernfs wakes pollers of
    the events file synchronously (POLLPRI) when it notifies, so no waiting is needed.
    """
    path = f"{silo}/{PROBE_NAME}-{os.getpid()}"
    try:
        fs.mkdir(path)
    except OSError:
        return False
    try:
        c.write_file(f"{path}/pids.max", "1")
        fd = os.open(f"{path}/pids.events", os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.read(fd, 4096)
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                code = 0
                try:
                    c.write_file(f"{path}/cgroup.procs", "0")
                    if os.fork() == 0:
                        os._exit(0)
                except BaseException:
                    code = 1
                os._exit(code)
            os.waitpid(pid, 0)
            poller = select.poll()
            poller.register(fd, select.POLLPRI)
            return any(ev & select.POLLPRI for _, ev in poller.poll(0))
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        c.remove_cgroup(fs, path, wait=True)
