"""The ``silo run`` / ``silo plan`` command line: argparse in, a validated Spec out.

Used by ``silo plan`` in-process and by the CLI server for ``silo run`` (the client
only forwards argv, so the interpreter that parses is already warm). Relative paths
(``--env-file``) are resolved against the *caller's* working directory.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import NoReturn

from silo.model.errors import SpecError
from silo.model.spec import KERNELS, Spec, build_spec, parse_env_entry, parse_env_file, parse_rlimit


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise SpecError(f"{message}; see 'silo run --help'")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise SpecError(message or "bad arguments")


def run_parser(prog: str = "silo run") -> argparse.ArgumentParser:
    ps = _Parser(prog=prog, add_help=False, allow_abbrev=False,
                 description="Run a command isolated; exits with its exit code.")
    ps.add_argument("--isolation", default="process",
                    help="process (default), gvisor (gVisor's user-space kernel), vm (a QEMU microVM) "
                         "or app (NOT a security boundary)")
    ps.add_argument("--root", default="host", help="host (default) or an image directory")
    ps.add_argument("--kernel", default="auto", metavar="host|debian|PATH",
                    help="with --isolation vm: the guest's kernel (default: the host's if readable, else debian)")
    ps.add_argument("-v", "--volume", action="append", default=[], metavar="HOST:GUEST[:ro]")
    ps.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    ps.add_argument("--env-file", action="append", default=[], metavar="FILE")
    ps.add_argument("-w", "--workdir", metavar="DIR")
    ps.add_argument("-u", "--user", metavar="UID[:GID]")
    ps.add_argument("--hostname")
    ps.add_argument("--memory", metavar="SIZE")
    ps.add_argument("--cpus", metavar="N")
    ps.add_argument("--pids", metavar="N")
    ps.add_argument("--timeout", metavar="DURATION")
    ps.add_argument("--cap", action="append", default=[], metavar="CAP")
    ps.add_argument("--seccomp", default="default", metavar="default|unconfined|FILE")
    ps.add_argument("--rlimit", action="append", default=[], metavar="NAME=SOFT[:HARD]")
    ps.add_argument("--tmpfs-size", metavar="SIZE")
    ps.add_argument("--cow", action="append", default=[], metavar="PATH")
    ps.add_argument("--keep", metavar="DIR")
    add_network_options(ps)
    ps.add_argument("-t", "--tty", action="store_true")
    ps.add_argument("-i", "--interactive", action="store_true")
    ps.add_argument("command", nargs=argparse.REMAINDER)
    return ps


@dataclass(frozen=True)
class RunRequest:
    spec: Spec
    argv: tuple[str, ...]
    tty: bool
    interactive: bool


def _abs(path: str, cwd: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(cwd, path))


def add_network_options(ps: argparse.ArgumentParser, links: bool = False) -> None:
    """The network options of ``silo run`` and ``silo create`` (docs: README, "Networks")."""
    ps.add_argument("--network", nargs="?", const="internet", metavar="none|internet|allow|full",
                    help="the network policy (default none; --network alone: internet)")
    ps.add_argument("--allow", action="append", default=[], metavar="NAME|CIDR[:PORT]",
                    help="what the allow mode lets through (repeatable)")
    ps.add_argument("-p", "--publish", action="append", default=[], metavar="[ADDR:]HOST_PORT:PORT",
                    help="forward a host TCP port into the sandbox (127.0.0.1 unless ADDR is given)")
    ps.add_argument("--bandwidth", metavar="RATE", help="cap each direction, like 10mbit")
    ps.add_argument("--dns", action="append", default=[], metavar="ADDRESS",
                    help="upstream server for silo's resolver (default: the host's)")
    if links:
        ps.add_argument("--link", action="append", default=[], metavar="NAME",
                        help="let this workspace reach workspace NAME (by its name)")


def parse_run(untrusted_argv: list[str], cwd: str) -> RunRequest:
    """Parse ``silo run`` arguments (without ``run``) into a request; SpecError on bad input.

    Only what is particular to a command line happens here (paths relative to the
    caller's cwd, env files, ``NAME=SOFT:HARD`` rlimits); every value is validated by
    :func:`silo.model.spec.build_spec`, the same function the SDK uses.
    """
    ns = run_parser().parse_args(untrusted_argv)
    command = list(ns.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise SpecError("no command given: add it after the options, like: silo run -- /bin/sh")
    env: dict[str, str] = {}
    for f in ns.env_file:
        path = _abs(f, cwd)
        try:
            with open(path, encoding="utf-8") as fh:
                env.update(parse_env_file(fh.read(), f))
        except OSError as e:
            raise SpecError(f"cannot read --env-file {f}: {e.strerror}") from None
    for entry in ns.env:
        name, value = parse_env_entry(entry)
        env[name] = value
    root = ns.root
    if root != "host":
        root = _abs(root, cwd)
        if not os.path.isdir(root):
            raise SpecError(f"root directory {ns.root} does not exist: unpack an image there or use --root host")
    rlimits = {name: (soft, hard) for name, soft, hard in map(parse_rlimit, ns.rlimit)}
    spec = build_spec(
        isolation=ns.isolation, root=root, mounts=ns.volume, env=env, workdir=ns.workdir, user=ns.user,
        hostname=ns.hostname, memory=ns.memory, cpus=ns.cpus, pids=ns.pids, timeout=ns.timeout,
        caps=ns.cap, seccomp=ns.seccomp if ns.seccomp in ("default", "unconfined") else _abs(ns.seccomp, cwd),
        rlimits=rlimits, tmpfs_size=ns.tmpfs_size, cow=[_abs(c, cwd) for c in ns.cow],
        keep=_abs(ns.keep, cwd) if ns.keep else None, network=ns.network, allow=ns.allow, publish=ns.publish,
        bandwidth=ns.bandwidth, dns=ns.dns,
        kernel=ns.kernel if ns.kernel in KERNELS else _abs(ns.kernel, cwd),
    )
    return RunRequest(spec, tuple(command), bool(ns.tty), bool(ns.interactive))
