"""The sandbox spec: what a user asks for, validated into frozen values.

This module owns parsing of every user-facing string (sizes, durations, mounts,
env entries, users, capabilities) into typed values. It never touches the system:
existence checks of host paths happen in the engine, which sees the host.
Every parser takes ``untrusted_*`` text and either returns a value or raises
:class:`~silo.model.errors.SpecError` with a message that says what to do.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from silo.model.errors import SpecError
from silo.model.network import Network, NetworkPolicy, build_policy


class Isolation(enum.Enum):
    """The boundary a sandbox runs behind (see ARCHITECTURE.md)."""

    APP = "app"  # copy-on-write file view only: NOT a security boundary
    PROCESS = "process"
    VM = "vm"  # a QEMU microVM (silo.backends.vm)
    GVISOR = "gvisor"  # gVisor's runsc (silo.backends.gvisor): one-shot runs for now


CAPABILITIES: dict[str, int] = {
    name: number
    for number, name in enumerate(
        (
            "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP "
            "LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK "
            "IPC_OWNER SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN "
            "SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE "
            "AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND "
            "AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE"
        ).split()
    )
}

# Capabilities that would hand the sandbox the host: refused even with --cap.
FORBIDDEN_CAPABILITIES = frozenset({"SYS_MODULE", "SYS_RAWIO", "SYS_BOOT", "MAC_ADMIN", "MAC_OVERRIDE"})

RLIMITS = ("nofile", "nproc", "core", "stack", "fsize", "as", "cpu", "memlock")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(untrusted: str, what: str = "size") -> int:
    """``512M``, ``1G``, ``1.5GiB``, ``4096`` -> bytes (binary units)."""
    match = _SIZE_RE.match(untrusted)
    if not match:
        raise SpecError(
            f"bad {what} {untrusted!r}: use a number with an optional unit K, M, G or T, like 512M"
        )
    number, unit, _ = match.groups()
    value = int(float(number) * _UNITS[unit.lower()])
    if value <= 0:
        raise SpecError(f"bad {what} {untrusted!r}: it must be greater than zero")
    return value


def parse_duration(untrusted: str, what: str = "duration") -> float:
    """``30s``, ``1.5m``, ``250ms``, ``2h``, ``10`` (seconds) -> seconds."""
    match = _DURATION_RE.match(untrusted)
    if not match:
        raise SpecError(
            f"bad {what} {untrusted!r}: use a number with an optional unit ms, s, m or h, like 30s"
        )
    number, unit = match.groups()
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[(unit or "s").lower()]
    value = float(number) * scale
    if value <= 0 or not math.isfinite(value):
        raise SpecError(f"bad {what} {untrusted!r}: it must be greater than zero")
    return value


def parse_cpus(untrusted: str | float) -> float:
    try:
        value = float(untrusted)
    except ValueError:
        raise SpecError(f"bad cpu count {untrusted!r}: use a number of CPUs like 1.5") from None
    if not (0.01 <= value <= 1024) or not math.isfinite(value):
        raise SpecError(f"bad cpu count {untrusted!r}: use a number between 0.01 and 1024")
    return value


def parse_count(untrusted: str | int, what: str) -> int:
    try:
        value = int(untrusted)
    except ValueError:
        raise SpecError(f"bad {what} {untrusted!r}: use a whole number like 256") from None
    if value <= 0:
        raise SpecError(f"bad {what} {untrusted!r}: it must be greater than zero")
    return value


def _check_guest_path(untrusted: str, what: str) -> str:
    if not untrusted.startswith("/"):
        raise SpecError(f"bad {what} {untrusted!r}: it must be an absolute path inside the sandbox")
    if "\0" in untrusted or len(untrusted) > 4096:
        raise SpecError(f"bad {what} {untrusted!r}: it contains a NUL byte or is too long")
    parts = [p for p in untrusted.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise SpecError(f"bad {what} {untrusted!r}: '..' is not allowed")
    return "/" + "/".join(parts)


@dataclass(frozen=True)
class Mount:
    """A host directory or file mapped into the sandbox."""

    source: str
    target: str
    readonly: bool = False

    @classmethod
    def parse(cls, untrusted: str) -> Mount:
        """``HOST:GUEST[:ro|:rw]`` as given to ``-v``."""
        parts = untrusted.split(":")
        mode = "rw"
        if len(parts) == 3:
            mode = parts[2]
        if len(parts) not in (2, 3) or mode not in ("ro", "rw") or not parts[0] or not parts[1]:
            raise SpecError(f"bad mount {untrusted!r}: use HOST:GUEST or HOST:GUEST:ro")
        return cls(parts[0], parts[1], readonly=mode == "ro")

    def __post_init__(self) -> None:
        """Every Mount is validated, however it was built (``silo.Mount`` is public)."""
        if not self.source.startswith("/"):
            raise SpecError(
                f"bad mount source {self.source!r}: it must be an absolute host path "
                f"(try $PWD/{self.source})"
            )
        if "\0" in self.source:
            raise SpecError("bad mount source: it contains a NUL byte")
        target = _check_guest_path(self.target, "mount target")
        if target == "/":
            raise SpecError("bad mount target '/': map a folder below the root, like /data")
        object.__setattr__(self, "target", target)


def check_vm_mounts(mounts: Sequence[Mount]) -> None:
    """The vm level's own rule for mount targets: /.silo is the guest agent's."""
    for m in mounts:
        if m.target == "/.silo" or m.target.startswith("/.silo/"):
            raise SpecError(f"bad mount target {m.target}: /.silo is the VM agent's own; pick another path")


@dataclass(frozen=True)
class User:
    uid: int = 0
    gid: int = 0

    @classmethod
    def parse(cls, untrusted: str) -> User:
        """``UID`` or ``UID:GID`` (numbers, inside the sandbox)."""
        uid_s, _, gid_s = untrusted.partition(":")
        try:
            uid = int(uid_s)
            gid = int(gid_s) if gid_s else uid
        except ValueError:
            raise SpecError(f"bad user {untrusted!r}: use numeric UID or UID:GID, like 1000:1000") from None
        if not (0 <= uid < 65536 and 0 <= gid < 65536):
            raise SpecError(f"bad user {untrusted!r}: ids must be between 0 and 65535")
        return cls(uid, gid)


@dataclass(frozen=True)
class Limits:
    memory: int | None = None  # bytes
    cpus: float | None = None
    pids: int | None = None

    @property
    def any(self) -> bool:
        return self.memory is not None or self.cpus is not None or self.pids is not None


def parse_env_entry(untrusted: str) -> tuple[str, str]:
    name, sep, value = untrusted.partition("=")
    if not sep or not _ENV_NAME_RE.fullmatch(name):
        raise SpecError(f"bad environment entry {untrusted!r}: use NAME=VALUE")
    if "\0" in value:
        raise SpecError(f"bad environment entry {name!r}: the value contains a NUL byte")
    return name, value


def parse_env_file(text: str, filename: str) -> dict[str, str]:
    """``NAME=VALUE`` lines; blank lines and ``#`` comments skipped; errors name file:line."""
    env: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export "):
            stripped = stripped[7:].lstrip()
        try:
            name, value = parse_env_entry(stripped)
        except SpecError as e:
            raise SpecError(f"{filename}:{lineno}: {e.message}") from None
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[name] = value
    return env


def parse_cap(untrusted: str) -> str:
    name = untrusted.upper().removeprefix("CAP_")
    if name not in CAPABILITIES:
        raise SpecError(f"unknown capability {untrusted!r}: use a name like NET_BIND_SERVICE")
    if name in FORBIDDEN_CAPABILITIES:
        raise SpecError(f"capability {name} would give the sandbox the host; it cannot be added")
    return name


def parse_hostname(untrusted: str) -> str:
    if not _HOSTNAME_RE.fullmatch(untrusted):
        raise SpecError(f"bad hostname {untrusted!r}: use letters, digits and '-', at most 63")
    return untrusted


def parse_rlimit(untrusted: str) -> tuple[str, int, int]:
    """``nofile=1024`` or ``nofile=1024:4096``."""
    name, sep, value = untrusted.partition("=")
    if not sep or name not in RLIMITS:
        raise SpecError(f"bad rlimit {untrusted!r}: use NAME=SOFT[:HARD] with NAME one of {', '.join(RLIMITS)}")
    soft_s, _, hard_s = value.partition(":")
    try:
        soft = int(soft_s)
        hard = int(hard_s) if hard_s else soft
    except ValueError:
        raise SpecError(f"bad rlimit {untrusted!r}: limits are whole numbers") from None
    if soft < 0 or hard < soft:
        raise SpecError(f"bad rlimit {untrusted!r}: need 0 <= SOFT <= HARD")
    return name, soft, hard


@dataclass(frozen=True)
class Spec:
    """Everything that describes a one-shot sandbox except the command.

    ``root`` is ``"host"`` (the host's system directories, read-only, under a
    writable overlay) or an absolute path to an unpacked image directory.
    """

    isolation: Isolation = Isolation.PROCESS
    root: str = "host"
    mounts: tuple[Mount, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    workdir: str | None = None
    user: User = field(default_factory=User)
    hostname: str = "silo"
    limits: Limits = field(default_factory=Limits)
    timeout: float | None = None
    caps: tuple[str, ...] = ()
    seccomp: str = "default"  # "default", "unconfined" or an absolute path to a profile
    rlimits: tuple[tuple[str, int, int], ...] = ()
    tmpfs_size: int = 1 << 30
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    kernel: str = "auto"  # vm level: auto, host, debian (fetched) or a kernel image's absolute path
    # app level only
    cow: tuple[str, ...] = ()
    keep: str | None = None

    def __post_init__(self) -> None:
        if self.workdir is not None:
            workdir = _check_guest_path(self.workdir, "working directory")
            if workdir == "/proc" or workdir.startswith("/proc/"):
                # SECURITY: /proc/self/fd/N as a cwd was runc's CVE-2024-21626.
                raise SpecError(f"bad working directory {self.workdir!r}: it cannot be inside /proc")
            object.__setattr__(self, "workdir", workdir)
        if self.root != "host" and not self.root.startswith("/"):
            raise SpecError(f"bad root {self.root!r}: use 'host' or an absolute path to an image directory")
        if self.isolation is not Isolation.APP and (self.cow or self.keep):
            raise SpecError("--cow and --keep belong to the app level: add --isolation app")
        if self.keep is not None and not self.keep.startswith("/"):
            raise SpecError(f"bad --keep {self.keep!r}: it must be an absolute path")
        for path in self.cow:
            if not path.startswith("/"):
                raise SpecError(f"bad --cow {path!r}: it must be an absolute path")
        check_kernel(self.kernel, self.isolation)
        if self.network.enabled and self.isolation is Isolation.APP:
            raise SpecError("the app level shares the host's network: a network policy needs --isolation process")
        if self.network.enabled and "NET_ADMIN" in self.caps:
            # SECURITY: CAP_NET_ADMIN would let the sandbox rewrite its own firewall.
            raise SpecError("--cap NET_ADMIN cannot be combined with a network policy: drop one of them")


KERNELS = ("auto", "host", "debian")


def check_kernel(kernel: str, isolation: Isolation) -> str:
    """A vm guest's kernel choice: ``auto``, ``host``, ``debian`` or an absolute path."""
    if kernel not in KERNELS and not kernel.startswith("/"):
        raise SpecError(f"bad kernel {kernel!r}: use host, debian or the absolute path of a kernel image")
    if kernel != "auto" and isolation is not Isolation.VM:
        raise SpecError("--kernel belongs to the vm level (the other levels share the host's kernel): "
                        "add --isolation vm, or drop --kernel")
    return kernel


def coerce_duration(value: float | str | None, what: str) -> float | None:
    """Seconds from a number or a duration string like ``30s``; None stays None."""
    if value is None or isinstance(value, (int, float)):
        if value is not None and value <= 0:
            raise SpecError(f"bad {what} {value!r}: it must be greater than zero")
        return None if value is None else float(value)
    return parse_duration(value, what)


def build_spec(*, isolation: str | Isolation = "process", root: str = "host",
               mounts: Iterable[Mount | str] = (), env: Mapping[str, str] | None = None,
               workdir: str | None = None, user: str | int | User | None = None,
               hostname: str | None = None, memory: str | int | None = None,
               cpus: float | str | None = None, pids: int | str | None = None,
               timeout: float | str | None = None, caps: Iterable[str] = (),
               seccomp: str = "default", rlimits: Mapping[str, int | tuple[int, int]] | None = None,
               tmpfs_size: str | int | None = None, cow: Iterable[str] = (),
               keep: str | None = None, network: str | Network | NetworkPolicy | None = None,
               allow: Iterable[str] = (), publish: Iterable[str] = (), links: Iterable[str] = (),
               bandwidth: str | int | None = None, dns: Iterable[str] = (), kernel: str = "auto") -> Spec:
    """Validate SDK-style arguments into a :class:`Spec` (SpecError on bad input)."""
    try:
        iso = isolation if isinstance(isolation, Isolation) else Isolation(isolation)
    except ValueError:
        raise SpecError(f"unknown isolation {isolation!r}: use one of "
                        f"{', '.join(i.value for i in Isolation)}") from None
    mount_list = tuple(m if isinstance(m, Mount) else Mount.parse(m) for m in mounts)
    env_pairs = tuple(parse_env_entry(f"{k}={v}") for k, v in (env or {}).items())
    if user is None:
        usr = User()
    elif isinstance(user, User):
        usr = user
    else:
        usr = User.parse(str(user))
    limits = Limits(
        memory=None if memory is None else (memory if isinstance(memory, int) else parse_size(memory, "memory size")),
        cpus=None if cpus is None else parse_cpus(cpus),
        pids=None if pids is None else parse_count(pids, "pids limit"),
    )
    rl = []
    for name, value in (rlimits or {}).items():
        soft, hard = (value, value) if isinstance(value, int) else value
        rl.append(parse_rlimit(f"{name}={soft}:{hard}"))
    seccomp_src = seccomp
    if seccomp not in ("default", "unconfined") and not seccomp.startswith("/"):
        raise SpecError(f"bad seccomp {seccomp!r}: use default, unconfined or an absolute path to a profile")
    extra: dict[str, Any] = {}
    if tmpfs_size is not None:
        extra["tmpfs_size"] = tmpfs_size if isinstance(tmpfs_size, int) else parse_size(tmpfs_size, "tmpfs size")
    if isinstance(network, NetworkPolicy):
        extra["network"] = network
    else:
        extra["network"] = build_policy(network, allow=allow, publish=publish, links=links,
                                        bandwidth=bandwidth, dns=dns)
    return Spec(
        isolation=iso, root=root, mounts=mount_list, env=env_pairs, workdir=workdir, user=usr,
        hostname=parse_hostname(hostname) if hostname else "silo", limits=limits,
        timeout=coerce_duration(timeout, "timeout"), caps=tuple(parse_cap(c) for c in caps),
        seccomp=seccomp_src, rlimits=tuple(rl), cow=tuple(cow), keep=keep, kernel=kernel, **extra,
    )
