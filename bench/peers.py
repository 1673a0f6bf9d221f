"""The peers silo is measured against, each as a ready-to-spawn command.

Every builder returns a :class:`Command` (argv, optional cleanup) or raises
:class:`Unavailable` when the tool is not installed. Isolation is kept comparable
to silo's ``process`` level: private namespaces, the host's ``/usr`` read-only,
a fresh ``/proc``, a minimal ``/dev``, a private ``/tmp``, no capabilities.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# The top-level entries that hold the host's system (usr-merged or not).
SYSTEM_ENTRIES = ("bin", "lib", "lib32", "lib64", "libx32", "sbin")
# Small, non-secret /etc files a dynamically linked program may read.
ETC_FILES = ("passwd", "group", "hosts", "resolv.conf", "nsswitch.conf", "ld.so.cache")


class Unavailable(Exception):
    """The tool is not installed on this machine."""


@dataclass
class Command:
    """A command to spawn once per measured run."""

    argv: list[str]
    # The argv for run number i (runc/runsc need a fresh container id per run).
    per_run: Callable[[int], list[str]] | None = None
    cleanup: Callable[[], None] = field(default=lambda: None)

    def for_run(self, i: int) -> list[str]:
        return self.per_run(i) if self.per_run else self.argv


def which(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise Unavailable(f"{tool} is not installed")
    return path


def version(tool: str, *args: str) -> str:
    """First line of ``tool --version``, or ``not installed``."""
    path = shutil.which(tool)
    if path is None:
        return "not installed"
    try:
        out = subprocess.run(
            [path, *(args or ("--version",))], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def plain_true() -> Command:
    return Command(["/bin/true" if os.path.exists("/bin/true") else which("true")])


def bwrap() -> Command:
    """bubblewrap with the isolation the issue names as the peer."""
    argv = [
        which("bwrap"),
        "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
        "--ro-bind", "/usr", "/usr",
    ]
    for name in SYSTEM_ENTRIES:
        host = Path("/") / name
        if host.is_symlink():
            argv += ["--symlink", os.readlink(host), str(host)]
        elif host.is_dir():
            argv += ["--ro-bind", str(host), str(host)]
    for name in ETC_FILES:
        if (Path("/etc") / name).exists():
            argv += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "/bin/true"]
    return Command(argv)


def firejail() -> Command:
    return Command([which("firejail"), "--quiet", "--noprofile", "/bin/true"])


def make_oci_bundle(where: Path) -> Path:
    """An OCI bundle whose rootfs is empty dirs; /usr comes in as a read-only bind."""
    bundle = where / "bundle"
    rootfs = bundle / "rootfs"
    for d in ("usr", "proc", "dev", "tmp", "etc"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    mounts: list[dict[str, object]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/usr", "type": "bind", "source": "/usr",
         "options": ["rbind", "ro", "nosuid", "nodev"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=1777"]},
    ]
    for name in SYSTEM_ENTRIES:
        host = Path("/") / name
        if host.is_symlink():
            (rootfs / name).symlink_to(os.readlink(host))
        elif host.is_dir():
            (rootfs / name).mkdir()
            mounts.append({"destination": str(host), "type": "bind", "source": str(host),
                           "options": ["rbind", "ro", "nosuid", "nodev"]})
    for name in ETC_FILES:
        if (Path("/etc") / name).exists():
            (rootfs / "etc" / name).touch()
            mounts.append({"destination": f"/etc/{name}", "type": "bind",
                           "source": f"/etc/{name}", "options": ["bind", "ro"]})
    no_caps: dict[str, list[str]] = {
        k: [] for k in ("bounding", "effective", "permitted", "inheritable", "ambient")
    }
    config = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": ["/bin/true"],
            "env": ["PATH=/usr/bin:/bin"],
            "cwd": "/",
            "capabilities": no_caps,
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "bench",
        "mounts": mounts,
        "linux": {
            "namespaces": [
                {"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")
            ],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list",
                            "/proc/sched_debug", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        },
    }
    (bundle / "config.json").write_text(json.dumps(config, indent=1))
    return bundle


def _oci(tool: str, extra: list[str]) -> Command:
    exe = which(tool)
    tmp = Path(tempfile.mkdtemp(prefix=f"silo-bench-{tool}-"))
    try:
        bundle = make_oci_bundle(tmp)
        state = tmp / "state"
        state.mkdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prefix = f"bench-{os.getpid()}"

    def per_run(i: int) -> list[str]:
        return [exe, "--root", str(state), *extra, "run", "--bundle", str(bundle), f"{prefix}-{i}"]

    return Command(per_run(0), per_run=per_run,
                   cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True))


def runc() -> Command:
    return _oci("runc", [])


def runsc() -> Command:
    """gVisor on the same bundle; the platform is runsc's default (ptrace here)."""
    return _oci("runsc", ["--network=none"])
