"""The guest's initramfs: the kernel's virtio/fuse/virtiofs/overlay modules (in
dependency order, their signatures stripped) and ``silo-agent`` (static C) as ``/init``,
which builds the guest's root and then serves as the agent; built once per kernel and
inputs, cached under silo's cache directory.

The archive is an uncompressed ``newc`` cpio written here (about 40 lines; no maintained
Python library writes cpio, and an external ``cpio`` run would be one more package):
uncompressed because under TCG the guest's gunzip costs more than reading the bytes.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from silo import native
from silo.model.errors import SiloError
from silo.sys import cachefile

BUSYBOX = ("/bin/busybox", "/usr/bin/busybox")
# What the guest loads, in this order after their dependencies (a module built into the
# kernel is skipped).
# The machine is a microvm (virtio-mmio, no PCI): no virtio_pci (each module costs ~8 ms
# under TCG). A workspace's disk needs virtio_blk, loaded only when the guest has one
# (``silo.disk=``); ext4 is built into Debian's kernels (a module kernel lists it here).
MODULES = ("virtio_mmio", "virtio_console", "virtio_balloon", "virtio_rng", "virtiofs", "overlay")
DISK_MODULES = ("virtio_blk", "ext4")
NET_MODULES = ("virtio_net",)  # a guest with a network (``silo.net=``)
FORMAT = "7"  # bump when the layout changes
SIG_MAGIC = b"~Module signature appended~\n"


def strip_signature(module: bytes) -> bytes:
    """``module`` without its appended signature: the guest's kernel does not enforce
    signatures, and checking one costs an RSA verification per module under TCG. (The
    file came from the kernel package apt verified; the initramfs is silo's own.)"""
    if not module.endswith(SIG_MAGIC):
        return module
    # struct module_signature: 12 bytes before the magic, the signature's length last (big-endian)
    info = module[-len(SIG_MAGIC) - 12:-len(SIG_MAGIC)]
    sig_len = int.from_bytes(info[8:12], "big")
    end = len(module) - len(SIG_MAGIC) - 12 - sig_len
    if sig_len <= 0 or end <= 0:
        return module
    return module[:end]


def _modinfo_depends(path: Path) -> list[str]:
    """The ``depends=`` field of a module's .modinfo strings."""
    data = path.read_bytes()
    at = data.find(b"\0depends=")
    if at < 0:
        return []
    end = data.index(b"\0", at + 1)
    value = data[at + len(b"\0depends="):end].decode()
    return [d for d in value.split(",") if d]


def module_order(modules_dir: Path, wanted: Iterable[str]) -> list[Path]:
    """The ``.ko`` files of ``wanted`` and their dependencies, dependencies first; a
    name built into the kernel (listed in ``modules.builtin``) needs no file."""
    index = {p.name[: -len(".ko")].replace("-", "_"): p for p in modules_dir.rglob("*.ko")}
    builtin = set()
    builtin_list = modules_dir / "modules.builtin"
    if builtin_list.exists():
        builtin = {Path(line.strip()).name[: -len(".ko")].replace("-", "_")
                   for line in builtin_list.read_text().splitlines() if line.strip()}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        seen.add(name)
        path = index.get(name)
        if path is None:
            raise SiloError(f"the guest kernel has no module {name} (looked in {modules_dir}): "
                            "use a kernel with virtio support, like 'silo kernel fetch' gets")
        for dep in _modinfo_depends(path):
            visit(dep)
        order.append(path)

    for name in wanted:
        visit(name)
    return order


def busybox() -> str:
    """The host's static busybox: the guest's own tools (/.silo/busybox) and bench/vm.py's raw-QEMU peer."""
    for path in BUSYBOX:
        if os.path.isfile(path):
            return path
    raise SiloError("busybox is not installed: install Debian's busybox-static (make install does)")


class Cpio:
    """A ``newc`` archive writer."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.ino = 1

    def add(self, name: str, mode: int, data: bytes = b"") -> None:
        header = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0))
        self.ino += 1
        self.out += header.encode() + name.encode() + b"\0"
        self.out += b"\0" * (-len(self.out) % 4)
        self.out += data
        self.out += b"\0" * (-len(self.out) % 4)

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return bytes(self.out)


# build()'s answers in this process, keyed on what a change of its inputs changes: the
# modules directory and its depmod index (a kernel's install or ``silo kernel fetch``
# rewrites them), the agent and busybox. Walking the modules and reading each one's
# dependencies costs ~4 ms, which a long-lived server would pay for every VM run.
_built: dict[tuple[object, ...], str] = {}


def _stamp(path: str) -> tuple[int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def build(modules_dir: Path, cache_dir: str, release: str) -> str:
    """Path of the cached initramfs for the kernel whose modules are in ``modules_dir``,
    built if missing or if any input changed."""
    memo = (str(modules_dir), cache_dir, release, _stamp(str(modules_dir)),
            _stamp(str(modules_dir / "modules.dep")), _stamp(native.built("silo-agent")), _stamp(busybox()))
    target = _built.get(memo)
    if target is not None and os.path.exists(target):
        return target
    target = _build(modules_dir, cache_dir, release)
    _built[memo] = target
    return target


def _build(modules_dir: Path, cache_dir: str, release: str) -> str:
    mods = module_order(modules_dir, MODULES)
    disk_mods = [m for m in module_order(modules_dir, (*MODULES, *DISK_MODULES)) if m not in mods]
    net_mods = [m for m in module_order(modules_dir, (*MODULES, *NET_MODULES)) if m not in mods]
    agent = Path(native.built("silo-agent"))
    inputs: list[Path] = [agent, Path(busybox()), *mods, *disk_mods, *net_mods]
    h = hashlib.sha256(FORMAT.encode() + release.encode())
    for path in inputs:
        st = path.stat()
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    key = h.hexdigest()[:16]
    base = os.path.join(cache_dir, "vm")
    target = os.path.join(base, f"initramfs-{key}.cpio")
    if os.path.exists(target):
        return target
    os.makedirs(base, mode=0o755, exist_ok=True)
    cpio = Cpio()
    for d in ("dev", "proc", "lib", "lib/silo"):
        cpio.add(d, stat.S_IFDIR | 0o755)
    cpio.add("dev/console", stat.S_IFCHR | 0o600)  # rdev set below is not needed: devtmpfs replaces it
    cpio.add("init", stat.S_IFREG | 0o755, agent.read_bytes())  # the init, then the agent
    cpio.add("lib/silo/busybox", stat.S_IFREG | 0o755, Path(busybox()).read_bytes())  # the agent's tools
    for listing, group in (("modules", mods), ("modules.disk", disk_mods), ("modules.net", net_mods)):
        names = []
        for path in group:
            name = path.name[: -len(".ko")]
            names.append(name)
            cpio.add(f"lib/silo/{name}.ko", stat.S_IFREG | 0o644, strip_signature(path.read_bytes()))
        cpio.add(f"lib/silo/{listing}", stat.S_IFREG | 0o644, ("\n".join(names) + "\n").encode())
    cachefile.publish(target, cpio.finish())
    for old in os.listdir(base):  # earlier builds
        if old.startswith("initramfs-") and old != os.path.basename(target):
            try:
                os.unlink(os.path.join(base, old))
            except OSError:
                pass
    return target
