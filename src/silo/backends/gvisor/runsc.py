"""gVisor's ``runsc``: the platform it runs on, the OCI bundle of a plan, and the
command lines that run, exec into and signal a sandbox.

A gvisor-level sandbox is ``runsc run`` of a bundle silo writes itself, run by the
spawner like any plan (see the planner's ``_plan_gvisor``): as the root of the
sandbox's user namespace (silo's id range), in mount, pid and network namespaces of
its own, where a size-limited tmpfs holds the bundle and runsc's state (``--root``).
runsc's gofer serves the same overlays a process-level sandbox pivots into, so the
workload writes where a process-level one would, with the same ids on the host, and
nothing outlives the namespaces: no state files, no mounts, no global runsc
configuration, no control socket in the host's network namespace.

A workspace's sandbox runs silo-init (``--idle``, from silo's read-only top layer:
:func:`layer`) as the container's PID 1; each command joins it with ``runsc
exec`` (:func:`exec_argv`), and is signalled with ``runsc kill --pid`` (:func:`kill_argv`).
With ``-t`` a one-shot run's runsc makes the pty itself (``--console-socket``: silo-init
takes the master, see :func:`argv`); an exec's is silo-setup's, as at the process level.

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
INIT_PATH = "/.silo/init"  # a workspace's PID 1 inside, in silo's layer (see layer())
INIT_ARGV = (INIT_PATH, "--idle", "-1")
STATE_FILE = f"{CONTAINER}_sandbox:{CONTAINER}.state"  # runsc's record of the container, in --root


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


def _verdict_path(cache_dir: str, exe: str) -> str:
    return os.path.join(cache_dir, "gvisor", f"platform-{_key(exe)}.json")


def known(cache_dir: str) -> str | None:
    """The platform :func:`choose` would pick, without probing: the override or the
    cached verdict; None before the first probe (or without runsc)."""
    forced = os.environ.get("SILO_GVISOR_PLATFORM")
    if forced in PLATFORMS:
        return forced
    try:
        exe = runsc()
        return cachefile.cached(_verdict_path(cache_dir, exe), "platform", PLATFORMS)
    except (NotFoundError, OSError):
        return None


def choose(cache_dir: str, skeleton: str) -> str:
    """The platform runsc runs sandboxes on here, probing once and caching the verdict."""
    forced = os.environ.get("SILO_GVISOR_PLATFORM")
    if forced in PLATFORMS:
        return forced
    exe = runsc()
    return cachefile.verdict(_verdict_path(cache_dir, exe), "platform", PLATFORMS,
                             lambda: next((name for name in PLATFORMS[:-1] if probe(exe, name, skeleton)),
                                          PLATFORMS[-1]))


def bundle(process: dict[str, Any], root: str, mounts: Sequence[dict[str, Any]], hostname: str, *,
           readonly: bool = False, rlimits: Sequence[tuple[str, int, int]] = (),
           network: bool = False) -> dict[str, Any]:
    """The ``config.json`` of a bundle whose root is ``root``: its own pid, network,
    ipc, uts and mount namespaces (gVisor's, in the Sentry), a fresh ``/proc``, no
    capabilities unless ``process`` names some. With ``network`` the sandbox's process
    stays in runsc's own network namespace, whose links its netstack takes over."""
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
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}, *mounts],
        "linux": {"namespaces": [{"type": t, **({"path": "/proc/self/ns/net"} if t == "network" and network else {})}
                                 for t in ("pid", "network", "ipc", "uts", "mount")]},
    }


def argv(exe: str, state: str, bundle_dir: str, platform: str, network: bool = False,
         restore: str | None = None, console: str | None = None) -> tuple[str, ...]:
    """``runsc run`` of the bundle: its state in ``state``, cgroups left to silo (the
    sandbox's own), no host unix sockets; no network but loopback, or with ``network``
    runsc's netstack on the links of the namespace it runs in (``eth0``, which silo's
    keeper links to the policy's namespace: silo.net.keeper). With ``restore`` (the
    directory of a :func:`checkpoint_argv` image) it is ``runsc restore`` of that image:
    the bundle's container with the processes the image saved. With ``console`` (a
    bundle whose process has ``terminal``) runsc makes the container's pty and hands
    its master over that unix socket; the sandbox is the pty's session leader, and
    passes the terminal's signals (ctrl-C) to the container's foreground group."""
    verb = ("restore", "--image-path", restore) if restore is not None else ("run",)
    if console is not None:
        verb = (*verb, "--console-socket", console)
    return (exe, "--root", state, f"--network={'sandbox' if network else 'none'}", "--ignore-cgroups",
            f"--platform={platform}", *verb, "--bundle", bundle_dir, CONTAINER)


def checkpoint_argv(run_argv: Sequence[str], image: str) -> tuple[str, ...]:
    """``runsc checkpoint`` of the sandbox that ``run_argv`` started: its processes'
    state goes to ``image``/checkpoint.img, and the sandbox ends."""
    return (*global_flags(run_argv), "checkpoint", "--image-path", image, CONTAINER)


NET_TCP = ("/proc/net/tcp", "/proc/net/tcp6")  # the Sentry's own tables, read by open_connections
_LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def open_connections(tables: bytes) -> int:
    """TCP connections in the Sentry's ``/proc/net/tcp`` and ``tcp6`` (``tables``, as
    ``cat`` gives them) that ``runsc checkpoint`` would refuse to save: every one but
    listeners and those over loopback, which gVisor saves (TIME_WAIT ones are not listed)."""
    count = 0
    for line in tables.decode(errors="replace").splitlines():
        fields = line.split()
        if len(fields) < 4 or not fields[0].rstrip(":").isdigit() or fields[3] == "0A":  # 0A: LISTEN
            continue
        if fields[2].split(":")[0].upper() not in _LOOPBACK:
            count += 1
    return count


_REFUSALS = (  # what runsc checkpoint says when gVisor cannot save a sandbox, and what that means
    (b"endpoint cannot be saved in connected state",
     "gVisor saves no TCP connection (open, or closed less than a minute ago: TIME_WAIT); close them and try "
     "again"),
    (b"unsupported networking state", "gVisor cannot save the state of one of its sockets"),
)


def checkpoint_refusal(said: bytes) -> str | None:
    """Why ``runsc checkpoint`` refused, in a line, from what it said (None: not known)."""
    return next((why for marker, why in _REFUSALS if marker in said), None)


def platform_of(run_argv: Sequence[str]) -> str:
    """The platform a ``runsc run`` command line of :func:`argv` names."""
    return next((a.split("=", 1)[1] for a in run_argv if a.startswith("--platform=")), "")


def global_flags(run_argv: Sequence[str]) -> tuple[str, ...]:
    """runsc and its ``--root`` from the ``runsc run`` command line of :func:`argv`."""
    return tuple(run_argv[:3])


def exec_argv(run_argv: Sequence[str], process_file: str, pid_file: str) -> tuple[str, ...]:
    """``runsc exec`` of the process that ``process_file`` describes (:func:`exec_process`)
    in the sandbox that ``run_argv`` started. Its pid inside goes to ``pid_file``, for
    :func:`kill_argv`. A file, not flags: runsc (20221219) gives a command a terminal
    only when its process file says so, and flags would show its environment to every
    host user in ``ps``."""
    return (*global_flags(run_argv), "exec", f"--internal-pid-file={pid_file}", f"--process={process_file}",
            CONTAINER)


def init_argv(argv: Sequence[str], seccomp: str = "") -> list[str]:
    """``argv`` under silo-init ``--run`` inside the Sentry; with ``seccomp`` (a compiled
    program, in hex) silo-init loads it for the command: gVisor's kernel enforces it."""
    return [INIT_PATH, "--run", "-1", *(("--seccomp", seccomp) if seccomp else ()), "--", *argv]


def exec_process(argv: Sequence[str], env: Sequence[tuple[str, str]], cwd: str, uid: int, gid: int,
                 tty: bool, seccomp: str = "") -> dict[str, Any]:
    """The process file of :func:`exec_argv`: ``argv`` as ``uid:gid`` in ``cwd`` with
    exactly ``env`` (the container's own is empty), under silo-init ``--run`` inside: it
    finds the command as at the process level (127 and 126 with silo's messages), puts
    it in a process group of its own and passes every signal it gets to that group
    (``runsc kill`` reaches one process only), and the command dies with it. With
    ``tty`` its stdio is a terminal: the pty of the ``runsc exec`` that reads the file
    (made by silo-setup, as at the process level), whose signals (ctrl-C, a resize)
    runsc passes to the command's foreground group inside. ``seccomp``: see :func:`init_argv`."""
    return {"terminal": tty, "user": {"uid": uid, "gid": gid}, "cwd": cwd,
            "args": init_argv(argv, seccomp), "env": [f"{k}={v}" for k, v in env]}


def process_file(pid_file: str) -> str:
    """Where the process file of the exec whose pid file is ``pid_file`` lives."""
    return f"{pid_file}.json"


def signal_argv(run_argv: Sequence[str], sig: int) -> tuple[str, ...]:
    """``runsc kill`` of the container that ``run_argv`` started: signal ``sig`` to its
    PID 1 (silo-init, which passes it to the command's process group)."""
    return (*global_flags(run_argv), "kill", CONTAINER, str(sig))


def kill_argv(run_argv: Sequence[str], pid: int, sig: int) -> tuple[str, ...]:
    """``runsc kill`` of the sandbox's process ``pid`` with signal ``sig``."""
    return (*global_flags(run_argv), "kill", f"--pid={pid}", CONTAINER, str(sig))


def layer(cache_dir: str, init: str) -> str:
    """silo's read-only layer at the top of a gvisor workspace's root: silo-init (a
    copy of ``init``) at :data:`INIT_PATH`, and the mount points runsc would otherwise
    make in the workspace's own layer (``/sys``). In silo's cache, owned by root, named
    by its content (made once, atomically): the gofer, which runs as the sandbox's
    root, reads it through an idmapped clone."""
    with open(init, "rb") as f:
        data = f.read()
    path = os.path.join(cache_dir, "gvisor", f"layer-{hashlib.sha256(data).hexdigest()[:16]}")
    if os.path.isdir(path):
        return path
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".layer-", dir=os.path.dirname(path))
    try:
        os.chmod(tmp, 0o755)  # noqa: S103 - read by sandboxes
        os.mkdir(os.path.join(tmp, "sys"), 0o555)
        os.mkdir(os.path.join(tmp, ".silo"), 0o755)
        cachefile.publish(os.path.join(tmp, INIT_PATH.lstrip("/")), data, mode=0o755)
        os.rename(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(path):  # not another process's, made first
            raise
    return path
