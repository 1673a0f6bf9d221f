"""``silo``: the command line. A thin client of the SDK; one module per verb.

``silo run`` normally takes the fast path (:mod:`silo.cli.client`); this module
serves every other verb, and ``run --help``. Errors print one line, never a
traceback, and exit with a code that tells their kind (``silo.model.errors``: 125-127
for run, plan and exec, whose own code is the command's; 1-11 for the other verbs).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from silo.model.errors import EXIT_BAD_INPUT, EXIT_NO_SUCH, SiloError

USAGE = """usage: silo <command> [options]   ('silo <command> --help' for its options)

one-shot sandboxes:
  run        run a command in a fresh sandbox (see 'silo run --help')
  plan       print the operations 'silo run' would execute, without running anything
  diff DIR   list what an app-level run kept with --keep DIR changed
  server     stop | status: the per-user server behind 'silo run'

workspaces (kept by the silod daemon, started on first use):
  create     create a workspace: silo create NAME [-f silo.toml] [options]
  start, stop, restart, rm NAME...
  ls         list workspaces (--json, --quiet)
  inspect    print a workspace as JSON
  exec       run a command in a running workspace: silo exec NAME -- CMD...
  cp         copy files: silo cp HOSTPATH NAME:PATH | silo cp NAME:PATH HOSTPATH
  snapshot, snapshots, restore, reset, fork
  diff NAME  list what a workspace changed
  template   create TNAME --from NAME | ls | rm TNAME
  export, import, logs
  completion bash | zsh: print a shell completion script

  kernel     fetch | show: the guest kernel of the vm level (Debian's cloud kernel)
  pool       set --isolation vm --size N [--memory SIZE] [--cpus N] | show:
             keep N booted VMs ready, so 'silo run --isolation vm' skips the boot

  version    print silo's version
"""


def error_line(message: str) -> str:
    """``silo: MESSAGE`` as one line: newlines and other control characters escaped (a
    daemon's message may quote a workspace's file names, which its guest chose)."""
    return "silo: " + "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in message)


def _fail(message: str, code: int = 125) -> NoReturn:
    print(error_line(message), file=sys.stderr)
    sys.exit(code)


def cmd_run(argv: list[str]) -> None:
    from silo.cli.args import run_parser

    if not argv or argv[0] in ("-h", "--help"):
        run_parser().print_help()
        print("\nThe app isolation level is NOT a security boundary: it only keeps writes off your files.")
        return
    from silo.cli.client import _run

    _run(argv)


def cmd_plan(argv: list[str]) -> None:
    from silo.cli.args import parse_run
    from silo.engine import planner

    if argv and argv[0] == "run":
        argv = argv[1:]
    req = parse_run(argv, os.getcwd())
    plan = planner.plan(req.spec, req.argv, term=os.environ.get("TERM"))
    for line in plan.describe():
        print(line)


def cmd_diff(argv: list[str]) -> int | None:
    """``silo diff NAME`` (a workspace); ``silo diff DIR`` for a ``--keep`` directory: an
    argument with a '/', or an existing directory that ``--keep`` made (it holds
    ``silo-keep.json``; a workspace name cannot name a path)."""
    if not argv:
        _fail("usage: silo diff NAME (a workspace) | silo diff DIR (a directory of 'silo run --keep DIR')",
              EXIT_BAD_INPUT)
    keep_dirs = [arg for arg in argv if not arg.startswith("-") and (
        "/" in arg or os.path.isfile(os.path.join(arg, "silo-keep.json")))]
    if not keep_dirs:
        return _workspaces("diff", argv)
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        _fail(f"{keep_dirs[0]}: no such directory ('silo diff DIR' takes a directory of 'silo run --keep DIR'; "
              "'silo diff NAME' a workspace)", EXIT_NO_SUCH)
    from silo.cli.diff import changes

    for kind, path in changes(os.path.abspath(argv[0])):
        print(f"{kind} {path}")
    return None


def cmd_server(argv: list[str]) -> None:
    import socket

    from silo.engine import paths
    from silo.spawner import protocol

    if argv not in (["stop"], ["status"]):
        _fail("usage: silo server stop|status", EXIT_BAD_INPUT)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(paths.server_socket())
    except OSError:
        print("not running")
        return
    with sock:
        if argv == ["status"]:
            print(f"running ({paths.server_socket()})")
            return
        protocol.send(sock, ("stop",))
        protocol.recv(sock)
        print("stopping (running sandboxes finish first)")


def cmd_kernel(argv: list[str]) -> None:
    from silo.backends.vm import kernel
    from silo.engine import host as hostmod

    if argv not in (["fetch"], ["show"]):
        _fail("usage: silo kernel fetch|show", EXIT_BAD_INPUT)
    cache = hostmod.host().cache_dir
    if argv == ["fetch"]:
        print(f"fetching Debian's {kernel.PACKAGE} with apt-get download ...", file=sys.stderr)
        k = kernel.fetch(cache)
        print(f"guest kernel {k.release}: {k.image}")
        return
    found = kernel.host_kernel() or kernel.fetched(cache)
    if found is None:
        _fail("no guest kernel: run 'silo kernel fetch'", EXIT_NO_SUCH)
    print(f"guest kernel {found.release}: {found.image}")


def cmd_pool(argv: list[str]) -> None:
    import argparse

    from silo.cli import client
    from silo.engine import paths

    if argv in ([], ["show"]):
        message: tuple[object, ...] = ("pool", 1, "show")
    elif argv[:1] == ["set"]:
        ps = argparse.ArgumentParser(prog="silo pool set", exit_on_error=False, add_help=False)
        ps.add_argument("--isolation")
        ps.add_argument("--size")
        for name in ("--memory", "--cpus", "--tmpfs-size"):
            ps.add_argument(name)
        try:
            ns, rest = ps.parse_known_args(argv[1:])
        except argparse.ArgumentError as e:
            _fail(f"silo pool set: {e}", EXIT_BAD_INPUT)
        if rest:
            _fail(f"silo pool set takes --isolation, --size, --memory, --cpus and --tmpfs-size, not {rest[0]!r}",
                  EXIT_BAD_INPUT)
        if ns.isolation is None or ns.size is None:
            _fail("silo pool set needs --isolation vm and --size N", EXIT_BAD_INPUT)
        if not ns.size.isdigit():
            _fail(f"bad pool size {ns.size!r}: give a number of VMs, 0 to drop the pool", EXIT_BAD_INPUT)
        options = ["--isolation", ns.isolation]
        for name in ("memory", "cpus", "tmpfs_size"):
            if getattr(ns, name) is not None:
                options += [f"--{name.replace('_', '-')}", getattr(ns, name)]
        message = ("pool", 1, "set", options, int(ns.size))
    else:
        _fail("usage: silo pool set --isolation vm --size N [--memory SIZE] [--cpus N] [--tmpfs-size SIZE] "
              "| silo pool show", EXIT_BAD_INPUT)
    sock = client.connect_server(paths.code_token())
    try:
        client.send(sock, message)
        reply = client.recv(sock)
    finally:
        sock.close()
    if reply is None:
        _fail("silo's server went away", 9)
    if reply[0] == "error":
        from silo.model.errors import error_from_wire

        refused = error_from_wire(reply[2])
        _fail(refused.message, refused.verb_exit_code)
    rows = reply[2]
    if not rows:
        print("no pools")
    for options, size, ready, booting, error in rows:
        line = f"{' '.join(options)}: {size} kept, {ready} ready, {booting} booting"
        print(line + (f" (last boot failed: {error})" if error else ""))


def _workspaces(verb: str, argv: list[str]) -> int | None:
    from silo.cli import workspaces  # httpx and rich only for the verbs that need them

    return workspaces.run(verb, argv)


def cmd_completion(argv: list[str]) -> None:
    from silo.cli.completion import script

    if len(argv) != 1 or argv[0] not in ("bash", "zsh"):
        _fail("usage: silo completion bash|zsh (then: source <(silo completion bash))", EXIT_BAD_INPUT)
    print(script(argv[0], sorted(COMMANDS)), end="")


_WORKSPACE_VERBS = ("create", "start", "stop", "restart", "rm", "ls", "inspect", "exec", "cp", "snapshot",
                    "snapshots", "restore", "reset", "fork", "template", "export", "import", "logs",
                    "network")

# The verbs whose exit code is a command's: silo's own failures are 125-127 there
# (silo.model.errors explains both sets of codes).
COMMAND_CODE_VERBS = ("run", "plan", "exec")

COMMANDS: dict[str, Callable[[list[str]], int | None]] = {
    "run": cmd_run, "plan": cmd_plan, "diff": cmd_diff, "server": cmd_server, "completion": cmd_completion,
    "kernel": cmd_kernel, "pool": cmd_pool,
    **{verb: functools.partial(_workspaces, verb) for verb in _WORKSPACE_VERBS},
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return
    if argv[0] in ("version", "--version"):
        from silo import __version__

        print(f"silo {__version__}")
        return
    command = COMMANDS.get(argv[0])
    if command is None:
        _fail(f"unknown command {argv[0]!r}: run 'silo --help' for the list", EXIT_BAD_INPUT)
    try:
        code = command(argv[1:])
    except SiloError as e:
        _fail(e.message, e.exit_code if argv[0] in COMMAND_CODE_VERBS else e.verb_exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(141)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
