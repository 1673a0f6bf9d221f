"""Workspaces at isolation vm (issue 5, requirement 5): real TCG boots under a private silod.

Every workspace here is a QEMU microVM whose root is the host's read-only view under an
overlay; a persistent one's upper is on its qcow2 disk chain (silo.backends.vm.disk).
Each test makes its own workspaces and removes them; a start costs a boot (~2 s under
TCG), so the tests start as few machines as they can and check several things on each.
"""

# ruff: noqa: F811 - the imported fixtures are the tests' parameters by name

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import daemons
import pytest
from cli_servers import pty_run
from daemons import REPO, Daemon, cli, client, names, ok  # noqa: F401 - fixtures

import silo
from silo import NotFoundError
from vmtools import tiny_image, vm_processes

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.skip("vm workspaces need root", allow_module_level=True)

SILO = str(REPO / ".venv" / "bin" / "silo")
BAD_INPUT, NOT_FOUND, WRONG_STATE = 2, 3, 4


def ws_cgroups(name: str) -> list[str]:
    return glob.glob(f"/sys/fs/cgroup/*/silo/ws-*-{name}") + glob.glob(f"/sys/fs/cgroup/silo/ws-*-{name}")


def machine_pids(name: str) -> list[int]:
    """The processes in workspace ``name``'s cgroup (its supervisor, QEMU, virtiofsd)."""
    pids: set[int] = set()
    for group in ws_cgroups(name):
        with contextlib.suppress(OSError):
            pids |= {int(x) for x in Path(group, "cgroup.procs").read_text().split()}
    return sorted(pids)


def program_in(name: str, program: str) -> int:
    """The pid of ``program`` (by its executable's name) in workspace ``name``'s cgroup,
    the outermost one (virtiofsd forks its sandbox)."""
    found = []
    for pid in machine_pids(name):
        with contextlib.suppress(OSError):
            exe = os.readlink(f"/proc/{pid}/exe")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if os.path.basename(exe).startswith(program):
                found.append((pid, ppid))
    pids = {pid for pid, _ in found}
    top = [pid for pid, ppid in found if ppid not in pids]
    assert len(top) == 1, found
    return top[0]


def wait_state(client: silo.Client, name: str, state: str, timeout: float = 30) -> silo.WorkspaceInfo:
    deadline = time.monotonic() + timeout
    info = client.get(name).info()
    while info.state.value != state and time.monotonic() < deadline:
        time.sleep(0.1)
        info = client.get(name).info()
    assert info.state.value == state, info
    return info


def nothing_left_of(name: str) -> None:
    deadline = time.monotonic() + 10
    while (ws_cgroups(name) or vm_processes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (ws_cgroups(name), vm_processes()) == ([], [])


def new(names: list[str], prefix: str = "vm") -> str:
    return daemons.new(names, prefix)


def started(names: list[str], *options: str) -> str:
    return daemons.started(names, "vm", ok, *options)


def test_persistent_workspace_keeps_its_files_hostname_and_machine_id_across_a_stop(
        client: silo.Client, names: list[str]) -> None:
    name = new(names)
    ok("create", name, "--isolation", "vm", "--memory", "256M")
    assert client.get(name).info().spec.isolation.value == "vm"
    ok("start", name)
    assert len(machine_pids(name)) >= 3  # the supervisor, QEMU, virtiofsd
    first = ok("exec", name, "--", "sh", "-c",
               "hostname; cat /etc/machine-id; uname -r; echo kept > /root/file; id -u")
    hostname, machine_id, _release, uid = first.split()
    assert (hostname, uid) == (name, "0")
    assert len(machine_id) == 32
    # exit codes, a missing command, env and cwd
    assert cli("exec", name, "--", "sh", "-c", "exit 7").returncode == 7
    r = cli("exec", name, "--", "no-such-command")
    assert (r.returncode, r.stderr) == (
        127, "silo: no-such-command: command not found inside the VM; check the name and PATH\n")
    assert ok("exec", "-e", "GREETING=hi", "-w", "/usr", name, "--", "sh", "-c", "echo $GREETING; pwd") == "hi\n/usr\n"
    ok("stop", name)
    assert client.get(name).info().state.value == "stopped"
    assert machine_pids(name) == [] and vm_processes() == []
    ok("start", name)
    again = ok("exec", name, "--", "sh", "-c", "cat /root/file; cat /etc/machine-id")
    assert again.split() == ["kept", machine_id]
    ok("rm", "-f", name)
    nothing_left_of(name)
    assert not os.path.exists(os.path.join(os.environ["SILO_STATE_DIR"], "workspaces", name))


def test_exec_streams_stdin_both_outputs_and_a_tty(client: silo.Client, names: list[str]) -> None:
    name = started(names)
    data = os.urandom(1 << 20).hex()  # 2 MiB through the agent and back
    r = cli("exec", "-i", name, "--", "sh", "-c", "sha256sum; echo to-stderr >&2", stdin=data)
    assert r.returncode == 0, r
    assert r.stdout.split()[0] == hashlib.sha256(data.encode()).hexdigest()
    assert r.stderr == "to-stderr\n"
    # the SDK's captured exec (HTTP) runs there too
    result = client.get(name).exec(["sh", "-c", "cat; echo err >&2; exit 3"], stdin=b"abc")
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"abc", b"err\n")
    # -t: a pty in the guest, the caller's window size, the line discipline done once
    env = {**os.environ, "TERM": "xterm"}
    output, code = pty_run([SILO, "exec", "-t", name, "--", "sh", "-c", "tty; stty size; exit 4"], env,
                           rows=33, cols=101, timeout=60)
    text = output.decode(errors="replace")
    assert code == 4, text
    assert "/dev/pts/" in text and "33 101" in text, text
    ok("stop", name)


def test_snapshot_restore_reset_and_fork_on_the_disk_chain(client: silo.Client, names: list[str]) -> None:
    name, fork = new(names), new(names)
    ok("create", name, "--isolation", "vm")
    ok("start", name)
    ok("exec", name, "--", "sh", "-c", "echo v1 > /root/f")
    ok("stop", name)
    assert ok("snapshot", name).strip() == "snap-1"
    ok("start", name)
    ok("exec", name, "--", "sh", "-c", "echo v2 > /root/f; echo new > /root/g")
    ok("stop", name)
    ok("restore", name, "snap-1")
    ok("fork", name, fork)
    state = os.environ["SILO_STATE_DIR"]
    stacks = [json.loads(Path(state, "workspaces", n, "stack.json").read_text()) for n in (name, fork)]
    shared = set(stacks[0]["layers"]) & set(stacks[1]["layers"])
    assert shared, stacks  # fork = a new overlay on a shared backing file
    for layer in shared:
        assert os.path.isfile(os.path.join(state, "layers", layer, "disk.qcow2"))
    ok("start", name)
    ok("start", fork)
    assert ok("exec", name, "--", "sh", "-c", "cat /root/f; ls /root") == "v1\nf\n"
    ok("exec", fork, "--", "sh", "-c", "echo forked > /root/f")
    assert ok("exec", name, "--", "cat", "/root/f") == "v1\n"
    assert ok("exec", fork, "--", "cat", "/root/f") == "forked\n"
    r = cli("snapshot", name)
    assert (r.returncode, r.stderr) == (WRONG_STATE, f"silo: cannot snapshot '{name}': it is running; "
                                                     f"run 'silo stop {name}' first\n")
    ok("stop", name)
    ok("stop", fork)
    ok("reset", name)
    ok("start", name)
    assert ok("exec", name, "--", "ls", "/root") == ""
    ok("stop", name)


def test_templates_keep_their_level(client: silo.Client, names: list[str]) -> None:
    name, tpl, child, proc_ws = new(names), new(names, "tpl"), new(names), new(names)
    ok("create", name, "--isolation", "vm")
    ok("start", name)
    ok("exec", name, "--", "sh", "-c", "echo from-template > /root/t")
    ok("stop", name)
    ok("template", "create", tpl, "--from", name)
    ok("create", child, "--isolation", "vm", "--root", tpl)
    ok("start", child)
    assert ok("exec", child, "--", "cat", "/root/t") == "from-template\n"
    ok("stop", child)
    r = cli("create", proc_ws, "--root", tpl)
    assert r.returncode == BAD_INPUT
    assert r.stderr == (f"silo: template {tpl!r} was made from a VM workspace: its files cannot be the layers of "
                        "a workspace at isolation 'process'; use a template made at that level\n")


def test_cp_into_and_out_of_a_vm_workspace_running_or_not(client: silo.Client, names: list[str],
                                                          tmp_path: Path) -> None:
    name = new(names)
    ok("create", name, "--isolation", "vm")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n")
    (src / "sub" / "b.txt").write_text("beta\n")
    os.symlink("a.txt", src / "link")
    # Not started yet: its guest boots for the copy alone, and stops again.
    ok("cp", str(src / "a.txt"), f"{name}:/root/early.txt")
    assert client.get(name).state.value == "created"
    assert not machine_pids(name)
    ok("start", name)
    assert ok("exec", name, "--", "cat", "/root/early.txt") == "alpha\n"
    ok("cp", str(src / "a.txt"), f"{name}:/root/")
    ok("cp", str(src / "a.txt"), f"{name}:/root/renamed.txt")
    ok("cp", str(src), f"{name}:/root/tree")
    assert ok("exec", name, "--", "sh", "-c",
              "cat /root/a.txt /root/renamed.txt /root/tree/sub/b.txt; readlink /root/tree/link") == \
        "alpha\nalpha\nbeta\na.txt\n"
    out = tmp_path / "out"
    out.mkdir()
    ok("cp", f"{name}:/root/tree", str(out))
    assert (out / "tree" / "sub" / "b.txt").read_text() == "beta\n"
    assert os.readlink(out / "tree" / "link") == "a.txt"
    r = cli("cp", f"{name}:/root/missing", str(out))
    assert (r.returncode, r.stderr) == (NOT_FOUND, f"silo: cannot copy {name}:/root/missing: /root/missing: "
                                                   "no such file or directory in the workspace\n")
    ok("stop", name)
    # Stopped: out and in again, each through a guest booted for it.
    ok("cp", f"{name}:/root/renamed.txt", str(out / "back.txt"))
    assert (out / "back.txt").read_text() == "alpha\n"
    (src / "a.txt").write_text("written while stopped\n")
    ok("cp", str(src / "a.txt"), f"{name}:/root/renamed.txt")
    r = cli("cp", f"{name}:/root/missing", str(out))
    assert r.returncode == NOT_FOUND, r
    assert client.get(name).state.value == "stopped"
    assert not machine_pids(name) and not ws_cgroups(name)
    ok("start", name)  # what cp wrote was synced with the temporary guest's stop
    assert ok("exec", name, "--", "cat", "/root/renamed.txt") == "written while stopped\n"
    ok("stop", name)


def test_disposable_vm_workspace_keeps_nothing(client: silo.Client, names: list[str]) -> None:
    name = started(names, "--disposable")
    ok("exec", name, "--", "sh", "-c", "echo x > /root/x")
    ok("stop", name)
    ws = Path(os.environ["SILO_STATE_DIR"], "workspaces", name, "upper")
    assert list(ws.iterdir()) == []  # no disk: the guest wrote to its RAM
    ok("start", name)
    assert ok("exec", name, "--", "ls", "/root") == ""
    ok("stop", name)


def test_stop_ends_processes_that_ignore_sigterm_and_syncs_the_disk(client: silo.Client, names: list[str]) -> None:
    name = started(names)
    ok("exec", name, "--", "sh", "-c", "echo unsynced-but-written > /root/w")
    stubborn = subprocess.Popen([SILO, "exec", name, "--", "sh", "-c", "trap '' TERM; sleep 1000"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    begun = time.monotonic()
    ok("stop", "--timeout", "1", name)
    assert time.monotonic() - begun < 15
    assert stubborn.wait(10) == 137  # SIGKILLed after the grace
    ok("start", name)
    assert ok("exec", name, "--", "cat", "/root/w") == "unsynced-but-written\n"
    ok("stop", name)


@pytest.mark.parametrize("how", ["qemu", "virtiofsd", "panic"])
def test_a_dying_machine_marks_the_workspace_broken_and_loses_no_synced_data(
        client: silo.Client, names: list[str], how: str) -> None:
    name = started(names)
    ok("exec", name, "--", "sh", "-c", "echo safe > /root/s; sync")
    if how == "panic":  # the agent is the guest's PID 1: its kernel dying is its death
        subprocess.run([SILO, "exec", name, "--", "sh", "-c", "echo c > /proc/sysrq-trigger"],
                       capture_output=True, timeout=60, check=False)
        reason = "the guest's kernel stopped"
    else:
        os.kill(program_in(name, "qemu-system" if how == "qemu" else "virtiofsd"), signal.SIGKILL)
        reason = "QEMU stopped" if how == "qemu" else "the VM's file server (virtiofsd) stopped"
    info = wait_state(client, name, "broken")
    assert reason in str(info.error), info
    nothing_left_of(name)
    r = cli("exec", name, "--", "true")
    assert r.returncode == 125 and "broken" in r.stderr
    ok("stop", name)
    ok("start", name)
    assert ok("exec", name, "--", "cat", "/root/s") == "safe\n"
    ok("stop", name)


def test_a_guest_that_powers_itself_off_is_stopped_not_broken(client: silo.Client, names: list[str]) -> None:
    name = started(names)
    subprocess.run([SILO, "exec", name, "--", "sh", "-c", "echo o > /proc/sysrq-trigger; sleep 30"],
                   capture_output=True, timeout=60, check=False)
    info = wait_state(client, name, "stopped")
    assert "powered itself off" in str(info.error), info
    nothing_left_of(name)


def test_daemon_crash_leaves_no_machine_and_the_disk_intact(daemon: Daemon, client: silo.Client,
                                                              names: list[str]) -> None:
    name = started(names)
    ok("exec", name, "--", "sh", "-c", "echo before-crash > /root/c; sync")
    daemon.kill()
    deadline = time.monotonic() + 10
    while vm_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert vm_processes() == []  # QEMU and virtiofsd die with their supervisor, it with silod
    daemon.start()
    info = client.get(name).info()
    assert (info.state.value, info.error) == ("stopped", "the daemon stopped while it ran, and its processes with it")
    assert ws_cgroups(name) == []
    ok("start", name)
    assert ok("exec", name, "--", "cat", "/root/c") == "before-crash\n"
    ok("stop", name)


def test_volumes_reach_a_vm_workspace_at_each_start(client: silo.Client, names: list[str], tmp_path: Path) -> None:
    """``-v`` at the vm level: a second virtiofsd, in a user namespace with the sandbox
    range's ids (test_vm.py has the security half)."""
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o777)
    (data / "in").write_text("host\n")
    conf = tmp_path / "app.conf"
    conf.write_text("setting=1\n")
    name = new(names)
    ok("create", name, "--isolation", "vm", "--memory", "256M", "-v", f"{data}:/srv/data",
       "-v", f"{conf}:/etc/app.conf:ro")
    ok("start", name)
    out = ok("exec", name, "--", "sh", "-c", "cat /srv/data/in /etc/app.conf; echo guest > /srv/data/out; "
             "(echo x > /etc/app.conf) 2>&1 || true")
    assert out.startswith("host\nsetting=1\n") and "Read-only file system" in out, out
    assert (data / "out").read_text() == "guest\n" and (data / "out").stat().st_uid != 0
    assert conf.read_text() == "setting=1\n"
    ok("stop", name)
    (data / "in").write_text("changed while stopped\n")
    ok("start", name)
    assert ok("exec", name, "--", "cat", "/srv/data/in") == "changed while stopped\n"
    ok("stop", name)


def test_vm_workspace_refusals(client: silo.Client, names: list[str]) -> None:
    name = new(names)
    for args, message in (
        (["-v", "/srv:/.silo/x"], "bad mount target /.silo/x: /.silo is the VM agent's own; pick another path"),
    ):
        r = cli("create", name, "--isolation", "vm", *args)
        assert (r.returncode, r.stderr, r.stdout) == (BAD_INPUT, f"silo: {message}\n", ""), r
    with pytest.raises(NotFoundError):
        client.get(name)
    ok("create", name, "--isolation", "vm")
    r = cli("exec", name, "--", "true")
    assert r.returncode == 125 and "it has not been started" in r.stderr, r
    r = cli("diff", name)
    assert r.returncode != 0 and "does not read a VM workspace's disk" in r.stderr, r


def test_export_and_import_carry_the_disk_and_its_file_system(client: silo.Client, names: list[str],
                                                             tmp_path: Path) -> None:
    name = started(names)
    ok("exec", name, "--", "sh", "-c", "echo exported > /root/e")
    ok("stop", name)
    ok("snapshot", name)  # a frozen layer under an empty upper: the chain is carried whole
    archive = tmp_path / "box.silo"
    ok("export", name, str(archive))
    # The empty base the chain started from is not needed: its copy is the bottom layer.
    vm_dir = Path(os.environ["SILO_STATE_DIR"], "vm")
    for base in vm_dir.glob("empty-ext4-*"):
        base.rename(tmp_path / base.name)
    try:
        copy = new(names)
        ok("import", str(archive), copy)
        ok("start", copy)
        assert ok("exec", copy, "--", "cat", "/root/e") == "exported\n"
        ok("stop", copy)
    finally:
        for base in tmp_path.glob("empty-ext4-*"):
            base.rename(vm_dir / base.name)


def test_inspect_reports_the_guests_memory_and_its_vms_on_the_host(client: silo.Client, names: list[str]) -> None:
    name = started(names, "--memory", "256M")
    deadline = time.monotonic() + 30
    info = client.get(name).info()
    while not (info.memory or {}).get("guest", {}).get("total") and time.monotonic() < deadline:
        time.sleep(0.5)
        info = client.get(name).info()
    memory = info.memory
    assert memory is not None, info
    guest = memory["guest"]
    assert memory["ram_bytes"] == 256 << 20
    assert 128 << 20 < guest["total"] <= 256 << 20  # the guest's kernel reserves some of its RAM
    assert 0 < guest["free"] <= guest["available"] <= guest["total"]
    assert guest["balloon"] == 256 << 20  # nothing inflated: the guest may use all of it
    assert 0 < memory["host_bytes"]
    shown = json.loads(ok("inspect", name))
    assert shown["memory"]["ram_bytes"] == 256 << 20
    ok("stop", name)
    assert client.get(name).info().memory is None


def test_an_encrypted_workspace_keeps_its_disks_unreadable_at_rest(client: silo.Client, names: list[str],
                                                                    tmp_path: Path) -> None:
    state = Path(os.environ["SILO_STATE_DIR"])
    plain, secret, fork = new(names), new(names), new(names)
    marker = f"silo-marker-{uuid.uuid4().hex}"
    for name, extra in ((plain, ()), (secret, ("--encrypt",))):
        ok("create", name, "--isolation", "vm", *extra)
        ok("start", name)
        ok("exec", name, "--", "sh", "-c", f"for i in $(seq 64); do echo {marker}; done > /root/m; sync")
        ok("stop", name)
    assert client.get(secret).info().spec.encrypted
    disks = {name: state / "workspaces" / name / "upper" / "disk.qcow2" for name in (plain, secret)}
    assert marker.encode() in disks[plain].read_bytes()  # the control: ext4 data lies in the clear
    assert marker.encode() not in disks[secret].read_bytes()
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(disks[secret])],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["encrypted"] is True and info["format-specific"]["data"]["encrypt"]["format"] == "luks", info
    key = state / "vm" / "disk.key"
    st = key.stat()
    assert (oct(st.st_mode & 0o777), st.st_uid, len(key.read_text())) == ("0o600", 0, 64)
    # a snapshot freezes the encrypted disk into a layer; a fork stacks on it, and both open
    ok("snapshot", secret)
    ok("fork", secret, fork)
    ok("start", fork)
    assert ok("exec", fork, "--", "sort", "-u", "/root/m") == f"{marker}\n"
    qemu = program_in(fork, "qemu-system")
    assert key.read_bytes() not in Path(f"/proc/{qemu}/cmdline").read_bytes()  # a memfd, never argv
    ok("stop", fork)
    r = cli("export", secret, str(tmp_path / "x.silo"))
    assert (r.returncode, r.stdout) == (11, ""), r
    assert r.stderr == (f"silo: workspace {secret!r} has disks encrypted with this daemon's key, which never "
                        "leaves it, so an export could not be read anywhere else: export a workspace created "
                        "without --encrypt\n"), r
    assert not (tmp_path / "x.silo").exists()
    for args, message in ((["--encrypt"], "an encrypted workspace needs isolation 'vm'"),
                          (["--isolation", "vm", "--encrypt", "--disposable"],
                           "a disposable workspace keeps nothing on a disk, so there is nothing to encrypt")):
        r = cli("create", new(names), *args)
        assert r.returncode == BAD_INPUT and r.stderr.startswith(f"silo: {message}"), r


def locked_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmLck in /proc/{pid}/status")


def test_a_diskless_workspace_lives_in_locked_ram_only(client: silo.Client, names: list[str]) -> None:
    state = Path(os.environ["SILO_STATE_DIR"])
    name = new(names)
    ok("create", name, "--isolation", "vm", "--diskless", "--memory", "256M")
    spec = client.get(name).info().spec
    assert (spec.diskless, spec.disposable) == (True, True)  # diskless implies disposable
    ok("start", name)
    ok("exec", name, "--", "sh", "-c", "echo only-in-ram > /root/r; sync")
    assert ok("exec", name, "--", "cat", "/root/r") == "only-in-ram\n"
    supervisor = program_in(name, "python")
    assert locked_kib(supervisor) >= 256 << 10  # the guest's whole RAM: never swapped out
    assert list((state / "workspaces" / name / "upper").iterdir()) == []  # no disk was made
    ok("stop", name)
    ok("start", name)
    assert ok("exec", name, "--", "ls", "/root") == ""
    ok("stop", name)
    for args, message in ((["--diskless"], "a diskless workspace needs isolation 'vm'"),
                          (["--isolation", "vm", "--diskless", "--encrypt"],
                           "a diskless workspace has no disk to encrypt")):
        r = cli("create", new(names), *args)
        assert r.returncode == BAD_INPUT and r.stderr.startswith(f"silo: {message}"), r


def test_an_image_root_sees_nothing_of_the_host(client: silo.Client, names: list[str], tmp_path: Path) -> None:
    image = tiny_image(tmp_path / "image")
    name, fork, scratch = new(names), new(names), new(names)
    ok("create", name, "--isolation", "vm", "--root", str(image))
    ok("start", name)
    exes = {os.path.basename(os.readlink(f"/proc/{pid}/exe")) for pid in machine_pids(name)}
    assert not any(e.startswith("virtiofsd") for e in exes), exes  # no host view to serve
    out = ok("exec", name, "--", "sh", "-c", "cat /etc/image-release; ls /; ls /usr /etc/shadow 2>&1; "
                                             "echo mine > /root/x").splitlines()
    assert out[0] == "tiny", out
    assert set(out[1:-2]) == {"bin", "dev", "etc", "lost+found", "proc", "root", "run", "sys", "tmp"}, out
    assert out[-2:] == ["ls: /usr: No such file or directory", "ls: /etc/shadow: No such file or directory"], out
    # cp works with the agent's own tools: the image has no tar
    (tmp_path / "pl").write_text("payload\n")
    ok("cp", str(tmp_path / "pl"), f"{name}:/root/renamed")
    ok("cp", f"{name}:/root/renamed", str(tmp_path / "back"))
    assert (tmp_path / "back").read_text() == "payload\n"
    ok("stop", name)
    ok("snapshot", name)
    ok("fork", name, fork)
    ok("start", fork)
    assert ok("exec", fork, "--", "cat", "/root/x", "/root/renamed") == "mine\npayload\n"
    ok("stop", fork)
    ok("create", scratch, "--isolation", "vm", "--root", str(image), "--disposable")
    ok("start", scratch)
    ok("exec", scratch, "--", "sh", "-c", "echo gone > /root/y")
    ok("stop", scratch)
    ok("start", scratch)
    assert ok("exec", scratch, "--", "ls", "/root") == ""
    ok("stop", scratch)


def test_a_workspace_keeps_the_kernel_it_was_created_with(client: silo.Client, names: list[str]) -> None:
    from silo.backends.vm import kernel
    from silo.engine import host as hostmod

    fetched = kernel.fetched(hostmod.host().cache_dir)
    if fetched is None:
        pytest.skip("no fetched kernel here (the host's is readable and make test did not fetch one)")
    name = new(names)
    ok("create", name, "--isolation", "vm", "--kernel", fetched.image, "--disposable")
    assert client.get(name).info().spec.kernel == fetched.image
    ok("start", name)
    assert ok("exec", name, "--", "uname", "-r") == f"{fetched.release}\n"
    ok("stop", name)
    r = cli("create", new(names), "--kernel", "debian")
    assert r.returncode == BAD_INPUT and "--kernel belongs to the vm level" in r.stderr, r
