"""Seccomp: a JSON profile in, a classic-BPF program out.

This module owns the translation of seccomp profiles (silo's packaged ``default``
profile, or a user's file in the OCI/Docker JSON format) into the kernel's BPF;
``silo-setup`` loads the program with one ``seccomp(2)`` call. It must not decide *whether* a sandbox
gets a filter (``unconfined`` is the caller's business) nor set no_new_privs.

Profile format (a compatible subset of the runtimes' JSON)::

    {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
     "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
     "syscalls": [{"names": [...], "action": "SCMP_ACT_ALLOW",
                   "errnoRet": 1, "args": [{"index": 1, "op": "SCMP_CMP_MASKED_EQ",
                                            "value": MASK, "valueTwo": VALUE}],
                   "includes": {...}, "excludes": {...}, "comment": "..."}]}

* ``args`` of one entry are ANDed; if an index repeats, each arg becomes its own
  rule (ORed), as runc does. For ``SCMP_CMP_MASKED_EQ`` ``value`` is the mask.
* ``archMap`` is read like ``architectures`` for this machine's entry. Only the
  native architecture and its compat ABIs (i386 and x32 on x86_64) can run here;
  any architecture the profile does not list kills the process (no x32/i386
  bypass of an x86_64 filter).
* ``includes``/``excludes`` select entries by ``arches`` (Go names: ``amd64``...),
  ``caps`` (sandboxes hold no capabilities, so ``includes.caps`` entries never
  apply) and ``minKernel``.
* Syscall names the installed libseccomp does not know are skipped.
* **Exceptions win.** If a syscall has an unconditional rule and conditional rules
  with another action (``ioctl`` allowed, ``ioctl(fd, TIOCSTI)`` refused),
  libseccomp alone would let the unconditional rule swallow them. The unconditional
  rule is therefore rewritten as the complement of the exceptions, which must each
  be one ``SCMP_CMP_EQ``/``SCMP_CMP_MASKED_EQ`` on the low 32 bits of one shared
  argument (the kernel truncates ``int`` arguments and the ioctl request to 32
  bits, so ``0x1_00005412`` is still TIOCSTI).
* Unknown keys are ignored; unknown actions, operators and malformed values are a
  :class:`~silo.model.errors.SpecError`.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from silo.model.errors import SpecError

__all__ = ["compile_profile"]

DEFAULT_PROFILE: Final = (
    Path(__file__).resolve().parent.parent / "data" / "seccomp" / "default.json"
)
"""The packaged profile that ``compile_profile("default")`` reads."""

_MAX_PROFILE_BYTES: Final = 1 << 20
_BPF_MAXINSNS: Final = 4096  # the kernel's limit on one filter program
_MAX_ERRNO: Final = 4095
_U64: Final = (1 << 64) - 1
_U32: Final = (1 << 32) - 1
_CACHE_SIZE: Final = 32

_ACTIONS: Final = frozenset(
    {
        "SCMP_ACT_ALLOW",
        "SCMP_ACT_ERRNO",
        "SCMP_ACT_KILL",
        "SCMP_ACT_KILL_THREAD",
        "SCMP_ACT_KILL_PROCESS",
        "SCMP_ACT_TRAP",
        "SCMP_ACT_LOG",
        "SCMP_ACT_TRACE",
    }
)
_OPS: Final = frozenset(
    {
        "SCMP_CMP_NE",
        "SCMP_CMP_LT",
        "SCMP_CMP_LE",
        "SCMP_CMP_EQ",
        "SCMP_CMP_GE",
        "SCMP_CMP_GT",
        "SCMP_CMP_MASKED_EQ",
    }
)
# Compat ABIs a native architecture can also execute (libseccomp names).
_COMPAT: Final[Mapping[str, frozenset[str]]] = {
    "X86_64": frozenset({"X86", "X32"}),
    "AARCH64": frozenset({"ARM"}),
    "S390X": frozenset({"S390"}),
    "PPC64": frozenset({"PPC"}),
    "MIPS64": frozenset({"MIPS", "MIPS64N32"}),
    "MIPSEL64": frozenset({"MIPSEL", "MIPSEL64N32"}),
    "PARISC64": frozenset({"PARISC"}),
}
# Names the runtimes' includes/excludes use for an architecture (Go's GOARCH).
_GO_ARCH: Final[Mapping[str, str]] = {
    "X86_64": "amd64",
    "X86": "386",
    "AARCH64": "arm64",
    "ARM": "arm",
    "PPC64LE": "ppc64le",
    "S390X": "s390x",
    "RISCV64": "riscv64",
    "MIPS64": "mips64",
    "MIPSEL64": "mips64le",
}


@dataclass(frozen=True)
class _Action:
    kind: str  # SCMP_ACT_* with KILL normalised to KILL_THREAD
    data: int = 0  # errno for ERRNO, message for TRACE


@dataclass(frozen=True)
class _Cond:
    index: int
    op: str
    value: int
    value_two: int


@dataclass(frozen=True)
class _Rule:
    name: str
    action: _Action
    conds: tuple[_Cond, ...]


@dataclass(frozen=True)
class _Profile:
    where: str
    default: _Action
    arches: frozenset[str]  # listed architectures, libseccomp names without SCMP_ARCH_
    rules: tuple[_Rule, ...]


# --------------------------------------------------------------------------- compile

_cache: dict[tuple[str, int, int], bytes] = {}
_cache_lock = threading.Lock()


def compile_profile(untrusted_source: str) -> bytes:
    """Compile a profile to the BPF program for this machine (``struct sock_filter[]``).

    ``untrusted_source`` is ``"default"`` or an absolute path to a JSON profile; the
    file is opened with this process's privileges, so the caller decides whether the
    requester may name it. Results are cached in-process by (path, mtime_ns, size).
    Raises :class:`SpecError` (one line, naming the file and what to fix) for a bad
    source, an unreadable file, invalid JSON (``FILE:LINE:COL: ...``) or a bad rule.
    """
    path = _source_path(untrusted_source)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    with _cache_lock:
        hit = _cache.get((path, st.st_mtime_ns, st.st_size))
    if hit is not None:
        return hit
    key, data = _read(path)
    bpf = _build(_parse(path, data))
    with _cache_lock:
        if len(_cache) >= _CACHE_SIZE:
            del _cache[next(iter(_cache))]
        _cache[key] = bpf
    return bpf


def _unreadable(path: str, exc: OSError) -> SpecError:
    return SpecError(f"seccomp profile {path}: {exc.strerror}; give a readable JSON file")


def _source_path(untrusted_source: str) -> str:
    if untrusted_source == "default":
        return str(DEFAULT_PROFILE)
    if "\0" in untrusted_source or not os.path.isabs(untrusted_source):
        raise SpecError(
            f"seccomp profile {untrusted_source[:200]!r}: use 'default', 'unconfined' "
            "or an absolute path to a JSON profile"
        )
    return os.path.normpath(untrusted_source)


def _read(path: str) -> tuple[tuple[str, int, int], bytes]:
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SpecError(f"seccomp profile {path}: not a regular file; give a JSON file")
        if st.st_size > _MAX_PROFILE_BYTES:
            raise SpecError(f"seccomp profile {path}: larger than 1 MiB; trim the profile")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(_MAX_PROFILE_BYTES + 1)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    finally:
        os.close(fd)
    return (path, st.st_mtime_ns, st.st_size), data


# --------------------------------------------------------------------------- parse


def _parse(path: str, untrusted_data: bytes) -> _Profile:
    import json

    try:
        untrusted = json.loads(untrusted_data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"{path}: byte {exc.start} is not UTF-8; save the profile as UTF-8"
        ) from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    if not isinstance(untrusted, dict):
        raise SpecError(f"{path}: the profile must be a JSON object")

    default_errno = _int(path, "defaultErrnoRet", untrusted.get("defaultErrnoRet", 1), _MAX_ERRNO)
    default = _action(path, "defaultAction", untrusted.get("defaultAction"), default_errno)

    native = _native_arch()
    arches = set(_arch_names(path, "architectures", untrusted.get("architectures")))
    for i, entry in enumerate(_list(path, "archMap", untrusted.get("archMap"))):
        where = f"archMap[{i}]"
        if not isinstance(entry, dict):
            raise SpecError(f"{path}: {where}: must be an object")
        names = _arch_names(path, f"{where}.architecture", [entry.get("architecture")])
        if native in names:
            arches.update(names)
            arches.update(
                _arch_names(path, f"{where}.subArchitectures", entry.get("subArchitectures"))
            )

    rules: list[_Rule] = []
    for i, entry in enumerate(_list(path, "syscalls", untrusted.get("syscalls"))):
        rules.extend(_parse_entry(path, f"syscalls[{i}]", entry, default_errno, native))
    return _Profile(path, default, frozenset(arches), tuple(rules))


def _parse_entry(
    path: str, where: str, untrusted: object, default_errno: int, native: str
) -> Iterator[_Rule]:
    if not isinstance(untrusted, dict):
        raise SpecError(f"{path}: {where}: must be an object")
    untrusted_names = _list(path, f"{where}.names", untrusted.get("names"))
    if "name" in untrusted:  # the older single-name form
        untrusted_names = [*untrusted_names, untrusted["name"]]
    names: list[str] = []
    for j, name in enumerate(untrusted_names):
        if not isinstance(name, str) or not name or len(name) > 64:
            raise SpecError(f"{path}: {where}.names[{j}]: must be a syscall name")
        names.append(name)
    errno_ret = default_errno
    if untrusted.get("errnoRet") is not None:
        errno_ret = _int(path, f"{where}.errnoRet", untrusted["errnoRet"], _MAX_ERRNO)
    action = _action(path, f"{where}.action", untrusted.get("action"), errno_ret)
    conds = [
        _cond(path, f"{where}.args[{k}]", arg)
        for k, arg in enumerate(_list(path, f"{where}.args", untrusted.get("args")))
    ]
    if not _selected(path, where, untrusted, native):
        return
    if len({c.index for c in conds}) == len(conds):
        groups = [tuple(conds)]
    else:  # runc: repeated indexes make one rule per condition
        groups = [(c,) for c in conds]
    for name in names:
        for group in groups:
            yield _Rule(name, action, group)


def _action(path: str, where: str, untrusted: object, errno_ret: int) -> _Action:
    """``errno_ret`` is the errno of SCMP_ACT_ERRNO and the message of SCMP_ACT_TRACE."""
    if untrusted == "SCMP_ACT_NOTIFY":
        raise SpecError(
            f"{path}: {where}: SCMP_ACT_NOTIFY needs a listener silo does not run; "
            "use SCMP_ACT_ERRNO"
        )
    if not isinstance(untrusted, str) or untrusted not in _ACTIONS:
        raise SpecError(
            f"{path}: {where}: unknown action {untrusted!r}; "
            f"use one of {', '.join(sorted(_ACTIONS))}"
        )
    kind = "SCMP_ACT_KILL_THREAD" if untrusted == "SCMP_ACT_KILL" else untrusted
    if kind in ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"):
        return _Action(kind, errno_ret)
    return _Action(kind)


def _cond(path: str, where: str, untrusted: object) -> _Cond:
    if not isinstance(untrusted, dict):
        raise SpecError(f"{path}: {where}: must be an object")
    op = untrusted.get("op")
    if not isinstance(op, str) or op not in _OPS:
        raise SpecError(
            f"{path}: {where}.op: unknown operator {op!r}; use one of {', '.join(sorted(_OPS))}"
        )
    return _Cond(
        index=_int(path, f"{where}.index", untrusted.get("index"), 5),
        op=op,
        value=_int(path, f"{where}.value", untrusted.get("value", 0), _U64),
        value_two=_int(path, f"{where}.valueTwo", untrusted.get("valueTwo", 0), _U64),
    )


def _selected(path: str, where: str, entry: Mapping[str, Any], native: str) -> bool:
    """Apply ``includes``/``excludes``: does this entry concern a sandbox on this machine?"""
    names = {native.lower(), _GO_ARCH.get(native, native.lower())}
    includes, excludes = entry.get("includes") or {}, entry.get("excludes") or {}
    if not isinstance(includes, dict) or not isinstance(excludes, dict):
        raise SpecError(f"{path}: {where}: includes and excludes must be objects")
    wanted = set(_strs(path, f"{where}.includes.arches", includes.get("arches")))
    if wanted and not names & wanted:
        return False
    if names & set(_strs(path, f"{where}.excludes.arches", excludes.get("arches"))):
        return False
    if includes.get("caps"):  # silo's sandboxes hold no capabilities
        return False
    min_kernel = includes.get("minKernel")
    if min_kernel:
        if not isinstance(min_kernel, str):
            raise SpecError(f"{path}: {where}.includes.minKernel: must be a string such as '4.8'")
        return _kernel_version() >= _version(path, f"{where}.includes.minKernel", min_kernel)
    return True


def _arch_names(path: str, where: str, untrusted: object) -> Iterator[str]:
    for name in _strs(path, where, untrusted):
        if not name.startswith("SCMP_ARCH_") or not name[10:].replace("_", "").isalnum():
            raise SpecError(
                f"{path}: {where}: {name!r} is not an architecture such as SCMP_ARCH_X86_64"
            )
        yield name[10:]


def _list(path: str, where: str, untrusted: object) -> list[object]:
    if untrusted is None:
        return []
    if not isinstance(untrusted, list):
        raise SpecError(f"{path}: {where}: must be a list")
    return untrusted


def _strs(path: str, where: str, untrusted: object) -> list[str]:
    items = _list(path, where, untrusted)
    for item in items:
        if not isinstance(item, str):
            raise SpecError(f"{path}: {where}: must be a list of strings")
    return [str(item) for item in items]


def _int(path: str, where: str, untrusted: object, maximum: int) -> int:
    if (
        isinstance(untrusted, bool)
        or not isinstance(untrusted, int)
        or not 0 <= untrusted <= maximum
    ):
        raise SpecError(f"{path}: {where}: must be an integer from 0 to {maximum}")
    return untrusted


def _version(path: str, where: str, untrusted: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in untrusted.split(".")[:3])
    except ValueError:
        raise SpecError(f"{path}: {where}: {untrusted!r} is not a version such as '4.8'") from None


def _kernel_version() -> tuple[int, ...]:
    release = os.uname().release
    parts = []
    for part in release.split("-")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts)


def _native_arch() -> str:
    """libseccomp's name (``X86_64``...) for this machine's architecture."""
    import seccomp

    token = seccomp.system_arch() & _U32
    for name in dir(seccomp.Arch):
        if name.isupper() and name != "NATIVE" and getattr(seccomp.Arch, name) & _U32 == token:
            return name
    raise SpecError("seccomp: libseccomp does not know this machine's architecture")


# --------------------------------------------------------------------------- plan


def _plan(profile: _Profile) -> list[_Rule]:
    """Turn the profile's rules into rules libseccomp will honour as written.

    Rules equal to the default action are dropped (libseccomp refuses them), and an
    unconditional rule with exceptions becomes the complement of the exceptions.
    """
    by_name: dict[str, list[_Rule]] = {}
    for rule in profile.rules:
        if rule not in by_name.setdefault(rule.name, []):
            by_name[rule.name].append(rule)
    out: list[_Rule] = []
    for name, rules in by_name.items():
        plain = {r.action for r in rules if not r.conds}
        if len(plain) > 1:
            raise SpecError(
                f"{profile.where}: syscall {name!r} has unconditional rules with different "
                "actions; keep one"
            )
        conditional = [r for r in rules if r.conds and r.action != profile.default]
        if not plain:
            out.extend(conditional)
            continue
        (action,) = plain
        exceptions = [r for r in rules if r.conds and r.action != action]
        if action == profile.default:
            out.extend(exceptions)
        elif not exceptions:
            out.append(_Rule(name, action, ()))
        else:
            index, patterns = _exception_patterns(profile.where, name, exceptions)
            for mask, value in _complement(patterns):
                out.append(_Rule(name, action, (_Cond(index, "SCMP_CMP_MASKED_EQ", mask, value),)))
            out.extend(r for r in exceptions if r.action != profile.default)
    return out


def _exception_patterns(
    where: str, name: str, exceptions: list[_Rule]
) -> tuple[int, list[tuple[int, int]]]:
    indexes = {c.index for r in exceptions for c in r.conds}
    patterns: list[tuple[int, int]] = []
    for rule in exceptions:
        if len(rule.conds) != 1 or len(indexes) != 1:
            break
        cond = rule.conds[0]
        if cond.op == "SCMP_CMP_EQ" and cond.value <= _U32:
            patterns.append((_U32, cond.value))
        elif cond.op == "SCMP_CMP_MASKED_EQ" and cond.value <= _U32:
            patterns.append((cond.value, cond.value_two & cond.value))
        else:
            break
    else:
        return indexes.pop(), patterns
    raise SpecError(
        f"{where}: syscall {name!r}: exceptions to an unconditional rule must each be one "
        "SCMP_CMP_EQ or SCMP_CMP_MASKED_EQ on the low 32 bits of the same argument"
    )


def _complement(patterns: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Cover every value matching none of ``patterns`` ((mask, value) pairs) with masked blocks.

    Splits on the highest bit any live pattern still constrains; a branch no pattern
    can reach becomes one block, a branch a pattern fully decides is dropped.
    """
    blocks: list[tuple[int, int]] = []
    stack: list[tuple[int, int]] = [(0, 0)]
    while stack:
        mask, value = stack.pop()
        live = [(m, v) for m, v in patterns if (v ^ value) & m & mask == 0]
        if not live:
            blocks.append((mask, value))
            continue
        if any(m & ~mask == 0 for m, _ in live):
            continue
        free = 0
        for m, _ in live:
            free |= m & ~mask
        bit = 1 << (free.bit_length() - 1)
        stack.append((mask | bit, value | bit))
        stack.append((mask | bit, value))
    return blocks


# --------------------------------------------------------------------------- build


def _build(profile: _Profile) -> bytes:
    import seccomp

    def action(a: _Action) -> Any:
        match a.kind:
            case "SCMP_ACT_ALLOW":
                return seccomp.ALLOW
            case "SCMP_ACT_ERRNO":
                return seccomp.ERRNO(a.data)
            case "SCMP_ACT_TRACE":
                return seccomp.TRACE(a.data)
            case "SCMP_ACT_KILL_PROCESS":
                return seccomp.KILL_PROCESS
            case "SCMP_ACT_TRAP":
                return seccomp.TRAP
            case "SCMP_ACT_LOG":
                return seccomp.LOG
            case _:
                return seccomp.KILL

    ops = {
        "SCMP_CMP_NE": seccomp.NE,
        "SCMP_CMP_LT": seccomp.LT,
        "SCMP_CMP_LE": seccomp.LE,
        "SCMP_CMP_EQ": seccomp.EQ,
        "SCMP_CMP_GE": seccomp.GE,
        "SCMP_CMP_GT": seccomp.GT,
        "SCMP_CMP_MASKED_EQ": seccomp.MASKED_EQ,
    }
    native = _native_arch()
    wanted = profile.arches & _COMPAT.get(native, frozenset())
    tokens = [getattr(seccomp.Arch, name) for name in sorted(wanted) if hasattr(seccomp.Arch, name)]

    filt = seccomp.SyscallFilter(action(profile.default))
    # Syscalls of an architecture the filter does not list kill the process.
    filt.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    # A binary search over syscall numbers instead of a linear chain: fewer instructions
    # run per syscall, and a much faster load (the kernel emulates the filter per number).
    filt.set_attr(seccomp.Attr.CTL_OPTIMIZE, 2)
    for token in tokens:
        filt.add_arch(token)
    all_arches = [seccomp.Arch.NATIVE, *tokens]
    for rule in _plan(profile):
        if all(seccomp.resolve_syscall(a, rule.name) == -1 for a in all_arches):
            continue  # newer than the installed libseccomp: stays refused by default
        args = [seccomp.Arg(c.index, ops[c.op], c.value, c.value_two) for c in rule.conds]
        try:
            filt.add_rule(action(rule.action), rule.name, *args)
        except (RuntimeError, ValueError) as exc:
            raise SpecError(
                f"{profile.where}: syscall {rule.name!r}: libseccomp refused the rule ({exc})"
            ) from None

    fd = os.memfd_create("silo-seccomp", os.MFD_CLOEXEC)
    with os.fdopen(fd, "w+b") as f:
        filt.export_bpf(f)
        f.seek(0)
        bpf = f.read()
    if len(bpf) // 8 > _BPF_MAXINSNS:
        raise SpecError(
            f"{profile.where}: compiles to {len(bpf) // 8} BPF instructions, over the "
            f"kernel's {_BPF_MAXINSNS}; merge or drop argument rules"
        )
    return bpf
