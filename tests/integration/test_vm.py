"""The vm level's one-shot runs: real QEMU boots (TCG here), each test one boot.

Each boot takes seconds under TCG, so the tests are few and each asserts several things.
"""

from __future__ import annotations

import glob
import os
import platform
import signal
import subprocess
import time
from pathlib import Path

import pytest

from silo.engine.host import idmap_config
from vmtools import nothing_left as _nothing_left
from vmtools import pid_of as _pid_of
from vmtools import vm_processes


def _env(runtime_dir: str) -> dict[str, str]:
    return {**os.environ, "XDG_RUNTIME_DIR": runtime_dir}


@pytest.fixture(scope="module")
def vm_runtime(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    runtime = str(tmp_path_factory.mktemp("vmrt"))
    os.chmod(runtime, 0o700)
    yield runtime
    silo = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "silo"
    subprocess.run([str(silo), "server", "stop"], env=_env(runtime), capture_output=True, check=False)


def _run(silo_cli: list[str], runtime: str, *args: str, input: bytes = b"", timeout: float = 120):  # type: ignore[no-untyped-def]
    return subprocess.run([*silo_cli, "run", "--isolation", "vm", *args], env=_env(runtime), input=input,
                          capture_output=True, timeout=timeout, check=False)


def _started(silo_cli: list[str], runtime: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([*silo_cli, "run", "--isolation", "vm", "--", "sh", "-c", "echo ready; exec sleep 60"],
                            env=_env(runtime), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    return proc


def test_a_command_runs_under_its_own_kernel(silo_cli: list[str], vm_runtime: str) -> None:
    cp = _run(silo_cli, vm_runtime, "-i", "--", "sh", "-c", "uname -r; echo out; echo err >&2; cat; exit 3",
              input=b"from stdin\n")
    out = cp.stdout.decode().splitlines()
    assert cp.returncode == 3, cp.stderr
    assert out[0] != platform.release()  # the guest's kernel, not the host's
    assert out[1:] == ["out", "from stdin"]
    assert cp.stderr == b"err\n"


def test_the_guest_sees_only_the_read_only_system_view(silo_cli: list[str], vm_runtime: str) -> None:
    marker = f"/etc/silo-vm-{os.getpid()}"
    script = ("cat; test -e /etc/shadow && echo shadow-visible; ls -A /root | wc -l; "
              "test -e /var/lib/silo && echo state-visible; test -e /run/silo && echo runtime-visible; "
              "touch /usr/bin/silo-vm-x && echo usr-written; "
              f"echo written > {marker} && cat {marker}; python3 -c 'print(40 + 2)'")
    cp = _run(silo_cli, vm_runtime, "--", "sh", "-c", script)
    assert cp.returncode == 0, cp.stderr
    # stdin at its end (no -i); no shadow, an empty /root, no daemon state; /usr writable
    # as at the process level, but every write lands in the guest's RAM overlay, never on
    # the host; the host's python3 runs from the shared view.
    assert cp.stdout.decode().splitlines() == ["0", "usr-written", "written", "42"]
    assert not os.path.exists(marker)
    assert not os.path.exists("/usr/bin/silo-vm-x")


def test_ctrl_c_reaches_the_command_in_the_guest(silo_cli: list[str], vm_runtime: str) -> None:
    proc = subprocess.Popen(
        [*silo_cli, "run", "--isolation", "vm", "--", "sh", "-c",
         'trap "echo got INT; exit 7" INT; (echo ready; exec sleep 60)'],
        env=_env(vm_runtime), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert (out, proc.returncode) == (b"got INT\n", 7), err


def test_a_missing_command_is_one_line_and_127(silo_cli: list[str], vm_runtime: str) -> None:
    cp = _run(silo_cli, vm_runtime, "--", "no-such-command-here")
    assert cp.returncode == 127
    assert cp.stderr.decode().splitlines() == [
        "silo: no-such-command-here: command not found inside the VM; check the name and PATH"]


def test_a_timeout_kills_the_machine_and_leaves_nothing(silo_cli: list[str], vm_runtime: str) -> None:
    start = time.monotonic()
    cp = _run(silo_cli, vm_runtime, "--timeout", "2", "--", "sleep", "60")
    assert (cp.returncode, cp.stderr) == (137, b"silo: the sandbox was killed: it hit its timeout\n")
    assert time.monotonic() - start < 20
    _nothing_left()
    assert glob.glob("/tmp/silo-vm-*") == []


def test_qemu_runs_jailed(silo_cli: list[str], vm_runtime: str) -> None:
    """SECURITY.md #20: an unprivileged uid without capabilities, no_new_privs, QEMU's
    seccomp filter, namespaces of its own, a root with /usr and its two files, a cgroup."""
    proc = _started(silo_cli, vm_runtime)
    try:
        pid = _pid_of("qemu-system-x86_64")
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        assert "0" not in status["Uid"].split() and "0" not in status["Gid"].split()
        assert (status["CapEff"], status["CapPrm"], status["CapBnd"]) == ("0" * 16,) * 3
        assert (status["NoNewPrivs"], status["Seccomp"]) == ("1", "2")
        for ns in ("mnt", "pid", "net", "ipc", "uts"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        assert status["NSpid"].split()[-1] == "1"  # PID 1 of its own pid namespace
        links = {n for n in ("bin", "sbin", "lib", "lib32", "lib64", "libx32") if os.path.lexists(f"/{n}")}
        assert set(os.listdir(f"/proc/{pid}/root")) == links | {"dev", "proc", "tmp", "usr", "vm"}
        assert sorted(os.listdir(f"/proc/{pid}/root/vm")) == ["initramfs", "kernel"]
        assert not os.path.exists(f"/proc/{pid}/root/etc/shadow")
        with open(f"/proc/{pid}/cgroup") as f:
            assert "/silo/vm-" in f.read()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    _nothing_left()


@pytest.mark.parametrize(("victim", "message"), [
    ("qemu-system-x86_64", "silo: the VM stopped before the command ended"),
    ("virtiofsd", "silo: the VM's file server (virtiofsd) stopped"),
])
def test_killing_qemu_or_virtiofsd_ends_the_run_and_leaves_nothing(silo_cli: list[str], vm_runtime: str,
                                                                   victim: str, message: str) -> None:
    proc = _started(silo_cli, vm_runtime)
    os.kill(_pid_of(victim), signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 125
    assert err.decode().startswith(message) and err.count(b"\n") == 1, err
    _nothing_left()


def test_a_guest_that_powers_off_mid_command_ends_the_run(silo_cli: list[str], vm_runtime: str) -> None:
    cp = _run(silo_cli, vm_runtime, "--", "sh", "-c", "echo o > /proc/sysrq-trigger; sleep 60", timeout=60)
    assert cp.returncode == 125
    assert cp.stderr.decode().startswith("silo: the VM stopped before the command ended"), cp.stderr
    _nothing_left()


def test_volumes_map_the_guests_root_and_the_host_never_follows_a_link(
        silo_cli: list[str], vm_runtime: str, tmp_path: Path) -> None:
    """SECURITY.md #16 and #19 for volumes: virtiofsd serves them as root of a user
    namespace mapping the guest's ids onto the sandbox range, so what the guest's root
    makes (a set-uid copy of a shell included) is not the host root's; a link the host
    put in the volume is read by the guest's kernel in the guest, never by the host;
    and the export shows only the volumes."""
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o777)
    (data / "shadow-link").symlink_to("/etc/shadow")
    (data / "up-link").symlink_to("../../../../../../../etc/shadow")
    script = ("cp /bin/sh /data/sh && chown 0:0 /data/sh && chmod 4755 /data/sh; "
              "cat /data/shadow-link /data/up-link 2>&1; ls -A /.silo/vols; echo end")
    cp = _run(silo_cli, vm_runtime, "-v", f"{data}:/data", "--", "sh", "-c", script)
    assert cp.returncode == 0, cp.stderr
    shadow = Path("/etc/shadow").read_text()
    out = cp.stdout.decode()
    assert shadow.splitlines()[0] not in out
    assert out.count("No such file or directory") == 2 and out.endswith("end\n"), out
    st = (data / "sh").stat()
    first, _ = idmap_config()
    assert (st.st_uid, st.st_gid) == (first, first) and first != 0
    assert st.st_mode & 0o4000  # set-uid, but to the sandbox range's first id: nothing to gain
    _nothing_left()


@pytest.mark.parametrize(("option", "named"), [
    (["--seccomp", "unconfined"], "--seccomp"),
])
def test_what_the_vm_level_lacks_yet_is_refused(silo_cli: list[str], vm_runtime: str, option: list[str],
                                               named: str) -> None:
    cp = _run(silo_cli, vm_runtime, *option, "--", "true", timeout=30)
    assert cp.returncode == 125
    assert cp.stderr.decode().splitlines() == [
        f"silo: {named} with --isolation vm is not available yet: drop it, or use --isolation process"]
    assert vm_processes() == []


def test_kernel_picks_the_guests_kernel(silo_cli: list[str], vm_runtime: str) -> None:
    from silo.backends.vm import kernel
    from silo.engine import host as hostmod

    cache = hostmod.host().cache_dir
    fetched, host = kernel.fetched(cache), kernel.host_kernel()
    if fetched is None:
        pytest.skip("no fetched kernel here (the host's is readable and make test did not fetch one)")
    for choice in ("debian", fetched.image):  # by name, and by path (its modules/ beside it)
        cp = _run(silo_cli, vm_runtime, "--kernel", choice, "--", "uname", "-r")
        assert (cp.returncode, cp.stdout.decode()) == (0, f"{fetched.release}\n"), cp.stderr
    cp = _run(silo_cli, vm_runtime, "--kernel", "host", "--", "uname", "-r")
    if host is None:
        assert cp.returncode == 125 and cp.stderr.decode().splitlines() == [
            f"silo: the host's kernel is not readable (/boot/vmlinuz-{os.uname().release} and its modules): "
            "use --kernel debian after 'silo kernel fetch'"], cp.stderr
    else:
        assert (cp.returncode, cp.stdout.decode()) == (0, f"{host.release}\n"), cp.stderr
    cp = _run(silo_cli, vm_runtime, "--kernel", "/nonexistent/vmlinuz", "--", "true")
    assert cp.returncode == 125 and cp.stderr.decode() == (
        "silo: kernel '/nonexistent/vmlinuz' is not a file: use host, debian or the path of a kernel image\n")
    cp = subprocess.run([*silo_cli, "run", "--kernel", "debian", "--", "true"], env=_env(vm_runtime),
                        capture_output=True, timeout=60, check=False)
    assert cp.returncode == 125 and b"--kernel belongs to the vm level" in cp.stderr, cp.stderr
    _nothing_left()
