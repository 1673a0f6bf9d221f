"""A vm workspace's disk: a chain of qcow2 files, one per layer, found by the stack.

The workspace storage (:mod:`silo.store.layers`) is the same at every level: frozen
layers, shared by id, under an upper that is the workspace's own. At the vm level each
of those directories holds one file, :data:`DISK` (a qcow2 image with no backing file
in its header), and the guest sees the chain stacked::

    template layers  <-  own frozen layers  <-  upper/disk.qcow2
    (read-only)          (read-only)            (the guest writes here)

The bottom layer of every chain starts as a copy of an empty ext4 image (:func:`empty_base`,
~8 MiB), so a chain never depends on a file outside its layers.

So snapshot, restore, reset, fork and templates are the storage's renames, unchanged:
freezing the upper makes its disk a read-only layer, and the new upper's disk starts
empty on top of it (:func:`ensure_top`, at the next start). A fork is a new overlay on
the shared backing files.

A workspace created with ``encrypted`` has its own disks encrypted at rest (qcow2's
LUKS format, AES-256-XTS): the daemon's key (:func:`disk_key`, a random 256-bit key in
its state directory, readable by its owner only) opens every encrypted disk of the
daemon, which is what lets a fork or a template share encrypted backing files. Which
disks are encrypted is read from each one's header when it is opened; the key reaches
QEMU through a memfd, never a path or its command line.

The chain is handed to QEMU as open file descriptors and an explicit ``backing`` per
node (:func:`blockdev_args`): QEMU never opens a path, and no backing-file name in an
image header is ever followed -- a header is written by QEMU, which the guest may have
taken over (SECURITY.md #19, #20). The empty ext4 image is made by the host's
``mkfs.ext4`` once per state directory; no disk is ever mounted on the host: only the
guest's kernel parses what the guest wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

from silo.model.errors import SiloError

DISK = "disk.qcow2"
KEY = "disk.key"
KEY_SECRET = "disk-key"  # noqa: S105 - the id of QEMU's secret object, not a secret
QCOW2_MAGIC = b"QFI\xfb"
CRYPT_LUKS = 2  # a qcow2 header's crypt_method
SIZE = 32 << 30  # virtual size of every disk (sparse: a fresh one takes ~200 KiB, the base ~8 MiB)
QEMU_IMG = "/usr/bin/qemu-img"
MKFS = ("/sbin/mkfs.ext4", "/usr/sbin/mkfs.ext4")
BASE_FORMAT = 1  # bump when the base's file system changes


PBKDF_ATTEMPTS = 6


def _run(argv: Sequence[str], what: str) -> None:
    for attempt in range(PBKDF_ATTEMPTS):
        try:
            done = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, timeout=120,
                                  check=False)
        except FileNotFoundError:
            raise SiloError(f"{argv[0]} is not installed: install Debian's qemu-utils and e2fsprogs "
                            "(make install does)") from None
        err = done.stderr.decode(errors="replace").strip()
        # QEMU's PBKDF2 benchmark (making a LUKS header) fails now and then (about 1 in 12
        # here, more under load) when the thread's CPU time did not move between its
        # readings: again, a few times
        if done.returncode == 0 or "accurate CPU usage" not in err or attempt == PBKDF_ATTEMPTS - 1:
            break
    if done.returncode != 0:
        raise SiloError(f"cannot {what}: {err[:300]}")


def disk_key(directory: str) -> str:
    """The daemon's disk key file in ``directory`` (made once: 32 random bytes, as hex,
    mode 0600), which opens every encrypted disk of the daemon."""
    path = os.path.join(directory, KEY)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex())
        f.flush()
        os.fsync(f.fileno())
    return path


def _luks(key: str) -> list[str]:
    # The key is random, full strength: PBKDF2's iterations guard nothing, so they are
    # kept short (each open derives them again).
    return ["--object", f"secret,id=k,file={key}",
            "-o", "encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=10"]


def is_encrypted(fd: int) -> bool:
    """Whether the qcow2 image open as ``fd`` is LUKS-encrypted (its header says so)."""
    header = os.pread(fd, 36, 0)
    return len(header) == 36 and header[:4] == QCOW2_MAGIC and int.from_bytes(header[32:36], "big") == CRYPT_LUKS


def layer_is_encrypted(layer: str) -> bool:
    """Whether the layer directory ``layer`` holds a LUKS-encrypted disk."""
    try:
        fd = os.open(os.path.join(layer, DISK), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        return is_encrypted(fd)
    finally:
        os.close(fd)


def _mkfs() -> str:
    for path in MKFS:
        if os.path.exists(path):
            return path
    raise SiloError("mkfs.ext4 is not installed: install Debian's e2fsprogs (make install does)")


def empty_base(directory: str) -> str:
    """The read-only empty ext4 image every chain starts from, made once in ``directory``.

    Made sparse and raw, converted to qcow2 (zeroes take no space), published by
    rename: a crash leaves at most a temp file beside it, removed at the next call."""
    path = os.path.join(directory, f"empty-ext4-{BASE_FORMAT}.qcow2")
    if os.path.exists(path):
        return path
    os.makedirs(directory, mode=0o700, exist_ok=True)
    for old in os.listdir(directory):
        if old.startswith(".empty-"):
            os.unlink(os.path.join(directory, old))
    _make_ext4(directory, ".empty-", path, 0o444, None)
    return path


def _make_ext4(directory: str, prefix: str, path: str, mode: int, source: str | None,
               key: str | None = None, owner: tuple[int, int] | None = None) -> None:
    """An ext4 file system as a qcow2 image at ``path`` (published by rename, with
    ``mode`` and ``owner``), empty or holding a copy of the tree ``source``, encrypted
    with ``key`` if given; its temp files in ``directory``."""
    raw = tempfile.NamedTemporaryFile(dir=directory, prefix=prefix, suffix=".raw", delete=False)
    qcow = raw.name[:-4] + ".qcow2"
    try:
        raw.truncate(SIZE)
        raw.close()
        # Inode tables written now (zeroes: free), so the guest's kernel has nothing to
        # initialize in the background; a small journal; no blocks reserved for root.
        # With a source, mkfs copies its files, owners and modes in (-d).
        extra = ["-d", source] if source is not None else []
        root_owner = "" if source is not None else ",root_owner=0:0"
        _run([_mkfs(), "-q", "-F", "-L", "silo", "-m", "0", "-J", "size=64",
              "-E", f"lazy_itable_init=0,lazy_journal_init=1{root_owner}", *extra, raw.name],
             "make the disk's file system" if source is None else f"copy {source} into a disk")
        luks = _luks(key) if key is not None else []
        _run([QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "qcow2", *luks, raw.name, qcow], "convert the disk")
        os.chmod(qcow, mode)
        if owner is not None:
            os.chown(qcow, *owner)
        os.rename(qcow, path)
    finally:
        for leftover in (raw.name, qcow):
            if os.path.exists(leftover):
                os.unlink(leftover)


def image_top(upper: str, source: str, owner: tuple[int, int] | None = None, key: str | None = None) -> str:
    """``upper``'s disk made from the image directory ``source`` when missing: an ext4
    holding a copy of its tree, the root file system of a guest that sees nothing of
    the host's (an image root). Copied once, at the first start: later changes to
    ``source`` do not reach the workspace (the process level reads it live). ``key``:
    encrypted, as :func:`ensure_top`."""
    path = os.path.join(upper, DISK)
    if os.path.lexists(path):
        return path
    if not os.path.isdir(source):
        raise SiloError(f"root directory {source} does not exist: unpack an image there or use --root host")
    _make_ext4(upper, f".{DISK}.", path, 0o600, source, key, owner)
    return path


def ensure_top(upper: str, base: str | None, owner: tuple[int, int] | None = None, key: str | None = None) -> str:
    """``upper``'s disk, made when missing: empty (no backing file named in it) over
    layers, or a copy of ``base`` (the empty ext4 image) when it is the bottom of its
    chain. So every chain carries its own file system from its bottom layer up, and a
    layer never depends on a base that another machine (an import) or a new base
    would make differently (mkfs picks a new UUID and hash seed each time). Owned by
    ``owner`` (the storage's), whose ids an export records. ``key``: encrypted with the
    key in that file (QEMU benchmarks PBKDF2 to make the header: ~2 s)."""
    path = os.path.join(upper, DISK)
    if os.path.lexists(path):
        return path
    temp = os.path.join(upper, f".{DISK}.{os.getpid()}.tmp")
    try:
        luks = _luks(key) if key is not None else []
        if base is None:
            _run([QEMU_IMG, "create", "-q", "-f", "qcow2", *luks, temp, str(SIZE)], "make the workspace's disk")
        elif key is not None:
            _run([QEMU_IMG, "convert", "-q", "-f", "qcow2", "-O", "qcow2", *luks, base, temp],
                 "make the workspace's encrypted disk")
        else:
            shutil.copyfile(base, temp)
        os.chmod(temp, 0o600)
        if owner is not None:
            os.chown(temp, *owner)
        os.rename(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return path


def layer_disks(lowers: Sequence[str]) -> list[str]:
    """The disks of the frozen layers ``lowers`` (top first, as the stack lists them),
    bottom first; a layer without one is not a vm layer."""
    out = []
    for layer in reversed(lowers):
        path = os.path.join(layer, DISK)
        if not os.path.isfile(path) or os.path.islink(path):
            raise SiloError(f"layer {layer} holds no VM disk: it was made at another isolation level")
        out.append(path)
    return out


def blockdev_args(fds: Sequence[int], writable_top: bool, encrypted: Sequence[bool] = (),
                  key_fd: int = -1) -> list[str]:
    """QEMU's arguments for the chain whose files are open as ``fds`` (bottom first):
    one fd set and one qcow2 node per file, each naming the node below as its backing
    (the bottom none), and the top as the guest's virtio-blk disk. ``encrypted``: which
    of them are (:func:`is_encrypted`), opened with the key QEMU reads from ``key_fd``."""
    args: list[str] = []
    if any(encrypted):
        args += ["-object", f"secret,id={KEY_SECRET},file=/dev/fd/{key_fd}"]
    below: str | None = None
    for i, fd in enumerate(fds, start=1):
        node = f"disk{i}"
        top = i == len(fds)
        args += ["-add-fd", f"fd={fd},set={i}"]
        spec: dict[str, object] = {
            "driver": "qcow2", "node-name": node, "read-only": not (top and writable_top),
            "file": {"driver": "file", "filename": f"/dev/fdset/{i}"}, "backing": below}
        if i <= len(encrypted) and encrypted[i - 1]:
            spec["encrypt"] = {"format": "luks", "key-secret": KEY_SECRET}
        args += ["-blockdev", json.dumps(spec)]
        below = node
    if below is not None:
        args += ["-device", f"virtio-blk-device,drive={below}"]
    return args
