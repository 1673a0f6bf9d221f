"""gVisor's ``runsc``: the platform it runs on and the OCI bundle of a plan.

A gvisor-level sandbox is ``runsc run`` of a bundle silo writes itself, run by the
spawner like any plan (see the planner's ``_plan_gvisor``): in a mount and pid
namespace of its own, where a size-limited tmpfs holds the bundle, runsc's state
(``--root``) and the writable upper layers of the root and the host's system
directories. runsc's gofer serves those overlays, so the workload may write
anywhere a process-level sandbox may, and every write lands in that tmpfs: nothing
of the host's (nor silo's shared skeleton) is writable through runsc, and nothing
outlives the namespace -- no state files, no mounts, no global runsc configuration.

The platform is chosen by a probe, cached per runsc binary and host kernel:
``systrap`` or ``kvm`` where the installed runsc has them and a sandbox actually runs
on them within :data:`PROBE_TIMEOUT` (``/dev/kvm`` may exist on a host whose guests
hang), ``ptrace`` otherwise. ``SILO_GVISOR_PLATFORM`` overrides it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform as hostplatform
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from typing import Any

from silo.model.errors import NotFoundError
from silo.sys import cachefile

RUNSC = "/usr/bin/runsc"
PLATFORMS = ("systrap", "kvm", "ptrace")  # preferred first; ptrace always works
PROBE_TIMEOUT = 5.0  # a sandbox of /bin/true starts in ~0.2 s where the platform works
CONTAINER = "silo"  # the container's id: runsc's state is private to each sandbox


def runsc() -> str:
    path = RUNSC if os.access(RUNSC, os.X_OK) else shutil.which("runsc")
    if not path:
        raise NotFoundError("runsc (gVisor) is not installed: apt-get install runsc, or use --isolation process")
    return path


def _key(exe: str) -> str:
    st = os.stat(exe)
    raw = f"{exe}\0{st.st_size}\0{st.st_mtime_ns}\0{hostplatform.release()}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def probe(exe: str, name: str, skeleton: str) -> bool:
    """Whether a sandbox of ``/bin/true`` runs on platform ``name`` within the timeout."""
    with tempfile.TemporaryDirectory(prefix="silo-runsc-probe-") as tmp:
        os.mkdir(os.path.join(tmp, "state"))
        process = {"user": {"uid": 0, "gid": 0}, "args": ["/bin/true"], "env": ["PATH=/usr/bin:/bin"],
                   "cwd": "/", "noNewPrivileges": True}
        mounts = [{"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]}]
        spec = bundle(process, skeleton, mounts, "probe", readonly=True)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(spec, f)
        argv = [exe, "--root", os.path.join(tmp, "state"), "--network=none", "--ignore-cgroups",
                f"--platform={name}", "run", "--bundle", tmp, "probe"]
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError:
            return False
        try:
            return proc.wait(PROBE_TIMEOUT) == 0
        except subprocess.TimeoutExpired:
            return False
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            # a sandbox cut short leaves its processes in runsc's state: end them
            subprocess.run([exe, "--root", os.path.join(tmp, "state"), "delete", "--force", "probe"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           check=False, timeout=10)


def choose(cache_dir: str, skeleton: str) -> str:
    """The platform runsc runs sandboxes on here, probing once and caching the verdict."""
    forced = os.environ.get("SILO_GVISOR_PLATFORM")
    if forced in PLATFORMS:
        return forced
    exe = runsc()
    path = os.path.join(cache_dir, "gvisor", f"platform-{_key(exe)}.json")
    return cachefile.verdict(path, "platform", PLATFORMS,
                             lambda: next((name for name in PLATFORMS[:-1] if probe(exe, name, skeleton)),
                                          PLATFORMS[-1]))


def bundle(process: dict[str, Any], root: str, mounts: Sequence[dict[str, Any]], hostname: str, *,
           readonly: bool = False, rlimits: Sequence[tuple[str, int, int]] = ()) -> dict[str, Any]:
    """The ``config.json`` of a bundle whose root is ``root``: its own pid, network,
    ipc, uts and mount namespaces (gVisor's, in the Sentry), a fresh ``/proc`` and
    ``/tmp``, no capabilities unless ``process`` names some."""
    process = dict(process)
    process.setdefault("capabilities", {k: [] for k in ("bounding", "effective", "permitted", "inheritable",
                                                       "ambient")})
    if rlimits:
        process["rlimits"] = [{"type": f"RLIMIT_{name.upper()}", "soft": soft, "hard": hard}
                              for name, soft, hard in rlimits]
    return {
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": root, "readonly": readonly},
        "hostname": hostname,
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["mode=1777"]},
                   *mounts],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")]},
    }


def argv(exe: str, state: str, bundle_dir: str, platform: str) -> tuple[str, ...]:
    """``runsc run`` of the bundle: its state in ``state``, no network but loopback,
    cgroups left to silo (the sandbox's own), no host unix sockets."""
    return (exe, "--root", state, "--network=none", "--ignore-cgroups", f"--platform={platform}",
            "run", "--bundle", bundle_dir, CONTAINER)
