"""The spec parsers turn user strings into typed values or one SpecError naming the problem.

No root, no system access: :mod:`silo.model.spec` never touches the host.
"""

from __future__ import annotations

import pytest

from silo.model.errors import EXIT_SILO, SpecError, UserError
from silo.model.spec import (
    CAPABILITIES,
    Isolation,
    Mount,
    Spec,
    User,
    parse_cap,
    parse_count,
    parse_cpus,
    parse_duration,
    parse_env_entry,
    parse_env_file,
    parse_hostname,
    parse_rlimit,
    parse_size,
)

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


def _raises(fn, *args, match: str, **kw) -> SpecError:  # type: ignore[no-untyped-def]
    with pytest.raises(SpecError, match=match) as info:
        fn(*args, **kw)
    err = info.value
    assert isinstance(err, UserError)
    assert err.exit_code == EXIT_SILO
    assert err.message == str(err)
    assert "\n" not in err.message  # the CLI prints it as one line
    return err


# sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("4096", 4096),
    ("1", 1),
    ("512M", 512 * MiB),
    ("512m", 512 * MiB),
    ("1G", GiB),
    ("1.5G", GiB + GiB // 2),
    ("1.5GiB", GiB + GiB // 2),
    ("64k", 64 * KiB),
    ("64KB", 64 * KiB),
    ("2T", 2 * TiB),
    (" 256M ", 256 * MiB),
    ("10 M", 10 * MiB),
    ("100b", 100),
])
def test_parse_size_good(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "12Q", "-1M", "1.2.3M", "1e6", "abc", "5 MB extra", "0x10"])
def test_parse_size_malformed(text: str) -> None:
    err = _raises(parse_size, text, "memory size", match="bad memory size")
    assert repr(text) in err.message
    assert "like 512M" in err.message  # says what a good value looks like


@pytest.mark.parametrize("text", ["0", "0M", "0.0G", "0.0000001K"])
def test_parse_size_zero(text: str) -> None:
    _raises(parse_size, text, match="greater than zero")


def test_parse_size_names_what() -> None:
    _raises(parse_size, "x", "tmpfs size", match="^bad tmpfs size 'x'")
    _raises(parse_size, "x", match="^bad size 'x'")


# durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("30s", 30.0), ("30", 30.0), ("1.5m", 90.0), ("250ms", 0.25), ("2h", 7200.0),
    ("1S", 1.0), ("1H", 3600.0), (" 5s ", 5.0), ("0.5", 0.5),
])
def test_parse_duration_good(text: str, value: float) -> None:
    assert parse_duration(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "s", "5y", "-1s", "1d", "1e3", "inf", "nan", "5 s s", "1:30"])
def test_parse_duration_malformed(text: str) -> None:
    err = _raises(parse_duration, text, "timeout", match="^bad timeout")
    assert repr(text) in err.message
    assert "like 30s" in err.message


@pytest.mark.parametrize("text", ["0", "0s", "0ms", "0.0h"])
def test_parse_duration_zero(text: str) -> None:
    _raises(parse_duration, text, match="greater than zero")


# cpus / counts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [("1.5", 1.5), ("0.01", 0.01), ("1024", 1024.0),
                                                  (2, 2.0), (0.5, 0.5), ("4", 4.0)])
def test_parse_cpus_good(value: str | float, expected: float) -> None:
    assert parse_cpus(value) == expected


@pytest.mark.parametrize("value", ["abc", "", "1.5cpus"])
def test_parse_cpus_malformed(value: str) -> None:
    err = _raises(parse_cpus, value, match="^bad cpu count")
    assert "like 1.5" in err.message


@pytest.mark.parametrize("value", ["0", "0.001", "-1", "1025", "inf", "nan", 0.0, 5000])
def test_parse_cpus_out_of_range(value: str | float) -> None:
    _raises(parse_cpus, value, match="between 0.01 and 1024")


@pytest.mark.parametrize(("value", "expected"), [("256", 256), (16, 16), ("1", 1)])
def test_parse_count_good(value: str | int, expected: int) -> None:
    assert parse_count(value, "pids limit") == expected


@pytest.mark.parametrize("value", ["abc", "1.5", "", "12k"])
def test_parse_count_malformed(value: str) -> None:
    err = _raises(parse_count, value, "pids limit", match="^bad pids limit")
    assert "whole number" in err.message


@pytest.mark.parametrize("value", ["0", "-5", 0, -1])
def test_parse_count_not_positive(value: str | int) -> None:
    _raises(parse_count, value, "pids limit", match="greater than zero")


# mounts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "mount"), [
    ("/srv/data:/data", Mount("/srv/data", "/data", False)),
    ("/srv/data:/data:ro", Mount("/srv/data", "/data", True)),
    ("/srv/data:/data:rw", Mount("/srv/data", "/data", False)),
    ("/srv/data:/a//b/./c/", Mount("/srv/data", "/a/b/c", False)),  # target normalised
    ("/etc/hosts:/x/hosts:ro", Mount("/etc/hosts", "/x/hosts", True)),
])
def test_mount_parse_good(text: str, mount: Mount) -> None:
    assert Mount.parse(text) == mount


@pytest.mark.parametrize("text", ["/a", "/a:/b:ro:x", "/a:/b:rx", ":/b", "/a:", "", "/a:/b:"])
def test_mount_parse_malformed(text: str) -> None:
    err = _raises(Mount.parse, text, match="^bad mount")
    assert "HOST:GUEST" in err.message


def test_mount_relative_source_says_how_to_fix() -> None:
    err = _raises(Mount.parse, "data:/data", match="^bad mount source 'data'")
    assert "absolute host path" in err.message
    assert "$PWD/data" in err.message


@pytest.mark.parametrize(("target", "match"), [
    ("data", "absolute path inside the sandbox"),
    ("/a/../etc", r"'\.\.' is not allowed"),
    ("/..", r"'\.\.' is not allowed"),
    ("/", "map a folder below the root"),
    ("//./", "map a folder below the root"),
])
def test_mount_bad_target(target: str, match: str) -> None:
    _raises(Mount, "/srv", target, match=match)


def test_mount_nul_bytes() -> None:
    _raises(Mount, "/srv\0x", "/data", match="NUL byte")
    _raises(Mount, "/srv", "/da\0ta", match="NUL byte")
    _raises(Mount, "/srv", "/" + "a" * 5000, match="too long")


# users ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "user"), [
    ("0", User(0, 0)), ("1000", User(1000, 1000)), ("1000:100", User(1000, 100)),
    ("65535:0", User(65535, 0)),
])
def test_user_parse_good(text: str, user: User) -> None:
    assert User.parse(text) == user


@pytest.mark.parametrize("text", ["root", "1000:staff", "", ":1000", "1.5", "1000:x"])
def test_user_parse_not_numeric(text: str) -> None:
    err = _raises(User.parse, text, match="^bad user")
    assert "numeric UID or UID:GID" in err.message


@pytest.mark.parametrize("text", ["-1", "65536", "0:65536", "1000:-1"])
def test_user_parse_out_of_range(text: str) -> None:
    _raises(User.parse, text, match="between 0 and 65535")


# environment ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "pair"), [
    ("A=1", ("A", "1")), ("_x9=", ("_x9", "")), ("K=a=b", ("K", "a=b")), ("P=/a b:c", ("P", "/a b:c")),
])
def test_env_entry_good(text: str, pair: tuple[str, str]) -> None:
    assert parse_env_entry(text) == pair


@pytest.mark.parametrize("text", ["A", "=1", "1A=x", "A-B=1", "A B=1", "", "A\n=1", "B =x"])
def test_env_entry_malformed(text: str) -> None:
    err = _raises(parse_env_entry, text, match="^bad environment entry")
    assert "NAME=VALUE" in err.message


def test_env_entry_nul_value() -> None:
    _raises(parse_env_entry, "A=x\0y", match="'A'.*NUL byte")


def test_env_file_good() -> None:
    text = "\n".join([
        "# comment", "   ", "A=1", "export B=two", "C='quoted value'", 'D="dq"', "E='", "F=a=b",
        "A=override", "  G=spaces around  ",
    ])
    assert parse_env_file(text, "env") == {
        "A": "override", "B": "two", "C": "quoted value", "D": "dq", "E": "'", "F": "a=b",
        "G": "spaces around",
    }


@pytest.mark.parametrize(("text", "line"), [
    ("A=1\nnot an entry\n", 2), ("\n\n\n=x", 4), ("A=1\nB=\0", 2), ("# c\n   B = x", 2),
])
def test_env_file_error_names_file_and_line(text: str, line: int) -> None:
    err = _raises(parse_env_file, text, "conf/my.env", match=rf"^conf/my\.env:{line}: ")
    assert "environment entry" in err.message


# capabilities ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "name"), [
    ("NET_BIND_SERVICE", "NET_BIND_SERVICE"), ("net_bind_service", "NET_BIND_SERVICE"),
    ("CAP_CHOWN", "CHOWN"), ("cap_sys_ptrace", "SYS_PTRACE"), ("SYS_ADMIN", "SYS_ADMIN"),
])
def test_cap_good(text: str, name: str) -> None:
    assert parse_cap(text) == name
    assert name in CAPABILITIES


def test_capability_numbers_match_the_kernel() -> None:
    assert CAPABILITIES["CHOWN"] == 0
    assert CAPABILITIES["NET_BIND_SERVICE"] == 10
    assert CAPABILITIES["SYS_ADMIN"] == 21
    assert CAPABILITIES["CHECKPOINT_RESTORE"] == 40


@pytest.mark.parametrize("text", ["FLY", "", "CAP_", "NET BIND"])
def test_cap_unknown(text: str) -> None:
    err = _raises(parse_cap, text, match="^unknown capability")
    assert "NET_BIND_SERVICE" in err.message


@pytest.mark.parametrize("text", ["SYS_MODULE", "cap_sys_rawio", "SYS_BOOT", "MAC_ADMIN", "MAC_OVERRIDE"])
def test_cap_forbidden(text: str) -> None:
    _raises(parse_cap, text, match="would give the sandbox the host; it cannot be added")


# hostnames ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["silo", "a", "web-1", "A9", "x" * 63])
def test_hostname_good(text: str) -> None:
    assert parse_hostname(text) == text


@pytest.mark.parametrize("text", ["", "-a", "a-", "a.b", "a_b", "x" * 64, "h\n", "ü"])
def test_hostname_bad(text: str) -> None:
    err = _raises(parse_hostname, text, match="^bad hostname")
    assert "at most 63" in err.message


# rlimits ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("nofile=64", ("nofile", 64, 64)), ("nofile=64:128", ("nofile", 64, 128)),
    ("core=0", ("core", 0, 0)), ("nproc=10:10", ("nproc", 10, 10)), ("as=1048576", ("as", 1 << 20, 1 << 20)),
])
def test_rlimit_good(text: str, value: tuple[str, int, int]) -> None:
    assert parse_rlimit(text) == value


@pytest.mark.parametrize("text", ["nofile", "files=10", "=10", "NOFILE=10", ""])
def test_rlimit_bad_name(text: str) -> None:
    err = _raises(parse_rlimit, text, match="^bad rlimit")
    assert "NAME=SOFT[:HARD]" in err.message
    assert "nofile" in err.message  # lists the names


@pytest.mark.parametrize("text", ["nofile=x", "nofile=1:y", "nofile=", "nofile=1.5"])
def test_rlimit_not_numbers(text: str) -> None:
    _raises(parse_rlimit, text, match="whole numbers")


@pytest.mark.parametrize("text", ["nofile=-1", "nofile=10:5"])
def test_rlimit_order(text: str) -> None:
    _raises(parse_rlimit, text, match="0 <= SOFT <= HARD")


# the Spec itself ----------------------------------------------------------------------------------


def test_spec_defaults_and_normalised_workdir() -> None:
    spec = Spec(workdir="/w//x/./")
    assert spec.workdir == "/w/x"
    assert spec.isolation is Isolation.PROCESS
    assert spec.root == "host"
    assert spec.seccomp == "default"
    assert spec.user == User(0, 0)
    with pytest.raises(AttributeError):
        spec.root = "/x"  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(("kw", "match"), [
    ({"workdir": "rel"}, "bad working directory"),
    ({"workdir": "/a/../b"}, r"'\.\.' is not allowed"),
    ({"root": "images/x"}, "bad root 'images/x'"),
    ({"cow": ("/x",)}, "add --isolation app"),
    ({"keep": "/k"}, "add --isolation app"),
    ({"isolation": Isolation.APP, "keep": "rel"}, "bad --keep 'rel'"),
    ({"isolation": Isolation.APP, "cow": ("rel",)}, "bad --cow 'rel'"),
])
def test_spec_errors(kw: dict[str, object], match: str) -> None:
    _raises(Spec, match=match, **kw)
