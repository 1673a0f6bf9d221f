"""The sandbox's first process: builds the sandbox from a plan, then execs the init.

Runs in the child that :func:`silo.backends.process.launcher.start` cloned into new
namespaces; it is PID 1 of its pid namespace. It never returns: it either execs
(silo-init from a sealed memfd, or the command itself at the app level) or reports an
error on ``err_fd`` and exits. Order matters and is the security argument:

1. wait until the parent has written the id maps (and placed us in our cgroup);
2. become the sandbox's root inside the user namespace, unshare the cgroup namespace;
3. execute the mount operations and ``pivot_root`` (executor);
4. resolve the command inside the new root (127 / 126 reported precisely);
5. drop the bounding set, switch to the sandbox user, set the remaining capability
   sets, no_new_privs, parent-death signal, new session, rlimits;
6. mark every fd but stdio close-on-exec, load the seccomp filter, exec.

A *warm* child does all of that except knowing its command: it execs silo-init in
``--wait`` mode, a finished sandbox (hardened, filtered, PID 1 running) parked on
``err_fd`` until the spawner sends argv, env and three stdio fds
(:func:`go_message`). Only argv, env and stdio differ between runs of one plan (the
spawner's pool key says so; plans with a custom seccomp profile are not pooled), so
a warm sandbox is the same sandbox a cold start would have built.
"""

from __future__ import annotations

import gc
import marshal
import os
import resource
import signal
import stat
from typing import NoReturn

from silo.backends.process import executor
from silo.model import plan as p
from silo.model.errors import CommandNotExecutable, CommandNotFound, InternalError, SiloError, UserError
from silo.model.spec import CAPABILITIES
from silo.sys import kernel as sysk
from silo.sys import seccomp

_RLIMITS = {"nofile": resource.RLIMIT_NOFILE, "nproc": resource.RLIMIT_NPROC,
            "core": resource.RLIMIT_CORE, "stack": resource.RLIMIT_STACK,
            "fsize": resource.RLIMIT_FSIZE, "as": resource.RLIMIT_AS, "cpu": resource.RLIMIT_CPU,
            "memlock": resource.RLIMIT_MEMLOCK}


def _resolve(argv0: str, env: dict[str, str]) -> str:
    """PATH lookup inside the sandbox, as execvp would; errors name what to do."""
    candidates = [argv0] if "/" in argv0 else [
        os.path.join(d or ".", argv0) for d in env.get("PATH", "").split(":")]
    denied = None
    for path in candidates:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and os.access(path, os.X_OK):
            return path
        denied = path
    if denied is not None:
        raise CommandNotExecutable(f"{argv0}: not executable inside the sandbox ({denied}); check its mode")
    raise CommandNotFound(f"{argv0}: command not found inside the sandbox; check the name and PATH")


def _open_pty(err_fd: int) -> None:
    """A pty from the sandbox's own devpts becomes stdio and the controlling terminal;
    its master goes to the spawner (and on to the client) over ``err_fd``."""
    import fcntl
    import socket
    import struct

    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    fcntl.ioctl(master, sysk.TIOCSPTLCK, struct.pack("i", 0))
    number = struct.unpack("I", fcntl.ioctl(master, sysk.TIOCGPTN, b"\0" * 4))[0]
    slave = os.open(f"/dev/pts/{number}", os.O_RDWR)
    sysk.set_controlling_tty(slave)
    for target in (0, 1, 2):
        os.dup2(slave, target)
    os.close(slave)
    sock = socket.socket(fileno=os.dup(err_fd))
    try:
        sock.sendmsg([b"pty"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", master))])
    finally:
        sock.close()
        os.close(master)


def _dup_stdio(stdio: tuple[int, int, int]) -> None:
    for target, fd in enumerate(stdio):
        if fd != target:
            os.dup2(fd, target)  # dup2 clears close-on-exec on the target


def _close_all_but(*keep: int) -> None:
    low = 3
    for fd in sorted(k for k in keep if k >= 3):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 30)


def go_message(argv: tuple[str, ...], env: tuple[tuple[str, str], ...]) -> bytes:
    """The request silo-init --wait reads (with three stdio fds as SCM_RIGHTS):
    ``ARGC\\0ARGV...\\0KEY=VALUE\\0...``."""
    parts = [str(len(argv)).encode(), *(os.fsencode(a) for a in argv),
             *(os.fsencode(f"{k}={v}") for k, v in env)]
    return b"\0".join(parts) + b"\0"


GO_MAX = 1 << 16  # larger commands start cold (silo-init's buffer)
TAKEN = b"taken"
INIT_ERROR = b"init-error "


def _report(err_fd: int, error: SiloError) -> NoReturn:
    try:
        os.write(err_fd, marshal.dumps(error.to_wire()))
    finally:
        os._exit(error.exit_code)


def child_main(plan: p.Plan, sync_fd: int, err_fd: int, stdio: tuple[int, int, int],
               init_fd: int, bpf: bytes | None, warm: bool = False) -> NoReturn:
    """Entry point in the cloned child. ``stdio`` fds become 0, 1, 2; a ``warm`` child
    builds the sandbox and execs silo-init, which waits for the command on ``err_fd``."""
    gc.disable()  # a collection would touch (copy) every page it shares with the spawner
    try:
        _child(plan, sync_fd, err_fd, stdio, init_fd, bpf, warm)
    except SiloError as e:
        _report(err_fd, e)
    except executor.SetupError as e:
        if isinstance(e.op, p.Bind) and e.error.errno in (2, 20):
            _report(err_fd, UserError(f"cannot map {e.op.source} to {e.op.target}: {e.error.strerror}"))
        _report(err_fd, InternalError(f"sandbox setup failed at {e}"))
    except BaseException as e:
        _report(err_fd, InternalError(f"sandbox setup failed: {type(e).__name__}: {e}"))


def _child(plan: p.Plan, sync_fd: int, err_fd: int, stdio: tuple[int, int, int],
           init_fd: int, bpf: bytes | None, warm: bool) -> NoReturn:
    _dup_stdio(stdio)
    if os.read(sync_fd, 1) != b"g":
        os._exit(125)  # the parent gave up on us
    if warm:
        # A parked sandbox may wait for minutes: it must not hold what the spawner
        # had open when it was cloned (another run's pipes would never see EOF).
        _close_all_but(err_fd, init_fd)
    proc = plan.process
    k = sysk.LibcKernel()
    if "user" in plan.namespaces and proc.setgroups:
        os.setgroups([])
    if "user" in plan.namespaces:
        inside_uid = plan.uid_map[0].inside if plan.uid_map[0].count == 1 else 0
        inside_gid = plan.gid_map[0].inside if plan.gid_map[0].count == 1 else 0
        os.setresgid(inside_gid, inside_gid, inside_gid)
        os.setresuid(inside_uid, inside_uid, inside_uid)
    if "cgroup" in plan.namespaces:
        k.unshare(sysk.CLONE_NEWCGROUP)
    executor.execute(k, plan.ops)
    env = dict(proc.env)
    if "mnt" in plan.namespaces and proc.harden and not os.path.isdir(proc.cwd):
        try:
            os.makedirs(proc.cwd)
            if proc.uid != 0:
                os.chown(proc.cwd, proc.uid, proc.gid)
        except OSError as e:
            raise UserError(f"cannot create working directory {proc.cwd}: {e.strerror}") from None
    try:
        os.chdir(proc.cwd)
        # SECURITY: a cwd outside the new root has no path from it (CVE-2024-21626).
        inside = "pid" not in plan.namespaces or os.getcwd().startswith("/")
    except OSError as e:
        raise UserError(f"working directory {proc.cwd}: {e.strerror}") from None
    if not inside:
        raise UserError(f"working directory {proc.cwd} is outside the sandbox")
    if proc.harden:
        keep = 0
        for name in proc.caps:
            keep |= 1 << CAPABILITIES[name]
        # SECURITY: the bounding set loses every capability not asked for, before the
        # identity switch, so nothing exec'd later can regain them (SECURITY.md #8).
        sysk.prctl(sysk.PR_SET_KEEPCAPS, 1)
        sysk.drop_bounding_except(keep)
        if proc.setgroups:
            os.setgroups([proc.gid])
        os.setresgid(proc.gid, proc.gid, proc.gid)
        os.setresuid(proc.uid, proc.uid, proc.uid)
        sysk.set_capabilities(keep)
        sysk.prctl(sysk.PR_SET_KEEPCAPS, 0)
    if proc.no_new_privs:
        # SECURITY: no setuid binary or file capability can raise privileges (SECURITY.md #8).
        sysk.prctl(sysk.PR_SET_NO_NEW_PRIVS, 1)
    # SECURITY: the sandbox dies with the spawner; set after the last credential change,
    # which would clear it.
    sysk.prctl(sysk.PR_SET_PDEATHSIG, signal.SIGKILL)
    if "pid" not in plan.namespaces and os.getppid() == 1:
        os._exit(125)  # the spawner died before the death signal was armed
    if proc.new_session:
        # SECURITY: no controlling terminal of the host (SECURITY.md #7).
        os.setsid()
        if proc.tty:
            _open_pty(err_fd)
    for name, soft, hard in proc.rlimits:
        resource.setrlimit(_RLIMITS[name], (soft, hard))
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    # Default dispositions for everything the spawner (or Python: SIGPIPE, SIGXFSZ) changed.
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP) and signal.getsignal(sig) is not signal.SIG_DFL:
            signal.signal(sig, signal.SIG_DFL)
    for reserved in (32, 33):  # glibc's reserved signals: invisible to the signal module
        sysk.default_signal(reserved)
    # SECURITY: only stdio crosses into the sandbox (SECURITY.md #2).
    sysk.close_range_cloexec(3)
    if warm:
        if bpf is not None:
            seccomp.install(bpf)
        # silo-init from a sealed memfd, parked until the spawner sends the command on
        # err_fd (kept open across this exec, closed by silo-init once the command runs).
        os.set_inheritable(err_fd, True)
        sysk.execveat_fd(init_fd, [b"silo-init", b"--wait", str(err_fd).encode()], [])
    path = _resolve(proc.argv[0], env)
    envp = [f"{k_}={v}".encode() for k_, v in env.items()]
    if bpf is not None:
        seccomp.install(bpf)
    argv = [os.fsencode(a) for a in proc.argv]
    if proc.init:
        # silo-init from a sealed memfd: /proc/1/exe is not a host file (CVE-2019-5736).
        sysk.execveat_fd(init_fd, [b"silo-init", b"--", os.fsencode(path), *argv], envp)
    os.execve(path, argv, dict(env))  # noqa: S606 - exec is the point
