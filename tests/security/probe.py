#!/usr/bin/env python3
"""Escape-attempt probe that runs INSIDE a sandbox (stdlib only, never imports silo).

Usage::

    python3 probe.py [--params JSON] CHECK [CHECK ...]

Each CHECK is the number of an attack class of SECURITY.md ("1", "2", "4" ... "17")
or one of the resource actions of class 18 ("forkbomb", "balloon", "fill", "flood",
"fdexhaust", "spin") or a helper action ("create", "tree").  The probe performs the
attempts and prints ONE JSON object ``{CHECK: findings, ...}`` on stdout (except for
"flood" and "spin", whose output/behaviour is the point).  Findings are raw
observations (errno names, values, listings); the tests decide what is acceptable.

Rules the probe keeps so that it can also run on a host to show the opposite result:

* writability is checked by opening for write and closing at once: not one byte is
  written to any existing file;
* attempts that change the process's own state (unshare, mount, setsid) run in a
  forked child; a mount that unexpectedly succeeds is detached at once, and mounts are
  tried inside a private mount namespace whenever the kernel allows creating one;
* nothing is read from ``/proc/kmsg`` (reading would consume the host's log).
"""

from __future__ import annotations

import os

# ---------------------------------------------------------------------------
# Fds at start-up: recorded before any other import can open one (``random``,
# pulled in by ``tempfile``, may open /dev/urandom when getrandom(2) is refused).
# ---------------------------------------------------------------------------

_START_FSTAT = []
for _n in range(1024):
    try:
        os.fstat(_n)
    except OSError:
        continue
    _START_FSTAT.append(_n)


def _fd_table() -> dict[str, str]:
    table: dict[str, str] = {}
    path = "/proc/self/fd"
    try:
        names = os.listdir(path)
    except OSError as e:
        return {"error": str(e.errno)}
    for name in names:
        try:
            table[name] = os.readlink(f"{path}/{name}")
        except OSError:
            table[name] = "<gone>"  # the directory fd used for the listing itself
    return table


_START_FDS = _fd_table()

import ctypes  # noqa: E402
import ctypes.util  # noqa: E402
import errno  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import stat  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

_START_PTS = sorted(os.listdir("/dev/pts")) if os.path.isdir("/dev/pts") else None
try:
    with open("/proc/net/unix") as _f:
        _START_UNIX = _f.read().splitlines()[1:]
except OSError:
    _START_UNIX = None

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
LIBC.syscall.restype = ctypes.c_long

MACHINE = platform.machine()
SYSCALLS = {
    "x86_64": {
        "ioctl": 16, "mount": 165, "umount2": 166, "unshare": 272, "bpf": 321,
        "userfaultfd": 323, "perf_event_open": 298, "io_uring_setup": 425,
        "keyctl": 250, "add_key": 248, "request_key": 249, "fsopen": 430,
        "open_tree": 428, "move_mount": 429, "fsmount": 432, "syslog": 103,
        "init_module": 175, "finit_module": 313, "delete_module": 176,
        "kexec_load": 246, "kexec_file_load": 320, "clock_settime": 227,
        "settimeofday": 164, "open_by_handle_at": 304, "mknodat": 259, "setns": 308,
        "pivot_root": 155, "ptrace": 101, "reboot": 169, "swapon": 167, "acct": 163,
        "iopl": 172, "ioperm": 173, "getrandom": 318, "getpid": 39,
    },
    "aarch64": {
        "ioctl": 29, "mount": 40, "umount2": 39, "unshare": 97, "bpf": 280,
        "userfaultfd": 282, "perf_event_open": 241, "io_uring_setup": 425,
        "keyctl": 219, "add_key": 217, "request_key": 218, "fsopen": 430,
        "open_tree": 428, "move_mount": 429, "fsmount": 432, "syslog": 116,
        "init_module": 105, "finit_module": 273, "delete_module": 106,
        "kexec_load": 104, "kexec_file_load": 294, "clock_settime": 112,
        "settimeofday": 170, "open_by_handle_at": 265, "mknodat": 33, "setns": 268,
        "pivot_root": 41, "ptrace": 117, "reboot": 142, "swapon": 224, "acct": 89,
        "getrandom": 278, "getpid": 172,
    },
}.get(MACHINE, {})

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20
MNT_DETACH = 2

TIOCSTI = 0x5412
TIOCLINUX = 0x541C
TIOCSCTTY = 0x540E
NS_GET_USERNS = 0xB701


def ename(code: int | None) -> str:
    if not code:
        return "ok"
    return errno.errorcode.get(code, f"E{code}")


def err(e: OSError) -> str:
    return ename(e.errno)


def syscall(name: str, *args: int | ctypes._SimpleCData | ctypes.Array | None) -> str:  # type: ignore[type-arg]
    """Run a raw system call; return "ok" or the errno name ("unsupported" if unknown here)."""
    nr = SYSCALLS.get(name)
    if nr is None:
        return "unsupported"
    cargs = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    ctypes.set_errno(0)
    rc = LIBC.syscall(ctypes.c_long(nr), *cargs)
    if rc == -1:
        return ename(ctypes.get_errno())
    return "ok"


def syscall_rc(name: str, *args: int | ctypes._SimpleCData | ctypes.Array | None) -> tuple[int, str]:  # type: ignore[type-arg]
    nr = SYSCALLS.get(name)
    if nr is None:
        return -1, "unsupported"
    cargs = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    ctypes.set_errno(0)
    rc = LIBC.syscall(ctypes.c_long(nr), *cargs)
    return rc, ename(ctypes.get_errno()) if rc == -1 else "ok"


def open_for_write(path: str) -> str:
    """Open for writing and close at once; never write a byte. "ok" or the errno name."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        return err(e)
    os.close(fd)
    return "ok"


def open_for_read(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        return err(e)
    os.close(fd)
    return "ok"


def read_head(path: str, size: int = 4096) -> dict[str, object]:
    """Read at most ``size`` bytes: {"open": errno|"ok", "len": n, "head": text}."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        return {"open": err(e)}
    try:
        data = os.read(fd, size)
    except IsADirectoryError:
        return {"open": "ok", "read": "EISDIR", "entries": listdir(path)}
    except OSError as e:
        return {"open": "ok", "read": err(e)}
    finally:
        os.close(fd)
    return {"open": "ok", "read": "ok", "len": len(data),
            "head": data[:200].decode("utf-8", "replace")}


def read_text(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return None


def lstat_kind(path: str) -> dict[str, object]:
    try:
        st = os.lstat(path)
    except OSError as e:
        return {"exists": False, "errno": err(e)}
    mode = st.st_mode
    kind = ("dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode)
            else "link" if stat.S_ISLNK(mode) else "chr" if stat.S_ISCHR(mode)
            else "blk" if stat.S_ISBLK(mode) else "sock" if stat.S_ISSOCK(mode)
            else "fifo" if stat.S_ISFIFO(mode) else "other")
    out: dict[str, object] = {"exists": True, "kind": kind, "uid": st.st_uid, "gid": st.st_gid,
                              "mode": oct(stat.S_IMODE(mode))}
    if kind in ("chr", "blk"):
        out["dev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
    if kind == "link":
        try:
            out["target"] = os.readlink(path)
        except OSError:
            pass
    return out


def listdir(path: str) -> list[str] | str:
    try:
        return sorted(os.listdir(path))
    except OSError as e:
        return err(e)


def in_child(fn, timeout: float = 20.0) -> object:  # type: ignore[no-untyped-def]
    """Run ``fn()`` in a forked child (so unshare/mount/setsid never touch the probe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            result = fn()
        except BaseException as e:
            result = {"exception": repr(e)}
        try:
            os.write(w, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
        if time.monotonic() > deadline:
            break
    os.close(r)
    _, status = os.waitpid(pid, 0)
    try:
        return json.loads(b"".join(chunks) or b"null")
    except ValueError:
        return {"child_status": status}


def fresh_dir(tag: str) -> str:
    """A new empty directory to mount on; falls back to an existing one when nothing
    is writable (a mount needs an existing target, or it fails ENOENT before EPERM)."""
    try:
        return tempfile.mkdtemp(prefix=f"silo-probe-{tag}-")
    except OSError:
        return "/tmp" if os.path.isdir("/tmp") else "/"


def drop_dir(path: str) -> None:
    if os.path.basename(path).startswith("silo-probe-"):
        try:
            os.rmdir(path)
        except OSError:
            pass


def try_mount(source: str, target: str, fstype: str | None, flags: int = 0,
              data: str | None = None) -> str:
    """mount(2); an unexpected success is undone at once."""
    src = source.encode() if source is not None else None
    fst = fstype.encode() if fstype is not None else None
    dat = data.encode() if data is not None else None
    res = syscall("mount", ctypes.c_char_p(src), ctypes.c_char_p(target.encode()),
                  ctypes.c_char_p(fst), ctypes.c_ulong(flags), ctypes.c_char_p(dat))
    if res == "ok" and not flags & MS_REMOUNT and fstype is not None:
        syscall("umount2", ctypes.c_char_p(target.encode()), MNT_DETACH)
    return res


def private_mount_ns() -> str:
    """In a child: try to get a private mount namespace so any success stays contained."""
    res = syscall("unshare", CLONE_NEWNS)
    if res == "ok":
        syscall("mount", None, ctypes.c_char_p(b"/"), None,
                ctypes.c_ulong(MS_REC | MS_PRIVATE), None)
    return res


def status_fields() -> dict[str, str]:
    fields: dict[str, str] = {}
    text = read_text("/proc/self/status") or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def mountinfo() -> list[dict[str, object]]:
    out = []
    for line in (read_text("/proc/self/mountinfo") or "").splitlines():
        left, _, right = line.partition(" - ")
        lf = left.split()
        rf = right.split()
        out.append({
            "id": lf[0], "root": lf[3], "mountpoint": lf[4], "options": lf[5],
            "optional": lf[6:], "fstype": rf[0] if rf else "",
            "source": rf[1] if len(rf) > 1 else "", "super": rf[2] if len(rf) > 2 else "",
        })
    return out


def processes() -> list[dict[str, object]]:
    procs = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        entry: dict[str, object] = {"pid": int(name)}
        try:
            entry["exe"] = os.readlink(f"/proc/{name}/exe")
        except OSError as e:
            entry["exe"] = err(e)
        raw = read_text(f"/proc/{name}/cmdline")
        entry["cmdline"] = [a[:200] for a in raw.split("\0") if a] if raw else []
        entry["comm"] = (read_text(f"/proc/{name}/comm") or "").strip()
        procs.append(entry)
    return sorted(procs, key=lambda p: p["pid"])  # type: ignore[arg-type, return-value]


# ---------------------------------------------------------------------------
# Checks, one per attack class of SECURITY.md
# ---------------------------------------------------------------------------


def check_1(params: dict) -> dict:  # type: ignore[type-arg]
    """Runtime binary overwrite: visible processes, their exes reopened for write."""
    procs = processes()
    for p in procs:
        pid = p["pid"]
        p["exe_open_write"] = open_for_write(f"/proc/{pid}/exe")
        exe = p["exe"]
        if isinstance(exe, str) and exe.startswith("/") and not exe.endswith("(deleted)"):
            p["exe_path_open_write"] = open_for_write(exe)
    return {"self": os.getpid(), "processes": procs}


def check_2(params: dict) -> dict:  # type: ignore[type-arg]
    """Leaked fds and cwd."""
    fds = dict(_START_FDS)
    # The listing's own directory fd reads as "<gone>" or /proc/<pid>/fd: not a leak.
    own = {k for k, v in fds.items() if v == "<gone>" or v == f"/proc/{os.getpid()}/fd"}
    leaked = {k: v for k, v in fds.items() if k not in ("0", "1", "2") and k not in own}
    # Belt and braces: every fd number below 1024 that fstat accepted at start-up.
    open_numbers = list(_START_FSTAT)
    pid1_fds: dict[str, str] | str
    try:
        pid1_fds = {}
        for name in os.listdir("/proc/1/fd"):
            try:
                pid1_fds[name] = os.readlink(f"/proc/1/fd/{name}")
            except OSError as e:
                pid1_fds[name] = err(e)
    except OSError as e:
        pid1_fds = err(e)
    # Climb ".." from the cwd: inside the root we must arrive at our own "/".
    try:
        cwd_link = os.readlink("/proc/self/cwd")
    except OSError as e:
        cwd_link = err(e)
    try:
        getcwd = os.getcwd()
    except OSError as e:
        getcwd = err(e)
    climbed_to_root = None
    try:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(256):
            nfd = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        st = os.fstat(fd)
        os.close(fd)
        root = os.stat("/")
        climbed_to_root = (st.st_dev, st.st_ino) == (root.st_dev, root.st_ino)
    except OSError as e:
        climbed_to_root = err(e)
    return {
        "fds": fds, "leaked": leaked, "open_numbers": open_numbers,
        "stdio": {n: fds.get(n) for n in ("0", "1", "2")},
        "pid1_fds": pid1_fds,
        "cwd_link": cwd_link, "getcwd": getcwd, "climbed_to_root": climbed_to_root,
        "pid1_cwd": _readlink("/proc/1/cwd"), "pid1_root": _readlink("/proc/1/root"),
    }


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError as e:
        return err(e)


MASKED = ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug",
          "/proc/latency_stats", "/proc/timer_stats", "/proc/acpi", "/proc/scsi"]
HOST_KNOBS = [
    "/proc/sysrq-trigger", "/proc/sys/kernel/core_pattern", "/proc/sys/kernel/modprobe",
    "/proc/sys/kernel/hotplug", "/proc/sys/kernel/panic", "/proc/sys/vm/drop_caches",
    "/proc/sys/kernel/poweroff_cmd", "/proc/sys/fs/binfmt_misc/register",
    "/proc/sys/fs/binfmt_misc/status", "/sys/kernel/uevent_helper",
    "/sys/kernel/mm/transparent_hugepage/enabled", "/sys/power/state",
    "/proc/sys/kernel/ns_last_pid", "/proc/sys/kernel/hostname",
]


def check_4(params: dict) -> dict:  # type: ignore[type-arg]
    """Masked paths hold (also when the image plants symlinks); fresh procfs denied."""
    masked = {p: read_head(p) for p in MASKED}
    knobs = {p: open_for_write(p) for p in HOST_KNOBS}
    dev = {n: lstat_kind(f"/dev/{n}") for n in ("null", "zero", "full", "random", "urandom", "tty")}
    null_write = open_for_write("/dev/null")

    def attempt() -> dict:  # type: ignore[type-arg]
        res: dict[str, str] = {"unshare_mnt": private_mount_ns()}
        target = fresh_dir("proc")
        res["mount_proc"] = try_mount("proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        res["mount_proc_ro"] = try_mount("proc", target, "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        fs = syscall("fsopen", ctypes.c_char_p(b"proc"), 0)
        res["fsopen_proc"] = fs
        res["bind_proc"] = try_mount("/proc", target, None, MS_BIND | MS_REC)
        if res["bind_proc"] == "ok":
            syscall("umount2", ctypes.c_char_p(target.encode()), MNT_DETACH)
        drop_dir(target)
        return res

    return {"masked": masked, "knobs": knobs, "dev": dev, "null_open_write": null_write,
            "mounts": in_child(attempt)}


def check_5(params: dict) -> dict:  # type: ignore[type-arg]
    """Host-wide knobs: open for write (no byte written), and all of /proc/sys."""
    knobs = {p: open_for_write(p) for p in HOST_KNOBS}
    writable = []
    total = 0
    for root, dirs, files in os.walk("/proc/sys"):
        for name in files:
            path = os.path.join(root, name)
            total += 1
            if open_for_write(path) == "ok":
                writable.append(path)
    sysfs_writable = []
    if os.path.isdir("/sys/kernel"):
        for name in ("uevent_helper", "kexec_load", "profiling", "rcu_expedited"):
            if open_for_write(f"/sys/kernel/{name}") == "ok":
                sysfs_writable.append(f"/sys/kernel/{name}")
    proc_sys = [m for m in mountinfo() if m["mountpoint"] == "/proc/sys"]
    return {"knobs": knobs, "proc_sys_files": total, "proc_sys_writable": writable,
            "sysfs_writable": sysfs_writable, "proc_sys_mounts": proc_sys,
            "sys_exists": os.path.exists("/sys")}


def check_6(params: dict) -> dict:  # type: ignore[type-arg]
    """cgroup release_agent and cgroup mounts."""
    agents = []
    for m in mountinfo():
        if m["fstype"] in ("cgroup", "cgroup2"):
            for root, dirs, files in os.walk(str(m["mountpoint"])):
                for name in files:
                    if name in ("release_agent", "notify_on_release", "cgroup.procs"):
                        path = os.path.join(root, name)
                        agents.append({"path": path, "open_write": open_for_write(path)})
    # release_agent files anywhere under /sys (cgroupfs may be mounted elsewhere too)
    for root, dirs, files in os.walk("/sys"):
        if "release_agent" in files:
            path = os.path.join(root, "release_agent")
            if not any(a["path"] == path for a in agents):
                agents.append({"path": path, "open_write": open_for_write(path)})
    cgroup_mounts = [m for m in mountinfo() if m["fstype"] in ("cgroup", "cgroup2")]

    def direct() -> dict:  # type: ignore[type-arg]
        res = {"unshare_mnt": private_mount_ns()}
        target = fresh_dir("cg")
        res["mount_cgroup_v1_memory"] = try_mount("cgroup", target, "cgroup", 0, "memory")
        res["mount_cgroup_v1_named"] = try_mount("cgroup", target, "cgroup", 0, "none,name=siloprobe")
        res["mount_cgroup_v1_rdma"] = try_mount("cgroup", target, "cgroup", 0, "rdma")
        res["mount_cgroup2"] = try_mount("cgroup2", target, "cgroup2", 0, None)
        drop_dir(target)
        return res

    def via_userns() -> dict:  # type: ignore[type-arg]
        res = {"unshare_user": syscall("unshare", CLONE_NEWUSER)}
        res["unshare_user_mnt_cgroup"] = syscall("unshare", CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWCGROUP)
        if res["unshare_user"] == "ok" or res["unshare_user_mnt_cgroup"] == "ok":
            res["unshare_mnt"] = private_mount_ns()
            target = fresh_dir("cgu")
            res["mount_cgroup_v1_named"] = try_mount("cgroup", target, "cgroup", 0, "none,name=siloprobe")
            res["mount_cgroup_v1_memory"] = try_mount("cgroup", target, "cgroup", 0, "memory")
            drop_dir(target)
        return res

    return {"release_agents": agents, "cgroup_mounts": cgroup_mounts,
            "proc_self_cgroup": (read_text("/proc/self/cgroup") or "").splitlines(),
            "direct": in_child(direct), "userns": in_child(via_userns)}


def check_7(params: dict) -> dict:  # type: ignore[type-arg]
    """Terminal injection."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
        os.close(fd)
        dev_tty = "ok"
    except OSError as e:
        dev_tty = err(e)
    stat_fields = (read_text("/proc/self/stat") or "").rsplit(")", 1)[-1].split()
    tty_nr = int(stat_fields[4]) if len(stat_fields) > 4 else None
    sid = os.getsid(0)

    def on_pty() -> dict:  # type: ignore[type-arg]
        res: dict[str, object] = {}
        try:
            master, slave = os.openpty()
        except OSError as e:
            return {"openpty": err(e)}
        res["openpty"] = "ok"
        try:
            os.setsid()
            res["setsid"] = "ok"
        except OSError as e:
            res["setsid"] = err(e)
        res["tiocsctty"] = syscall("ioctl", slave, ctypes.c_ulong(TIOCSCTTY), 0)
        ch = ctypes.c_char(b"x")
        sub = ctypes.c_char(b"\x06")  # TIOCL_GETSHIFTSTATE: harmless even where allowed
        for label, fd in (("slave", slave), ("master", master)):
            res[f"tiocsti_{label}"] = syscall("ioctl", fd, ctypes.c_ulong(TIOCSTI), ctypes.byref(ch))
            res[f"tiocsti_high_{label}"] = syscall(
                "ioctl", fd, ctypes.c_ulong(TIOCSTI | (1 << 32)), ctypes.byref(ch))
            res[f"tiocsti_high63_{label}"] = syscall(
                "ioctl", fd, ctypes.c_ulong(TIOCSTI | (1 << 63)), ctypes.byref(ch))
            res[f"tioclinux_{label}"] = syscall("ioctl", fd, ctypes.c_ulong(TIOCLINUX), ctypes.byref(sub))
            res[f"tioclinux_high_{label}"] = syscall(
                "ioctl", fd, ctypes.c_ulong(TIOCLINUX | (1 << 32)), ctypes.byref(sub))
        # Control: an ordinary tty ioctl on the same fd must work (proves the fd is a tty).
        res["tcgetattr"] = "ok"
        try:
            import termios
            termios.tcgetattr(slave)
        except Exception as e:
            res["tcgetattr"] = repr(e)
        return res

    return {"dev_tty_open": dev_tty, "tty_nr": tty_nr, "sid": sid, "pid": os.getpid(),
            "isatty": [os.isatty(n) for n in (0, 1, 2)], "pty": in_child(on_pty),
            "legacy_tiocsti": (read_text("/proc/sys/dev/tty/legacy_tiocsti") or "").strip()}


CAP_NAMES = (
    "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP "
    "LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK "
    "IPC_OWNER SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN "
    "SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE "
    "AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND "
    "AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE"
).split()


def decode_caps(value: int) -> list[str]:
    return [CAP_NAMES[i] if i < len(CAP_NAMES) else f"CAP{i}" for i in range(64) if value >> i & 1]


def check_8(params: dict) -> dict:  # type: ignore[type-arg]
    """Capabilities and no_new_privs."""
    st = status_fields()
    sets = {}
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        value = int(st.get(key, "0"), 16)
        sets[key] = {"hex": st.get(key), "value": value, "names": decode_caps(value)}
    # Privileged port: needs CAP_NET_BIND_SERVICE (unless the sysctl was lowered).
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 80))
        bind80 = "ok"
    except OSError as e:
        bind80 = err(e)
    finally:
        s.close()
    return {"sets": sets, "net_ns_owner": check_11({})["ns_owner"]["net"],
            "NoNewPrivs": st.get("NoNewPrivs"), "Seccomp": st.get("Seccomp"),
            "Uid": st.get("Uid"), "Gid": st.get("Gid"), "Groups": st.get("Groups"),
            "bind_port_80": bind80,
            "unprivileged_port_start": (read_text("/proc/sys/net/ipv4/ip_unprivileged_port_start") or "").strip()}


def check_9(params: dict) -> dict:  # type: ignore[type-arg]
    """Kernel attack surface: seccomp status and syscalls called with bad arguments.

    Every call below would fail with EFAULT/EINVAL/EBADF from the kernel itself
    (NULL pointers, bad fds); EPERM or ENOSYS means the filter refused it first.
    """
    st = status_fields()
    null = ctypes.c_void_p(0)

    def attempts() -> dict:  # type: ignore[type-arg]
        res: dict[str, str] = {}
        # Controls: harmless calls that any sane filter allows, so that the refusals
        # below are specific and not "everything fails".
        buf = ctypes.create_string_buffer(16)
        res["control_getrandom"] = syscall("getrandom", buf, 16, 0)
        res["control_getpid"] = syscall("getpid")
        res["unshare_newuser"] = syscall("unshare", CLONE_NEWUSER)
        res["unshare_newns"] = syscall("unshare", CLONE_NEWNS)
        res["unshare_newnet"] = syscall("unshare", CLONE_NEWNET)
        res["unshare_newpid"] = syscall("unshare", CLONE_NEWPID)
        res["unshare_newcgroup"] = syscall("unshare", CLONE_NEWCGROUP)
        res["unshare_newtime"] = syscall("unshare", CLONE_NEWTIME)
        res["bpf"] = syscall("bpf", 5, null, 0)  # BPF_PROG_LOAD with a NULL attr
        res["userfaultfd"] = syscall("userfaultfd", 0x7FFFFFFF)  # invalid flags
        res["perf_event_open"] = syscall("perf_event_open", null, 0, -1, -1, 0)
        res["io_uring_setup"] = syscall("io_uring_setup", 1, null)
        res["keyctl"] = syscall("keyctl", 0, -1, 0)  # KEYCTL_GET_KEYRING_ID of a bad id
        res["add_key"] = syscall("add_key", null, null, null, 0, 0)
        res["request_key"] = syscall("request_key", null, null, null, 0)
        res["fsopen"] = syscall("fsopen", null, 0)
        res["open_tree"] = syscall("open_tree", -1, null, 0)
        res["move_mount"] = syscall("move_mount", -1, null, -1, null, 0)
        res["fsmount"] = syscall("fsmount", -1, 0, 0)
        res["syslog_read_all"] = syscall("syslog", 3, null, 0)
        res["init_module"] = syscall("init_module", null, 0, null)
        res["finit_module"] = syscall("finit_module", -1, null, 0)
        res["delete_module"] = syscall("delete_module", null, 0)
        res["kexec_load"] = syscall("kexec_load", 0, 0, null, 0)
        res["kexec_file_load"] = syscall("kexec_file_load", -1, -1, 0, null, 0)
        res["clock_settime"] = syscall("clock_settime", 0, null)
        res["settimeofday"] = syscall("settimeofday", null, null)
        res["open_by_handle_at"] = syscall("open_by_handle_at", -1, null, 0)
        res["setns"] = syscall("setns", -1, 0)
        res["pivot_root"] = syscall("pivot_root", null, null)
        res["mount"] = syscall("mount", null, null, null, 0, null)
        res["swapon"] = syscall("swapon", null, 0)
        res["acct"] = syscall("acct", ctypes.c_char_p(b"/nonexistent/silo-probe"))
        res["reboot"] = syscall("reboot", 0, 0, 0, null)  # bad magic: EINVAL from the kernel
        if MACHINE == "x86_64":
            res["iopl"] = syscall("iopl", 4)  # level 4 is invalid: EINVAL from the kernel
            res["ioperm"] = syscall("ioperm", 0, 0, 1)
        return res

    return {"Seccomp": st.get("Seccomp"), "Seccomp_filters": st.get("Seccomp_filters"),
            "NoNewPrivs": st.get("NoNewPrivs"), "machine": MACHINE, "calls": in_child(attempts)}


ALLOWED_DEV = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8),
               "urandom": (1, 9), "tty": (5, 0)}
FORBIDDEN_DEV = ["/dev/mem", "/dev/kmem", "/dev/port", "/dev/kmsg", "/dev/kvm", "/dev/vda",
                 "/dev/sda", "/dev/nvme0n1", "/dev/loop0", "/dev/loop-control", "/dev/fuse",
                 "/dev/net/tun", "/dev/console", "/dev/tty0", "/dev/tty1", "/dev/ttyS0",
                 "/dev/vsock", "/dev/vhost-vsock", "/dev/vhost-net", "/dev/userfaultfd",
                 "/dev/cpu/0/msr", "/dev/hwrng", "/dev/btrfs-control", "/dev/zram0",
                 "/dev/dri", "/dev/snd", "/dev/input", "/dev/mqueue", "/dev/autofs",
                 "/dev/cpu_dma_latency", "/dev/vga_arbiter", "/dev/hpet", "/dev/rtc0"]


def check_10(params: dict) -> dict:  # type: ignore[type-arg]
    """Devices: what /dev holds, forbidden nodes absent, mknod refused."""
    entries = {}
    try:
        for name in sorted(os.listdir("/dev")):
            entries[name] = lstat_kind(f"/dev/{name}")
    except OSError as e:
        entries = {"error": err(e)}  # type: ignore[dict-item]
    forbidden = {p: open_for_read(p) for p in FORBIDDEN_DEV}
    mounts = {m["mountpoint"]: m for m in mountinfo() if str(m["mountpoint"]).startswith("/dev")}

    def attempt() -> dict:  # type: ignore[type-arg]
        res: dict[str, str] = {}
        d = fresh_dir("mknod")
        for label, kind, dev in (("blk_loop0", stat.S_IFBLK, os.makedev(7, 0)),
                                 ("blk_vda", stat.S_IFBLK, os.makedev(254, 0)),
                                 ("chr_mem", stat.S_IFCHR, os.makedev(1, 1)),
                                 ("chr_kmsg", stat.S_IFCHR, os.makedev(1, 11))):
            path = os.path.join(d, label)
            try:
                os.mknod(path, kind | 0o600, dev)
                res[f"mknod_{label}"] = "ok"
                res[f"open_{label}"] = open_for_read(path)
                os.unlink(path)
            except OSError as e:
                res[f"mknod_{label}"] = err(e)
        drop_dir(d)
        return res

    return {"entries": entries, "pts_at_start": _START_PTS, "forbidden_open": forbidden,
            "dev_mounts": mounts, "mknod": in_child(attempt),
            "shm": listdir("/dev/shm")}


def check_11(params: dict) -> dict:  # type: ignore[type-arg]
    """Host namespaces: processes, PID 1, abstract sockets, interfaces, hostname, IPC."""
    procs = processes()
    ns = {}
    for name in ("pid", "net", "ipc", "uts", "cgroup", "mnt", "user", "time"):
        ns[name] = _readlink(f"/proc/self/ns/{name}")
    # Which user namespace owns each namespace: "own" (the sandbox's), or EPERM when the
    # owner is outside (an ancestor, e.g. the host's): capabilities inside do not count there.
    owners = {}
    try:
        own_user = os.stat("/proc/self/ns/user").st_ino
    except OSError:
        own_user = None
    for name in ("net", "ipc", "uts", "pid", "cgroup", "mnt"):
        try:
            fd = os.open(f"/proc/self/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            owners[name] = err(e)
            continue
        rc, e = syscall_rc("ioctl", fd, ctypes.c_ulong(NS_GET_USERNS), 0)
        os.close(fd)
        if rc >= 0:
            owners[name] = "own" if os.fstat(rc).st_ino == own_user else "other"
            os.close(rc)
        else:
            owners[name] = e
    unix = _START_UNIX
    ifaces = sorted(line.split(":", 1)[0].strip()
                    for line in (read_text("/proc/net/dev") or "").splitlines()[2:])
    try:
        if_names = sorted(n for _, n in socket.if_nameindex())
    except OSError as e:
        if_names = [err(e)]
    sysvipc = {}
    for kind in ("shm", "msg", "sem"):
        text = read_text(f"/proc/sysvipc/{kind}")
        sysvipc[kind] = None if text is None else len(text.splitlines()[1:])
    return {"processes": procs, "count": len(procs), "self": os.getpid(), "ns": ns,
            "ns_owner": owners,
            "unix_sockets": unix, "interfaces": ifaces, "if_nameindex": if_names,
            "routes": (read_text("/proc/net/route") or "").splitlines()[1:],
            "hostname": socket.gethostname(), "uname_nodename": os.uname().nodename,
            "sysvipc": sysvipc, "mqueue": lstat_kind("/dev/mqueue")}


SCAN_SKIP = ("/proc", "/sys", "/dev")


def scan_tree(limit: int = 600000) -> dict:  # type: ignore[type-arg]
    """Walk the visible tree (not /proc, /sys, /dev): sockets, devices, fifos, setuid files."""
    found: dict[str, list[str]] = {"sock": [], "chr": [], "blk": [], "fifo": [], "setuid": []}
    count = 0
    stack = ["/"]
    truncated = False
    while stack:
        top = stack.pop()
        try:
            it = os.scandir(top)
        except OSError:
            continue
        with it:
            for e in it:
                count += 1
                if count > limit:
                    truncated = True
                    break
                path = e.path
                try:
                    if e.is_dir(follow_symlinks=False):
                        if path not in SCAN_SKIP:
                            stack.append(path)
                        continue
                    if e.is_symlink():
                        continue
                    if e.is_file(follow_symlinks=False):
                        # setuid bits matter only with privileges, NoNewPrivs defeats them
                        continue
                    mode = e.stat(follow_symlinks=False).st_mode
                except OSError:
                    continue
                if stat.S_ISSOCK(mode):
                    found["sock"].append(path)
                elif stat.S_ISCHR(mode):
                    found["chr"].append(path)
                elif stat.S_ISBLK(mode):
                    found["blk"].append(path)
                elif stat.S_ISFIFO(mode):
                    found["fifo"].append(path)
        if truncated:
            break
    return {"entries": count, "truncated": truncated,
            **{k: v[:200] for k, v in found.items()}}


def check_12(params: dict) -> dict:  # type: ignore[type-arg]
    """Sockets of the host: none in the tree, none reachable by path or abstract name."""
    connects = {}
    for path in params.get("unix_paths", []):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.connect(path)
            connects[path] = "ok"
        except OSError as e:
            connects[path] = err(e)
        finally:
            s.close()
    abstract = {}
    for name in params.get("abstract_names", []):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.connect("\0" + name)
            abstract[name] = "ok"
        except OSError as e:
            abstract[name] = err(e)
        finally:
            s.close()
    return {"scan": scan_tree(), "run": listdir("/run"), "var_run": listdir("/var/run"),
            "connect_paths": connects, "connect_abstract": abstract,
            "unix_sockets": _START_UNIX}


def check_14(params: dict) -> dict:  # type: ignore[type-arg]
    """Information leaks."""
    masked = {p: read_head(p) for p in MASKED}
    kallsyms: dict[str, object]
    try:
        with open("/proc/kallsyms") as f:
            lines = f.readlines()
        nonzero = [ln for ln in lines if ln.split(" ", 1)[0].strip("0")]
        kallsyms = {"open": "ok", "lines": len(lines), "nonzero": len(nonzero),
                    "sample": nonzero[:3]}
    except OSError as e:
        kallsyms = {"open": err(e)}
    modules: dict[str, object]
    try:
        with open("/proc/modules") as f:
            mlines = f.readlines()
        maddr = [ln for ln in mlines if ln.split()[-1].startswith("0x") and ln.split()[-1].strip("0x")]
        modules = {"open": "ok", "lines": len(mlines), "nonzero": len(maddr)}
    except OSError as e:
        modules = {"open": err(e)}
    sysdirs = {p: listdir(p) for p in ("/sys/firmware", "/sys/kernel/debug", "/sys/kernel/security",
                                       "/sys/fs/bpf", "/sys/kernel/tracing")}
    buf = ctypes.create_string_buffer(4096)
    syslog = {
        "read_all": syscall("syslog", 3, buf, 4096),
        "size_buffer": syscall("syslog", 10, ctypes.c_void_p(0), 0),
    }
    kmsg_open = open_for_read("/proc/kmsg")  # open only: never read (it would consume)
    dev_kmsg = open_for_read("/dev/kmsg")
    info = read_text("/proc/self/mountinfo") or ""
    return {"masked": masked, "kallsyms": kallsyms, "modules": modules, "sys": sysdirs,
            "syslog": syslog, "proc_kmsg_open": kmsg_open, "dev_kmsg_open": dev_kmsg,
            "mountinfo": info.splitlines()}


def check_15(params: dict) -> dict:  # type: ignore[type-arg]
    """Mount propagation: no shared peer groups; mounting anything is denied."""
    infos = mountinfo()
    shared = [m for m in infos if any(str(o).startswith("shared:") for o in m["optional"])]  # type: ignore[attr-defined]
    marker = params.get("marker", "x")

    def attempt() -> dict:  # type: ignore[type-arg]
        # On a host this contains everything below; inside a sandbox it must be refused.
        res: dict[str, str] = {"unshare_mnt_first": private_mount_ns()}
        target = f"/tmp/silo-probe-mnt-{marker}"
        try:
            os.makedirs(target, exist_ok=True)
        except OSError as e:
            res["mkdir_target"] = err(e)
            target = "/tmp" if os.path.isdir("/tmp") else "/"
        res["mount_tmpfs"] = try_mount("tmpfs", target, "tmpfs", 0, "size=1m")
        res["make_shared_root"] = syscall("mount", None, ctypes.c_char_p(b"/"), None,
                                          ctypes.c_ulong(MS_SHARED | MS_REC), None)
        res["remount_root_rw"] = syscall("mount", None, ctypes.c_char_p(b"/"), None,
                                         ctypes.c_ulong(MS_REMOUNT | MS_BIND), None)
        res["remount_proc_sys_rw"] = syscall("mount", None, ctypes.c_char_p(b"/proc/sys"), None,
                                             ctypes.c_ulong(MS_REMOUNT | MS_BIND), None)
        res["umount_proc_sys"] = syscall("umount2", ctypes.c_char_p(b"/proc/sys"), MNT_DETACH)
        res["umount_proc_kcore_mask"] = syscall("umount2", ctypes.c_char_p(b"/proc/timer_list"), MNT_DETACH)
        res["fsopen_tmpfs"] = syscall("fsopen", ctypes.c_char_p(b"tmpfs"), 0)
        drop_dir(target)
        return res

    return {"shared": shared, "mounts": len(infos), "attempts": in_child(attempt)}


def check_16(params: dict) -> dict:  # type: ignore[type-arg]
    """uid mapping: maps, ownership seen inside, writes to a root-owned bound file."""
    res: dict[str, object] = {
        "uid_map": (read_text("/proc/self/uid_map") or "").splitlines(),
        "gid_map": (read_text("/proc/self/gid_map") or "").splitlines(),
        "setgroups": (read_text("/proc/self/setgroups") or "").strip(),
        "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid()],
    }
    target = params.get("root_file")
    if target:
        res["root_file_stat"] = lstat_kind(target)
        res["root_file_open_write"] = open_for_write(target)
        try:
            fd = os.open(target, os.O_RDWR | os.O_CLOEXEC)
            os.close(fd)
            res["root_file_open_rdwr"] = "ok"
        except OSError as e:
            res["root_file_open_rdwr"] = err(e)
        try:
            os.chmod(target, 0o666)
            res["root_file_chmod"] = "ok"
        except OSError as e:
            res["root_file_chmod"] = err(e)
        try:
            os.chown(target, 0, 0)
            res["root_file_chown"] = "ok"
        except OSError as e:
            res["root_file_chown"] = err(e)
        sibling = os.path.join(os.path.dirname(target), "silo-probe-new")
        try:
            fd = os.open(sibling, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            res["root_dir_create"] = "ok"
        except OSError as e:
            res["root_dir_create"] = err(e)
    created = params.get("create_in")
    if created:
        path = os.path.join(created, "made-by-sandbox")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.close(fd)
            res["create"] = "ok"
        except OSError as e:
            res["create"] = err(e)
    return res


SENSITIVE = ["/root/.ssh", "/root/.aws", "/root/.bash_history", "/root/.gnupg", "/root/.config",
             "/root/.pyenv", "/home", "/run/secrets", "/var/run/secrets", "/etc/shadow",
             "/etc/gshadow", "/etc/shadow-", "/etc/sudoers", "/etc/ssh/ssh_host_rsa_key",
             "/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/ssh_host_ecdsa_key", "/work",
             "/var/lib", "/var/log", "/srv", "/opt", "/mnt", "/media", "/boot", "/old_root"]


def check_17(params: dict) -> dict:  # type: ignore[type-arg]
    """Environment and credentials of the host."""
    compare = {}
    for path in params.get("host_dirs", []):
        compare[path] = listdir(path)
    pid1_env = read_text("/proc/1/environ")
    return {
        "environ": dict(os.environ),
        "pid1_environ": None if pid1_env is None else [e.split("=", 1)[0] for e in pid1_env.split("\0") if e],
        "sensitive": {p: os.path.lexists(p) for p in SENSITIVE},
        "listings": compare,
        "top": listdir("/"),
        "passwd": (read_text("/etc/passwd") or "").splitlines(),
    }


# ---------------------------------------------------------------------------
# Class 18: resource exhaustion actions
# ---------------------------------------------------------------------------


def act_forkbomb(params: dict) -> dict:  # type: ignore[type-arg]
    """Fork until refused (bounded by params["max"]); children sleep, then die with us."""
    limit = int(params.get("max", 1000))
    children = []
    error = "ok"
    for _ in range(limit):
        try:
            pid = os.fork()
        except OSError as e:
            error = err(e)
            break
        if pid == 0:
            try:
                time.sleep(float(params.get("child_sleep", 30)))
            finally:
                os._exit(0)
        children.append(pid)
    result = {"forked": len(children), "error": error}
    sys.stdout.write(json.dumps({"forkbomb": result}) + "\n")
    sys.stdout.flush()
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for pid in children:
        try:
            os.waitpid(pid, 0)
        except OSError:
            pass
    return result


def act_balloon(params: dict) -> dict:  # type: ignore[type-arg]
    """Allocate and touch memory up to params["max_mb"] (bounded even without a limit)."""
    max_mb = int(params.get("max_mb", 512))
    chunks = []
    for _ in range(max_mb // 8):
        chunks.append(bytearray(8 << 20))  # zero-filled, so every page is touched
        for i in range(0, 8 << 20, 4096):
            chunks[-1][i] = 1
    return {"allocated_mb": len(chunks) * 8}


def act_fill(params: dict) -> dict:  # type: ignore[type-arg]
    """Fill params["dir"] with 1 MiB writes until refused or params["max_mb"]."""
    directory = params.get("dir", "/tmp")
    max_mb = int(params.get("max_mb", 4096))
    block = b"\xa5" * (1 << 20)
    written = 0
    error = "ok"
    paths = []
    try:
        for n in range(max_mb // 256 + 1):
            path = os.path.join(directory, f"silo-probe-fill-{n}")
            paths.append(path)
            with open(path, "wb", buffering=0) as f:
                for _ in range(256):
                    if written >= max_mb << 20:
                        raise StopIteration
                    written += f.write(block)
    except StopIteration:
        pass
    except OSError as e:
        error = err(e)
    statvfs = os.statvfs(directory)
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass
    return {"dir": directory, "written": written, "error": error,
            "fs_size": statvfs.f_blocks * statvfs.f_frsize}


def act_flood(params: dict) -> None:
    """Write params["mb"] MiB to stdout as fast as possible."""
    block = memoryview(b"F" * (1 << 20))
    try:
        for _ in range(int(params.get("mb", 256))):
            done = 0
            while done < len(block):  # a pipe may take less than asked (gVisor's host fds do)
                done += os.write(1, block[done:])
    except OSError:
        pass


def act_fdexhaust(params: dict) -> dict:  # type: ignore[type-arg]
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fds = []
    error = "ok"
    cap = int(params.get("max", 2_000_000))
    try:
        while len(fds) < cap:
            fds.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as e:
        error = err(e)
    first = len(fds)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        raise_soft = "ok"
    except (OSError, ValueError) as e:
        raise_soft = repr(e)
    error2 = "ok"
    try:
        while len(fds) < cap:
            fds.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as e:
        error2 = err(e)
    # Raising the hard limit: through libc, since Python turns EPERM into ValueError.
    class Rlimit(ctypes.Structure):
        _fields_ = [("cur", ctypes.c_ulong), ("max", ctypes.c_ulong)]

    ctypes.set_errno(0)
    rc = LIBC.setrlimit(resource.RLIMIT_NOFILE, ctypes.byref(Rlimit(hard + 1, hard + 1)))
    raise_hard = "ok" if rc == 0 else ename(ctypes.get_errno())
    total = len(fds)
    for fd in fds:
        os.close(fd)
    return {"soft": soft, "hard": hard, "opened_at_soft": first, "error_at_soft": error,
            "raise_soft": raise_soft, "opened_at_hard": total, "error_at_hard": error2,
            "raise_hard": raise_hard,
            "nr_open": (read_text("/proc/sys/fs/nr_open") or "").strip()}


def act_spin(params: dict) -> None:
    sys.stdout.write("spinning\n")
    sys.stdout.flush()
    while True:
        pass


def act_create(params: dict) -> dict:  # type: ignore[type-arg]
    """Create the new (not existing) files params["paths"]: used to show writes stay inside."""
    out = {}
    for path in params.get("paths", []):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.close(fd)
            out[path] = "ok"
        except OSError as e:
            out[path] = err(e)
    return out


def act_tree(params: dict) -> dict:  # type: ignore[type-arg]
    return scan_tree()


CHECKS = {
    "1": check_1, "2": check_2, "4": check_4, "5": check_5, "6": check_6, "7": check_7,
    "8": check_8, "9": check_9, "10": check_10, "11": check_11, "12": check_12,
    "14": check_14, "15": check_15, "16": check_16, "17": check_17,
    "forkbomb": act_forkbomb, "balloon": act_balloon, "fill": act_fill, "flood": act_flood,
    "fdexhaust": act_fdexhaust, "spin": act_spin, "create": act_create, "tree": act_tree,
}


def main(argv: list[str]) -> int:
    params: dict = {}  # type: ignore[type-arg]
    names = []
    it = iter(argv)
    for arg in it:
        if arg == "--params":
            params = json.loads(next(it))
        else:
            names.append(arg)
    unknown = [n for n in names if n not in CHECKS]
    if not names or unknown:
        sys.stderr.write(f"usage: probe.py [--params JSON] CHECK...; unknown {unknown}; "
                         f"checks: {' '.join(CHECKS)}\n")
        return 2
    if names == ["flood"]:
        act_flood(params)
        return 0
    if names == ["forkbomb"]:  # prints its own findings before cleaning up its children
        act_forkbomb(params)
        return 0
    out: dict[str, object] = {}
    for name in names:
        try:
            out[name] = CHECKS[name](params)
        except Exception as e:
            out[name] = {"probe_exception": repr(e)}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
