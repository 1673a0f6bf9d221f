"""The process level's functional suite re-run at isolation gvisor (issue 6, requirement 5).

test_run_cli.py's own functions, collected here a second time; this module's
``silo_cli`` puts ``--isolation gvisor`` into every ``silo run`` (level_cli.py), so each
test runs a real ``runsc`` sandbox (Debian 12's runsc 0.0~20221219, ptrace platform
here). What is not re-run, and why:

- GNU ``ls`` (coreutils 9.1) fails in this runsc: its ``statx`` refuses the
  ``AT_NO_AUTOMOUNT`` flag with EINVAL ("ls: cannot access '/': Invalid argument");
  test_gvisor.py shows the gap. So test_command_without_double_dash (runs ``ls``) and
  test_root_dir_image (lists ``/``; its variant below uses busybox's ``ls``) differ.
- ``-u``: inside gVisor ``/proc/self/uid_map`` is the Sentry's identity map, so
  test_user's last check does not apply; the rest runs as test_user_and_group.
- Capabilities (test_cap_adds_exactly_one): the Sentry gives its root a full bounding
  set of its own; ``--cap`` reaches the effective set (test_gvisor.py). Binding a port
  below 1024 needs no capability in gVisor's network stack (this runsc), so
  test_cap_net_bind_service_binds_a_low_port's refusal does not happen; with no
  network but loopback, that port is the sandbox's own.
- test_leaves_nothing_behind lists the process level's pids cgroups, which this level
  has none of (``--pids`` is RLIMIT_NPROC inside the Sentry); test_gvisor.py checks that
  runs leave no process, mount or state.

Since runsc runs as the root of the sandbox's user namespace (silo's id range), the
image and volume tests run unchanged: an image owned by silo's range is writable
through the overlay, a read-write volume writes through with the sandbox's ids, and a
file of host root's stays unwritable.
- Signal dispositions (the Sentry's ``/proc/self/status`` has no ``SigIgn``/``SigBlk``)
  and the cgroup tests (the cgroup holds runsc, its gofer and Sentry, whose threads are
  not the command's; test_pids_limit_contains_a_fork_loop expects silo's "process
  limit", which only a pids cgroup tells) are not re-run; test_gvisor.py checks --pids,
  -t, the memory limit and the cleanup. ctrl-C and the terminal's resize are re-run.
"""

# ruff: noqa: F811 - the imported fixtures are the tests' parameters by name

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from test_run_cli import (  # noqa: F401 - the fixtures and tests collected again here
    _assert_silo_error,
    _ok,
    cli,
    hostdir,
    image,
    runtime_dir,
    shared,
    test_bad_env_file_content_names_file_and_line,
    test_ctrl_c_reaches_the_command,
    test_env_file,
    test_env_is_clean_plus_e,
    test_exit_code_is_the_commands,
    test_hostname,
    test_killed_by_signal_is_128_plus_n,
    test_memory_limit_kills_a_balloon,
    test_no_controlling_terminal_without_t,
    test_not_executable_is_126,
    test_not_found_is_127,
    test_private_writable_tmp_and_home,
    test_rlimit,
    test_root_dir_image_is_writable_through_the_overlay,
    test_root_dir_image_owned_by_host_root_is_copy_on_write,
    test_root_host_is_read_only_system_and_curated_etc,
    test_runs_a_command_isolated,
    test_shell_pipeline_into_silo,
    test_stdin_is_empty_without_i,
    test_stdin_streams_with_i,
    test_timeout_kills_and_says_so,
    test_timeout_kills_the_whole_tree,
    test_tty_resize_propagates,
    test_volume_file,
    test_volume_ro_is_refused,
    test_volume_root_owned_file_stays_unwritable,
    test_volume_rw_writes_through,
    test_workdir,
)
from test_vm_suite import (  # noqa: F401 - the same variants as at the vm level (--seccomp refused there too)
    test_silo_errors_are_one_line_and_125,
    test_user_and_group,
)

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.skip("the gvisor level needs root", allow_module_level=True)


@pytest.fixture
def silo_cli(silo_cli: list[str]) -> list[str]:
    """The CLI with ``--isolation gvisor`` on every ``silo run`` (level_cli.py)."""
    return [sys.executable, str(Path(__file__).with_name("level_cli.py")), "gvisor", *silo_cli, "--"]


def test_root_dir_image(cli, image: Path, hostdir: Path) -> None:  # type: ignore[no-untyped-def]
    """test_run_cli's test of the same name with busybox's ``ls`` (GNU ``ls`` fails in
    this runsc) and the Sentry's own ``sys`` mount point."""
    script = "busybox ls /; cat /etc/image-release; busybox ls /usr 2>&1 || true; busybox ls /etc"
    out = _ok(cli("run", "--root", str(image), "--", "/bin/sh", "-c", script))
    top = out.split("tiny\n")[0].split()
    assert set(top) <= {"bin", "etc", "dev", "proc", "tmp", "sys"}, top
    assert "No such file or directory" in out  # /usr
    etc = out.split("tiny\n")[1]
    assert "passwd" not in etc and "os-release" not in etc  # nothing of the host's /etc
    cli("run", "--root", str(image), "--", "sh", "-c", "echo changed > /etc/image-release; echo > /tmp/t")
    assert (image / "etc" / "image-release").read_text() == "tiny\n"
    assert sorted(os.listdir(image)) == ["bin", "etc"]
