"""The workspace verbs of the CLI, run in-process against a MockTransport.

The CLI gets its client from ``silo.cli.workspaces.make_client``; the ``cli`` fixture
replaces it with a client of a fresh :class:`silo.MockTransport`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

import silo
from silo.cli import workspaces
from silo.cli.main import main
from silo.model.workspace import State, WorkspaceSpec
from silo.sdk.client import Client
from silo.sdk.transport import FakeWorkspace

Run = Callable[..., tuple[int, str, str]]
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def mock(monkeypatch: pytest.MonkeyPatch) -> silo.MockTransport:
    transport = silo.MockTransport()
    monkeypatch.setattr(workspaces, "make_client", lambda: Client(transport=transport))
    return transport


@pytest.fixture
def cli(mock: silo.MockTransport, capsys: pytest.CaptureFixture[str]) -> Run:
    def run(*argv: str) -> tuple[int, str, str]:
        try:
            main(list(argv))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err
    return run


def test_create_and_list(cli: Run, mock: silo.MockTransport) -> None:
    assert cli("create", "web", "--isolation", "app", "-e", "A=1", "--memory", "1G", "--on-start", "echo hi",
               "--restart", "always", "-v", "/tmp:/data:ro") == (0, "web\n", "")
    spec = mock.daemon.workspaces["web"].spec
    assert spec.on_start == ("sh", "-c", "echo hi") and spec.restart.value == "always"
    assert spec.mounts[0].readonly and spec.limits.memory == 1 << 30 and dict(spec.env) == {"A": "1"}
    cli("create", "db")
    code, out, err = cli("ls")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "ISOLATION", "ROOT", "CREATED", "PRIVATE", "SIZE"]
    assert lines[1].split() == ["web", "created", "app", "host", "just", "now", "0", "B"]
    assert lines[2].split()[:3] == ["db", "created", "process"]
    code, out, _ = cli("ls", "--json")
    listed = json.loads(out)
    assert [w["name"] for w in listed] == ["web", "db"] and listed[0]["spec"]["isolation"] == "app"
    assert cli("ls", "--quiet") == (0, "web\ndb\n", "")


def test_create_from_a_file_with_overrides(cli: Run, mock: silo.MockTransport, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "silo.toml").write_text('name = "svc"\ndisposable = true\n[env]\nA = "1"\n')
    (tmp_path / "img").mkdir()
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    assert cli("create", "-f", "silo.toml", "-e", "B=2", "--root", "./img", "-v", "data:/data") == (0, "svc\n", "")
    spec = mock.daemon.workspaces["svc"].spec
    assert spec.disposable and dict(spec.env) == {"A": "1", "B": "2"}
    assert spec.root == str(tmp_path / "img") and spec.mounts[0].source == str(tmp_path / "data")


@pytest.mark.parametrize(("argv", "code", "message"), [
    (["create", "Web"], 2, "bad workspace name 'Web'"),
    (["create"], 2, "give the workspace a name"),
    (["create", "web", "--isolation", "vmm"], 2, "unknown isolation 'vmm'"),
    (["create", "web", "--root", "./nope"], 3, "root directory ./nope does not exist"),
    (["create", "web", "--bogus"], 2, "unrecognized arguments: --bogus; see 'silo create --help'"),
    (["create", "web"], 5, "a workspace named 'web' exists already"),
    (["start", "nope"], 3, "no workspace named 'nope': see 'silo ls'"),
    (["stop", "web"], 4, "cannot stop 'web'"),
    (["exec", "web"], 125, "no command given"),
    (["exec", "nope", "--", "true"], 125, "no workspace named 'nope'"),
    (["cp", "a", "b"], 2, "copy between the host and a workspace"),
    (["cp", "web:rel", "/tmp"], 2, "a workspace path is absolute"),
    (["template", "create", "t"], 2, "the following arguments are required: --from"),
    (["frobnicate"], 2, "unknown command 'frobnicate'"),
])
def test_errors_are_one_line_with_a_code_per_kind(cli: Run, argv: list[str], code: int, message: str) -> None:
    """Every verb but exec (whose code is the command's, so silo's own is 125) exits with
    the code of its error's kind (silo.model.errors)."""
    cli("create", "web")
    got, out, err = cli(*argv)
    assert (got, out) == (code, ""), err
    assert err.startswith("silo: ") and message in err and err.count("\n") == 1, err


def test_wrong_state_and_exec(cli: Run, mock: silo.MockTransport, monkeypatch: pytest.MonkeyPatch) -> None:
    cli("create", "web")
    assert cli("exec", "web", "--", "echo", "hi") == (
        125, "", "silo: cannot exec in 'web': it has not been started; run 'silo start web'\n")
    assert cli("start", "web") == (0, "web\n", "")
    assert cli("exec", "web", "--", "echo", "hi", "there") == (0, "hi there\n", "")
    assert cli("exec", "-e", "K=V", "-w", "/tmp", "-u", "1000", "web", "--", "false")[0] == 1
    assert json.loads(mock.daemon.requests[-1].content) == {"argv": ["false"], "env": {"K": "V"},
                                                             "workdir": "/tmp", "user": "1000"}
    code, _, err = cli("exec", "web", "--", "jq")
    assert code == 127 and err == "silo: jq: command not found in 'web'\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"piped\n")))
    assert cli("exec", "-i", "web", "cat") == (0, "piped\n", "")
    code, _, err = cli("exec", "-t", "web", "--", "sh")
    assert code == 125 and "needs the streamed exec path" in err


def test_several_names_go_on_after_a_failure(cli: Run, mock: silo.MockTransport) -> None:
    cli("create", "a")
    cli("create", "b")
    code, out, err = cli("start", "a", "nope", "b")
    assert (code, out) == (3, "a\nb\n") and err == "silo: no workspace named 'nope': see 'silo ls'\n"
    assert cli("stop", "--timeout", "2", "a", "b") == (0, "a\nb\n", "")
    assert json.loads(mock.daemon.requests[-1].content) == {"timeout": 2.0}
    assert cli("restart", "a")[0] == 0 and mock.daemon.workspaces["a"].state is State.RUNNING
    code, _, err = cli("rm", "a")
    assert code == 4 and "or 'silo rm -f a'" in err
    assert cli("rm", "-f", "a", "b") == (0, "a\nb\n", "")
    assert mock.daemon.workspaces == {}


def test_inspect(cli: Run) -> None:
    cli("create", "web")
    code, out, _ = cli("inspect", "web")
    assert code == 0 and json.loads(out)["name"] == "web" and json.loads(out)["state"] == "created"
    assert cli("inspect", "--json", "web")[1] == out


def test_cp_both_ways(cli: Run, mock: silo.MockTransport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cli("create", "web")
    monkeypatch.chdir(tmp_path)
    Path("a:b").write_text("colon")
    assert cli("cp", "./a:b", "web:/tmp/ab") == (0, "", "")
    assert mock.daemon.workspaces["web"].files["/tmp/ab"] == b"colon"
    assert cli("cp", "web:/tmp/ab", str(tmp_path / "back")) == (0, "", "")
    assert (tmp_path / "back").read_text() == "colon"


def test_snapshots_fork_diff_logs(cli: Run, tmp_path: Path) -> None:
    cli("create", "web")
    (tmp_path / "f").write_text("x")
    cli("cp", str(tmp_path / "f"), "web:/tmp")
    assert cli("snapshot", "web", "clean") == (0, "clean\n", "")
    assert cli("snapshot", "web") == (0, "snap-1\n", "")
    code, out, _ = cli("snapshots", "web")
    assert code == 0 and out.splitlines()[0].split() == ["TAG", "CREATED", "PROCESSES"] and "clean" in out
    assert [(s["tag"], s["memory"]) for s in json.loads(cli("snapshots", "web", "--json")[1])] == [
        ("clean", False), ("snap-1", False)]
    # 'snapshot ls' and 'snapshot rm', as the error messages name them
    assert cli("snapshot", "ls", "web")[1] == out
    assert cli("snapshot", "rm", "web", "snap-1") == (0, "", "")
    assert [s["tag"] for s in json.loads(cli("snapshot", "ls", "web", "--json")[1])] == ["clean"]
    code, _, err = cli("snapshot", "web", "a", "b")
    assert code == 2 and err == ("silo: too many arguments: use 'silo snapshot NAME [TAG]', 'silo snapshot ls "
                                 "NAME' or 'silo snapshot rm NAME TAG'\n")
    # the fake daemon saves no processes, as a non-gvisor workspace
    code, _, err = cli("snapshot", "web", "--memory")
    assert code != 0 and "saves processes at isolation 'gvisor' only" in err
    assert cli("reset", "web") == (0, "", "")
    assert json.loads(cli("diff", "web", "--json")[1]) == []
    assert cli("restore", "web", "clean") == (0, "", "")
    assert json.loads(cli("diff", "web", "--json")[1]) == [{"kind": "added", "path": "/tmp/f"}]
    assert cli("diff", "web")[1].splitlines()[1].split() == ["A", "/tmp/f"]
    assert cli("fork", "web", "web2") == (0, "web2\n", "")
    code, _, err = cli("fork", "web", "web2")
    assert code == 5 and "exists already" in err
    cli("start", "web")
    cli("stop", "web")
    assert cli("logs", "web", "--tail", "1") == (0, "stop\n", "")


def test_diff_of_a_keep_directory_keeps_its_old_meaning(cli: Run, mock: silo.MockTransport, tmp_path: Path) -> None:
    code, _, err = cli("diff", str(tmp_path))
    assert code == 2 and "is not a kept app-level directory" in err
    code, _, err = cli("diff", str(tmp_path / "missing"))
    assert code == 3 and err.startswith(f"silo: {tmp_path}/missing: no such directory ('silo diff DIR'")
    assert mock.daemon.requests == []


def test_templates_export_import(cli: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cli("create", "web")
    assert cli("template", "create", "py", "--from", "web") == (0, "py\n", "")
    assert cli("template", "ls")[1].splitlines()[1].split()[:3] == ["py", "host", "web"]
    assert [t["name"] for t in json.loads(cli("template", "ls", "--json")[1])] == ["py"]
    assert cli("template", "rm", "py") == (0, "", "")
    assert cli("template", "ls", "--json") == (0, "[]\n", "")
    archive = tmp_path / "web.silo"
    assert cli("export", "web", str(archive)) == (0, "", "")
    assert cli("import", str(archive), "copy") == (0, "copy\n", "")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(archive.read_bytes())))
    assert cli("import", "-", "copy2") == (0, "copy2\n", "")


def test_help_exits_zero(cli: Run) -> None:
    code, out, _ = cli("create", "--help")
    assert code == 0 and out.startswith("usage: silo create") and "--on-start CMD" in out
    code, out, _ = cli("--help")
    assert code == 0 and "snapshot" in out and "completion" in out


def test_completion_scripts(cli: Run, tmp_path: Path) -> None:
    code, script, _ = cli("completion", "bash")
    assert code == 0 and "complete -o default -F _silo silo" in script
    code, zsh, _ = cli("completion", "zsh")
    assert zsh.startswith("#compdef silo") and script in zsh
    assert cli("completion", "fish")[0] == 2
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    fake = tmp_path / "silo"
    fake.write_text("#!/bin/sh\n[ \"$*\" = 'ls --quiet' ] && printf 'web\\nweb2\\ndb\\n'\n")
    fake.chmod(0o755)
    (tmp_path / "comp.bash").write_text(script)

    def complete(*words: str) -> list[str]:
        line = " ".join(f"'{w}'" for w in words)
        code = (f"source {tmp_path}/comp.bash; COMP_WORDS=(silo {line}); COMP_CWORD={len(words)}; _silo; "
                "printf '%s\\n' \"${COMPREPLY[@]}\"")
        env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
        out = subprocess.run([bash, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
        return sorted(filter(None, out.splitlines()))

    assert complete("sn") == ["snapshot", "snapshots"]
    assert complete("start", "we") == ["web", "web2"]
    assert complete("create", "--on") == ["--on-start"]
    assert complete("template", "") == ["create", "ls", "rm"]
    assert complete("template", "create", "py", "--from", "d") == ["db"]
    assert complete("completion", "") == ["bash", "zsh"]


def test_plain_commands_stay_light() -> None:
    code = (f"import sys; sys.path.insert(0, {str(SRC)!r}); import silo.cli.main; "
            "print(' '.join(sorted(n for n in ('httpx', 'rich', 'silo.cli.workspaces', 'silo.sdk.client') "
            "if n in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == ""


def test_a_hostile_archive_is_one_line(cli: Run, mock: silo.MockTransport, tmp_path: Path) -> None:
    cli("create", "web")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("x")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/shadow"
        tar.addfile(info)
    mock.daemon.files_reply = out.getvalue()
    code, _, err = cli("cp", "web:/x", str(tmp_path))
    assert code == 11 and err.startswith("silo: refusing the archive from silod: x is a symlink to '/etc/shadow'")
    assert list(tmp_path.iterdir()) == []


def test_guest_chosen_text_cannot_style_or_split_output(cli: Run, mock: silo.MockTransport,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cli("create", "web")
    ws = mock.daemon.workspaces["web"]
    ws.files["/tmp/[red]x"] = b"1"

    def fail(w: object, body: object) -> tuple[int, bytes, bytes]:
        raise silo.UserError("line one\nsilo: forged line \x1b[31m")

    mock.daemon.exec_handler = fail
    assert "/tmp/[red]x" in cli("diff", "web")[1]
    cli("start", "web")
    code, _, err = cli("exec", "web", "--", "x")
    assert code == 125 and err == "silo: line one\\nsilo: forged line \\x1b[31m\n"


def test_an_unmeasured_size_is_a_dash(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    record = silo.MockTransport().daemon
    record.workspaces["web"] = FakeWorkspace(WorkspaceSpec(name="web"))
    wire = {**record.workspaces["web"].to_wire(), "private_bytes": None}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=[wire]))
    monkeypatch.setattr(workspaces, "make_client", lambda: Client(transport=transport))
    main(["ls"])
    assert capsys.readouterr().out.splitlines()[1].split()[-1] == "-"
