"""``silo.toml``: every error is ``FILE:LINE:COL: message`` and points at the offending text."""

from __future__ import annotations

from pathlib import Path

import pytest

from silo.model.errors import NotFoundError, SpecError
from silo.model.network import NetworkPolicy
from silo.model.spec import Isolation, Limits, Mount, User
from silo.model.specfile import SpecFileError, load, loads, scan_positions
from silo.model.workspace import Overrides, RestartPolicy, WorkspaceSpec

EXAMPLE = """\
# a workspace for the web app
name = "web"
isolation = "process"
root = "host"
disposable = false
workdir = "/work"
user = "1000:1000"
hostname = "webhost"
on_start = ["sh", "-c", "echo hi"]
restart = "on-failure"

[env]
LANG = "C.UTF-8"
"QUOTED_KEY" = 'literal \\ value'

[[mount]]
source = "/srv/data"
target = "/data"
readonly = true

[[mount]]
source = "/srv/cache"
target = "/cache"

[limits]
memory = "512M"
cpus = 1.5
pids = 256

[network]
mode = "none"
"""


def test_the_documented_example_loads() -> None:
    spec = loads(EXAMPLE)
    assert spec == WorkspaceSpec(
        name="web", isolation=Isolation.PROCESS, root="host", disposable=False, workdir="/work",
        user=User(1000, 1000), hostname="webhost", on_start=("sh", "-c", "echo hi"),
        restart=RestartPolicy.ON_FAILURE, env=(("LANG", "C.UTF-8"), ("QUOTED_KEY", "literal \\ value")),
        mounts=(Mount("/srv/data", "/data", True), Mount("/srv/cache", "/cache")),
        limits=Limits(memory=512 << 20, cpus=1.5, pids=256), network=NetworkPolicy(),
    )


def test_other_toml_spellings_of_the_same_data() -> None:
    text = ('name = "web"\nlimits = { memory = "512M", cpus = 1.5, pids = 256 }\n'
            'mount = [{ source = "/srv/data", target = "/data", readonly = true }, "/srv/cache:/cache"]\n'
            'env.LANG = "C.UTF-8"\nnetwork.mode = "none"\n')
    spec = loads(text)
    assert spec.limits == Limits(memory=512 << 20, cpus=1.5, pids=256)
    assert spec.mounts == (Mount("/srv/data", "/data", True), Mount("/srv/cache", "/cache"))
    assert spec.env == (("LANG", "C.UTF-8"),)


def _error(text: str, overrides: Overrides | None = None) -> str:
    with pytest.raises(SpecFileError) as info:
        loads(text, "ws/silo.toml", overrides)
    err = info.value
    assert isinstance(err, SpecError)
    assert "\n" not in err.message
    assert err.message == f"ws/silo.toml:{err.line}:{err.col}: {err.detail}"
    return err.message


# syntax errors: tomllib's positions, reformatted --------------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    ('name = "web"\nisolation = process\n',
     'ws/silo.toml:2:13: invalid value (strings need quotes, like isolation = "process")'),
    ('name = "web"\nenv = { A = "x"\n', "ws/silo.toml:2:16: unclosed inline table"),
    ('name = "web\n', "ws/silo.toml:1:12: illegal character '\\n'"),
    ('name = "web"\non_start = ["sh",\n', "ws/silo.toml:3:1: invalid value"),
    ('[limits]\npids = 1\n[limits]\n', "ws/silo.toml:3:1: [limits] is declared twice: merge the two tables"),
    # tomllib reports this one at the end of the document: the scanner finds the key
    ('name = "web"\n\nname = "db"\n\n\n', "ws/silo.toml:3:1: name is set twice: keep one"),
    ('[limits]\npids = 1\ncpus = 1\npids = 2\n', "ws/silo.toml:4:1: limits.pids is set twice: keep one"),
])
def test_syntax_errors(text: str, message: str) -> None:
    assert _error(text).startswith(message)


# values: the scanner's positions ------------------------------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    # a bad size, as in the issue
    ('name = "web"\n[limits]\nmemory = "12Q"\n',
     "ws/silo.toml:3:10: bad memory size '12Q': use a number with an optional unit K, M, G or T, like 512M"),
    ('name = "web"\nlimits.memory = "12Q"\n', "ws/silo.toml:2:17: bad memory size '12Q'"),
    ('name = "web"\nlimits = { cpus = 1, memory = "12Q" }\n', "ws/silo.toml:2:31: bad memory size '12Q'"),
    # a relative mount source in the second [[mount]]
    ('name = "web"\n[[mount]]\nsource = "/a"\ntarget = "/a"\n\n[[mount]]\nsource   =   "srv"\ntarget = "/b"\n',
     "ws/silo.toml:7:14: bad mount source 'srv': it must be an absolute host path (try $PWD/srv)"),
    ('name = "web"\nmount = [ "/a:/a",\n  { source = "/b", target = "rel" } ]\n',
     "ws/silo.toml:3:29: bad mount target 'rel'"),
    ('name = "web"\nmount = ["/a:/a", "nope"]\n', "ws/silo.toml:2:19: bad mount 'nope'"),
    ('name = "web"\n[[mount]]\ntarget = "/x"\n', "ws/silo.toml:2:3: this mount has no source"),
    ('name = "web"\n[[mount]]\nsource = "/a"\ntarget = "/x"\n[[mount]]\nsource = "/b"\ntarget = "/x/"\n',
     "ws/silo.toml:7:10: another mount already has the target /x: keep one"),
    # names and simple values
    ('# comment\nname = "Web"\n', "ws/silo.toml:2:8: bad workspace name 'Web': use 1 to 63 lowercase letters"),
    ('name = "../etc"\n', "ws/silo.toml:1:8: bad workspace name '../etc'"),
    ('name = "web"\ndisposable = "yes"\n', "ws/silo.toml:2:14: disposable must be true or false, not the string"),
    ('name = "web"\nisolation = "gvisr"\n', "ws/silo.toml:2:13: unknown isolation 'gvisr': use one of"),
    ('name = "web"\nrestart = "never"\n', "ws/silo.toml:2:11: unknown restart policy 'never'"),
    ('name = "web"\nworkdir = "/proc/1/cwd"\n', "ws/silo.toml:2:11: bad working directory"),
    ('name = "web"\nuser = "root"\n', "ws/silo.toml:2:8: bad user 'root'"),
    ('name = "web"\nhostname = "a_b"\n', "ws/silo.toml:2:12: bad hostname 'a_b'"),
    ('name = "web"\nroot = "./img"\n', "ws/silo.toml:2:8: bad root './img'"),
    ('name = "web"\n[network]\nmode = "lan"\n', "ws/silo.toml:3:8: unknown network mode 'lan'"),
    ('name = "web"\non_start = "echo hi"\n', "ws/silo.toml:2:12: on_start must be a list of strings"),
    ('name = "web"\non_start = [\n  "sh",\n  # the flag\n  3,\n]\n', "ws/silo.toml:5:3: on_start must be"),
    ('name = "web"\nlimits = 3\n', "ws/silo.toml:2:10: limits must be a table, not the number 3"),
    ('name = "web"\n[limits]\ncpus = true\n', "ws/silo.toml:3:8: cpus must be a number of CPUs"),
    # environment: bad names point at the key, bad values at the value
    ('name = "web"\n[env]\n"1A" = "x"\n', "ws/silo.toml:3:1: bad environment variable name '1A'"),
    ('name = "web"\n[env]\nPORT = 8080\n', 'ws/silo.toml:3:8: PORT must be a string (write PORT = "8080" with'),
    ('name = "web"\n[env]\nA = "a\\u0000b"\n', "ws/silo.toml:3:5: bad environment entry 'A': the value contains"),
    # unknown keys point at the key and suggest the closest
    ('name = "web"\nisolaton = "app"\n', "ws/silo.toml:2:1: unknown key 'isolaton': did you mean 'isolation'? "
     "allowed keys are name, isolation, root"),
    ('name = "web"\n[limits]\n  memroy = "1G"\n',
     "ws/silo.toml:3:3: unknown key 'memroy' in [limits]: did you mean 'memory'? allowed keys are memory, cpus, "
     "pids"),
    ('name = "web"\nlimits.memroy = "1G"\n', "ws/silo.toml:2:8: unknown key 'memroy' in [limits]"),
    ('name = "web"\n[[mount]]\nsource = "/a"\ntarget = "/a"\nread_only = true\n',
     "ws/silo.toml:5:1: unknown key 'read_only' in [[mount]]: did you mean 'readonly'?"),
    ('name = "web"\n[limit]\nmemory = "1G"\n', "ws/silo.toml:2:2: unknown key 'limit': did you mean 'limits'?"),
    # no name anywhere: nothing to point at
    ('isolation = "app"\n',
     'ws/silo.toml:1:1: the workspace has no name: add name = "web" to the file, or give a name on the command line'),
])
def test_value_errors_point_at_the_value(text: str, message: str) -> None:
    assert _error(text).startswith(message), _error(text)


def test_positions_survive_multiline_strings_comments_and_crlf() -> None:
    text = ('name = "web" # the name\r\n'
            'on_start = ["sh", "-c", """\r\n'
            'echo "[limits]" ; echo \'x\'\r\n'
            '"""]\r\n'
            "[env]\r\n"
            "NOTE = '''\r\nmulti [x] = 1\r\n'''\r\n"
            'B = "a # not a comment"\r\n'
            "[limits] # trailing\r\n"
            "pids = 0\r\n")
    assert _error(text).startswith("ws/silo.toml:11:8: bad pids limit '0': it must be greater than zero")


def test_a_date_is_a_wrong_type_not_a_crash() -> None:
    assert _error('name = "web"\nworkdir = 1979-05-27 07:32:00Z\n').startswith(
        "ws/silo.toml:2:11: workdir must be an absolute path like \"/work\", not a datetime")


# overrides ----------------------------------------------------------------------------------


def test_command_line_overrides_win_over_the_file() -> None:
    text = 'name = "web"\n[limits]\nmemory = "512M"\ncpus = 1.5\n[env]\nA = "file"\nB = "file"\n'
    spec = loads(text, "silo.toml", Overrides(memory="1G", env={"A": "cli"}, disposable=True))
    assert spec.limits == Limits(memory=1 << 30, cpus=1.5)
    assert dict(spec.env) == {"A": "cli", "B": "file"}
    assert spec.disposable is True


def test_a_command_line_name_completes_or_replaces_the_file_one() -> None:
    assert loads('isolation = "app"\n', "silo.toml", Overrides(name="cli")).name == "cli"
    assert loads('name = "file"\n', "silo.toml", Overrides(name="cli")).name == "cli"


def test_bad_overrides_are_not_blamed_on_the_file() -> None:
    with pytest.raises(SpecError) as info:
        loads('name = "web"\n', "silo.toml", Overrides(memory="12Q"))
    assert not isinstance(info.value, SpecFileError)
    assert info.value.message.startswith("bad memory size '12Q'")
    with pytest.raises(SpecError) as info:
        loads('name = "web"\n', "silo.toml", Overrides(name="Bad"))
    assert not isinstance(info.value, SpecFileError)


# files --------------------------------------------------------------------------------------


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "silo.toml"
    path.write_text(EXAMPLE)
    assert load(path) == loads(EXAMPLE)
    path.write_text('name = "web"\n[limits]\nmemory = "12Q"\n')
    with pytest.raises(SpecFileError, match=rf"^{path}:3:10: bad memory size"):
        load(path)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no such spec file"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'name = "web"\nhostname = "caf\xe9"\n')
    with pytest.raises(SpecFileError, match=r":2:16: the file is not UTF-8 text$"):
        load(bad)
    huge = tmp_path / "huge.toml"
    huge.write_bytes(b"#" * ((1 << 20) + 1))
    with pytest.raises(SpecFileError, match=r":1:1: the file is larger than 1 MiB"):
        load(huge)
    with pytest.raises(SpecError, match="cannot read it"):
        load(tmp_path)  # a directory


# the scanner on its own ---------------------------------------------------------------------


def _at(text: str, offset: int) -> str:
    return text[offset:offset + 6]


def test_scanner_paths() -> None:
    text = ('a = 1\n[t]\nb.c = "x"\n[[arr]]\nd = [1, [2, 3], {e = 4}]\n[arr.sub]\nf = 5\n[[arr]]\n'
            '"q.k" = 6\n[[arr.list]]\ng = 7\n')
    pos = scan_positions(text)
    assert _at(text, pos.values[("a",)]) == "1\n[t]\n"
    assert _at(text, pos.values[("t", "b", "c")]) == '"x"\n[['
    assert _at(text, pos.keys[("t", "b", "c")]) == 'c = "x'
    assert _at(text, pos.values[("arr", 0, "d", 1, 0)]) == "2, 3],"
    assert _at(text, pos.values[("arr", 0, "d", 2, "e")]) == "4}]\n[a"
    assert _at(text, pos.values[("arr", 0, "sub", "f")]) == "5\n[[ar"
    assert _at(text, pos.values[("arr", 1, "q.k")]) == "6\n[[ar"
    assert _at(text, pos.values[("arr", 1, "list", 0, "g")]) == "7\n"
    assert _at(text, pos.values[("arr", 1)]) == "[[arr]"
    assert pos.duplicate is None
