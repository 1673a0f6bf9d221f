"""Export and import of a workspace: one archive with its spec, its base and every layer.

Format 1 is an uncompressed tar, written and read as a stream (never seeked), whose members are:

* ``manifest.json`` first: ``{"format": 1, "kind": "silo-workspace", "spec": {...}, "base":
  "host"|"/dir", "layers": [{"blob": "layer-0.tar.gz", "sha256": HEX, "size": N}, ...]}``,
  layers top first: 0 is the upper, then the own frozen layers, then the template's
  (flattened, so the archive works where the template does not exist);
* then ``layer-N.tar.gz`` for each layer, in that order: a gzip'd tar of the layer
  directory's content (the overlay targets: ``root/etc/...``, ``usr/...``).

Inside a layer: regular files, directories, symlinks and hard links to an earlier file of
the same layer (a vm workspace's layer is its one ``disk.qcow2``, silo.backends.vm.disk);
ids relative to the storage's owner (``uid - owner[0]``, 0..65535) with no
user or group names; overlay whiteouts as OCI ``.wh.NAME`` empty files and opaque
directories as a ``.wh..wh..opq`` entry. Extended attributes are not kept (overlay's own
are encoded as above). Export refuses fifos, devices and names starting with ``.wh.``;
sockets are skipped, as tar does.

Import trusts nothing: the manifest must parse and match this format; every blob's size and
sha256 must match it; member names must be plain relative paths below a directory an
earlier member of the same layer made (so none goes through a symlink, ``..`` or ``/``);
only the types above are accepted; ids must lie in 0..65535 and become ``owner + id``
(a process that is not root keeps its own ids, as rootless sandboxes see them); setuid and
setgid bits are kept. Every byte written and every member counts against ``max_bytes``
(default: the free space of the state directory less 1 GiB). Layers are extracted into a
staging directory of the storage and only renamed into place by :meth:`Storage.adopt`
once all is verified; on any failure (KeyboardInterrupt too) the staging directory is
deleted, so nothing is left behind. The imported workspace has no template (its layers
are its own) and its spec's root is the archive's base; the caller validates both again.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import re
import stat
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, BinaryIO

from silo.model.errors import SpecError, UserError, WorkspaceExists
from silo.model.workspace import WorkspaceSpec, parse_name
from silo.store.layers import MAX_LAYERS, Storage, check_base, is_opaque, is_whiteout

FORMAT = 1
KIND = "silo-workspace"
VM_DISK = "disk.qcow2"  # silo.backends.vm.disk.DISK (the store does not import a backend)
MANIFEST = "manifest.json"
WH = ".wh."
OPQ = ".wh..wh..opq"
MAX_IDS = 65536
_MAX_MANIFEST = 1 << 20
_MAX_HEADER = 1 << 20  # a pax or GNU long-name header is read into memory by tarfile
_MEMBER_COST = 512  # what a member counts against the budget besides its data
_CHUNK = 1 << 20
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_ENCODING, _ERRORS = "utf-8", "surrogateescape"  # any file name survives


class _Refused(Exception):
    """Why an archive (or a workspace, on export) is refused; becomes a one-line UserError."""


class _BoundedInfo(tarfile.TarInfo):
    """TarInfo that refuses an oversized pax or long-name header before tarfile reads it into memory."""

    def _proc_pax(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.size > _MAX_HEADER:
            raise _Refused(f"it has a {self.size}-byte member header")
        info: tarfile.TarInfo = tarfile.TarInfo._proc_pax(self, tar)  # type: ignore[attr-defined]
        return info

    def _proc_gnulong(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.size > _MAX_HEADER:
            raise _Refused(f"it has a {self.size}-byte member name")
        info: tarfile.TarInfo = tarfile.TarInfo._proc_gnulong(self, tar)  # type: ignore[attr-defined]
        return info


class _Hashing(io.RawIOBase):
    """A reader or writer that hashes and counts what goes through it."""

    def __init__(self, inner: IO[bytes], on_read: Callable[[int], None] | None = None, *,
                 hashed: bool = True) -> None:
        self.inner = inner
        self.hashed = hashed
        self.sha = hashlib.sha256()
        self.count = 0
        self.on_read = on_read

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        if self.hashed:
            self.sha.update(data)
        self.count += len(data)
        if self.on_read is not None and data:
            self.on_read(self.count)
        return data

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.inner.write(data)
        self.sha.update(data)
        self.count += len(data)
        return len(data)


# -- export ----------------------------------------------------------------------------------


def _walk(top: str) -> Iterator[tuple[str, str, os.stat_result]]:
    """(path, relative name, lstat) of everything below ``top``, each directory before its content."""
    todo = [""]
    while todo:
        rel = todo.pop()
        with os.scandir(os.path.join(top, rel)) as it:
            entries = sorted(it, key=lambda e: e.name, reverse=True)
        for entry in entries:
            sub = f"{rel}/{entry.name}" if rel else entry.name
            st = entry.stat(follow_symlinks=False)
            yield entry.path, sub, st
            if stat.S_ISDIR(st.st_mode):
                todo.append(sub)


def _info(name: str, kind: bytes, st: os.stat_result | None = None, owner: tuple[int, int] = (0, 0)) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.uname = info.gname = ""
    if st is not None:
        info.mode = stat.S_IMODE(st.st_mode)
        info.mtime = st.st_mtime
        info.uid, info.gid = st.st_uid - owner[0], st.st_gid - owner[1]
        if not (0 <= info.uid < MAX_IDS and 0 <= info.gid < MAX_IDS):
            raise _Refused(f"{name} is owned by host ids {st.st_uid}:{st.st_gid}, outside the workspace's ids")
    else:
        info.mode = 0o600
        info.mtime = int(time.time())
    return info


def _write_layer(top: str, tar: tarfile.TarFile, owner: tuple[int, int], sent: Callable[[int], None]) -> None:
    linked: dict[tuple[int, int], str] = {}
    for path, name, st in _walk(top):
        base = os.path.basename(name)
        if is_whiteout(path, st):
            tar.addfile(_info(f"{os.path.dirname(name)}/{WH}{base}".lstrip("/"), tarfile.REGTYPE))
            continue
        if base.startswith(WH):
            raise _Refused(f"{path} has a name the archive format reserves ({WH}...): rename it first")
        if stat.S_ISDIR(st.st_mode):
            tar.addfile(_info(name, tarfile.DIRTYPE, st, owner))
            if is_opaque(path):
                tar.addfile(_info(f"{name}/{OPQ}", tarfile.REGTYPE))
        elif stat.S_ISLNK(st.st_mode):
            info = _info(name, tarfile.SYMTYPE, st, owner)
            info.linkname = os.readlink(path)
            tar.addfile(info)
        elif stat.S_ISREG(st.st_mode):
            info = _info(name, tarfile.REGTYPE, st, owner)
            if st.st_nlink > 1 and (st.st_dev, st.st_ino) in linked:
                info.type, info.linkname = tarfile.LNKTYPE, linked[st.st_dev, st.st_ino]
                tar.addfile(info)
                continue
            linked[st.st_dev, st.st_ino] = name
            info.size = st.st_size
            with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
                tar.addfile(info, f)
            sent(st.st_size)
        elif not stat.S_ISSOCK(st.st_mode):  # a socket means nothing once its process is gone
            what = "a fifo" if stat.S_ISFIFO(st.st_mode) else "a device node"
            raise _Refused(f"{path} is {what}, which an archive does not hold: remove it from the workspace first")


def export(storage: Storage, name: str, spec: Mapping[str, object], out: BinaryIO, *,
           progress: Callable[[int, int], None] | None = None) -> None:
    """Write workspace ``name`` (at rest) with ``spec`` (``WorkspaceSpec.to_dict()``) to ``out``.

    ``progress(done, total)`` is called in bytes of file data packed. Each layer is packed
    into a temporary blob first (its size and sha256 go into the manifest, which comes first).
    """
    stack = storage.stack(name)
    tops = [stack.upper, *stack.lowers]
    files = {(st.st_dev, st.st_ino): st.st_size for top in tops for _, _, st in _walk(top) if stat.S_ISREG(st.st_mode)}
    total = sum(files.values())
    done = [0]

    def sent(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], total)

    try:
        with storage.staging("export") as tmp:
            blobs = []
            for index, top in enumerate(tops):
                blob = tmp / f"layer-{index}.tar.gz"
                with open(blob, "xb") as raw:
                    hashing = _Hashing(raw)
                    with gzip.GzipFile(fileobj=hashing, mode="wb", compresslevel=6, mtime=0) as gz, \
                            tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT,
                                         encoding=_ENCODING, errors=_ERRORS) as tar:
                        _write_layer(top, tar, storage.owner, sent)
                blobs.append({"blob": blob.name, "sha256": hashing.sha.hexdigest(), "size": hashing.count})
            manifest = json.dumps({"format": FORMAT, "kind": KIND, "spec": dict(spec), "base": stack.base,
                                   "layers": blobs}, indent=1, allow_nan=False).encode()
            with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding=_ENCODING,
                              errors=_ERRORS) as outer:
                info = _info(MANIFEST, tarfile.REGTYPE)
                info.size = len(manifest)
                outer.addfile(info, io.BytesIO(manifest))
                for entry in blobs:
                    info = _info(str(entry["blob"]), tarfile.REGTYPE)
                    info.size = int(str(entry["size"]))
                    with open(tmp / info.name, "rb") as f:
                        outer.addfile(info, f)
    except _Refused as e:
        raise UserError(f"cannot export workspace {name!r}: {e}") from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"cannot export workspace {name!r}: no space left in {storage.root} for "
                            "its packed layers: free some space and try again") from None
        raise UserError(f"cannot export workspace {name!r}: {e.strerror or e}"
                        + (f" ({e.filename})" if e.filename else "")) from None


# -- import ----------------------------------------------------------------------------------


class _Budget:
    def __init__(self, limit: int, why: str) -> None:
        self.left = limit
        self.limit = limit
        self.why = why

    def charge(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise _Refused(f"it unpacks to more than {self.limit} bytes, the most this import may take{self.why}")


def _manifest(outer: tarfile.TarFile) -> tuple[dict[str, object], object, list[dict[str, object]]]:
    """The manifest's spec, base (both unchecked) and checked layer list."""
    member = outer.next()
    if member is None or member.name != MANIFEST or not member.isfile():
        raise _Refused(f"it is not a silo workspace archive (no {MANIFEST} first)")
    if member.size > _MAX_MANIFEST:
        raise _Refused(f"its {MANIFEST} is larger than {_MAX_MANIFEST} bytes")
    f = outer.extractfile(member)
    data = f.read() if f is not None else b""
    if len(data) != member.size:
        raise _Refused("it is truncated")
    try:
        untrusted = json.loads(data, parse_constant=lambda c: None)
    except (ValueError, RecursionError) as e:
        raise _Refused(f"its {MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(untrusted, dict) or set(untrusted) != {"format", "kind", "spec", "base", "layers"}:
        raise _Refused(f"its {MANIFEST} does not have the keys of format {FORMAT}")
    if untrusted["format"] != FORMAT or untrusted["kind"] != KIND:
        raise _Refused(f"archive format {untrusted['format']!r} is not {FORMAT}: another version of silo made it")
    layers = untrusted["layers"]
    if not isinstance(layers, list) or not 1 <= len(layers) <= MAX_LAYERS + 1:
        raise _Refused(f"it must have 1 to {MAX_LAYERS + 1} layers")
    for index, layer in enumerate(layers):
        if (not isinstance(layer, dict) or set(layer) != {"blob", "sha256", "size"}
                or layer["blob"] != f"layer-{index}.tar.gz" or not isinstance(layer["sha256"], str)
                or not _SHA_RE.fullmatch(layer["sha256"]) or not isinstance(layer["size"], int)
                or isinstance(layer["size"], bool) or layer["size"] < 0):
            raise _Refused(f"layer {index} of its {MANIFEST} is not valid")
    if not isinstance(untrusted["spec"], dict):
        raise _Refused("its spec is not a table")
    return untrusted["spec"], untrusted["base"], layers


class _Layer:
    """Extracts one layer blob's members below ``dest``, refusing every hostile member."""

    def __init__(self, dest: Path, owner: tuple[int, int] | None, budget: _Budget,
                 top_files: frozenset[str] = frozenset()) -> None:
        self.dest = dest
        self.top_files = top_files  # regular files a layer may hold at its top (a vm layer's disk)
        self.owner = owner  # None: keep this process's ids
        self.budget = budget
        self.dirs: list[tuple[str, tarfile.TarInfo]] = []
        self.made_dirs: set[str] = set()
        self.files: set[str] = set()
        self.links: set[str] = set()
        self.names: set[str] = set()
        self.opaque: set[str] = set()

    def _path(self, name: str) -> str:
        return os.path.join(self.dest, name)

    def _chown(self, path: str, info: tarfile.TarInfo, fd: int | None = None) -> None:
        if self.owner is not None:
            uid, gid = self.owner[0] + info.uid, self.owner[1] + info.gid
            if fd is not None:
                os.fchown(fd, uid, gid)
            else:
                os.chown(path, uid, gid, follow_symlinks=False)

    def _check(self, info: tarfile.TarInfo) -> tuple[str, str]:
        name = info.name
        if name.startswith("/"):
            raise _Refused(f"member {name!r} has an absolute path")
        parts = name.split("/")
        if ".." in parts:
            raise _Refused(f"member {name!r} has a '..' component")
        if any(p in ("", ".") for p in parts):
            raise _Refused(f"member {name!r} is not a plain relative path")
        parent = "/".join(parts[:-1])
        if parent and parent not in self.made_dirs:
            ancestors = ["/".join(parts[:i]) for i in range(1, len(parts))]
            if any(a in self.links for a in ancestors):
                raise _Refused(f"member {name!r} goes through a symbolic link")
            raise _Refused(f"member {name!r} is not below a directory made before it")
        if not parent and not info.isdir() and not (info.isreg() and name in self.top_files):
            raise _Refused(f"member {name!r} is not inside an overlay target's directory")
        if not (0 <= info.uid < MAX_IDS and 0 <= info.gid < MAX_IDS):
            raise _Refused(f"member {name!r} is owned by {info.uid}:{info.gid}, outside the ids 0 to "
                           f"{MAX_IDS - 1} a workspace has")
        return parent, parts[-1]

    def _claim(self, name: str) -> None:
        if name in self.names:
            raise _Refused(f"member {name!r} appears twice in a layer")
        self.names.add(name)

    def add(self, tar: tarfile.TarFile, info: tarfile.TarInfo) -> None:
        self.budget.charge(_MEMBER_COST)
        parent, base = self._check(info)
        if base.startswith(WH):
            if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or info.size != 0:
                raise _Refused(f"member {info.name!r} has a whiteout's name but is not an empty file")
            if base == OPQ:
                self.opaque.add(parent)
            elif base[len(WH):] in ("", ".", "..") or base[len(WH):].startswith(WH):
                raise _Refused(f"member {info.name!r} is not a valid whiteout")
            else:
                hidden = f"{parent}/{base[len(WH):]}"
                self._claim(hidden)
                self._whiteout(self._path(hidden))
            return
        self._claim(info.name)
        path = self._path(info.name)
        if info.isdir():
            os.mkdir(path, 0o700)
            self.made_dirs.add(info.name)
            self.dirs.append((path, info))
        elif info.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
            self._file(tar, info, path)
        elif info.issym():
            os.symlink(info.linkname, path)
            self._chown(path, info)
            os.utime(path, (info.mtime, info.mtime), follow_symlinks=False)
            self.links.add(info.name)
        elif info.islnk():
            if info.linkname not in self.files:
                raise _Refused(f"member {info.name!r} is a hard link to {info.linkname!r}, "
                               "which is not an earlier file of its layer")
            os.link(self._path(info.linkname), path, follow_symlinks=False)
        else:
            kind = {tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device",
                    tarfile.FIFOTYPE: "a fifo"}.get(info.type, f"of unsupported type {info.type!r}")
            raise _Refused(f"member {info.name!r} is {kind}")

    def _file(self, tar: tarfile.TarFile, info: tarfile.TarInfo, path: str) -> None:
        if info.size > self.budget.left:
            self.budget.charge(info.size)
        source = tar.extractfile(info)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as f:
            while source is not None and (chunk := source.read(_CHUNK)):
                self.budget.charge(len(chunk))  # the bytes there are, whatever the header said
                f.write(chunk)
            f.flush()  # a write after the chmod would clear setuid
            self._chown(path, info, fd)
            os.fchmod(fd, info.mode & 0o7777)  # after chown, which clears setuid too
            os.utime(fd, (info.mtime, info.mtime))
        self.files.add(info.name)

    def _whiteout(self, path: str) -> None:
        try:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))
        except PermissionError:  # no mknod here: overlay's xattr form (its directory is marked "x")
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
            os.setxattr(path, "user.overlay.whiteout", b"y", follow_symlinks=False)
            with contextlib.suppress(OSError):
                os.setxattr(os.path.dirname(path), "user.overlay.opaque", b"x", follow_symlinks=False)
        if self.owner is not None:
            os.chown(path, *self.owner, follow_symlinks=False)

    def finish(self) -> None:
        """Directories get their ids, opacity, mode and times once their content is in."""
        for path, info in reversed(self.dirs):
            self._chown(path, info)
            if info.name in self.opaque:
                os.setxattr(path, "user.overlay.opaque", b"y", follow_symlinks=False)
            os.chmod(path, info.mode & 0o7777)
            os.utime(path, (info.mtime, info.mtime), follow_symlinks=False)


def _extract_blob(outer: tarfile.TarFile, index: int, entry: Mapping[str, object], dest: Path,
                  owner: tuple[int, int] | None, budget: _Budget, top_files: frozenset[str]) -> None:
    member = outer.next()
    if member is None:
        raise _Refused(f"it is truncated: {entry['blob']} is missing")
    if member.name != entry["blob"] or not member.isfile() or member.size != entry["size"]:
        raise _Refused(f"member {member.name!r} is not {entry['blob']} of the size its manifest gives")
    raw = outer.extractfile(member)
    if raw is None:
        raise _Refused(f"{entry['blob']} cannot be read")
    hashing = _Hashing(raw)
    layer = _Layer(dest, owner, budget, top_files)
    with tarfile.open(fileobj=hashing, mode="r|gz", tarinfo=_BoundedInfo, encoding=_ENCODING, errors=_ERRORS) as tar:
        for info in tar:
            layer.add(tar, info)
            tar.members.clear()  # type: ignore[attr-defined]  # stream mode keeps every member otherwise
    layer.finish()
    while hashing.read(_CHUNK):
        pass
    if hashing.count != entry["size"]:
        raise _Refused(f"it is truncated: {entry['blob']} has {hashing.count} of its {entry['size']} bytes")
    if hashing.sha.hexdigest() != entry["sha256"]:
        raise _Refused(f"layer {index} does not match its checksum (a corrupt or altered archive)")


def import_(storage: Storage, src: BinaryIO, name: str | None, *, max_bytes: int | None = None,
            progress: Callable[[int], None] | None = None) -> tuple[str, dict[str, object]]:
    """Make a workspace from an archive of :func:`export`: (its name, its spec dict).

    ``name`` None keeps the archive's name. ``progress(n)`` gets the bytes read so far.
    A refused archive is a one-line UserError ("cannot import FILE: ..."); a name already
    taken is WorkspaceExists. The caller makes the workspace's record.
    """
    label = getattr(src, "name", None)
    label = label if isinstance(label, str) else "the archive"
    if name is not None:
        parse_name(name)
    if max_bytes is None:
        vfs = os.statvfs(storage.root)
        budget = _Budget(max(0, vfs.f_bavail * vfs.f_frsize - (1 << 30)),
                         f" (the free space of {storage.root} less 1 GiB): free some space")
    else:
        budget = _Budget(max_bytes, "")
    owner = storage.owner if os.geteuid() == 0 else None
    try:
        with storage.staging("import") as tmp:
            with tarfile.open(fileobj=_Hashing(src, progress, hashed=False), mode="r|", tarinfo=_BoundedInfo,
                              encoding=_ENCODING, errors=_ERRORS) as outer:
                untrusted_spec, untrusted_base, layers = _manifest(outer)
                try:
                    base = check_base(untrusted_base)
                except SpecError as e:
                    raise _Refused(f"its base is not valid: {e.message}") from None
                final = name if name is not None else parse_name(str(untrusted_spec.get("name", "")))
                spec = WorkspaceSpec.from_dict({**untrusted_spec, "name": final, "root": base}).to_dict()
                # a vm workspace's layers are one disk image each (silo.backends.vm.disk)
                top_files = frozenset({VM_DISK}) if spec["isolation"] == "vm" else frozenset()
                if storage.exists(final) or os.path.lexists(storage.root / "workspaces" / final / "record.json"):
                    raise WorkspaceExists(f"a workspace named {final!r} already exists: import it under another name")
                dirs = []
                for index, entry in enumerate(layers):
                    dest = tmp / f"layer-{index}"
                    os.mkdir(dest, 0o700)
                    if owner is not None:
                        os.chown(dest, *owner)
                    _extract_blob(outer, index, entry, dest, owner, budget, top_files)
                    dirs.append(dest)
                if outer.next() is not None:
                    raise _Refused("it has members after its last layer")
            storage.adopt(final, base, dirs[1:], dirs[0])
        return final, spec
    except _Refused as e:
        raise UserError(f"cannot import {label}: {e}") from None
    except SpecError as e:
        raise UserError(f"cannot import {label}: its spec is not valid: {e.message}") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(f"cannot import {label}: it is truncated or corrupt ({e})") from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"cannot import {label}: no space left in {storage.root}: free some space") from None
        raise UserError(f"cannot import {label}: {e.strerror or e}") from None
