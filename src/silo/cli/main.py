"""``silo``: the command line. A thin client of the SDK; one module per verb.

``silo run`` normally takes the fast path (:mod:`silo.cli.client`); this module
serves every other verb, and ``run --help``. Errors print one line and exit 125
(or 126/127 for commands that cannot run); never a traceback.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from silo.model.errors import SiloError

USAGE = """usage: silo <command> [options]

commands:
  run     run a command in a fresh sandbox (see 'silo run --help')
  plan    print the operations 'silo run' would execute, without running anything
  diff    list what an app-level run kept with --keep DIR changed
  server  stop | status: the per-user server behind 'silo run'
  version print silo's version
"""


def _fail(message: str, code: int = 125) -> NoReturn:
    print(f"silo: {message}", file=sys.stderr)
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


def cmd_diff(argv: list[str]) -> None:
    from silo.cli.diff import changes

    if len(argv) != 1 or argv[0].startswith("-"):
        _fail("usage: silo diff DIR (a directory given to 'silo run --isolation app --keep DIR')")
    for kind, path in changes(os.path.abspath(argv[0])):
        print(f"{kind} {path}")


def cmd_server(argv: list[str]) -> None:
    import socket

    from silo.engine import paths
    from silo.spawner import protocol

    if argv not in (["stop"], ["status"]):
        _fail("usage: silo server stop|status")
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


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "diff": cmd_diff, "server": cmd_server}


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
        _fail(f"unknown command {argv[0]!r}: run 'silo --help' for the list")
    try:
        command(argv[1:])
    except SiloError as e:
        _fail(e.message, e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(141)


if __name__ == "__main__":
    main()
