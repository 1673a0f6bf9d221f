"""Workspaces end to end (issue 3): a private silod, driven through ``silo.Client`` and the CLI.

One daemon serves the whole module (``private_daemon``: its own state and socket dirs,
named by SILO_STATE_DIR/SILO_DAEMON_DIR in this process's environment, which the CLI
inherits). Every test makes its own workspaces (``made``) and removes them, running or
not, when it ends. Workspaces have no network: nothing here leaves the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_servers import pty_run
from daemons import REPO, Daemon
from procs import comm, settle

import silo
from silo import NotFoundError, WorkspaceExists, WorkspaceStateError

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.skip("the workspace tests run a root silod", allow_module_level=True)

SILO = str(REPO / ".venv" / "bin" / "silo")


def cli(*args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``silo ARGS...`` against the module's daemon (its dirs are in os.environ)."""
    return subprocess.run([SILO, *args], input=stdin, capture_output=True, text=True, timeout=timeout,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


# Exit codes of the workspace verbs (README): exec keeps run's 125 for its own refusals.
BAD_INPUT, NOT_FOUND, WRONG_STATE, EXISTS, NOT_ALLOWED, EXEC_REFUSED = 2, 3, 4, 5, 6, 125


def assert_refused(r: subprocess.CompletedProcess[str], message: str, code: int) -> None:
    """One line on stderr, exactly ``silo: MESSAGE``; nothing on stdout; ``code``."""
    assert (r.returncode, r.stderr, r.stdout) == (code, f"silo: {message}\n", ""), r


def out(result: silo.ExecResult) -> str:
    assert result.exit_code == 0, result
    return result.stdout.decode()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[silo.Client]:
    with silo.Client(daemon.socket, autostart=False) as c:
        yield c


class Made:
    """Names of the workspaces and templates a test makes; all removed when it ends."""

    def __init__(self, client: silo.Client) -> None:
        self.client = client
        self.workspaces: list[str] = []
        self.templates: list[str] = []

    def name(self, prefix: str = "w") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.workspaces.append(name)
        return name

    def template(self) -> str:
        name = f"t-{uuid.uuid4().hex[:8]}"
        self.templates.append(name)
        return name

    def started(self, **options: object) -> silo.Workspace:
        ws = self.client.create(self.name(), **options)  # type: ignore[arg-type]
        ws.start()
        return ws

    def cleanup(self) -> None:
        for name in self.workspaces:
            with contextlib.suppress(NotFoundError):
                self.client.get(name).remove(force=True)
        for name in self.templates:
            with contextlib.suppress(NotFoundError):
                self.client.remove_template(name)


@pytest.fixture
def made(client: silo.Client) -> Iterator[Made]:
    m = Made(client)
    try:
        yield m
    finally:
        m.cleanup()


@pytest.fixture
def hostdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="silo-ws-test-"))
    os.chmod(path, 0o755)
    yield path
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def state_entries(daemon: Daemon) -> list[str]:
    path = os.path.join(daemon.state, "workspaces")
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def listed(client: silo.Client) -> list[str]:
    return sorted(info.name for info in client.list())


# -- lifecycle ---------------------------------------------------------------------------------


def test_lifecycle_through_the_sdk(client: silo.Client, made: Made) -> None:
    name = made.name()
    ws = client.create(name)
    info = ws.info()
    assert (info.state.value, info.pid, info.owner) == ("created", None, 0)
    with pytest.raises(WorkspaceStateError) as e:
        ws.exec(["true"])
    assert e.value.message == f"cannot exec in '{name}': it has not been started; run 'silo start {name}'"

    info = ws.start()
    assert info.state.value == "running" and info.pid is not None
    assert comm(info.pid) == "silo-init"
    r = ws.exec(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (r.exit_code, r.stdout, r.stderr) == (7, b"out\n", b"err\n")
    with pytest.raises(WorkspaceStateError) as e:
        ws.start()
    assert e.value.message == f"cannot start '{name}': it is already running"
    with pytest.raises(WorkspaceStateError) as e:
        ws.remove()
    assert e.value.message == (f"cannot remove '{name}': it is running; run 'silo stop {name}' first, "
                               f"or 'silo rm -f {name}'")
    assert ws.info().state.value == "running"

    stopped = ws.stop()
    assert (stopped.state.value, stopped.pid) == ("stopped", None)
    assert settle(lambda: comm(info.pid), lambda c: c != "silo-init") != "silo-init"
    with pytest.raises(WorkspaceStateError) as e:
        ws.exec(["true"])
    assert e.value.message == f"cannot exec in '{name}': it is stopped; run 'silo start {name}'"

    ws.start()
    ws.remove(force=True)
    with pytest.raises(NotFoundError):
        client.get(name)
    assert name not in listed(client)


def test_lifecycle_through_the_cli(daemon: Daemon, made: Made) -> None:
    name = made.name()
    r = cli("create", name)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{name}\n", "")
    assert_refused(cli("exec", name, "--", "true"),
                   f"cannot exec in '{name}': it has not been started; run 'silo start {name}'", EXEC_REFUSED)
    assert cli("start", name).stdout == f"{name}\n"
    r = cli("exec", name, "--", "sh", "-c", "echo hello; echo oops >&2")
    assert (r.returncode, r.stdout, r.stderr) == (0, "hello\n", "oops\n")

    table = cli("ls").stdout.splitlines()
    assert table[0].split()[:2] == ["NAME", "STATE"]
    assert [line.split()[:2] for line in table if line.split()[:1] == [name]] == [[name, "running"]]
    listing = {w["name"]: w for w in json.loads(cli("ls", "--json").stdout)}
    assert listing[name]["state"] == "running" and listing[name]["owner"] == 0
    inspected = json.loads(cli("inspect", name).stdout)
    assert inspected["state"] == "running" and comm(inspected["pid"]) == "silo-init"
    assert inspected["spec"]["name"] == name and inspected["private_bytes"] is not None

    assert_refused(cli("start", name), f"cannot start '{name}': it is already running", WRONG_STATE)
    assert_refused(cli("rm", name),
                   f"cannot remove '{name}': it is running; run 'silo stop {name}' first, or 'silo rm -f {name}'",
                   WRONG_STATE)

    assert cli("restart", name).returncode == 0
    restarted = json.loads(cli("inspect", name).stdout)
    assert restarted["state"] == "running" and restarted["pid"] != inspected["pid"]

    assert cli("stop", name).stdout == f"{name}\n"
    assert json.loads(cli("inspect", name).stdout)["state"] == "stopped"
    assert_refused(cli("exec", name, "--", "true"), f"cannot exec in '{name}': it is stopped; run 'silo start {name}'",
                   EXEC_REFUSED)
    assert_refused(cli("stop", name), f"cannot stop '{name}': it is already stopped", WRONG_STATE)

    cli("start", name)
    r = cli("rm", "-f", name)
    assert (r.returncode, r.stdout) == (0, f"{name}\n")
    assert name not in cli("ls", "-q").stdout.split()
    assert name not in state_entries(daemon)


def test_cli_errors_are_one_line(made: Made) -> None:
    r = cli("create", "Bad/Name")
    assert_refused(r, "bad workspace name 'Bad/Name': use 1 to 63 lowercase letters, digits, '_', '.' or '-', "
                      "starting with a letter or digit, no '..'", BAD_INPUT)
    missing = made.name("missing")
    for argv, code in ((("start", missing), NOT_FOUND), (("exec", missing, "--", "true"), EXEC_REFUSED),
                       (("inspect", missing), NOT_FOUND), (("rm", missing), NOT_FOUND)):
        assert_refused(cli(*argv), f"no workspace named '{missing}': see 'silo ls'", code)
    assert_refused(cli("exec", "Bad/Name", "--", "true"), "bad workspace name 'Bad/Name': use 1 to 63 lowercase "
                   "letters, digits, '_', '.' or '-', starting with a letter or digit, no '..'", EXEC_REFUSED)
    # exec's own refusals are 125, apart from the codes a command gives (126, 127, its own)
    r = cli("exec", missing)
    assert r.returncode == 125 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_create_of_an_existing_name_leaves_it_untouched(client: silo.Client, made: Made) -> None:
    ws = made.started(env={"WHO": "first"})
    ws.exec(["sh", "-c", "echo kept > /root/kept"])
    before = ws.info()
    with pytest.raises(WorkspaceExists) as e:
        client.create(ws.name, env={"WHO": "second"}, disposable=True)
    exists = f"a workspace named '{ws.name}' already exists: pick another name, or 'silo rm {ws.name}' first"
    assert e.value.message == exists
    assert_refused(cli("create", ws.name), exists, EXISTS)
    after = ws.info()
    assert (after.state, after.pid, after.spec, after.created) == (before.state, before.pid, before.spec,
                                                                    before.created)
    assert out(ws.exec(["sh", "-c", "cat /root/kept; echo $WHO"])) == "kept\nfirst\n"


def test_bad_spec_file_points_at_line_and_column(daemon: Daemon, client: silo.Client, made: Made,
                                                  hostdir: Path) -> None:
    name = made.name()
    spec = hostdir / "silo.toml"
    spec.write_text(f'name = "{name}"\n\n  bogus = 1\n')
    before, entries = listed(client), state_entries(daemon)
    r = cli("create", "-f", str(spec))
    assert r.returncode == BAD_INPUT and r.stdout == "" and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"silo: {spec}:3:3: unknown key 'bogus'"), r.stderr
    assert (listed(client), state_entries(daemon)) == (before, entries)


def test_a_failed_create_leaves_nothing(daemon: Daemon, client: silo.Client, made: Made, hostdir: Path) -> None:
    before, entries = listed(client), state_entries(daemon)
    name = made.name()
    attempts = [
        (("create", name, "-v", f"{hostdir}/absent:/data"), f"mount source {hostdir}/absent does not exist",
         NOT_FOUND),
        (("create", name, "--root", made.template()), "template", NOT_FOUND),
        (("create", name, "--memory", "lots"), "memory", BAD_INPUT),
        (("create", name, "-v", f"{os.path.dirname(daemon.sockets)}:/d"), "silod's sockets or state", NOT_ALLOWED),
    ]
    for argv, words, code in attempts:
        r = cli(*argv)
        assert r.returncode == code and words in r.stderr and r.stderr.count("\n") == 1, r
        assert (listed(client), state_entries(daemon)) == (before, entries), argv
    assert not os.path.exists(os.path.join(daemon.state, "workspaces", name))


# -- exec --------------------------------------------------------------------------------------


def test_concurrent_execs_each_get_their_own_output(made: Made) -> None:
    """Each exec waits (up to 20 s) until every exec has started: they only all finish if they run at once."""
    ws = made.started()
    n = 6
    script = ("touch /tmp/arrived.$0; i=0; while [ $(ls /tmp | grep -c '^arrived') -lt {n} ]; do "
              "i=$((i+1)); [ $i -gt 400 ] && exit 99; sleep 0.05; done; echo out-$0; echo err-$0 >&2; exit $0")
    results: dict[int, silo.ExecResult] = {}

    def run(i: int) -> None:
        results[i] = ws.exec(["sh", "-c", script.format(n=n), str(10 + i)])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(n):
        r = results[i]
        assert (r.exit_code, r.stdout, r.stderr) == (10 + i, f"out-{10 + i}\n".encode(), f"err-{10 + i}\n".encode())


def test_exec_options_through_the_sdk(made: Made) -> None:
    ws = made.started()
    r = ws.exec(["sh", "-c", "echo $K-$L; pwd"], env={"K": "v1", "L": "v 2"}, workdir="/tmp")
    assert out(r) == "v1-v 2\n/tmp\n"
    assert out(ws.exec(["id", "-u"], user="1000")) == "1000\n"
    assert out(ws.exec(["id", "-u"])) == "0\n"
    assert out(ws.exec(["cat"], stdin=b"x\0y\n")) == "x\0y\n"
    assert out(ws.exec(["cat"])) == ""


def test_exec_options_and_exit_codes_through_the_cli(made: Made) -> None:
    ws = made.started()
    r = cli("exec", "-e", "K=V", "-w", "/tmp", "-u", "1000", ws.name, "--", "sh", "-c", "id -u; echo $K; pwd")
    assert (r.returncode, r.stdout) == (0, "1000\nV\n/tmp\n")
    assert cli("exec", ws.name, "--", "sh", "-c", "exit 3").returncode == 3
    r = cli("exec", ws.name, "--", "no-such-command-here")
    assert r.returncode == 127 and r.stderr.count("\n") == 1 and "no-such-command-here" in r.stderr
    r = cli("exec", "-i", ws.name, "--", "cat", stdin="through stdin\n")
    assert (r.returncode, r.stdout) == (0, "through stdin\n")


def sleepers(ws: silo.Workspace) -> list[str]:
    return [line for line in out(ws.exec(["ps", "-e", "-o", "pid=,comm="])).splitlines() if "sleep" in line]


def test_an_exec_timeout_kills_what_the_command_started_in_its_background(made: Made) -> None:
    """The SDK's exec timeout ends the command's process group, as --timeout ends a run's
    tree: a shell's background job does not outlive it. What the command detached into
    a session of its own (setsid) is its own business, and lives on."""
    ws = made.started()
    started = time.monotonic()
    r = ws.exec(["sh", "-c", "sleep 301 & setsid sleep 302 & echo begun; sleep 303"], timeout=1)
    assert (r.exit_code, r.stdout) == (137, b"begun\n")
    assert time.monotonic() - started < 15
    left = settle(lambda: sleepers(ws), lambda s: len(s) <= 1, timeout=10)
    assert [line.split()[1] for line in left] == ["sleep"] and len(left) == 1, left
    detached = out(ws.exec(["sh", "-c", "ps -e -o args= | grep '^sleep 30'"])).split("\n")
    assert detached[0] == "sleep 302", detached


def test_a_signal_to_the_cli_reaches_the_command(made: Made) -> None:
    ws = made.started()
    proc = subprocess.Popen([SILO, "exec", ws.name, "--", "sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        assert settle(lambda: sleepers(ws), bool, timeout=10), "sleep never started in the workspace"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert settle(lambda: sleepers(ws), lambda s: not s) == []


def test_exec_with_a_tty(made: Made) -> None:
    ws = made.started()
    output, code = pty_run([SILO, "exec", "-t", ws.name, "--", "sh", "-c", "tty; echo $TERM; echo ok"],
                           {**os.environ, "TERM": "xterm"})
    text = output.decode(errors="replace").replace("\r", "")
    assert code == 0, text
    assert re.search(r"^/dev/pts/\d+\nxterm\nok$", text, re.M), text
    r = cli("exec", ws.name, "--", "tty")
    assert (r.returncode, r.stdout) == (1, "not a tty\n")


@pytest.mark.parametrize("flags", ["-it", "-t"])
def test_exec_tty_has_the_terminal_size_from_the_start(made: Made, flags: str) -> None:
    """The size travels in the request and is set on the pty before the command runs."""
    ws = made.started()
    output, code = pty_run([SILO, "exec", flags, ws.name, "--", "stty", "size"], dict(os.environ), rows=33, cols=101)
    assert (code, output.decode(errors="replace").strip()) == (0, "33 101")


# -- storage -----------------------------------------------------------------------------------

WRITE = ("echo data > /root/f && printf '#!/bin/sh\\necho from-x\\n' > /usr/local/bin/silo-test-x "
         "&& chmod 755 /usr/local/bin/silo-test-x")
CHECK = "cat /root/f && silo-test-x"


def test_persistent_files_survive_stop_start_and_a_daemon_restart(daemon: Daemon, client: silo.Client,
                                                                   made: Made) -> None:
    ws = made.started()
    out(ws.exec(["sh", "-c", WRITE]))
    assert not os.path.exists("/usr/local/bin/silo-test-x")
    ws.stop()
    ws.start()
    assert out(ws.exec(["sh", "-c", CHECK])) == "data\nfrom-x\n"
    daemon.stop()
    daemon.start()
    info = client.get(ws.name).info()
    assert info.state.value == "stopped" and info.pid is None
    ws.start()
    assert out(ws.exec(["sh", "-c", CHECK])) == "data\nfrom-x\n"
    assert not os.path.exists("/usr/local/bin/silo-test-x")


def build_deb(where: Path) -> Path:
    pkg = where / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr" / "share" / "silo-test").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text("Package: silo-test-pkg\nVersion: 1.0\nArchitecture: all\n"
                                            "Maintainer: silo tests <tests@example.invalid>\nDescription: test\n")
    (pkg / "usr" / "share" / "silo-test" / "hello").write_text("hello from the package\n")
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(pkg), str(where / "pkg.deb")], check=True,
                   capture_output=True)
    return where / "pkg.deb"


def host_has_test_package() -> bool:
    return subprocess.run(["dpkg", "-s", "silo-test-pkg"], capture_output=True).returncode == 0


def install_and_check(ws: silo.Workspace, hostdir: Path, installer: list[str]) -> None:
    assert not host_has_test_package()
    deb = build_deb(hostdir)
    r = cli("cp", str(deb), f"{ws.name}:/tmp/pkg.deb")
    assert r.returncode == 0, r
    r = ws.exec([*installer, "/tmp/pkg.deb"])
    assert r.exit_code == 0, r
    ws.stop()
    ws.start()
    assert ws.exec(["dpkg", "-s", "silo-test-pkg"]).exit_code == 0
    assert out(ws.exec(["cat", "/usr/share/silo-test/hello"])) == "hello from the package\n"
    assert not host_has_test_package()
    assert not os.path.exists("/usr/share/silo-test")


def test_a_package_installed_with_dpkg_stays_in_the_workspace(made: Made, hostdir: Path) -> None:
    install_and_check(made.started(), hostdir, ["dpkg", "-i"])


def test_a_package_installed_with_apt_get_stays_in_the_workspace(made: Made, hostdir: Path) -> None:
    install_and_check(made.started(), hostdir, ["apt-get", "install", "-y"])



def test_package_state_goes_through_snapshots_forks_and_exports(client: silo.Client, made: Made,
                                                                hostdir: Path) -> None:
    """The package state lives in nested layer directories (``var/lib/dpkg``): the storage
    verbs and diff treat them like any other."""
    ws = made.started()
    assert cli("cp", str(build_deb(hostdir)), f"{ws.name}:/tmp/pkg.deb").returncode == 0
    ws.stop()
    ws.snapshot("before")
    ws.start()
    out(ws.exec(["dpkg", "-i", "/tmp/pkg.deb"]))
    ws.stop()
    changes = {(c.kind, c.path) for c in ws.diff()}
    assert {("added", "/var/lib/dpkg/info/silo-test-pkg.list"), ("changed", "/var/lib/dpkg/status"),
            ("added", "/usr/share/silo-test/hello")} <= changes
    ws.snapshot("after")

    def installed(w: silo.Workspace) -> bool:
        if w.info().state.value != "running":
            w.start()
        return w.exec(["dpkg", "-s", "silo-test-pkg"]).exit_code == 0

    fork_name = made.name("fork")
    ws.fork(fork_name)
    ws.export(hostdir / "ws.tar")
    imported_name = made.name("imported")
    client.import_(hostdir / "ws.tar", imported_name)
    ws.restore("before")
    assert not installed(ws)
    ws.stop()
    ws.restore("after")
    assert installed(ws)
    ws.stop()
    ws.reset()
    assert not installed(ws)
    assert installed(client.get(fork_name)) and installed(client.get(imported_name))
    assert not host_has_test_package()

def test_apt_sees_the_host_sources_but_no_credentials(made: Made) -> None:
    ws = made.started()
    secrets = ("/etc/apt/auth.conf", "/etc/apt/auth.conf.d", "/var/cache/debconf/passwords.dat", "/etc/ssl/private")
    shown = out(ws.exec(["sh", "-c", 'for f in "$@"; do ls -d "$f" 2>/dev/null; done; true', "sh", *secrets]))
    assert shown == ""
    # the host's package database and sources, not empty ones
    assert out(ws.exec(["dpkg-query", "-W", "-f", "${Package}", "dpkg"])) == "dpkg"
    assert set(out(ws.exec(["ls", "/etc/apt"])).split()) & {"sources.list", "sources.list.d"}


def files_under(path: str) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]


def test_a_disposable_workspace_keeps_nothing(daemon: Daemon, made: Made) -> None:
    ws = made.started(disposable=True)
    upper = os.path.join(daemon.state, "workspaces", ws.name, "upper")
    out(ws.exec(["sh", "-c", "echo gone > /root/g && echo gone > /usr/local/bin/g"]))
    assert out(ws.exec(["cat", "/root/g"])) == "gone\n"
    assert files_under(upper) == []
    assert not any(f.endswith("/g") for f in files_under(daemon.state))
    ws.stop()
    ws.start()
    r = ws.exec(["sh", "-c", "ls /root/g /usr/local/bin/g"])
    assert r.exit_code != 0 and b"No such file" in r.stderr


def test_mapped_folders_read_write_and_read_only(made: Made, hostdir: Path) -> None:
    rw, ro = hostdir / "rw", hostdir / "ro"
    rw.mkdir()
    ro.mkdir()
    os.chmod(rw, 0o777)
    (ro / "given").write_text("from the host\n")
    ws = made.started(mounts=[f"{rw}:/data", f"{ro}:/ro:ro"])
    out(ws.exec(["sh", "-c", "echo from-inside > /data/written"]))
    assert (rw / "written").read_text() == "from-inside\n"
    assert out(ws.exec(["cat", "/ro/given"])) == "from the host\n"
    r = ws.exec(["sh", "-c", "echo no > /ro/given"])
    assert r.exit_code != 0 and b"Read-only file system" in r.stderr
    assert (ro / "given").read_text() == "from the host\n"


# -- snapshots, restore, reset, fork, templates, diff, export/import ---------------------------


def test_snapshot_and_restore(made: Made) -> None:
    ws = made.started()
    out(ws.exec(["sh", "-c", "echo v1 > /root/v"]))
    with pytest.raises(WorkspaceStateError) as e:
        ws.snapshot("clean")
    assert e.value.message == f"cannot snapshot '{ws.name}': it is running; run 'silo stop {ws.name}' first"
    assert_refused(cli("snapshot", ws.name, "clean"),
                   f"cannot snapshot '{ws.name}': it is running; run 'silo stop {ws.name}' first", WRONG_STATE)
    ws.stop()
    assert cli("snapshot", ws.name, "clean").stdout == "clean\n"
    assert [s["tag"] for s in json.loads(cli("snapshots", ws.name, "--json").stdout)] == ["clean"]
    ws.start()
    out(ws.exec(["sh", "-c", "echo v2 > /root/v && echo new > /root/added"]))
    ws.stop()
    assert cli("restore", ws.name, "clean").returncode == 0
    ws.start()
    assert out(ws.exec(["sh", "-c", "cat /root/v; ls /root"])) == "v1\nv\n"
    ws.stop()
    ws.restore("clean")  # a snapshot can be restored again
    assert [s.tag for s in ws.snapshots()] == ["clean"]


def test_reset_returns_to_the_base(made: Made) -> None:
    ws = made.started()
    out(ws.exec(["sh", "-c", "echo x > /root/x && rm /etc/issue"]))
    ws.stop()
    assert cli("reset", ws.name).returncode == 0
    ws.start()
    assert out(ws.exec(["sh", "-c", "ls /root; cat /etc/issue"])) == Path("/etc/issue").read_text()


def test_fork_is_an_independent_copy(client: silo.Client, made: Made) -> None:
    src = made.started()
    out(src.exec(["sh", "-c", "echo original > /root/v"]))
    src.stop()
    fork_name = made.name("fork")
    r = cli("fork", src.name, fork_name)
    assert r.stdout == f"{fork_name}\n"
    fork = client.get(fork_name)
    assert fork.info().state.value == "created"
    fork.start()
    assert out(fork.exec(["cat", "/root/v"])) == "original\n"
    out(fork.exec(["sh", "-c", "echo forked > /root/v && echo only-fork > /root/f"]))
    src.start()
    assert out(src.exec(["sh", "-c", "cat /root/v; ls /root"])) == "original\nv\n"
    out(src.exec(["sh", "-c", "echo source-later > /root/v"]))
    assert out(fork.exec(["cat", "/root/v"])) == "forked\n"


def test_templates(client: silo.Client, made: Made) -> None:
    src = made.started()
    out(src.exec(["sh", "-c", "echo in-template > /root/t && echo tool > /usr/local/bin/silo-tpl-tool"]))
    src.stop()
    tname = made.template()
    assert cli("template", "create", tname, "--from", src.name).stdout == f"{tname}\n"
    templates = {t["name"]: t for t in json.loads(cli("template", "ls", "--json").stdout)}
    assert templates[tname]["from"] == src.name and templates[tname]["base"] == "host"
    child = made.name("child")
    assert cli("create", child, "--root", tname).returncode == 0
    ws = client.get(child)
    assert ws.info().template == tname
    ws.start()
    assert out(ws.exec(["cat", "/root/t", "/usr/local/bin/silo-tpl-tool"])) == "in-template\ntool\n"
    out(ws.exec(["sh", "-c", "echo mine > /root/t"]))
    assert_refused(cli("template", "rm", tname),
                   f"cannot remove template '{tname}': workspace '{child}' is made from it; remove it first",
                   WRONG_STATE)
    src.start()  # the template is a copy: the source changes on its own
    out(src.exec(["sh", "-c", "echo source-later > /root/t"]))
    other = made.started(root=tname)
    assert out(other.exec(["cat", "/root/t"])) == "in-template\n"
    ws.remove(force=True)
    other.remove(force=True)
    assert cli("template", "rm", tname).returncode == 0
    assert tname not in [t.name for t in client.templates()]


def test_diff_lists_added_changed_and_deleted(made: Made) -> None:
    ws = made.started()
    out(ws.exec(["sh", "-c", "echo new > /root/added && rm /etc/issue && echo more >> /etc/shells"]))
    changes = {(c.kind, c.path) for c in ws.diff()}
    assert {("added", "/root/added"), ("deleted", "/etc/issue"), ("changed", "/etc/shells")} <= changes
    assert not any(path.startswith(("/proc", "/dev", "/tmp/")) for _, path in changes)
    as_json = {(c["kind"], c["path"]) for c in json.loads(cli("diff", ws.name, "--json").stdout)}
    assert as_json == changes
    table = cli("diff", ws.name).stdout
    assert re.search(r"^D\s+/etc/issue\s*$", table, re.M) and re.search(r"^A\s+/root/added\s*$", table, re.M)


def test_export_and_import_under_a_new_name(client: silo.Client, made: Made, hostdir: Path) -> None:
    ws = made.started(env={"FROM": "export"})
    out(ws.exec(["sh", "-c", "mkdir -p /root/d && echo exported > /root/d/f && rm /etc/issue"]))
    assert_refused(cli("export", ws.name, str(hostdir / "a.tar")),
                   f"cannot export '{ws.name}': it is running; run 'silo stop {ws.name}' first", WRONG_STATE)
    ws.stop()
    archive = hostdir / "ws.tar"
    assert cli("export", ws.name, str(archive)).returncode == 0
    assert archive.stat().st_size > 0
    new = made.name("imported")
    r = cli("import", str(archive), new)
    assert (r.returncode, r.stdout) == (0, f"{new}\n")
    imported = client.get(new)
    assert imported.info().state.value == "created"
    imported.start()
    assert out(imported.exec(["sh", "-c", "cat /root/d/f; echo $FROM; ls /etc/issue || true"])) == "exported\nexport\n"
    out(imported.exec(["sh", "-c", "echo after-import > /root/d/f"]))
    assert_refused(cli("import", str(archive), new),
                   f"a workspace named '{new}' already exists: import it under another name", EXISTS)
    assert out(imported.exec(["cat", "/root/d/f"])) == "after-import\n"


# -- logs and restart policy -------------------------------------------------------------------


def test_logs(made: Made) -> None:
    ws = made.started(on_start=["sh", "-c", "echo hello-from-on-start"])
    assert "hello-from-on-start" in settle(ws.logs, lambda t: "hello-from-on-start" in t)
    ws.stop()
    text = cli("logs", ws.name).stdout
    assert "created" in text and re.search(r"started \(init pid \d+\)", text) and "stopped" in text
    last = cli("logs", ws.name, "--tail", "1").stdout
    assert last.count("\n") == 1 and last == text.splitlines(keepends=True)[-1]


def wait_for(ws: silo.Workspace, good: object, timeout: float) -> silo.WorkspaceInfo:
    return settle(ws.info, good, timeout=timeout)  # type: ignore[arg-type]


def test_restart_always_brings_a_killed_init_back(made: Made) -> None:
    ws = made.started(restart="always")
    first = ws.info().pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    info = wait_for(ws, lambda i: i.state.value == "running" and i.pid not in (None, first), 6)
    assert info.state.value == "running" and info.pid not in (None, first), info
    assert comm(info.pid) == "silo-init"
    assert out(ws.exec(["echo", "back"])) == "back\n"


def test_restart_no_leaves_a_killed_workspace_stopped_with_the_reason(made: Made) -> None:
    ws = made.started()
    pid = ws.info().pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    info = wait_for(ws, lambda i: i.state.value != "running", 5)
    assert (info.state.value, info.pid) == ("stopped", None)
    assert info.error is not None and "exited" in info.error and "137" in info.error
    time.sleep(1.5)  # past the first restart back-off: it stays stopped
    assert ws.info().state.value == "stopped"
    assert "init exited with 137" in ws.logs()
