"""The setup script: a plan as silo-setup reads it, and the warm hand-over message.

``silo-setup`` (``src/silo/native/setup.c``) builds the sandbox inside its new
namespaces; this module is the one place that knows the layout it reads. A script is
a flat sequence of fields, each a 4-byte little-endian length, the bytes and a NUL
(so the C side can use every field as a C string in place):

    "silo-setup 4"
    user_ns mnt_ns pid_ns cgroup_ns inside_uid inside_gid setgroups idmapped_layers
    N  then N operations: the op's name, then its fields in plan.py's order
       (a tuple is a count and its items; bools and ints are decimal text)
    cwd uid gid capability-mask no_new_privs harden new_session tty init winsize (rows << 16 | cols)
    console (with tty: the socket path the command hands its own pty's master over; empty: none)
    R  then R rlimits: resource number, soft, hard (-1: unlimited)
    seccomp BPF (empty: none)
    A  then A argv strings;  E  then E "KEY=VALUE" strings

The operations part alone (see :func:`ops_only`) is what ``silo-setup --trace``
prints the system calls of, for the unit tests.
"""

from __future__ import annotations

import os
import resource
import struct
from dataclasses import fields
from typing import Any

from silo.model import plan as p
from silo.model.errors import (
    CommandNotExecutable,
    CommandNotFound,
    InternalError,
    ProtocolError,
    SiloError,
    error_from_wire,
)
from silo.model.spec import CAPABILITIES

MAGIC = b"silo-setup 4"

RLIMITS = {"nofile": resource.RLIMIT_NOFILE, "nproc": resource.RLIMIT_NPROC,
           "core": resource.RLIMIT_CORE, "stack": resource.RLIMIT_STACK,
           "fsize": resource.RLIMIT_FSIZE, "as": resource.RLIMIT_AS, "cpu": resource.RLIMIT_CPU,
           "memlock": resource.RLIMIT_MEMLOCK}

_pack = struct.Struct("<I").pack
_FIELDS: dict[type[Any], tuple[str, ...]] = {}


def _field(out: list[bytes], value: Any) -> None:
    if isinstance(value, str):
        if "\0" in value:  # silo-setup reads every field as a C string
            raise ProtocolError(f"a NUL byte in {value[:40]!r}: plans cannot carry one")
        value = os.fsencode(value)
    elif isinstance(value, bool | int):
        value = b"%d" % value
    elif isinstance(value, tuple):
        _field(out, len(value))
        for item in value:
            _field(out, item)
        return
    out.append(_pack(len(value)))
    out.append(value)
    out.append(b"\0")


def _ops(out: list[bytes], ops: tuple[p.Op, ...]) -> None:
    for op in ops:
        names = _FIELDS.get(type(op))
        if names is None:
            names = _FIELDS[type(op)] = tuple(f.name for f in fields(op))
        _field(out, op.name)
        for name in names:
            _field(out, getattr(op, name))


def ops_only(ops: tuple[p.Op, ...]) -> bytes:
    """Just the operations (what ``silo-setup --trace`` reads)."""
    out: list[bytes] = []
    _ops(out, ops)
    return b"".join(out)


def encode(plan: p.Plan, bpf: bytes | None) -> bytes:
    """The whole script of ``plan``; ``bpf`` is the compiled seccomp program, if any."""
    proc = plan.process
    ns = plan.namespaces
    out: list[bytes] = []
    inside_uid = plan.uid_map[0].inside if plan.uid_map and plan.uid_map[0].count == 1 else 0
    inside_gid = plan.gid_map[0].inside if plan.gid_map and plan.gid_map[0].count == 1 else 0
    header: tuple[Any, ...] = (MAGIC, "user" in ns, "mnt" in ns, "pid" in ns, "cgroup" in ns, inside_uid,
                               inside_gid, proc.setgroups, len(idmapped_layers(plan)), len(plan.ops))
    for value in header:
        _field(out, value)
    _ops(out, plan.ops)
    keep = 0
    for name in proc.caps:
        keep |= 1 << CAPABILITIES[name]
    process: tuple[Any, ...] = (proc.cwd, proc.uid, proc.gid, keep, proc.no_new_privs, proc.harden,
                                proc.new_session, proc.tty, proc.init, proc.winsize[0] << 16 | proc.winsize[1],
                                proc.console, len(proc.rlimits))
    for value in process:
        _field(out, value)
    for name, soft, hard in proc.rlimits:
        for value in (RLIMITS[name], soft, hard):
            _field(out, value)
    _field(out, bpf or b"")
    _field(out, proc.argv)
    _field(out, tuple(f"{k}={v}" for k, v in proc.env))
    return b"".join(out)


def idmapped_layers(plan: p.Plan) -> list[str]:
    """The lower layers the spawner idmaps for the sandbox, in the order it consumes them."""
    return [lower for op in plan.ops if isinstance(op, p.Overlay)
            for lower, attach in zip(op.lower, op.idmapped, strict=False) if attach]


def go_message(argv: tuple[str, ...], env: tuple[tuple[str, str], ...]) -> bytes:
    """The request silo-init --wait reads (with three stdio fds as SCM_RIGHTS):
    ``ARGC\\0ARGV...\\0KEY=VALUE\\0...``."""
    parts = [str(len(argv)).encode(), *(os.fsencode(a) for a in argv),
             *(os.fsencode(f"{k}={v}") for k, v in env)]
    return b"\0".join(parts) + b"\0"


GO_MAX = 1 << 16  # larger commands start cold (silo-init's buffer)
TAKEN = b"taken"
INIT_ERROR = b"init-error "
SETUP_ERROR = b"error "


def native_error(data: bytes) -> SiloError | None:
    """The error in a message from silo-setup (``error CLASS MESSAGE``, CLASS one of
    model/errors.py) or silo-init (``init-error CODE MESSAGE``); None for anything else."""
    _, kind, message = [*data.decode("utf-8", "replace").split(" ", 2), "", ""][:3]
    if data.startswith(SETUP_ERROR):
        return error_from_wire({"class": kind, "message": message or "sandbox setup failed"})
    if data.startswith(INIT_ERROR):
        cls = {"127": CommandNotFound, "126": CommandNotExecutable}.get(kind, InternalError)
        return cls(message or "the command could not be started")
    return None
