"""SECURITY.md row 9 (kernel attack surface) and row 7 (terminal injection), on the real kernel.

Each test forks a child, sets no_new_privs, loads ``compile_profile("default")`` with
``install`` (below: the one ``seccomp(2)`` call ``silo-setup`` makes for every sandbox)
and then makes the refused calls for real through ``syscall(2)``; the child reports
each errno over a pipe. Works as any user: no root, no skip.

That a refusal comes from seccomp and not from the kernel's own checks is shown twice:

* the same attempts under a copy of the default profile whose EPERM is replaced by
  an errno no kernel path returns (``MARKER``) fail with exactly ``MARKER``;
* as root, the harmless subset made *without* a filter succeeds or fails differently.

Nothing that could harm the host (clock_settime, reboot, kexec_load, init_module,
mount, TIOCLINUX, ...) is ever called without the filter; the filtered attempts use
arguments that would be rejected or be no-ops even if the filter let them through.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import pty
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import seccomp

from silo.sys.seccomp import DEFAULT_PROFILE, compile_profile

MARKER = 3999  # an errno the kernel never returns: only our filter can produce it
PR_SET_NO_NEW_PRIVS = 38
AT_FDCWD = -100

TIOCSTI, TIOCLINUX, TIOCSETD, TCGETS = 0x5412, 0x541C, 0x5423, 0x5401
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x20000, 0x10000000, 0x40000000, 0x20000000
SIGCHLD = 17
AF_VSOCK, SOCK_STREAM = 40, 1
PER_LINUX, ADDR_NO_RANDOMIZE = 0, 0x0040000

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def nr(name: str) -> int:
    number = seccomp.resolve_syscall(seccomp.Arch.NATIVE, name)
    assert number >= 0, name
    return int(number)


def sys_errno(name: str, *args: object) -> int:
    """Make a raw syscall (ints passed as unsigned long); return 0 on success, else the errno."""
    cargs = [a if not isinstance(a, int) else ctypes.c_ulong(a & (2**64 - 1)) for a in args]
    ctypes.set_errno(0)
    rc = libc.syscall(ctypes.c_long(nr(name)), *cargs)
    if rc == -1:
        return ctypes.get_errno()
    return 0


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(bpf: bytes) -> None:
    """Load ``bpf`` as this thread's seccomp filter, as silo-setup does (x86_64)."""
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.addressof(buf))
    if libc.syscall(317, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.byref(prog)) != 0:  # SECCOMP_SET_MODE_FILTER
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def run_in_child(body: Callable[[], object], bpf: bytes | None) -> Any:
    """Run ``body`` in a forked child (filtered by ``bpf`` if given); return its result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            if bpf is not None:
                if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                    raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
                install(bpf)
            out = json.dumps({"ok": body()})
        except BaseException as exc:
            out = json.dumps({"error": repr(exc)})
            code = 1
        try:
            os.write(w, out.encode())
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert chunks, f"child died without a report: wait status {status:#x}"
    result = json.loads(b"".join(chunks))
    assert "error" not in result, result["error"]
    return result["ok"]


# ---------------------------------------------------------------- the attempts


def attempts(scratch: str) -> dict[str, int]:
    """Every refused call, with arguments harmless even if the filter let it through."""
    master, slave = pty.openpty()
    ch = ctypes.c_char(b"x")
    buf = ctypes.create_string_buffer(256)
    null = ctypes.c_void_p(0)
    nowhere = ctypes.c_char_p(b"/nonexistent/silo-seccomp-test")
    node = ctypes.c_char_p(os.path.join(scratch, "chardev").encode())
    res: dict[str, int] = {}
    res["ioctl TIOCSTI"] = sys_errno("ioctl", slave, TIOCSTI, ctypes.byref(ch))
    res["ioctl TIOCSTI|1<<32"] = sys_errno("ioctl", slave, TIOCSTI | (1 << 32), ctypes.byref(ch))
    res["ioctl TIOCSTI|0xdead<<40"] = sys_errno(
        "ioctl", slave, TIOCSTI | (0xDEAD << 40), ctypes.byref(ch)
    )
    res["ioctl TIOCLINUX"] = sys_errno("ioctl", slave, TIOCLINUX, buf)
    res["ioctl TIOCLINUX|1<<32"] = sys_errno("ioctl", slave, TIOCLINUX | (1 << 32), buf)
    res["ioctl TIOCSETD"] = sys_errno("ioctl", slave, TIOCSETD, buf)
    os.close(master)
    os.close(slave)

    res["unshare CLONE_NEWUSER"] = sys_errno("unshare", CLONE_NEWUSER)
    res["unshare CLONE_NEWNS"] = sys_errno("unshare", CLONE_NEWNS)
    res["unshare CLONE_NEWNET"] = sys_errno("unshare", CLONE_NEWNET)
    res["clone CLONE_NEWUSER"] = raw_clone(CLONE_NEWUSER | SIGCHLD)
    res["clone CLONE_NEWPID"] = raw_clone(CLONE_NEWPID | SIGCHLD)
    res["clone3"] = sys_errno("clone3", null, 0)
    res["setns"] = sys_errno("setns", -1 & 0xFFFFFFFF, 0)

    res["io_uring_setup"] = sys_errno("io_uring_setup", 1, null)
    res["io_uring_enter"] = sys_errno("io_uring_enter", -1 & 0xFFFFFFFF, 0, 0, 0, null, 0)
    res["io_uring_register"] = sys_errno("io_uring_register", -1 & 0xFFFFFFFF, 0, null, 0)
    res["bpf"] = sys_errno("bpf", 5, null, 0)  # BPF_PROG_LOAD with no attr
    res["userfaultfd"] = sys_errno("userfaultfd", os.O_CLOEXEC)
    res["perf_event_open"] = sys_errno(
        "perf_event_open", null, 0, -1 & 0xFFFFFFFF, -1 & 0xFFFFFFFF, 0
    )
    res["keyctl"] = sys_errno("keyctl", 0, -3 & 0xFFFFFFFF, 0)  # GET_KEYRING_ID, session, no create
    res["add_key"] = sys_errno("add_key", null, null, null, 0, 0)
    res["request_key"] = sys_errno("request_key", null, null, null, 0)

    res["fsopen"] = sys_errno("fsopen", null, 0)
    res["fsconfig"] = sys_errno("fsconfig", -1 & 0xFFFFFFFF, 0, null, null, 0)
    res["fsmount"] = sys_errno("fsmount", -1 & 0xFFFFFFFF, 0, 0)
    res["fspick"] = sys_errno("fspick", AT_FDCWD & 0xFFFFFFFF, null, 0)
    res["open_tree"] = sys_errno("open_tree", AT_FDCWD & 0xFFFFFFFF, null, 0)
    res["move_mount"] = sys_errno("move_mount", -1 & 0xFFFFFFFF, null, -1 & 0xFFFFFFFF, null, 0)
    res["mount_setattr"] = sys_errno("mount_setattr", -1 & 0xFFFFFFFF, null, 0, null, 0)
    res["mount"] = sys_errno("mount", null, null, null, 0, null)
    res["umount2"] = sys_errno("umount2", nowhere, 0)
    res["pivot_root"] = sys_errno("pivot_root", nowhere, nowhere)

    res["syslog"] = sys_errno("syslog", 10, null, 0)  # SYSLOG_ACTION_SIZE_BUFFER
    res["init_module"] = sys_errno("init_module", null, 0, null)
    res["finit_module"] = sys_errno("finit_module", -1 & 0xFFFFFFFF, null, 0)
    res["delete_module"] = sys_errno("delete_module", nowhere, 0)
    res["kexec_load"] = sys_errno("kexec_load", 0, 0, null, 0xDEAD0000)  # invalid flags
    res["kexec_file_load"] = sys_errno(
        "kexec_file_load", -1 & 0xFFFFFFFF, -1 & 0xFFFFFFFF, 0, null, 0xDEAD0000
    )
    res["clock_settime"] = sys_errno("clock_settime", 0, null)  # NULL timespec
    res["clock_adjtime"] = sys_errno("clock_adjtime", 0, null)
    res["settimeofday"] = sys_errno("settimeofday", null, null)
    res["adjtimex"] = sys_errno("adjtimex", null)
    res["reboot"] = sys_errno("reboot", 0, 0, 0, null)  # wrong magic
    res["swapon"] = sys_errno("swapon", nowhere, 0)
    res["swapoff"] = sys_errno("swapoff", nowhere)
    res["acct"] = sys_errno("acct", nowhere)
    res["quotactl"] = sys_errno("quotactl", 0, null, 0, null)
    res["sethostname"] = sys_errno("sethostname", null, 4096)  # over __NEW_UTS_LEN
    res["open_by_handle_at"] = sys_errno("open_by_handle_at", -1 & 0xFFFFFFFF, null, 0)
    res["iopl"] = sys_errno("iopl", 0)
    res["ioperm"] = sys_errno("ioperm", 0, 0, 0)
    res["modify_ldt"] = sys_errno("modify_ldt", 0, null, 0)
    res["uselib"] = sys_errno("uselib", nowhere)
    res["personality ADDR_NO_RANDOMIZE"] = sys_errno("personality", ADDR_NO_RANDOMIZE)
    res["mknodat S_IFCHR"] = sys_errno("mknodat", AT_FDCWD & 0xFFFFFFFF, node, 0o020600, 0x0103)
    res["socket AF_VSOCK"] = sys_errno("socket", AF_VSOCK, SOCK_STREAM, 0)
    return res


def raw_clone(flags: int) -> int:
    """clone(2) without glibc; a child that gets created exits at once."""
    ctypes.set_errno(0)
    rc = libc.syscall(ctypes.c_long(nr("clone")), ctypes.c_ulong(flags), None, None, None, None)
    if rc == 0:
        os._exit(0)
    if rc > 0:
        os.waitpid(rc, 0)
        return 0
    return ctypes.get_errno()


REFUSED_CALLS = (
    "ioctl TIOCSTI",
    "ioctl TIOCSTI|1<<32",
    "ioctl TIOCSTI|0xdead<<40",
    "ioctl TIOCLINUX",
    "ioctl TIOCLINUX|1<<32",
    "ioctl TIOCSETD",
    "unshare CLONE_NEWUSER",
    "unshare CLONE_NEWNS",
    "unshare CLONE_NEWNET",
    "clone CLONE_NEWUSER",
    "clone CLONE_NEWPID",
    "clone3",
    "setns",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "bpf",
    "userfaultfd",
    "perf_event_open",
    "keyctl",
    "add_key",
    "request_key",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "open_tree",
    "move_mount",
    "mount_setattr",
    "mount",
    "umount2",
    "pivot_root",
    "syslog",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "clock_settime",
    "clock_adjtime",
    "settimeofday",
    "adjtimex",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "sethostname",
    "open_by_handle_at",
    "iopl",
    "ioperm",
    "modify_ldt",
    "uselib",
    "personality ADDR_NO_RANDOMIZE",
    "mknodat S_IFCHR",
    "socket AF_VSOCK",
)


def expected_errno(name: str, refusal: int) -> int:
    return errno.ENOSYS if name == "clone3" else refusal


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("seccomp")
    os.chmod(path, 0o777)
    return str(path)


@pytest.fixture(scope="module")
def default_bpf() -> bytes:
    return compile_profile("default")


@pytest.fixture(scope="module")
def marker_bpf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The default profile with every EPERM (default and explicit) turned into MARKER."""
    data = json.loads(DEFAULT_PROFILE.read_text())
    data["defaultErrnoRet"] = MARKER
    for entry in data["syscalls"]:
        if entry.get("errnoRet") == errno.EPERM:
            entry["errnoRet"] = MARKER
    path = tmp_path_factory.mktemp("marker") / "marker.json"
    path.write_text(json.dumps(data))
    return compile_profile(str(path))


@pytest.fixture(scope="module")
def filtered(default_bpf: bytes, scratch: str) -> dict[str, int]:
    result = dict(run_in_child(lambda: attempts(scratch), default_bpf))
    assert sorted(result) == sorted(REFUSED_CALLS)
    return result


@pytest.fixture(scope="module")
def marked(marker_bpf: bytes, scratch: str) -> dict[str, int]:
    return dict(run_in_child(lambda: attempts(scratch), marker_bpf))


@pytest.mark.parametrize("name", REFUSED_CALLS)
def test_refused_with_the_specific_errno(filtered: dict[str, int], name: str) -> None:
    got = filtered[name]
    want = expected_errno(name, errno.EPERM)
    assert got == want, f"{name}: {errno.errorcode.get(got, got)}, want {errno.errorcode[want]}"


@pytest.mark.parametrize("name", REFUSED_CALLS)
def test_refusal_comes_from_the_filter(marked: dict[str, int], name: str) -> None:
    assert marked[name] == expected_errno(name, MARKER), name


# Calls harmless to make without a filter, and what they must do then. As root each
# one succeeds or fails with something other than EPERM; the ones marked "any user"
# fail that way for everybody, because the kernel checks the arguments first.
UNFILTERED = {
    "unshare CLONE_NEWUSER": False,
    "clone CLONE_NEWUSER": False,
    "clone3": True,
    "bpf": False,
    "perf_event_open": True,
    "keyctl": True,
    "add_key": True,
    "fsopen": False,
    "open_tree": True,
    "syslog": False,
    "io_uring_setup": False,
    "ioctl TIOCSTI": False,
    "ioctl TIOCSTI|1<<32": False,
}


def test_without_the_filter_the_same_calls_fail_differently() -> None:
    def harmless() -> dict[str, int]:
        master, slave = pty.openpty()
        ch = ctypes.c_char(b"x")
        null = ctypes.c_void_p(0)
        res = {
            "clone CLONE_NEWUSER": raw_clone(CLONE_NEWUSER | SIGCHLD),
            "clone3": sys_errno("clone3", null, 0),
            "bpf": sys_errno("bpf", 5, null, 0),
            "perf_event_open": sys_errno("perf_event_open", null, 0, 2**32 - 1, 2**32 - 1, 0),
            "keyctl": sys_errno("keyctl", 0, 2**32 - 3, 0),
            "add_key": sys_errno("add_key", null, null, null, 0, 0),
            "fsopen": sys_errno("fsopen", null, 0),
            "open_tree": sys_errno("open_tree", AT_FDCWD & 0xFFFFFFFF, null, 0),
            "syslog": sys_errno("syslog", 10, null, 0),
            "io_uring_setup": sys_errno("io_uring_setup", 1, null),
            # our own private pty: the injected byte goes to our own input queue
            "ioctl TIOCSTI": sys_errno("ioctl", slave, TIOCSTI, ctypes.byref(ch)),
            "ioctl TIOCSTI|1<<32": sys_errno("ioctl", slave, TIOCSTI | (1 << 32), ctypes.byref(ch)),
            # last: it moves this child into a new, unmapped user namespace
            "unshare CLONE_NEWUSER": sys_errno("unshare", CLONE_NEWUSER),
        }
        os.close(master)
        os.close(slave)
        return res

    unfiltered = run_in_child(harmless, None)
    root = os.geteuid() == 0
    checked = 0
    for name, any_user in UNFILTERED.items():
        if root or any_user:
            assert unfiltered[name] not in (errno.EPERM, MARKER), (name, unfiltered[name])
            checked += 1
    assert checked >= 5
    if root:  # the kernel reads the request's low 32 bits: with high bits it is still TIOCSTI
        assert unfiltered["ioctl TIOCSTI|1<<32"] == 0


# ---------------------------------------------------------------- what must keep working


def test_ordinary_calls_still_work(default_bpf: bytes) -> None:
    def body() -> dict[str, object]:
        import mmap
        import select

        out: dict[str, object] = {}
        out["getpid"] = sys_errno("getpid") == 0 and os.getpid() > 0
        master, slave = pty.openpty()
        termios_buf = ctypes.create_string_buffer(64)
        out["TCGETS"] = sys_errno("ioctl", slave, TCGETS, termios_buf)
        os.close(master)
        os.close(slave)
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        seen: list[int] = []
        thread = threading.Thread(target=lambda: seen.append(threading.get_native_id()))
        thread.start()
        thread.join()
        out["thread"] = len(seen) == 1 and seen[0] != threading.get_native_id()
        with mmap.mmap(-1, 1 << 20) as region:
            region[:5] = b"hello"
            out["mmap"] = region[:5] == b"hello"
        r, w = os.pipe()
        r2, w2 = os.pipe()
        os.write(w, b"spliced")
        os.splice(r, w2, 7)
        out["splice"] = os.read(r2, 7) == b"spliced"
        ep = select.epoll()
        ep.register(r2, select.EPOLLIN)
        os.write(w2, b"!")
        out["epoll"] = len(ep.poll(1)) == 1
        ep.close()
        for fd in (r, w, r2, w2):
            os.close(fd)
        out["personality query"] = sys_errno("personality", 0xFFFFFFFF)
        out["personality PER_LINUX"] = sys_errno("personality", PER_LINUX)
        out["unshare CLONE_FILES"] = sys_errno("unshare", 0x400)
        return out

    got = run_in_child(body, default_bpf)
    assert got == {
        "getpid": True,
        "TCGETS": 0,
        "fork": 7,
        "thread": True,
        "mmap": True,
        "splice": True,
        "epoll": True,
        "personality query": 0,
        "personality PER_LINUX": 0,
        "unshare CLONE_FILES": 0,
    }


def exec_filtered(bpf: bytes, argv: list[str]) -> tuple[int, str]:
    """Fork, filter, exec ``argv``; return its exit code and output."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.dup2(w, 1)
            os.dup2(w, 2)
            if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                os._exit(120)
            install(bpf)
            os.execv(argv[0], argv)
        finally:
            os._exit(121)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


def test_python_subprocess_runs_under_the_filter(default_bpf: bytes) -> None:
    code, out = exec_filtered(
        default_bpf,
        [
            "/usr/bin/python3",
            "-c",
            'import subprocess; subprocess.run(["/bin/true"], check=True); print("ok")',
        ],
    )
    assert (code, out) == (0, "ok\n")


def test_bash_pipeline_runs_under_the_filter(default_bpf: bytes) -> None:
    code, out = exec_filtered(default_bpf, ["/bin/bash", "-c", "ls / | wc -l"])
    assert code == 0, out
    assert int(out.strip()) > 3


def test_filter_is_inherited_by_exec(default_bpf: bytes) -> None:
    code, out = exec_filtered(
        default_bpf, ["/bin/bash", "-c", "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status"]
    )
    assert code == 0, out
    assert "Seccomp:\t2" in out
    assert "NoNewPrivs:\t1" in out


def test_install_needs_no_new_privs_or_privilege(default_bpf: bytes) -> None:
    def body() -> str:
        try:
            install(default_bpf)
        except OSError as exc:
            return errno.errorcode[exc.errno or 0]
        return "loaded"

    want = "loaded" if os.geteuid() == 0 else "EACCES"
    assert run_in_child(body, None) == want


def test_scratch_untouched(scratch: str, filtered: dict[str, int]) -> None:
    assert not Path(scratch, "chardev").exists()
