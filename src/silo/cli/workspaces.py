"""The workspace verbs of ``silo`` (create, start, exec, cp, snapshot, ...): a thin client
of :class:`silo.sdk.client.Client`. Each verb parses its argv, makes SDK calls, prints.

Output: listings are rich tables on stdout, or one JSON array with ``--json`` (and
nothing else); progress bars and spinners go to stderr, only when it is a terminal.
Errors are :class:`SiloError`\\ s, printed as one line by :func:`silo.cli.main.main`.

The client: every verb gets its :class:`Client` from :data:`make_client`, a module-level
factory. Tests (and embedders) replace it, e.g. to serve a :class:`silo.MockTransport`::

    monkeypatch.setattr(silo.cli.workspaces, "make_client", lambda: Client(transport=mock))

This module is imported only when one of its verbs runs: ``silo run`` and ``silo
version`` never pay for httpx or rich.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any, NoReturn, TextIO, TypeVar

from silo.cli.args import add_network_options
from silo.cli.main import error_line
from silo.model.errors import NotFoundError, SiloError, SpecError, UserError
from silo.model.spec import KERNELS, parse_env_entry, parse_env_file
from silo.model.workspace import parse_name
from silo.sdk.client import Client, Progress, Workspace, WorkspaceInfo

T = TypeVar("T")


def _default_client() -> Client:
    return Client()


make_client: Callable[[], Client] = _default_client
"""The factory every verb gets its client from (replace it to inject a transport)."""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are SpecErrors (one line, exit 2, or 125 for exec); ``-h`` exits 0."""

    def error(self, message: str) -> NoReturn:
        raise SpecError(f"{message}; see '{self.prog} --help'")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise SystemExit(status)


def _parser(verb: str, description: str, names: str | None = "NAME") -> _Parser:
    ps = _Parser(prog=f"silo {verb}", description=description, allow_abbrev=False)
    if names == "NAME":
        ps.add_argument("name", metavar="NAME")
    elif names == "NAME...":
        ps.add_argument("names", metavar="NAME", nargs="+")
    return ps


def _with(ps: _Parser, *arguments: tuple[tuple[str, ...], dict[str, Any]]) -> _Parser:
    """``ps`` with more arguments: ``(("--tail",), {"type": int})``."""
    for flags, options in arguments:
        ps.add_argument(*flags, **options)
    return ps


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


# -- formatting ----------------------------------------------------------------------------


def relative_time(then: float, now: float | None = None) -> str:
    """``12 seconds ago``, ``3 minutes ago``, ``2 days ago``."""
    seconds = max(0, int((time.time() if now is None else now) - then))
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''} ago"
    return "just now" if seconds < 2 else f"{seconds} seconds ago"


def human_size(size: int) -> str:
    """``0 B``, ``4.0 KiB``, ``1.5 GiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))  # Text: a path like "[red]x" is not markup
    Console(soft_wrap=False).print(table)


@contextlib.contextmanager
def _progress(label: str) -> Iterator[Progress | None]:
    """A byte progress bar on stderr when it is a terminal; the callback for the SDK."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    with Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@contextlib.contextmanager
def _spinner(label: str) -> Iterator[None]:
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(label):
        yield


# -- create --------------------------------------------------------------------------------


def _create_parser() -> _Parser:
    ps = _parser("create", "Create a workspace (it is not started).", names=None)
    ps.add_argument("name", metavar="NAME", nargs="?", help="required unless the spec file names it")
    ps.add_argument("-f", "--file", metavar="FILE", help="a silo.toml spec; the options below override it")
    ps.add_argument("--isolation", help="process (default), vm, or app (NOT a security boundary)")
    ps.add_argument("--root", metavar="host|DIR|TEMPLATE", help="host (default), an image directory or a template")
    ps.add_argument("--disposable", action="store_true", default=None, help="keep changes in RAM: gone on stop")
    ps.add_argument("--encrypt", action="store_true", default=None,
                    help="with --isolation vm: keep its disks encrypted at rest (LUKS, the daemon's key)")
    ps.add_argument("--kernel", metavar="host|debian|PATH",
                    help="with --isolation vm: the guest's kernel (default: the host's if readable, else debian)")
    ps.add_argument("--diskless", action="store_true", default=None,
                    help="with --isolation vm: keep it in its VM's locked RAM only (disposable; never on disk or swap)")
    ps.add_argument("-v", "--volume", action="append", default=[], metavar="HOST:GUEST[:ro]")
    ps.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    ps.add_argument("--env-file", action="append", default=[], metavar="FILE")
    ps.add_argument("--memory", metavar="SIZE")
    ps.add_argument("--cpus", metavar="N")
    ps.add_argument("--pids", metavar="N")
    ps.add_argument("--on-start", metavar="CMD", help="a shell command (sh -c) run each time it starts")
    ps.add_argument("--restart", metavar="no|on-failure|always")
    ps.add_argument("-w", "--workdir", metavar="DIR")
    ps.add_argument("-u", "--user", metavar="UID[:GID]")
    ps.add_argument("--hostname")
    add_network_options(ps, links=True)
    return ps


def _env(entries: Sequence[str], files: Sequence[str] = ()) -> dict[str, str]:
    env: dict[str, str] = {}
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                env.update(parse_env_file(fh.read(), f))
        except OSError as e:
            raise SpecError(f"cannot read --env-file {f}: {e.strerror}") from None
    env.update(parse_env_entry(entry) for entry in entries)
    return env


def _abs_volume(volume: str) -> str:
    host, sep, rest = volume.partition(":")
    return f"{os.path.abspath(host)}{sep}{rest}" if host and sep and not host.startswith("/") else volume


def _root(root: str | None) -> str | None:
    """``host`` and template names as given; a directory (has '/' or starts with '.') made absolute."""
    if root is None or root == "host" or ("/" not in root and not root.startswith(".")):
        return root
    path = os.path.abspath(root)
    if not os.path.isdir(path):
        raise NotFoundError(f"root directory {root} does not exist: unpack an image there, use --root host "
                            "or a template name")
    return path


def _kernel(choice: str | None) -> str | None:
    """``--kernel``: a path is made absolute against the caller's cwd (silod has another)."""
    if choice is None or choice in KERNELS:
        return choice
    return os.path.abspath(choice)


def cmd_create(ns: argparse.Namespace) -> None:
    if ns.name is None and ns.file is None:
        raise SpecError("give the workspace a name, like 'silo create web', or a spec file with -f")
    with make_client() as client:
        ws = client.create(ns.name, file=ns.file, isolation=ns.isolation, root=_root(ns.root),
                           disposable=ns.disposable, encrypted=ns.encrypt, diskless=ns.diskless,
                           kernel=_kernel(ns.kernel),
                           mounts=[_abs_volume(v) for v in ns.volume],
                           env=_env(ns.env, ns.env_file), memory=ns.memory, cpus=ns.cpus, pids=ns.pids,
                           on_start=None if ns.on_start is None else ["sh", "-c", ns.on_start],
                           restart=ns.restart, workdir=ns.workdir, user=ns.user, hostname=ns.hostname,
                           network=ns.network, allow=ns.allow, publish=ns.publish, links=ns.link,
                           bandwidth=ns.bandwidth, dns=ns.dns)
    print(ws.name)


# -- verbs on one or more names ------------------------------------------------------------


def _each(names: Sequence[str], act: Callable[[Workspace], object]) -> int:
    """``act`` on every name; a failure is reported and the rest still done (exit code of the last)."""
    code = 0
    with make_client() as client:
        for name in names:
            try:
                act(Workspace(client, parse_name(name)))
                print(name)
            except SiloError as e:
                print(error_line(e.message), file=sys.stderr)
                code = e.verb_exit_code
    return code


# -- listings ------------------------------------------------------------------------------


def _info_row(info: WorkspaceInfo) -> list[str]:
    size = "-" if info.private_bytes is None else human_size(info.private_bytes)
    return [info.name, info.state.value, info.spec.isolation.value, info.spec.root, relative_time(info.created), size]


def _on(ns: argparse.Namespace, act: Callable[[Workspace], T]) -> T:
    """``act`` on the workspace ``ns.name`` (one request, no lookup first)."""
    with make_client() as client:
        return act(Workspace(client, parse_name(ns.name)))


def _listing(ns: argparse.Namespace, items: Sequence[T], to_json: Callable[[T], object], columns: Sequence[str],
             row: Callable[[T], list[str]]) -> None:
    """``items`` as one JSON array with ``--json``, else as a table."""
    if ns.json:
        _print_json([to_json(item) for item in items])
    else:
        _table(columns, [row(item) for item in items])


def cmd_ls(ns: argparse.Namespace) -> None:
    with make_client() as client:
        infos = client.list()
    if ns.quiet and not ns.json:
        print("".join(f"{info.name}\n" for info in infos), end="")
        return
    _listing(ns, infos, WorkspaceInfo.to_dict, ["NAME", "STATE", "ISOLATION", "ROOT", "CREATED", "PRIVATE SIZE"],
             _info_row)


def _snapshot_parser() -> _Parser:
    ps = _parser("snapshot", "Snapshot a stopped workspace's private layer and print the tag (NAME [TAG]); "
                 "'silo snapshot ls NAME' lists the snapshots, 'silo snapshot rm NAME TAG' deletes one.", names=None)
    return _with(ps, (("args",), {"metavar": "NAME [TAG] | ls NAME | rm NAME TAG", "nargs": "+"}),
                 (("--memory",), {"action": "store_true",
                                  "help": "a running gvisor workspace's processes too: it runs on, and after "
                                          "'silo restore NAME TAG' its next start resumes them"}), _JSON)


def cmd_snapshot(ns: argparse.Namespace) -> None:
    args = ns.args
    if args[0] == "rm" and len(args) == 3:
        ns.name = args[1]
        _on(ns, lambda ws: ws.delete_snapshot(args[2]))
    elif args[0] == "ls" and len(args) == 2:
        ns.name = args[1]
        cmd_snapshots(ns)
    elif len(args) <= 2:
        ns.name, tag = args[0], (args[1] if len(args) == 2 else None)
        print(_on(ns, lambda ws: ws.snapshot(tag, memory=ns.memory)).tag)
    else:
        raise SpecError("too many arguments: use 'silo snapshot NAME [TAG]', 'silo snapshot ls NAME' or "
                        "'silo snapshot rm NAME TAG'")


def cmd_snapshots(ns: argparse.Namespace) -> None:
    _listing(ns, _on(ns, Workspace.snapshots), lambda s: {"tag": s.tag, "created": s.created, "memory": s.memory},
             ["TAG", "CREATED", "PROCESSES"], lambda s: [s.tag, relative_time(s.created), "saved" if s.memory else "-"])


def cmd_diff(ns: argparse.Namespace) -> None:
    _listing(ns, _on(ns, Workspace.diff), lambda c: {"kind": c.kind, "path": c.path}, ["KIND", "PATH"],
             lambda c: [c.kind[0].upper(), c.path])


# -- exec ----------------------------------------------------------------------------------


def run_exec(client: Client, name: str, argv: Sequence[str], *, env: dict[str, str], workdir: str | None,
             user: str | None, interactive: bool, tty: bool) -> int:
    """Run ``argv`` in workspace ``name`` for ``silo exec``; the command's exit code.

    The streamed path (``exec.sock``, docs/api.md: the command gets this process's own
    stdio or a pty) is the C launcher's (``silo`` in the virtualenv's bin), which hands
    the command line here only when it cannot reach the daemon. So once ``client`` has
    reached (or started) the daemon, the launcher is exec'd again with the same command
    line; ``SILO_EXEC_HANDOFF`` stops a second round trip. Without the launcher this is
    the captured path (HTTP exec: stdin read whole with ``-i``, output printed when the
    command ends), which cannot give a terminal.
    """
    launcher = os.path.join(os.path.dirname(sys.executable), "silo")
    own_command_line = sys.argv[1:2] == ["exec"]  # not when called as a function (tests, scripts)
    if (own_command_line and not os.environ.get("SILO_EXEC_HANDOFF") and os.access(launcher, os.X_OK)
            and _is_elf(launcher)):
        client.version()  # reaches or starts the daemon
        os.environ["SILO_EXEC_HANDOFF"] = "1"
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(launcher, [launcher, *sys.argv[1:]])  # noqa: S606 - the launcher, a fixed path beside our interpreter
    if tty:
        raise UserError("silo exec -t needs the streamed exec path (exec.sock), which this silo does not have "
                        "yet: run without -t")
    stdin = sys.stdin.buffer.read() if interactive else None
    result = Workspace(client, name).exec(list(argv), env=env or None, workdir=workdir, user=user, stdin=stdin)
    for stream, data in ((sys.stdout, result.stdout), (sys.stderr, result.stderr)):
        stream.flush()
        stream.buffer.write(data)
        stream.buffer.flush()
    return result.exit_code


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _exec_parser() -> _Parser:
    ps = _parser("exec", "Run a command in a running workspace; exits with its exit code.")
    ps.add_argument("-t", "--tty", action="store_true", help="give the command a terminal")
    ps.add_argument("-i", "--interactive", action="store_true", help="pass this terminal's stdin")
    ps.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    ps.add_argument("-w", "--workdir", metavar="DIR")
    ps.add_argument("-u", "--user", metavar="UID[:GID]")
    ps.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD...")
    return ps


def cmd_exec(ns: argparse.Namespace) -> int:
    command = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    if not command:
        raise SpecError("no command given: add it after the name, like: silo exec web -- ls -l")
    with make_client() as client:
        return run_exec(client, parse_name(ns.name), command, env=_env(ns.env), workdir=ns.workdir, user=ns.user,
                        interactive=ns.interactive, tty=ns.tty)


# -- files, snapshots, copies --------------------------------------------------------------


def _cp_side(arg: str) -> tuple[str, str] | None:
    """``NAME:PATH`` as (name, path); None for a host path (absolute, ``./...`` or without ':')."""
    if arg.startswith(("/", ".")) or ":" not in arg:
        return None
    name, _, path = arg.partition(":")
    if not path.startswith("/"):
        raise SpecError(f"bad path {arg!r}: a workspace path is absolute, like {name}:/etc/hosts")
    return parse_name(name), path


def _cp_parser() -> _Parser:
    ps = _parser("cp", "Copy files between the host and a workspace (write a host path with ':' as ./a:b).",
                 names=None)
    ps.add_argument("source", metavar="HOSTPATH|NAME:PATH")
    ps.add_argument("dest", metavar="NAME:PATH|HOSTPATH")
    return ps


def cmd_cp(ns: argparse.Namespace) -> None:
    src, dst = _cp_side(ns.source), _cp_side(ns.dest)
    if (src is None) == (dst is None):
        raise SpecError("copy between the host and a workspace: silo cp HOSTPATH NAME:PATH or "
                        "silo cp NAME:PATH HOSTPATH")
    with make_client() as client:
        if dst is not None:
            Workspace(client, dst[0]).put(ns.source, dst[1])
        elif src is not None:
            Workspace(client, src[0]).get(src[1], ns.dest)


def cmd_logs(ns: argparse.Namespace) -> None:
    sys.stdout.write(_on(ns, lambda ws: ws.logs(ns.tail)))


# -- archives and templates ----------------------------------------------------------------


def _stdio(path: str, stream: TextIO) -> IO[bytes] | str:
    if path != "-":
        return path
    if stream.isatty():
        raise SpecError("an archive is binary: redirect it to or from a file instead of the terminal")
    return stream.buffer


def cmd_export(ns: argparse.Namespace) -> None:
    with make_client() as client, _progress(f"exporting {ns.name}") as progress:
        Workspace(client, parse_name(ns.name)).export(_stdio(ns.file, sys.stdout), progress)


def _import_parser() -> _Parser:
    ps = _parser("import", "Make a workspace from an archive of 'silo export'; FILE '-' is stdin.", names=None)
    ps.add_argument("file", metavar="FILE")
    ps.add_argument("name", metavar="NAME", nargs="?", help="its name (default: the archive's)")
    return ps


def cmd_import(ns: argparse.Namespace) -> None:
    with make_client() as client, _progress(f"importing {ns.file}") as progress:
        print(client.import_(_stdio(ns.file, sys.stdin), ns.name, progress).name)


def _template_parser() -> _Parser:
    ps = _parser("template", "Manage templates: read-only bases made from workspaces.", names=None)
    sub = ps.add_subparsers(dest="action", required=True, metavar="create|ls|rm", parser_class=_Parser)
    create = sub.add_parser("create", help="make a template from a stopped workspace")
    create.add_argument("tname", metavar="TNAME")
    create.add_argument("--from", dest="source", required=True, metavar="NAME")
    _with(sub.add_parser("ls", help="list templates"), _JSON)
    sub.add_parser("rm", help="remove a template no workspace uses").add_argument("tname", metavar="TNAME")
    return ps


def cmd_template(ns: argparse.Namespace) -> None:
    with make_client() as client:
        if ns.action == "create":
            with _spinner(f"making template {ns.tname} from {ns.source}"):
                print(client.create_template(ns.tname, from_=ns.source).name)
        elif ns.action == "rm":
            client.remove_template(ns.tname)
        elif ns.json:
            _print_json([t.to_dict() for t in client.templates()])
        else:
            _table(["NAME", "BASE", "FROM", "CREATED", "LAYERS"],
                   [[t.name, t.base, t.from_ or "", relative_time(t.created), str(t.layers)]
                    for t in client.templates()])


def _network_parser() -> _Parser:
    ps = _parser("network", "See or change a workspace's network policy.", names=None)
    sub = ps.add_subparsers(dest="action", required=True, metavar="set|show", parser_class=_Parser)
    setp = sub.add_parser("set", help="replace the policy; a running workspace's changes at once")
    setp.add_argument("name", metavar="NAME")
    setp.add_argument("mode", metavar="none|internet|allow|full")
    setp.add_argument("--allow", action="append", default=[], metavar="NAME|CIDR[:PORT]")
    setp.add_argument("--link", action="append", default=[], metavar="NAME")
    show = sub.add_parser("show", help="the policy, addresses, counters and refused destinations (JSON)")
    show.add_argument("name", metavar="NAME")
    return ps


def cmd_network(ns: argparse.Namespace) -> None:
    with make_client() as client:
        ws = client.get(parse_name(ns.name))
        if ns.action == "set":
            info = ws.set_network(ns.mode, allow=ns.allow, links=ns.link)
        else:
            info = ws.info()
    _print_json({"name": info.name, "policy": info.spec.network.to_dict(), "running": info.network})


Parse = Callable[[], _Parser]
Run = Callable[[argparse.Namespace], object]  # an int is the exit code; anything else means 0


def _named(verb: str, description: str, *arguments: tuple[tuple[str, ...], dict[str, Any]]) -> Parse:
    return lambda: _with(_parser(verb, description), *arguments)


def _many(verb: str, description: str, *arguments: tuple[tuple[str, ...], dict[str, Any]]) -> Parse:
    return lambda: _with(_parser(verb, description, "NAME..."), *arguments)


_JSON = (("--json",), {"action": "store_true", "help": "print one JSON array and nothing else"})

VERBS: dict[str, tuple[Parse, Run]] = {
    "create": (_create_parser, cmd_create),
    "start": (_many("start", "Start workspaces."), lambda ns: _each(ns.names, Workspace.start)),
    "stop": (_many("stop", "Stop workspaces (SIGTERM, then SIGKILL after the timeout).",
                   (("--timeout",), {"type": float, "metavar": "SECONDS", "help": "grace period before SIGKILL"})),
             lambda ns: _each(ns.names, lambda ws: ws.stop(ns.timeout))),
    "restart": (_many("restart", "Stop (when running) and start workspaces."),
                lambda ns: _each(ns.names, Workspace.restart)),
    "rm": (_many("rm", "Remove workspaces and everything they keep.",
                 (("-f", "--force"), {"action": "store_true", "help": "stop a running workspace first"})),
           lambda ns: _each(ns.names, lambda ws: ws.remove(force=ns.force))),
    "ls": (lambda: _with(_parser("ls", "List workspaces.", names=None), _JSON,
                         (("-q", "--quiet"), {"action": "store_true", "help": "print names only"})), cmd_ls),
    "inspect": (_named("inspect", "Print a workspace as JSON (the API's Workspace object).",
                       (("--json",), {"action": "store_true", "help": "the default (and only) format"})),
                lambda ns: _print_json(_on(ns, Workspace.info).to_dict())),
    "exec": (_exec_parser, cmd_exec),
    "cp": (_cp_parser, cmd_cp),
    "snapshot": (_snapshot_parser, cmd_snapshot),
    "snapshots": (_named("snapshots", "List a workspace's snapshots.", _JSON), cmd_snapshots),
    "restore": (_named("restore", "Bring a stopped workspace back to a snapshot.", (("tag",), {"metavar": "TAG"})),
                lambda ns: _on(ns, lambda ws: ws.restore(ns.tag))),
    "reset": (_named("reset", "Drop every change of a stopped workspace."), lambda ns: _on(ns, Workspace.reset)),
    "fork": (_named("fork", "Make a new workspace from a copy of a stopped one.",
                    (("new_name",), {"metavar": "NEWNAME"})),
             lambda ns: print(_on(ns, lambda ws: ws.fork(ns.new_name)).name)),
    "diff": (_named("diff", "List what a workspace changed (A added, C changed, D deleted).", _JSON), cmd_diff),
    "template": (_template_parser, cmd_template),
    "network": (_network_parser, cmd_network),
    "export": (_named("export", "Write a stopped workspace (spec and files) to an archive; FILE '-' is stdout.",
                      (("file",), {"metavar": "FILE"})), cmd_export),
    "import": (_import_parser, cmd_import),
    "logs": (_named("logs", "Print a workspace's log (its init's and on_start's output, the daemon's notes).",
                    (("--tail",), {"type": int, "metavar": "N", "help": "only the last N lines"})), cmd_logs),
}


def run(verb: str, argv: list[str]) -> int | None:
    """Parse ``argv`` for ``verb`` and run it; the exit code, when not 0."""
    parse, act = VERBS[verb]
    result = act(parse().parse_args(argv))
    return result if type(result) is int else None
