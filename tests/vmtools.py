"""What the vm tests look at on the host: QEMU and virtiofsd processes, the VMs' cgroups."""

from __future__ import annotations

import glob
import shutil
import subprocess
import time
from pathlib import Path


def vm_processes() -> list[str]:
    """QEMU and virtiofsd processes (none run on the test machines but silo's)."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if "qemu-system" in line or "virtiofsd" in line]


def vm_cgroups() -> list[str]:
    return glob.glob("/sys/fs/cgroup/*/silo/vm-*") + glob.glob("/sys/fs/cgroup/silo/vm-*")


def nothing_left() -> None:
    deadline = time.monotonic() + 10
    while (vm_processes() or vm_cgroups()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (vm_processes(), vm_cgroups()) == ([], []), (vm_processes(), vm_cgroups())


def pid_of(program: str) -> int:
    """The pid of the one ``program`` process whose parent is not one too (virtiofsd
    forks its own sandbox; QEMU runs under the jail's process in between)."""
    rows = [line.split(None, 2) for line in vm_processes() if "<defunct>" not in line]
    pids = {int(pid) for pid, _, args in rows if program in args.split()[0]}
    top = [pid for pid, ppid, args in rows if program in args.split()[0] and int(ppid) not in pids]
    assert len(top) == 1, rows
    return int(top[0])


def tiny_image(root: Path) -> Path:
    """An image root of busybox-static alone: nothing of the host's system."""
    busybox = Path("/bin/busybox")
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in ("sh", "ls", "cat", "echo", "id", "sync"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "image-release").write_text("tiny\n")
    return root
