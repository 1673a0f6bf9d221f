"""silo-setup's operations, traced: the exact system calls, no root.

Each test encodes a few plan operations with :func:`silo.backends.process.script.ops_only`,
runs the real ``silo-setup --trace`` on them (the same C functions that build every
sandbox, with the system calls printed instead of made) and compares the calls with
the ones the operation must make, and only those. Numbers print in decimal, NULL as
None; ``dir=PATH`` marks a directory, ``fail=PATH=ERRNO`` makes calls on PATH fail.
"""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path
from typing import Any

import pytest

from silo import native
from silo.backends.process import script
from silo.model import plan as p
from silo.model.errors import ProtocolError

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE, MNT_DETACH = 4096, 16384, 1 << 18, 2


def _value(text: str) -> Any:
    if text == "-":
        return None
    if text.lstrip("-").isdigit():
        return int(text)
    return text.encode()


def trace(tmp_path: Path, *ops: Any, args: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "script"
    path.write_bytes(script.ops_only(ops))
    return subprocess.run([native.built("silo-setup"), "--trace", str(path), *args],
                          capture_output=True, text=True, check=False)


def calls_of(out: str) -> list[tuple[Any, ...]]:
    return [(fields[0], *map(_value, fields[1:])) for fields in (line.split("\t") for line in out.splitlines())]


@pytest.fixture
def run(tmp_path: Path) -> Any:
    def run(*ops: Any, args: tuple[str, ...] = ()) -> list[tuple[Any, ...]]:
        done = trace(tmp_path, *ops, args=args)
        assert done.returncode == 0, done.stderr
        return calls_of(done.stdout)
    return run


def mounts(calls: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [c for c in calls if c[0] == "mount"]


def test_make_private_is_recursive_on_root(run: Any) -> None:
    assert run(p.MakePrivate()) == [("mount", None, b"/", None, MS_REC | MS_PRIVATE, None)]


def test_tmpfs(run: Any) -> None:
    assert run(p.Tmpfs("/s", "size=10,mode=0755")) == [
        ("mount", b"tmpfs", b"/s", b"tmpfs", MS_NOSUID | MS_NODEV, b"size=10,mode=0755")]
    assert run(p.Tmpfs("/s", "mode=0555", readonly=True)) == [
        ("mount", b"tmpfs", b"/s", b"tmpfs", MS_NOSUID | MS_NODEV | MS_RDONLY, b"mode=0555")]


def test_mkdir_without_owner_does_not_chown(run: Any) -> None:
    assert run(p.Mkdir("/s/a"), p.Mkdir("/s/t", 0o1777)) == [
        ("mkdir", b"/s/a", 0o755), ("mkdir", b"/s/t", 0o1777)]


def test_mkdir_with_owner_chowns(run: Any) -> None:
    assert run(p.Mkdir("/s/home/user", 0o700, 1000, 1001)) == [
        ("mkdir", b"/s/home/user", 0o700), ("chown", b"/s/home/user", 1000, 1001)]
    # only a gid is enough to chown (uid -1 = unchanged)
    assert run(p.Mkdir("/s/g", 0o755, -1, 5)) == [("mkdir", b"/s/g", 0o755), ("chown", b"/s/g", -1, 5)]


def test_symlink_and_write_file(run: Any) -> None:
    assert run(p.Symlink("pts/ptmx", "/r/dev/ptmx"), p.WriteFile("/r/etc/hosts", b"x\n", 0o600)) == [
        ("symlink", b"pts/ptmx", b"/r/dev/ptmx"), ("write_file", b"/r/etc/hosts", 2, 0o600)]


def test_overlay_options(run: Any) -> None:
    calls = run(p.Overlay("/r", ("/l1", "/l2"), "/u", "/w"))
    assert calls == [("mount", b"overlay", b"/r", b"overlay", MS_NOSUID | MS_NODEV,
                      b"lowerdir=/l1:/l2,upperdir=/u,workdir=/w,userxattr")]
    calls = run(p.Overlay("/r", ("/l",), "/u", "/w", userxattr=False))
    assert calls[0][5] == b"lowerdir=/l,upperdir=/u,workdir=/w"


def test_overlay_escapes_colon_comma_and_backslash(run: Any) -> None:
    calls = run(p.Overlay("/home/a:b", ("/home/a:b", "/x,y"), "/up,per", "/wo:rk\\"))
    # ':' separates lower layers and ',' separates options: both are escaped in paths,
    # so a directory name cannot inject a layer or an option (e.g. ",upperdir=/etc").
    assert calls == [("mount", b"overlay", b"/home/a:b", b"overlay", MS_NOSUID | MS_NODEV,
                      b"lowerdir=/home/a\\:b:/x\\,y,upperdir=/up\\,per,workdir=/wo\\:rk\\\\,userxattr")]


def test_bind_goes_through_fds_in_root(run: Any) -> None:
    calls = run(p.Bind("/host/data", "/data", "/s/root", readonly=False, create="dir"))
    src_fd, dst_fd = calls[0][-1], calls[1][-1]
    assert calls[0] == ("open_path", b"/host/data", src_fd)
    assert calls[1] == ("open_in_root", b"/s/root", b"/data", b"dir", dst_fd)
    # the mount names both ends only through /proc/self/fd: no path is re-resolved
    assert calls[2] == ("mount", b"/proc/self/fd/%d" % src_fd, b"/proc/self/fd/%d" % dst_fd, None,
                        MS_BIND | MS_REC, None)
    assert sorted(c for c in calls[3:]) == sorted([("close", dst_fd), ("close", src_fd)])
    assert len(calls) == 5
    assert not any(c[0] == "mount" and c[4] & MS_REMOUNT for c in calls)  # read-write: no remount


def test_bind_file_not_recursive(run: Any) -> None:
    calls = run(p.Bind("/host/f", "/etc/f", "/s/root", readonly=False, recursive=False, create="file"))
    assert calls[1][0] == "open_in_root" and calls[1][3] == b"file"
    assert calls[2][4] == MS_BIND


def test_bind_readonly_remounts_the_target_read_only(run: Any) -> None:
    calls = run(p.Bind("/host/data", "/data", "/s/root", readonly=True))
    ms = mounts(calls)
    assert len(ms) == 2
    bind_call, remount = ms
    assert bind_call[4] == MS_BIND | MS_REC
    # the remount re-opens the target inside the root and goes through its fd, too
    opens = [c for c in calls if c[0] == "open_in_root"]
    assert len(opens) == 2 and all(c[1:4] == (b"/s/root", b"/data", b"dir") for c in opens)
    assert remount[1] is None
    assert remount[2] == b"/proc/self/fd/%d" % opens[1][4]
    flags = remount[4]
    assert flags & (MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV) == \
        MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
    assert calls.index(remount) > calls.index(bind_call)
    # every fd opened is closed
    opened = {c[-1] for c in calls if c[0] in ("open_path", "open_in_root")}
    closed = [c[1] for c in calls if c[0] == "close"]
    assert sorted(closed) == sorted(opened)


def test_bind_of_a_missing_source_is_a_user_error(tmp_path: Path) -> None:
    done = trace(tmp_path, p.Bind("/host/gone", "/data", "/s/root"), args=(f"fail=/host/gone={errno.ENOENT}",))
    assert done.returncode == 125
    assert "UserError cannot map /host/gone to /data: No such file or directory" in done.stderr


def test_dev_node_binds_the_host_node_onto_a_fresh_file(run: Any) -> None:
    assert run(p.DevNode("/dev/null", "/r/dev/null")) == [
        ("write_file", b"/r/dev/null", 0, 0o666),
        ("mount", b"/dev/null", b"/r/dev/null", None, MS_BIND, None)]


def test_proc_and_devpts(run: Any) -> None:
    assert run(p.Proc("/r/proc"), p.Devpts("/r/dev/pts")) == [
        ("mount", b"proc", b"/r/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
        ("mount", b"devpts", b"/r/dev/pts", b"devpts", MS_NOSUID | MS_NOEXEC,
         b"newinstance,ptmxmode=0666,mode=0620")]


def test_mask_directory_gets_an_empty_read_only_tmpfs(run: Any) -> None:
    calls = run(p.Mask("/r/proc/acpi"), args=("dir=/r/proc/acpi",))
    assert len(calls) == 1
    kind, source, target, fstype, flags, data = calls[0]
    assert (kind, source, target, fstype) == ("mount", b"tmpfs", b"/r/proc/acpi", b"tmpfs")
    assert flags & MS_RDONLY and flags & MS_NOSUID and flags & MS_NODEV and flags & MS_NOEXEC
    assert not flags & MS_BIND
    assert b"size=0" in data


def test_mask_file_gets_dev_null(run: Any) -> None:
    assert run(p.Mask("/r/proc/kcore"), args=("dir=/r/proc/acpi",)) == [
        ("mount", b"/dev/null", b"/r/proc/kcore", None, MS_BIND, None)]


def test_mask_and_read_only_of_missing_paths_are_skipped(run: Any) -> None:
    calls = run(p.Mask("/r/proc/missing"), p.ReadOnly("/r/proc/missing"), p.Hostname("h"),
                args=(f"fail=/r/proc/missing={errno.ENOENT}",))
    assert [c[0] for c in calls] == ["mount", "mount", "sethostname"]  # no remount attempted


def test_read_only_binds_onto_itself_then_remounts(run: Any) -> None:
    calls = run(p.ReadOnly("/r/proc/sys"))
    assert calls[0] == ("mount", b"/r/proc/sys", b"/r/proc/sys", None, MS_BIND | MS_REC, None)
    assert len(calls) == 2
    _, source, target, fstype, flags, data = calls[1]
    assert (source, target, fstype, data) == (None, b"/r/proc/sys", None, None)
    assert flags & MS_RDONLY and flags & MS_REMOUNT and flags & MS_BIND
    assert flags & MS_NOSUID and flags & MS_NODEV


def test_unmount_pivot_hostname_loopback(run: Any) -> None:
    assert run(p.Unmount("/s"), p.Hostname("box"), p.LoopbackUp(), p.PivotRoot("/s/root")) == [
        ("umount", b"/s", MNT_DETACH), ("sethostname", b"box"), ("loopback_up",),
        ("pivot_root", b"/s/root")]


def test_every_op_class_is_executed(run: Any) -> None:
    samples: dict[str, Any] = {
        "make-private": p.MakePrivate(), "tmpfs": p.Tmpfs("/t"), "mkdir": p.Mkdir("/m"),
        "symlink": p.Symlink("a", "/b"), "write-file": p.WriteFile("/f", b""),
        "overlay": p.Overlay("/o", ("/l",), "/u", "/w"), "bind": p.Bind("/a", "/b", "/r"),
        "dev-node": p.DevNode("/dev/null", "/r/dev/null"), "proc": p.Proc("/p"), "devpts": p.Devpts("/d"),
        "mask": p.Mask("/x"), "read-only": p.ReadOnly("/y"), "unmount": p.Unmount("/u"),
        "pivot-root": p.PivotRoot("/r"), "hostname": p.Hostname("h"), "loopback-up": p.LoopbackUp(),
    }
    assert set(samples) == set(p.OP_CLASSES)
    for op in samples.values():
        assert run(op), op.name


def test_failure_names_the_operation_and_stops(tmp_path: Path) -> None:
    done = trace(tmp_path, p.MakePrivate(), p.Mkdir("/s/x"), p.PivotRoot("/s/root"),
                 args=(f"fail=/s/x={errno.EACCES}",))
    assert done.returncode == 125
    assert "InternalError sandbox setup failed at mkdir /s/x: Permission denied" in done.stderr
    assert "pivot_root" not in done.stdout  # nothing after the failing op ran


def test_an_unknown_operation_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "script"
    path.write_bytes(script.ops_only(()) + b"\x05\0\0\0bogus\0")
    done = subprocess.run([native.built("silo-setup"), "--trace", str(path)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 125 and "malformed setup script (operation bogus)" in done.stderr


def test_a_truncated_script_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "script"
    path.write_bytes(script.ops_only((p.Tmpfs("/t"),))[:-3])
    done = subprocess.run([native.built("silo-setup"), "--trace", str(path)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 125 and "malformed setup script" in done.stderr


def test_a_nul_byte_cannot_reach_silo_setup() -> None:
    # every field is a C string there: a NUL would cut it short silently
    with pytest.raises(ProtocolError, match="NUL"):
        script.ops_only((p.Mkdir("/s/a\0b"),))


def test_overlay_layer_paths_too_long_are_refused(tmp_path: Path) -> None:
    long_path = "/" + "x" * 250
    done = trace(tmp_path, p.Overlay("/r", tuple(f"{long_path}/{i}" for i in range(20)), "/u", "/w"))
    assert done.returncode == 125 and "too long" in done.stderr
