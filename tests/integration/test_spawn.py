"""``silo.sys.kernel.spawn`` (libsilo-spawn.so): failures before the exec are reported
with the step that failed, and leave no child behind."""

from __future__ import annotations

import os

import pytest

from silo.sys import kernel as sysk


def _children() -> set[str]:
    out: set[str] = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            out.update(f.read().split())
    return out


def test_an_exec_failure_names_the_step_and_reaps_the_child() -> None:
    before = _children()
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(OSError) as info:
        sysk.spawn(0, r, [b"nothing"], (), False)  # a pipe is not a program
    os.close(r)
    assert "execveat" in str(info.value)
    assert _children() <= before  # the failed child was reaped, not left a zombie


def test_only_the_kept_fds_cross_the_exec(tmp_path: os.PathLike[str]) -> None:
    # an fd the caller left inheritable does not reach the program; a kept one does
    stray = os.open("/dev/null", os.O_RDONLY)
    os.set_inheritable(stray, True)
    kept = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    out = os.path.join(os.fspath(tmp_path), "fds")
    sh = os.open("/bin/sh", os.O_RDONLY | os.O_CLOEXEC)
    try:
        pid = sysk.spawn(0, sh, [b"sh", b"-c", f"ls /proc/self/fd > {out}".encode()], (kept,), False)
        _, status = os.waitpid(pid, 0)
    finally:
        for fd in (stray, kept, sh):
            os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    fds = {int(n) for n in open(out).read().split()}
    assert kept in fds
    assert stray not in fds
