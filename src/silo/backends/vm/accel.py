"""KVM or TCG: decided by a short probe boot, never by ``/dev/kvm`` alone (on some hosts
the node exists and guests hang). The verdict is cached per kernel, QEMU and host
kernel; ``SILO_VM_ACCEL=kvm|tcg`` overrides it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import select
import subprocess
import time

from silo.backends.vm import machine
from silo.sys import cachefile

PROBE_TIMEOUT = 4.0  # a KVM boot to the initramfs takes well under a second


def _key(kernel: str, initramfs: str) -> str:
    st = os.stat(kernel)
    qemu = ""
    with contextlib.suppress(OSError):
        qemu = str(os.stat(machine.QEMU).st_mtime_ns)
    raw = f"{kernel}\0{st.st_size}\0{st.st_mtime_ns}\0{initramfs}\0{qemu}\0{platform.release()}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def probe_kvm(kernel: str, initramfs: str) -> bool:
    """Whether a guest boots to silo's init under KVM within :data:`PROBE_TIMEOUT`."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    argv = [machine.QEMU, "-nodefaults", "-no-user-config", "-nographic", "-M", "microvm", "-accel", "kvm",
            "-cpu", "host", "-m", "128M", "-kernel", kernel, "-initrd", initramfs,
            "-append", "console=ttyS0 quiet panic=-1 reboot=t silo.probe", "-serial", "stdio", "-no-reboot"]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    except OSError:
        return False
    assert proc.stdout is not None
    out = b""
    deadline = time.monotonic() + PROBE_TIMEOUT
    try:
        while b"SILO-PROBE-OK" not in out:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                return False
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                return False
            out += chunk
        return True
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def choose(kernel: str, initramfs: str, cache_dir: str) -> str:
    """``kvm`` or ``tcg`` for this kernel, probing once and caching the verdict."""
    forced = os.environ.get("SILO_VM_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced
    path = os.path.join(cache_dir, "vm", f"accel-{_key(kernel, initramfs)}.json")
    return cachefile.verdict(path, "accel", ("kvm", "tcg"),
                             lambda: "kvm" if probe_kvm(kernel, initramfs) else "tcg")
