"""The guest kernel: the host's own when it is readable, or one fetched from Debian
(``silo kernel fetch``: ``linux-image-cloud-amd64`` by ``apt-get download``, whose hashes
apt checks against the signed archive), or a path.

A fetched kernel is kept as ``<cache>/vm/kernels/<release>/{vmlinuz,vmlinux,modules/}``;
only the modules the guest loads (and their dependencies) are kept, about 2 MiB instead
of 90. ``vmlinux`` is the uncompressed kernel, booted directly through its PVH entry.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from silo.backends.vm import initramfs
from silo.model.errors import SiloError, SpecError
from silo.sys import cachefile

PACKAGE = "linux-image-cloud-amd64"
# Kept from a fetched kernel: what the guest loads now, and what networks and vsock need.
KEEP = (*initramfs.MODULES, *initramfs.DISK_MODULES, *initramfs.NET_MODULES, "vmw_vsock_virtio_transport")
SYSTEM_CACHE = "/var/cache/silo"
# bzImage payloads and the tools that unpack them (Debian's kernels use lz4 or zstd).
DECOMPRESSORS = ((b"\x02\x21\x4c\x18", ("lz4", "-dc")), (b"\x28\xb5\x2f\xfd", ("zstd", "-dcq")),
                 (b"\xfd7zXZ\x00", ("xz", "-dc")), (b"\x1f\x8b", ("gzip", "-dc")))
XEN_ELFNOTE_PHYS32_ENTRY = 18


@dataclass(frozen=True)
class Kernel:
    image: str  # the bzImage QEMU boots
    modules: str  # the directory with the release's modules (modules.builtin, kernel/...)
    release: str


def _kernels_dir(cache_dir: str) -> str:
    return os.path.join(cache_dir, "vm", "kernels")


def host_kernel() -> Kernel | None:
    release = platform.release()
    image, modules = f"/boot/vmlinuz-{release}", f"/lib/modules/{release}"
    if os.access(image, os.R_OK) and os.path.isdir(modules):
        return Kernel(image, modules, release)
    return None


def fetched(cache_dir: str) -> Kernel | None:
    """The newest kernel fetched into ``cache_dir`` (or the system's cache)."""
    for base in dict.fromkeys((_kernels_dir(cache_dir), _kernels_dir(SYSTEM_CACHE))):
        try:
            releases = sorted(os.listdir(base), reverse=True)
        except OSError:
            continue
        for release in releases:
            d = os.path.join(base, release)
            if os.access(os.path.join(d, "vmlinuz"), os.R_OK):
                return Kernel(os.path.join(d, "vmlinuz"), os.path.join(d, "modules"), release)
    return None


def find(choice: str, cache_dir: str) -> Kernel:
    """The kernel for ``--kernel choice``: ``host``, ``debian`` (fetched), ``auto`` (the
    host's, else a fetched one) or a path to a kernel image with its modules beside it
    in ``modules/``."""
    if choice in ("auto", "host"):
        k = host_kernel()
        if k is not None:
            return k
        if choice == "host":
            raise SpecError(f"the host's kernel is not readable (/boot/vmlinuz-{platform.release()} "
                            "and its modules): use --kernel debian after 'silo kernel fetch'")
    if choice in ("auto", "debian"):
        k = fetched(cache_dir)
        if k is not None:
            return k
        raise SpecError("no guest kernel: run 'silo kernel fetch' (as root, it serves every user), "
                        "or pass --kernel PATH")
    image = os.path.abspath(choice)
    if not os.path.isfile(image):
        raise SpecError(f"kernel {choice!r} is not a file: use host, debian or the path of a kernel image")
    modules = os.path.join(os.path.dirname(image), "modules")
    return Kernel(image, modules, os.path.basename(image))


def _apt_download(package: str, into: str) -> str:
    try:
        cp = subprocess.run(["apt-get", "download", package], cwd=into, capture_output=True, text=True,
                            timeout=600)
    except FileNotFoundError:
        raise SiloError("apt-get is not installed: 'silo kernel fetch' needs Debian's apt") from None
    if cp.returncode != 0:
        last = (cp.stderr.strip().splitlines() or ["no message"])[-1]
        raise SiloError(f"apt-get download {package} failed: {last}")
    debs = [f for f in os.listdir(into) if f.startswith(package + "_") and f.endswith(".deb")]
    if not debs:
        raise SiloError(f"apt-get download {package} left no .deb")
    return os.path.join(into, debs[0])


def _field(deb: str, name: str) -> str:
    cp = subprocess.run(["dpkg-deb", "-f", deb, name], capture_output=True, text=True, check=False)
    return cp.stdout.strip()


def fetch(cache_dir: str) -> Kernel:
    """Download Debian's cloud kernel and keep it in ``cache_dir`` (see the module doc)."""
    base = _kernels_dir(cache_dir)
    os.makedirs(base, mode=0o755, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=base) as tmp:
        os.chmod(tmp, 0o755)  # noqa: S103 - apt's download user must write here when run as root
        meta = _apt_download(PACKAGE, tmp)
        depends = _field(meta, "Depends")
        image_pkg = depends.split(",")[0].split("(")[0].strip()
        if not image_pkg.startswith("linux-image-"):
            raise SiloError(f"{PACKAGE} depends on {depends!r}, not on a kernel image package")
        deb = _apt_download(image_pkg, tmp)
        tree = os.path.join(tmp, "tree")
        cp = subprocess.run(["dpkg-deb", "-x", deb, tree], capture_output=True, text=True, check=False)
        if cp.returncode != 0:
            raise SiloError(f"cannot unpack {os.path.basename(deb)}: {cp.stderr.strip()}")
        release = image_pkg[len("linux-image-"):]
        image = os.path.join(tree, "boot", f"vmlinuz-{release}")
        modules = Path(tree, "lib", "modules", release)
        if not os.path.isfile(image) or not modules.is_dir():
            raise SiloError(f"{os.path.basename(deb)} has no vmlinuz-{release} or modules")
        out = os.path.join(tmp, "out")
        os.makedirs(os.path.join(out, "modules"))
        shutil.copy(image, os.path.join(out, "vmlinuz"))
        elf = pvh_elf(image)
        if elf is not None:
            cachefile.publish(os.path.join(out, "vmlinux"), elf)
        for name in ("modules.builtin", "modules.order"):
            if (modules / name).exists():
                shutil.copy(modules / name, os.path.join(out, "modules", name))
        for ko in initramfs.module_order(modules, KEEP):
            dst = os.path.join(out, "modules", ko.relative_to(modules))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy(ko, dst)
        for root, dirs, files in os.walk(out):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)  # noqa: S103 - the kernel serves every user
            for name in files:
                os.chmod(os.path.join(root, name), 0o644)
        os.chmod(out, 0o755)  # noqa: S103 - as above
        final = os.path.join(base, release)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.rename(out, final)
    return Kernel(os.path.join(final, "vmlinuz"), os.path.join(final, "modules"), release)


def _has_pvh_entry(elf: bytes) -> bool:
    """Whether ``elf`` (a 64-bit little-endian vmlinux) has the PVH entry note QEMU needs
    to boot it directly."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        ptype, _, offset, _, _, filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if ptype != 4:  # PT_NOTE
            continue
        at, end = offset, offset + filesz
        while at + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, at)
            name = elf[at + 12:at + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            at += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def pvh_elf(image: str) -> bytes | None:
    """The uncompressed ELF inside the bzImage ``image`` when it has a PVH entry, else None."""
    with open(image, "rb") as f:
        data = f.read()
    if data[0x202:0x206] != b"HdrS" or len(data) < 0x250:
        return None
    setup = ((data[0x1F1] or 4) + 1) * 512
    offset, length = struct.unpack_from("<II", data, 0x248)
    payload = data[setup + offset:setup + offset + length]
    for magic, tool in DECOMPRESSORS:
        if payload.startswith(magic):
            try:
                elf = subprocess.run(tool, input=payload, capture_output=True, timeout=120, check=False).stdout
            except (OSError, subprocess.TimeoutExpired):
                return None
            return elf if _has_pvh_entry(elf) else None
    return None


def bootable(image: str, cache_dir: str) -> str:
    """What QEMU boots for ``image``: its uncompressed ELF when the kernel has a PVH entry
    (the guest then skips decompressing itself, about half a second under TCG), else the
    bzImage itself. A fetched kernel has it beside its vmlinuz; others get it cached
    under ``cache_dir``."""
    beside = os.path.join(os.path.dirname(image), "vmlinux")
    if os.path.basename(image) == "vmlinuz" and os.path.exists(beside):
        return beside
    st = os.stat(image)
    key = hashlib.sha256(f"{os.path.realpath(image)}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    base = os.path.join(cache_dir, "vm")
    target = os.path.join(base, f"vmlinux-{key}")
    no_pvh = target + ".none"
    if os.path.exists(target):
        return target
    if os.path.exists(no_pvh):
        return image
    elf = pvh_elf(image)
    os.makedirs(base, mode=0o755, exist_ok=True)
    if elf is None:
        with open(no_pvh, "w"):
            pass
        return image
    cachefile.publish(target, elf)
    return target
