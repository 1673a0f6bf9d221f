"""The seccomp profile as data and its compilation, without root and without loading it.

The compiled program is run through a small classic-BPF interpreter over synthetic
``struct seccomp_data``, so every refusal is checked on x86_64 (the only ABI the default profile
lists: i386 and x32 are killed) and on i386 and x32 with the same rules listed for
them (a user's profile that opts in), including the ioctl request with high bits set.
"""

from __future__ import annotations

import errno
import json
import os
import random
import struct
import tempfile
from pathlib import Path

import pytest
import seccomp

from silo.model.errors import SpecError
from silo.sys import seccomp as sc

# ---------------------------------------------------------------- a seccomp BPF interpreter

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_AARCH64 = 0xC00000B7
X32_BIT = 0x40000000

RET_KILL_PROCESS = 0x80000000
RET_KILL_THREAD = 0x00000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000


def run_bpf(bpf: bytes, arch: int, nr: int, args: tuple[int, ...] = ()) -> int:
    """Evaluate a seccomp program on (arch, nr, args) and return its SECCOMP_RET_* value."""
    full = (list(args) + [0] * 6)[:6]
    data = struct.pack("<iIQ6Q", nr, arch, 0x400000, *[a & (2**64 - 1) for a in full])
    insns = [struct.unpack_from("<HBBI", bpf, off) for off in range(0, len(bpf), 8)]
    a = x = 0
    mem = [0] * 16
    pc = 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        cls = code & 0x07
        if cls == 0x00:  # LD
            mode = code & 0xE0
            assert code & 0x18 == 0x00, hex(code)  # 32-bit loads only
            if mode == 0x20:
                (a,) = struct.unpack_from("<I", data, k)
            elif mode == 0x00:
                a = k
            elif mode == 0x60:
                a = mem[k]
            else:
                raise AssertionError(f"LD mode {code:#x}")
        elif cls == 0x01:  # LDX
            x = mem[k] if code & 0xE0 == 0x60 else k
        elif cls == 0x02:
            mem[k] = a
        elif cls == 0x03:
            mem[k] = x
        elif cls == 0x04:  # ALU
            src = x if code & 0x08 else k
            op = code & 0xF0
            a = {
                0x00: lambda: a + src,
                0x10: lambda: a - src,
                0x40: lambda: a | src,
                0x50: lambda: a & src,
                0x60: lambda: a << src,
                0x70: lambda: a >> src,
                0xA0: lambda: a ^ src,
            }[op]() & 0xFFFFFFFF
        elif cls == 0x05:  # JMP
            op = code & 0xF0
            src = x if code & 0x08 else k
            if op == 0x00:
                pc += k
                continue
            cond = {
                0x10: a == src,
                0x20: a > src,
                0x30: a >= src,
                0x40: bool(a & src),
            }[op]
            pc += jt if cond else jf
        elif cls == 0x06:  # RET
            return a if code & 0x18 == 0x10 else k
        elif cls == 0x07:  # MISC
            if code & 0xF8 == 0x00:
                x = a
            else:
                a = x
        else:  # pragma: no cover
            raise AssertionError(f"opcode {code:#x}")


ARCHES = {
    "x86_64": (AUDIT_ARCH_X86_64, seccomp.Arch.X86_64),
    "i386": (AUDIT_ARCH_I386, seccomp.Arch.X86),
    "x32": (AUDIT_ARCH_X86_64, seccomp.Arch.X32),
}


_PROGRAMS: dict[str, bytes] = {}


def program(arch_name: str) -> bytes:
    """The default profile's program; for a compat ABI, the default rules with that ABI listed."""
    if arch_name not in _PROGRAMS:
        if arch_name == "x86_64":
            _PROGRAMS[arch_name] = sc.compile_profile("default")
        else:
            data = json.loads(sc.DEFAULT_PROFILE.read_text())
            data["architectures"] = ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
            fd, path = tempfile.mkstemp(suffix=".json")
            try:
                os.write(fd, json.dumps(data).encode())
                os.close(fd)
                _PROGRAMS[arch_name] = sc.compile_profile(path)
            finally:
                os.unlink(path)
    return _PROGRAMS[arch_name]


def nr_of(arch_name: str, name: str) -> int | None:
    nr = seccomp.resolve_syscall(ARCHES[arch_name][1], name)
    return nr if nr >= 0 else None


def verdict(bpf: bytes, arch_name: str, name: str, *args: int) -> int:
    nr = nr_of(arch_name, name)
    assert nr is not None, f"{name} has no number on {arch_name}"
    return run_bpf(bpf, ARCHES[arch_name][0], nr, args)


EPERM = RET_ERRNO | errno.EPERM

# ---------------------------------------------------------------- the default profile

# Everything the profile must refuse unconditionally, with EPERM.
REFUSED = [
    "setns",
    "bpf",
    "userfaultfd",
    "perf_event_open",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "keyctl",
    "add_key",
    "request_key",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "open_by_handle_at",
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "clock_settime",
    "clock_settime64",
    "clock_adjtime",
    "clock_adjtime64",
    "settimeofday",
    "adjtimex",
    "stime",
    "syslog",
    "acct",
    "swapon",
    "swapoff",
    "reboot",
    "quotactl",
    "quotactl_fd",
    "lookup_dcookie",
    "nfsservctl",
    "vm86",
    "vm86old",
    "iopl",
    "ioperm",
    "uselib",
    "modify_ldt",
    "sethostname",
    "setdomainname",
    "vhangup",
    "fanotify_init",
    "kcmp",
    "pidfd_getfd",
    "process_madvise",
    "migrate_pages",
    "move_pages",
    "mbind",
    "set_mempolicy",
    "get_mempolicy",
    "_sysctl",
    "sysfs",
    "create_module",
    "get_kernel_syms",
    "query_module",
]

ORDINARY = [
    "read",
    "write",
    "openat",
    "close",
    "mmap",
    "mprotect",
    "munmap",
    "brk",
    "execve",
    "exit_group",
    "futex",
    "rt_sigaction",
    "rt_sigreturn",
    "epoll_wait",
    "epoll_ctl",
    "splice",
    "vmsplice",
    "pipe2",
    "wait4",
    "getpid",
    "set_robust_list",
    "rseq",
    "prlimit64",
    "getdents64",
    "statx",
    "newfstatat",
    "socketpair",
    "connect",
    "sendmsg",
    "setsockopt",
    "chroot",
    "capget",
    "ptrace",
    "seccomp",
    "landlock_create_ruleset",
]

TIOCSTI, TIOCLINUX, TIOCSETD, TCGETS, TIOCGWINSZ, FIONREAD = (
    0x5412,
    0x541C,
    0x5423,
    0x5401,
    0x5413,
    0x541B,
)
NS_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
CLONE_NEWTIME = 0x80
THREAD_FLAGS = 0x003D0F00  # what glibc's pthread_create passes
FORK_FLAGS = 0x01200011  # CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | SIGCHLD


@pytest.fixture(scope="module")
def bpf() -> bytes:
    return sc.compile_profile("default")


def test_profile_is_json_with_the_documented_shape() -> None:
    data = json.loads(sc.DEFAULT_PROFILE.read_text())
    assert data["defaultAction"] == "SCMP_ACT_ERRNO"
    assert data["defaultErrnoRet"] == errno.EPERM
    assert data["architectures"] == ["SCMP_ARCH_X86_64"]
    allowed = {
        n
        for e in data["syscalls"]
        if e["action"] == "SCMP_ACT_ALLOW" and not e.get("args")
        for n in e["names"]
    }
    assert not allowed & set(REFUSED)
    assert not allowed & {"clone", "clone3", "unshare", "personality", "mknod", "mknodat"}


def test_compiles_to_a_loadable_program(bpf: bytes) -> None:
    assert len(bpf) % 8 == 0
    assert 0 < len(bpf) // 8 <= 4096


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_refused_syscalls_get_eperm_on_every_arch(arch: str) -> None:
    checked = 0
    for name in REFUSED:
        if nr_of(arch, name) is None:
            continue
        assert verdict(program(arch), arch, name) == EPERM, f"{name} on {arch}"
        checked += 1
    assert checked > 40


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_clone3_gets_enosys_so_glibc_falls_back(arch: str) -> None:
    assert verdict(program(arch), arch, "clone3", 0, 88) == RET_ERRNO | errno.ENOSYS


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_ordinary_syscalls_are_allowed(arch: str) -> None:
    for name in ORDINARY:
        if nr_of(arch, name) is not None:
            assert verdict(program(arch), arch, name) == RET_ALLOW, f"{name} on {arch}"
    if arch == "i386":
        for name in ("socketcall", "mmap2", "fcntl64", "_llseek", "ipc", "set_thread_area"):
            assert verdict(program(arch), arch, name) == RET_ALLOW, name


@pytest.mark.parametrize("arch", sorted(ARCHES))
@pytest.mark.parametrize(
    "request_", [TIOCSTI, TIOCLINUX, TIOCSETD], ids=["TIOCSTI", "TIOCLINUX", "TIOCSETD"]
)
def test_terminal_injection_ioctls_refused_with_and_without_high_bits(
    arch: str, request_: int
) -> None:
    for high in (0, 1 << 32, 0xFFFFFFFF << 32, 0xDEAD << 40):
        assert verdict(program(arch), arch, "ioctl", 0, request_ | high, 0) == EPERM, hex(request_ | high)


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_other_ioctls_allowed(arch: str) -> None:
    for req in (TCGETS, TIOCGWINSZ, FIONREAD, 0x5411, 0x541D, 0x5422, 0x5424, 0x80045430):
        assert verdict(program(arch), arch, "ioctl", 0, req, 0) == RET_ALLOW, hex(req)
        assert verdict(program(arch), arch, "ioctl", 0, req | (1 << 32), 0) == RET_ALLOW, hex(req)


def test_ioctl_sampled_over_the_32_bit_space(bpf: bytes) -> None:
    rng = random.Random(5412)
    refused = {TIOCSTI, TIOCLINUX, TIOCSETD}
    for _ in range(3000):
        req = rng.getrandbits(32) if rng.random() < 0.5 else 0x5400 + rng.getrandbits(6)
        want = EPERM if req in refused else RET_ALLOW
        assert verdict(bpf, "x86_64", "ioctl", 0, req | (rng.getrandbits(32) << 32)) == want


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_clone_and_unshare_refuse_every_namespace_flag(arch: str) -> None:
    for flag_name, flag in NS_FLAGS.items():
        assert verdict(program(arch), arch, "clone", flag | 17) == EPERM, flag_name
        assert verdict(program(arch), arch, "clone", flag | THREAD_FLAGS) == EPERM, flag_name
        assert verdict(program(arch), arch, "unshare", flag) == EPERM, flag_name
    assert verdict(program(arch), arch, "unshare", CLONE_NEWTIME) == EPERM
    assert verdict(program(arch), arch, "clone", THREAD_FLAGS) == RET_ALLOW
    assert verdict(program(arch), arch, "clone", FORK_FLAGS) == RET_ALLOW
    assert verdict(program(arch), arch, "clone", 0x4111) == RET_ALLOW  # vfork-style, posix_spawn
    assert verdict(program(arch), arch, "unshare", 0x400) == RET_ALLOW  # CLONE_FILES


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_personality_only_safe_values(arch: str) -> None:
    for ok in (0, 8, 0x20000, 0x20008, 0xFFFFFFFF):
        assert verdict(program(arch), arch, "personality", ok) == RET_ALLOW, hex(ok)
    for bad in (0x0040000, 0x0400000, 0x0200000, 0x1, 0x0008 | 0x0040000):
        assert verdict(program(arch), arch, "personality", bad) == EPERM, hex(bad)


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_mknod_refuses_device_nodes(arch: str) -> None:
    for call, index in (("mknod", 1), ("mknodat", 2)):
        if nr_of(arch, call) is None:
            continue
        for mode, want in (
            (0o020600, EPERM),
            (0o060600, EPERM),
            (0o010600, RET_ALLOW),
            (0o100600, RET_ALLOW),
            (0o140600, RET_ALLOW),
            (0o600, RET_ALLOW),
        ):
            args = [0, 0, 0]
            args[index] = mode
            assert verdict(program(arch), arch, call, *args) == want, (call, oct(mode))


@pytest.mark.parametrize("arch", ["x86_64", "x32"])
def test_vsock_refused(arch: str) -> None:
    assert verdict(program(arch), arch, "socket", 40, 1) == EPERM
    assert verdict(program(arch), arch, "socket", 40 | (1 << 32), 1) == EPERM
    for family in (1, 2, 10, 16, 17, 39, 41):
        assert verdict(program(arch), arch, "socket", family, 1) == RET_ALLOW, family


def test_foreign_arch_is_killed(bpf: bytes) -> None:
    assert run_bpf(bpf, AUDIT_ARCH_AARCH64, 63) == RET_KILL_PROCESS


def test_unlisted_compat_abis_are_killed(bpf: bytes) -> None:
    assert verdict(bpf, "x86_64", "read") == RET_ALLOW
    assert verdict(bpf, "x32", "read") == RET_KILL_PROCESS
    assert verdict(bpf, "x32", "ioctl", 0, TIOCSTI) == RET_KILL_PROCESS
    assert verdict(bpf, "i386", "read") == RET_KILL_PROCESS


def test_every_ioctl_exception_and_block_are_disjoint_and_cover() -> None:
    patterns = [(0xFFFFFFFF, TIOCSTI), (0xFFFFFFFF, TIOCLINUX), (0xFFFF0000, 0xAB0000)]
    blocks = sc._complement(patterns)
    rng = random.Random(1)
    samples = [rng.getrandbits(32) for _ in range(5000)] + [TIOCSTI, TIOCLINUX, 0xAB1234]
    for value in samples:
        excepted = any(value & m == v for m, v in patterns)
        covered = [b for b in blocks if value & b[0] == b[1]]
        assert len(covered) == (0 if excepted else 1), hex(value)


# ---------------------------------------------------------------- bad profiles


def write(tmp_path: Path, text: str, name: str = "p.json") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def minimal(**extra: object) -> str:
    return json.dumps({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [], **extra})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="No such file"):
        sc.compile_profile(str(tmp_path / "nope.json"))


def test_not_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not a regular file"):
        sc.compile_profile(str(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(SpecError, match="not a regular file"):
        sc.compile_profile(str(fifo))


def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, minimal())
    os.chmod(path, 0)
    if os.geteuid() == 0:  # root reads it anyway: then it must simply compile
        assert sc.compile_profile(path)
    else:
        with pytest.raises(SpecError, match="Permission denied"):
            sc.compile_profile(path)


def test_relative_path_refused() -> None:
    with pytest.raises(SpecError, match="absolute path"):
        sc.compile_profile("profiles/x.json")
    with pytest.raises(SpecError, match="absolute path"):
        sc.compile_profile("/tmp/a\0b")


def test_invalid_json_names_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, '{\n  "defaultAction": "SCMP_ACT_ERRNO",\n  "syscalls": [,]\n}\n')
    with pytest.raises(SpecError) as info:
        sc.compile_profile(path)
    assert str(info.value).startswith(f"{path}:3:16: invalid JSON: ")
    assert "\n" not in str(info.value)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_bytes(b'{"defaultAction": "\xff"}')
    with pytest.raises(SpecError, match="UTF-8"):
        sc.compile_profile(str(path))


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        ("[]", "must be a JSON object"),
        (
            json.dumps({"defaultAction": "SCMP_ACT_MAYBE"}),
            r"defaultAction: unknown action 'SCMP_ACT_MAYBE'",
        ),
        (json.dumps({"syscalls": []}), "defaultAction: unknown action None"),
        (minimal(syscalls=[{"names": ["read"], "action": "SCMP_ACT_NOTIFY"}]), "needs a listener"),
        (
            minimal(syscalls=[{"names": ["read"], "action": "ALLOW"}]),
            r"syscalls\[0\].action: unknown action",
        ),
        (
            minimal(
                syscalls=[
                    {
                        "names": ["read"],
                        "action": "SCMP_ACT_ALLOW",
                        "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_LIKE"}],
                    }
                ]
            ),
            r"syscalls\[0\].args\[0\].op: unknown operator 'SCMP_CMP_LIKE'",
        ),
        (
            minimal(
                syscalls=[
                    {
                        "names": ["read"],
                        "action": "SCMP_ACT_ALLOW",
                        "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}],
                    }
                ]
            ),
            r"args\[0\].index: must be an integer from 0 to 5",
        ),
        (
            minimal(
                syscalls=[
                    {
                        "names": ["read"],
                        "action": "SCMP_ACT_ALLOW",
                        "args": [{"index": 0, "value": -1, "op": "SCMP_CMP_EQ"}],
                    }
                ]
            ),
            r"args\[0\].value: must be an integer",
        ),
        (
            minimal(syscalls=[{"names": [7], "action": "SCMP_ACT_ALLOW"}]),
            r"names\[0\]: must be a syscall name",
        ),
        (minimal(syscalls="read"), "syscalls: must be a list"),
        (minimal(architectures=["x86_64"]), "is not an architecture such as SCMP_ARCH_X86_64"),
        (
            minimal(syscalls=[{"names": ["read"], "action": "SCMP_ACT_ERRNO", "errnoRet": 70000}]),
            "errnoRet",
        ),
        (
            minimal(
                syscalls=[
                    {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
                    {"names": ["read"], "action": "SCMP_ACT_KILL"},
                ]
            ),
            "'read' has unconditional rules with different actions",
        ),
        (
            minimal(
                syscalls=[
                    {"names": ["ioctl"], "action": "SCMP_ACT_ALLOW"},
                    {
                        "names": ["ioctl"],
                        "action": "SCMP_ACT_ERRNO",
                        "args": [{"index": 1, "value": 5, "op": "SCMP_CMP_GT"}],
                    },
                ]
            ),
            "exceptions to an unconditional rule must each be one",
        ),
    ],
)
def test_bad_profiles_name_what_to_fix(tmp_path: Path, profile: str, message: str) -> None:
    path = write(tmp_path, profile)
    with pytest.raises(SpecError, match=message) as info:
        sc.compile_profile(path)
    assert str(info.value).startswith(path)
    assert "\n" not in str(info.value)


def test_unknown_syscall_names_are_skipped(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        minimal(
            syscalls=[
                {
                    "names": ["read", "no_such_syscall_in_any_kernel", "mseal"],
                    "action": "SCMP_ACT_ALLOW",
                }
            ]
        ),
    )
    bpf = sc.compile_profile(path)
    assert verdict(bpf, "x86_64", "read") == RET_ALLOW
    assert verdict(bpf, "x86_64", "write") == EPERM


def test_runtime_profile_features(tmp_path: Path) -> None:
    """includes/excludes, archMap, "name" and repeated-index args as the OCI runtimes read them."""
    profile = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 38,
        "archMap": [
            {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]},
            {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]},
        ],
        "syscalls": [
            {"name": "read", "action": "SCMP_ACT_ALLOW"},
            {
                "names": ["mount"],
                "action": "SCMP_ACT_ALLOW",
                "includes": {"caps": ["CAP_SYS_ADMIN"]},
            },
            {
                "names": ["write"],
                "action": "SCMP_ACT_ALLOW",
                "excludes": {"caps": ["CAP_SYS_ADMIN"]},
            },
            {"names": ["getpid"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["s390x"]}},
            {"names": ["gettid"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["amd64"]}},
            {"names": ["getppid"], "action": "SCMP_ACT_ALLOW", "excludes": {"arches": ["amd64"]}},
            {"names": ["getuid"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "3.0"}},
            {"names": ["getgid"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "999.0"}},
            {
                "names": ["kill"],
                "action": "SCMP_ACT_ALLOW",
                "args": [
                    {"index": 1, "value": 0, "op": "SCMP_CMP_EQ"},
                    {"index": 1, "value": 15, "op": "SCMP_CMP_EQ"},
                ],
            },
            {"names": ["ioctl"], "action": "SCMP_ACT_KILL_PROCESS"},
            {
                "names": ["ioctl"],
                "action": "SCMP_ACT_ALLOW",
                "args": [
                    {"index": 1, "value": 0xFFFF, "valueTwo": 0x5401, "op": "SCMP_CMP_MASKED_EQ"}
                ],
            },
        ],
    }
    bpf = sc.compile_profile(write(tmp_path, json.dumps(profile)))
    enosys = RET_ERRNO | errno.ENOSYS
    assert verdict(bpf, "x86_64", "read") == RET_ALLOW
    assert verdict(bpf, "x86_64", "mount") == enosys
    assert verdict(bpf, "x86_64", "write") == RET_ALLOW
    assert verdict(bpf, "x86_64", "getpid") == enosys
    assert verdict(bpf, "x86_64", "gettid") == RET_ALLOW
    assert verdict(bpf, "x86_64", "getppid") == enosys
    assert verdict(bpf, "x86_64", "getuid") == RET_ALLOW
    assert verdict(bpf, "x86_64", "getgid") == enosys
    assert verdict(bpf, "x86_64", "kill", 1, 0) == RET_ALLOW
    assert verdict(bpf, "x86_64", "kill", 1, 15) == RET_ALLOW
    assert verdict(bpf, "x86_64", "kill", 1, 9) == enosys
    assert verdict(bpf, "x86_64", "ioctl", 0, 0x5401) == RET_ALLOW
    assert verdict(bpf, "x86_64", "ioctl", 0, 0x5412) == RET_KILL_PROCESS
    assert verdict(bpf, "i386", "read") == RET_ALLOW
    assert verdict(bpf, "x32", "read") == RET_KILL_PROCESS


# ---------------------------------------------------------------- caching


def test_cache_by_path_mtime_and_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_build = sc._build

    def counting_build(profile: object) -> bytes:
        calls.append("build")
        return real_build(profile)  # type: ignore[arg-type]

    monkeypatch.setattr(sc, "_build", counting_build)
    path = write(tmp_path, minimal(syscalls=[{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]))
    first = sc.compile_profile(path)
    assert sc.compile_profile(path) is first
    assert len(calls) == 1

    Path(path).write_text(minimal(syscalls=[{"names": ["write"], "action": "SCMP_ACT_ALLOW"}]))
    os.utime(path, ns=(1, 1_000_000_000))
    second = sc.compile_profile(path)
    assert len(calls) == 2
    assert verdict(second, "x86_64", "write") == RET_ALLOW
    assert verdict(second, "x86_64", "read") == EPERM


def test_default_is_cached(bpf: bytes) -> None:
    assert sc.compile_profile("default") is bpf
