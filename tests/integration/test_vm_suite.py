"""The process level's functional suite re-run at isolation vm (issue 5, requirement 10).

The tests below are test_run_cli.py's own functions, collected here a second time. This
module's ``silo_cli`` runs the CLI through level_cli.py, which puts ``--isolation vm`` into
every ``silo run``, so test_run_cli's ``cli`` and the tests that call the CLI
themselves (ctrl-C, pipes, ``-t``) boot a real TCG guest each. What is not re-run, and
why:

- ``--cap``, ``--pids`` and ``--seccomp`` are refused at the vm level so far (test_vm.py
  checks each refusal). So the bad-input case about seccomp profiles gets that refusal
  instead.
- test_root_dir_image allows only the process level's mount points at the top of an
  image root; a guest's init also makes ``sys``, ``run`` and ``root`` there (sysfs, a
  tmpfs, root's home). Its vm variant below allows those and checks the rest.
- ``--memory``/``--cpus`` size the guest (RAM, vCPUs) rather than cap a cgroup, so the
  cgroup and limit tests do not apply. The VM's own cgroup is checked in test_vm.py.
- ``--seccomp`` does not apply: the guest's kernel is the boundary, and seccomp inside
  it would guard nothing of the host's.
- test_user's last check reads ``/proc/self/uid_map`` to prove the sandbox's root is not
  the host's. In a guest, the map is the guest kernel's identity map (``0 0
  4294967295``): its root is the root of a kernel of its own, which is the point. The
  rest of that test runs here as ``test_user_and_group``.
- test_runs_a_command_isolated compares the pid namespace with the host's. A guest's
  initial namespaces carry the same fixed inode numbers as any kernel's. test_vm.py
  proves the guest's own kernel instead.
- ``--isolation app``, ``--help``, ``silo plan``, the unprivileged user and the
  server's leak checks are about the CLI and the process level. test_vm.py has the vm
  level's own timeout and leftovers tests.
"""

# ruff: noqa: F811 - the imported fixtures are the tests' parameters by name

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import test_run_cli
from test_run_cli import (  # noqa: F401 - the fixtures and tests collected again here
    _assert_silo_error,
    _ok,
    cli,
    hostdir,
    image,
    runtime_dir,
    shared,
    test_bad_env_file_content_names_file_and_line,
    test_command_starts_with_default_signal_dispositions,
    test_command_without_double_dash,
    test_ctrl_c_reaches_the_command,
    test_env_file,
    test_env_is_clean_plus_e,
    test_exit_code_is_the_commands,
    test_hostname,
    test_killed_by_signal_is_128_plus_n,
    test_no_controlling_terminal_without_t,
    test_not_executable_is_126,
    test_not_found_is_127,
    test_private_writable_tmp_and_home,
    test_rlimit,
    test_root_dir_image_is_writable_through_the_overlay,
    test_root_dir_image_owned_by_host_root_is_copy_on_write,
    test_root_host_is_read_only_system_and_curated_etc,
    test_shell_pipeline_into_silo,
    test_stdin_is_empty_without_i,
    test_stdin_streams_with_i,
    test_timeout_kills_and_says_so,
    test_tty_gives_a_pty_with_the_window_size,
    test_tty_resize_propagates,
    test_volume_file,
    test_volume_ro_is_refused,
    test_volume_root_owned_file_stays_unwritable,
    test_volume_rw_writes_through,
    test_workdir,
)

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.skip("the vm level needs root", allow_module_level=True)


@pytest.fixture
def silo_cli(silo_cli: list[str]) -> list[str]:
    """The CLI with ``--isolation vm`` on every ``silo run`` (level_cli.py); test_run_cli's
    ``cli`` and the tests that call the CLI themselves run through it."""
    return [sys.executable, str(Path(__file__).with_name("level_cli.py")), "vm", *silo_cli, "--"]


def test_root_dir_image(cli, image: Path, hostdir: Path) -> None:  # type: ignore[no-untyped-def]
    """test_run_cli's test of the same name, with a guest's own mount points."""
    script = "ls /; cat /etc/image-release; ls /usr 2>&1 || true; ls /etc; ls /.silo"
    out = _ok(cli("run", "--root", str(image), "--", "/bin/sh", "-c", script))
    top = out.split("tiny\n")[0].split()
    assert set(top) <= {"bin", "etc", "dev", "proc", "tmp", "sys", "run", "root"}, top
    assert "tiny" in out and "No such file or directory" in out  # /usr
    etc = out.split("tiny\n")[1]
    assert "passwd" not in etc and "os-release" not in etc  # nothing of the host's /etc
    rel = os.path.relpath(image, hostdir)
    assert "tiny" in _ok(cli("run", "--root", rel, "--", "cat", "/etc/image-release", cwd=str(hostdir)))
    cli("run", "--root", str(image), "--", "sh", "-c", "echo changed > /etc/image-release; echo > /tmp/t")
    assert (image / "etc" / "image-release").read_text() == "tiny\n"
    assert sorted(os.listdir(image)) == ["bin", "etc"]


def test_user_and_group(cli) -> None:  # type: ignore[no-untyped-def]
    out = _ok(cli("run", "-u", "1000:100", "--", "sh", "-c", "id -u; id -g; echo $HOME"))
    assert out.splitlines() == ["1000", "100", "/home/user"]
    assert _ok(cli("run", "-u", "1234", "--", "id", "-g")) == "1234\n"


_ERRORS = next(m for m in test_run_cli.test_silo_errors_are_one_line_and_125.pytestmark if m.name == "parametrize")


_VM_ERRORS = [(a, w) for a, w in _ERRORS.args[1] if "--seccomp" not in a]


@pytest.mark.parametrize(_ERRORS.args[0], _VM_ERRORS)
def test_silo_errors_are_one_line_and_125(cli, args: list[str], words: list[str]) -> None:  # type: ignore[no-untyped-def]
    test_run_cli.test_silo_errors_are_one_line_and_125(cli, args, words)

