"""Workspace storage: overlay layers, snapshots, templates, and crash-safe changes to them.

Owns a workspace's private files under the daemon's state directory, beside the records of
:mod:`silo.store.records` (whose ``record.json`` it never touches)::

    workspaces/<name>/upper/<target>  the writable layer: one subdirectory per overlay target
    workspaces/<name>/work/<target>   overlay's work directories (same file system)
    workspaces/<name>/stack.json      base, template, own frozen layers and snapshots
    workspaces/<name>/journal.json    the steps of an operation in progress
    workspaces/<name>/checkpoint/     a memory image being written (runsc checkpoint)
    layers/<id>/<target>              frozen layers: former uppers, immutable, shared by id
    images/<id>/checkpoint.img        memory images of ``snapshot --memory``, immutable, by id
    templates/<name>/template.json    a template: a base and a stack of layers
    staging/                          imports and exports in progress (see silo.store.archive)
    trash/                            what waits for :meth:`Storage.empty_trash`

The targets (``root`` for ``/``, ``usr``, ...) are made by the sandbox builder; this module
treats them generically (whatever subdirectories a layer has).

Contracts:

* **Cheap by construction.** Freezing renames ``upper/`` into ``layers/`` (no data is copied)
  and gives the workspace a new empty upper; snapshot, restore, reset and fork only rename
  directories and rewrite ``stack.json``. What they drop is renamed into ``trash/`` and
  deleted later, in the background. The base and layer data are never copied.
* **Crash safe.** An operation of several steps first writes ``journal.json`` (atomically,
  fsynced) listing them. Every step is idempotent (a rename to a fresh name, a mkdir, an
  atomic file write), so :meth:`Storage.recover` rolls a journal forward whatever
  instruction a crash stopped at; a failure in this process undoes the steps before it
  raises. Without a journal ``stack.json`` is the commit point: ``upper/`` beside no
  ``stack.json`` is what a cut-short create or remove left, and recover trashes it. The data
  of ``upper/`` is renamed, never copied or deleted, until the operation dropping it commits.
* **Never follows a symlink** in a workspace's files (lstat, ``O_NOFOLLOW``, directory fds)
  and never deletes across a mount point. Names pass :func:`parse_name` before they become
  paths; what is read back from disk is size-limited and validated.
* **Modes.** The sandbox builder runs as the workspace's root (host uid ``owner[0]``, not
  host root) and reaches its layers by path: the root, ``layers/``, ``workspaces/`` and each
  workspace directory are 0711 (search, no listing); ``upper/`` and ``work/`` are ``owner``'s, 0700.

Preconditions: one :class:`Storage` per state directory (the daemon's Store lock makes it
so); a workspace's overlay is not mounted while it is snapshotted, restored, reset, forked,
removed or made a template of (the verb rules of :mod:`silo.model.workspace` allow those
only at rest). The methods of one object are serialized by a lock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from silo.model.errors import (
    InternalError,
    NotFoundError,
    SiloError,
    SpecError,
    StoreFull,
    UserError,
    WorkspaceExists,
    WorkspaceStateError,
)
from silo.model.workspace import parse_name
from silo.store.records import _fsync_dir as fsync_dir

MAX_LAYERS = 60  # own + template layers: overlay's options must fit in a page
FORMAT = 1
STACK = "stack.json"
JOURNAL = "journal.json"
TEMPLATE = "template.json"
RECORD = "record.json"  # the Store's file: only its existence is ever looked at
_MAX_JSON = 8 << 20
_ID_RE = re.compile(r"[0-9a-f]{16}")
_TMP_RE = re.compile(r"\.(stack|journal|template)\.json\.[0-9a-f]{16}\.tmp")
_TOPS = ("workspaces", "layers", "images", "templates", "staging", "trash")
CHECKPOINT = "checkpoint"  # a workspace's memory image in the making (see memory_stage)
WHITEOUT_XATTRS = ("user.overlay.whiteout", "trusted.overlay.whiteout")
OPAQUE_XATTRS = ("user.overlay.opaque", "trusted.overlay.opaque")
_MAX_DEPTH = 64  # remove_tree keeps at most this many directories open


# -- values ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    """What the planner needs to mount a workspace."""

    base: str  # "host" or an absolute image directory
    lowers: tuple[str, ...]  # absolute layer directories, top first: own frozen layers, then the template's
    upper: str  # <ws>/upper
    work: str  # <ws>/work
    resume: str | None = None  # a memory image the next start resumes from (see Storage.take_resume)


@dataclass(frozen=True)
class SnapshotInfo:
    tag: str
    created: float
    memory: bool = False  # it saved the workspace's processes too (snapshot --memory)


@dataclass(frozen=True)
class TemplateInfo:
    name: str
    base: str
    source: str  # the workspace it was made from
    created: float
    layers: tuple[str, ...]  # absolute layer directories, top first
    owner: int  # the uid that made it: only it and root may see, use or remove it


@dataclass(frozen=True)
class Change:
    kind: str  # "added" | "changed" | "deleted"
    path: str  # absolute inside the workspace, e.g. "/usr/bin/jq"


# -- the files on disk -------------------------------------------------------------------


def _table(untrusted: object, keys: Sequence[str], what: str, optional: Sequence[str] = ()) -> dict[str, object]:
    if not isinstance(untrusted, dict) or not set(keys) <= set(untrusted) <= {*keys, *optional}:
        raise ValueError(f"{what} must be an object with exactly the keys {', '.join(keys)}"
                         + (f" (and maybe {', '.join(optional)})" if optional else ""))
    return untrusted


def _image(untrusted: object) -> str | None:
    if untrusted is not None and not (isinstance(untrusted, str) and _ID_RE.fullmatch(untrusted)):
        raise ValueError(f"{untrusted!r} is not a memory image id")
    return untrusted


def _ids(untrusted: object) -> tuple[str, ...]:
    if not isinstance(untrusted, list) or not all(isinstance(i, str) and _ID_RE.fullmatch(i) for i in untrusted):
        raise ValueError("a layer list is not a list of layer ids")
    return tuple(untrusted)


def _time(untrusted: object) -> float:
    if isinstance(untrusted, bool) or not isinstance(untrusted, (int, float)) or not math.isfinite(untrusted):
        raise ValueError(f"{untrusted!r} is not a time")
    return float(untrusted)


def check_base(untrusted: object) -> str:
    """``host`` or a normalized absolute directory (its existence is the caller's business)."""
    if untrusted == "host":
        return "host"
    if (isinstance(untrusted, str) and untrusted.startswith("/") and "\0" not in untrusted
            and os.path.normpath(untrusted) == untrusted and len(untrusted) < 4096):
        return untrusted
    raise SpecError(f"bad base {untrusted!r}: use 'host' or an absolute path to an image directory")


@dataclass(frozen=True)
class _Snap:
    tag: str
    created: float
    layers: tuple[str, ...]
    memory: str | None = None  # the id of its memory image under images/

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"tag": self.tag, "created": self.created, "layers": list(self.layers)}
        if self.memory is not None:  # absent otherwise: files an older silo reads unchanged
            out["memory"] = self.memory
        return out


@dataclass(frozen=True)
class _StackFile:
    base: str
    layers: tuple[str, ...] = ()
    template: str | None = None
    template_layers: tuple[str, ...] = ()
    snapshots: tuple[_Snap, ...] = ()
    resume: str | None = None  # the memory image (id) the next start resumes from

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"format": FORMAT, "layers": list(self.layers), "template": self.template,
                                  "template_layers": list(self.template_layers), "base": self.base,
                                  "snapshots": [s.to_dict() for s in self.snapshots]}
        if self.resume is not None:
            out["resume"] = self.resume
        return out

    @classmethod
    def parse(cls, untrusted: object) -> _StackFile:
        top = _table(untrusted, ("format", "layers", "template", "template_layers", "base", "snapshots"), "it",
                     ("resume",))
        if top["format"] != FORMAT:
            raise ValueError(f"format {top['format']!r} is not {FORMAT}: another version of silo wrote it")
        template = top["template"]
        if template is not None:
            template = parse_name(template, "template name")  # type: ignore[arg-type]
        raw_snaps = top["snapshots"]
        if not isinstance(raw_snaps, list):
            raise ValueError("snapshots is not a list")
        snaps = []
        for raw in raw_snaps:
            snap = _table(raw, ("tag", "created", "layers"), "a snapshot", ("memory",))
            snaps.append(_Snap(parse_name(snap["tag"], "snapshot tag"), _time(snap["created"]),  # type: ignore[arg-type]
                               _ids(snap["layers"]), _image(snap.get("memory"))))
        if len({s.tag for s in snaps}) != len(snaps):
            raise ValueError("a snapshot tag appears twice")
        return cls(base=check_base(top["base"]), layers=_ids(top["layers"]), template=template,
                   template_layers=_ids(top["template_layers"]), snapshots=tuple(snaps),
                   resume=_image(top.get("resume")))

    def all_layers(self) -> set[str]:
        return {*self.layers, *self.template_layers, *(i for s in self.snapshots for i in s.layers)}

    def all_images(self) -> set[str]:
        return {i for i in (self.resume, *(s.memory for s in self.snapshots)) if i is not None}


@dataclass(frozen=True)
class _TemplateFile:
    base: str
    layers: tuple[str, ...]
    source: str
    created: float
    owner: int

    def to_dict(self) -> dict[str, object]:
        return {"base": self.base, "layers": list(self.layers), "from": self.source, "created": self.created,
                "owner": self.owner}

    @classmethod
    def parse(cls, untrusted: object) -> _TemplateFile:
        top = _table(untrusted, ("base", "layers", "from", "created", "owner"), "it")
        owner = top["owner"]
        if isinstance(owner, bool) or not isinstance(owner, int) or not 0 <= owner < 1 << 32:
            raise ValueError(f"owner {owner!r} is not a uid")
        return cls(check_base(top["base"]), _ids(top["layers"]), parse_name(top["from"]),  # type: ignore[arg-type]
                   _time(top["created"]), owner)


# The steps of a journal; paths are relative to the state directory.
@dataclass(frozen=True)
class _Move:
    src: str
    dst: str  # always a fresh name, so "dst exists" means "done"


@dataclass(frozen=True)
class _Mkdir:
    path: str  # a private directory of the owner (upper/, work/)


@dataclass(frozen=True)
class _WriteStack:
    name: str
    new: _StackFile | None  # None: no stack.json (what an undo of a new workspace writes)
    old: _StackFile | None


@dataclass(frozen=True)
class _WriteTemplate:
    name: str
    new: _TemplateFile


_Step = _Move | _Mkdir | _WriteStack | _WriteTemplate


def _step_to_json(step: _Step) -> list[object]:
    if isinstance(step, _Move):
        return ["move", step.src, step.dst]
    if isinstance(step, _Mkdir):
        return ["mkdir", step.path]
    if isinstance(step, _WriteStack):
        return ["stack", step.name, None if step.new is None else step.new.to_dict(),
                None if step.old is None else step.old.to_dict()]
    return ["template", step.name, step.new.to_dict()]


def _rel(untrusted: object) -> str:
    if not isinstance(untrusted, str) or "\0" in untrusted:
        raise ValueError("a path is not a string")
    parts = untrusted.split("/")
    if parts[0] not in _TOPS or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{untrusted!r} is not a path inside the state directory")
    return untrusted


def _step_from_json(untrusted: object) -> _Step:
    if not isinstance(untrusted, list) or not untrusted:
        raise ValueError("a step is not a list")
    kind, args = untrusted[0], untrusted[1:]
    if kind == "move" and len(args) == 2:
        return _Move(_rel(args[0]), _rel(args[1]))
    if kind == "mkdir" and len(args) == 1:
        return _Mkdir(_rel(args[0]))
    if kind == "stack" and len(args) == 3:
        new, old = (None if a is None else _StackFile.parse(a) for a in args[1:])
        return _WriteStack(parse_name(args[0]), new, old)
    if kind == "template" and len(args) == 2:
        return _WriteTemplate(parse_name(args[0], "template name"), _TemplateFile.parse(args[1]))
    raise ValueError(f"unknown step {kind!r}")


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not a number silo writes")


def _corrupt(path: Path, detail: str, hint: str) -> UserError:
    return UserError(f"{path}: corrupt workspace storage: {detail}; {hint}")


def _read_json(path: Path, hint: str) -> object | None:
    """The parsed file, None when it does not exist; a one-line UserError when it is bad."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _corrupt(path, f"cannot open it: {e.strerror}", hint) from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(_MAX_JSON + 1)
    if len(data) > _MAX_JSON:
        raise _corrupt(path, f"it is larger than {_MAX_JSON} bytes", hint)
    try:
        parsed: object = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise _corrupt(path, f"not valid JSON ({e})", hint) from None
    return parsed


# -- overlay's encodings -----------------------------------------------------------------


def _has_xattr(path: str, names: Sequence[str], value: bytes | None = None) -> bool:
    for name in names:
        try:
            found = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
        if value is None or found == value:
            return True
    return False


def is_whiteout(path: str, st: os.stat_result) -> bool:
    """An overlay whiteout: a 0/0 character device, or an empty file with the whiteout xattr."""
    if stat.S_ISCHR(st.st_mode):
        return st.st_rdev == 0
    return stat.S_ISREG(st.st_mode) and st.st_size == 0 and _has_xattr(path, WHITEOUT_XATTRS)


def is_opaque(path: str) -> bool:
    """A directory that hides what the layers below have at its path (``overlay.opaque=y``)."""
    return _has_xattr(path, OPAQUE_XATTRS, b"y")


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _lookup(roots: Sequence[str], rel: str) -> os.stat_result | None:
    """What ``rel`` is in the merged view of ``roots`` (layer directories, top first)."""
    parts = rel.split("/")
    for root in roots:
        cur, hidden = root, False
        for i, part in enumerate(parts):
            cur = os.path.join(cur, part)
            st = _lstat(cur)
            if st is None:
                break
            if is_whiteout(cur, st):
                return None
            if i == len(parts) - 1:
                return st
            if not stat.S_ISDIR(st.st_mode):
                return None  # a file hides whatever lies below it
            hidden = hidden or is_opaque(cur)
        if hidden:
            return None
    return None


def _scan(top: str) -> Iterator[os.stat_result]:
    """lstat of everything below ``top`` (not ``top``), unreadable directories skipped."""
    todo = [top]
    while todo:
        try:
            with os.scandir(todo.pop()) as it:
                for entry in it:
                    st = entry.stat(follow_symlinks=False)
                    yield st
                    if stat.S_ISDIR(st.st_mode):
                        todo.append(entry.path)
        except OSError:
            continue


def _open_dir(parent_fd: int, name: str, dev: int) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=parent_fd)
    except PermissionError:
        # An unreadable directory (overlay's work/work is 0000): chmod the very inode, no path race.
        path_fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            os.chmod(f"/proc/self/fd/{path_fd}", 0o700)
        finally:
            os.close(path_fd)
        fd = os.open(name, flags, dir_fd=parent_fd)
    st = os.fstat(fd)
    if st.st_dev != dev:
        os.close(fd)
        raise OSError(errno.EXDEV, "a mount point is below it: not deleted", name)
    if st.st_mode & 0o700 != 0o700:
        with contextlib.suppress(OSError):
            os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)
    return fd


def _clear_files(fd: int) -> list[str]:
    """Unlink every non-directory in ``fd``; the names of its subdirectories."""
    subdirs = []
    with os.scandir(fd) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
            else:
                os.unlink(entry.name, dir_fd=fd)
    return subdirs


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Delete ``path`` and all below it without following a symlink or crossing a mount point.

    Works through directory fds; a tree deeper than a few dozen levels (a hostile sandbox
    can make one) is cut into pieces renamed beside ``path``, so no recursion limit or fd
    limit is reached. A mount point below stops it with an OSError (EXDEV).
    """
    parent, name = os.path.split(os.fspath(path))
    pfd = os.open(parent or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        dev = os.fstat(pfd).st_dev
        todo = [name]
        while todo:
            top = todo.pop()
            try:
                st = os.stat(top, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(top, dir_fd=pfd)
                continue
            fd = _open_dir(pfd, top, dev)
            chain = [(pfd, top, fd, _clear_files(fd))]
            try:
                while chain:
                    up, here, fd, subdirs = chain[-1]
                    if not subdirs:
                        chain.pop()
                        os.close(fd)
                        os.rmdir(here, dir_fd=up)
                    elif len(chain) >= _MAX_DEPTH:
                        piece = f".{name}.deep-{secrets.token_hex(8)}"
                        os.rename(subdirs.pop(), piece, src_dir_fd=fd, dst_dir_fd=pfd)
                        todo.append(piece)
                    else:
                        child = subdirs.pop()
                        cfd = _open_dir(fd, child, dev)
                        chain.append((fd, child, cfd, []))
                        chain[-1][3].extend(_clear_files(cfd))
            finally:
                for _, _, fd, _ in chain:
                    os.close(fd)
    finally:
        os.close(pfd)


def _mount_points() -> list[str]:
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().decode("utf-8", "surrogateescape").splitlines()
    except OSError:
        return []
    points = []
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4:
            points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    return points


def _os_error(e: OSError, what: str) -> SiloError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(f"no space left to {what}: free some space and try again")
    where = f" ({e.filename})" if e.filename else ""
    return InternalError(f"cannot {what}: {e.strerror}{where}")


# -- the kernel seam -----------------------------------------------------------------------


class FileOps:
    """Every call that changes the state directory, in one place: tests cut an operation
    short after any of them (a crash) and check what :meth:`Storage.recover` makes of it."""

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(path, mode)

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(path, mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(path, uid, gid, follow_symlinks=False)

    def write_new(self, path: str, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def fsync_dir(self, path: str) -> None:
        fsync_dir(Path(path))


# -- the storage ---------------------------------------------------------------------------


class Storage:
    """The layers of one daemon's workspaces; see the module docstring for the contracts.

    ``owner`` is the host (uid, gid) the private directories belong to (None: this
    process's own ids); files inside them are the sandbox's, host ids ``owner + n``.
    """

    def __init__(self, root: str | os.PathLike[str], owner: tuple[int, int] | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.owner = owner if owner is not None else (os.geteuid(), os.getegid())
        self._clock = clock
        self._mutex = threading.RLock()
        self._fs = FileOps()
        self._workspaces = self.root / "workspaces"
        self._layers = self.root / "layers"
        self._images = self.root / "images"
        self._templates = self.root / "templates"
        self._staging = self.root / "staging"
        self._trash = self.root / "trash"
        try:
            for path, mode in ((self.root, 0o711), (self._workspaces, 0o711), (self._layers, 0o711),
                               (self._images, 0o711),
                               (self._templates, 0o700), (self._staging, 0o700), (self._trash, 0o700)):
                self._ensure_dir(path, mode)
        except OSError as e:
            raise UserError(f"cannot open the workspace storage in {self.root}: {e.strerror}") from None

    # -- paths and files -----------------------------------------------------------------

    def _ensure_dir(self, path: Path, mode: int) -> bool:
        """Make ``path`` with ``mode`` if missing (True), else add the search bits ``mode`` wants."""
        made = False
        try:
            self._fs.mkdir(str(path), mode)
            self._fs.chmod(str(path), mode)  # not the umask's
            made = True
        except FileExistsError:
            pass
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise UserError(f"{path} is not a directory (a symlink?): move it away, then try again")
        if st.st_mode & mode & 0o011 != mode & 0o011:
            self._fs.chmod(str(path), stat.S_IMODE(st.st_mode) | (mode & 0o011))
        return made

    def _ws(self, name: str) -> Path:
        path = self._workspaces / parse_name(name)
        st = _lstat(str(path))
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise UserError(f"{path} is not a directory (a symlink?): move it away, then try again")
        return path

    def _rel(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def _to_trash(self, path: Path, label: str) -> _Move:
        return _Move(self._rel(path), f"trash/{secrets.token_hex(8)}-{label}")

    def _new_ids(self, count: int) -> list[str]:
        ids: list[str] = []
        while len(ids) < count:
            lid = secrets.token_hex(8)
            if lid not in ids and not os.path.lexists(self._layers / lid) and not os.path.lexists(self._images / lid):
                ids.append(lid)
        return ids

    def _write_json(self, path: Path, data: object) -> None:
        raw = (json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()
        tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
        self._fs.write_new(str(tmp), raw)
        try:
            self._fs.replace(str(tmp), str(path))
        except BaseException:
            with contextlib.suppress(OSError):
                self._fs.unlink(str(tmp))
            raise
        self._fs.fsync_dir(str(path.parent))

    def _write_stack(self, name: str, new: _StackFile | None) -> None:
        path = self._ws(name) / STACK
        if new is not None:
            self._write_json(path, new.to_dict())
        elif os.path.lexists(path):
            self._fs.unlink(str(path))
            self._fs.fsync_dir(str(path.parent))

    def _make_private(self, path: Path) -> None:
        """An owner's directory, 0700 (idempotent: a replayed journal makes it again)."""
        if not os.path.lexists(path):
            self._fs.mkdir(str(path), 0o700)
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise InternalError(f"{path} is not a directory")
        self._fs.chmod(str(path), 0o700)
        if self.owner != (os.geteuid(), os.getegid()):
            self._fs.chown(str(path), *self.owner)

    def _load(self, name: str) -> _StackFile:
        """``name``'s stack; an operation a failure left half done is finished first."""
        path = self._ws(name) / STACK
        if os.path.lexists(path.parent / JOURNAL):
            try:
                self._replay(path.parent / JOURNAL)
            except (SiloError, OSError, ValueError) as e:
                raise InternalError(f"workspace {name!r}: cannot finish an interrupted operation: {e}") from None
        hint = f"remove the workspace ('silo rm {name}') and make it again"
        untrusted = _read_json(path, hint)
        if untrusted is None:
            raise NotFoundError(f"no workspace named {name!r}: see 'silo ls'")
        try:
            return _StackFile.parse(untrusted)
        except (ValueError, SpecError) as e:
            raise _corrupt(path, str(e), hint) from None

    def _load_template(self, tname: str) -> _TemplateFile:
        path = self._templates / parse_name(tname, "template name") / TEMPLATE
        untrusted = _read_json(path, f"remove the template with 'silo template rm {tname}'")
        if untrusted is None:
            raise NotFoundError(f"template {tname!r} does not exist: run 'silo template ls'")
        try:
            return _TemplateFile.parse(untrusted)
        except (ValueError, SpecError) as e:
            raise _corrupt(path, str(e), f"remove the template with 'silo template rm {tname}'") from None

    def _names_in(self, directory: Path, what: str) -> list[str]:
        out = []
        for entry in sorted(os.listdir(directory)):
            with contextlib.suppress(SpecError):
                if stat.S_ISDIR(os.lstat(directory / parse_name(entry, what)).st_mode):
                    out.append(entry)
        return out

    def _upper_is_empty(self, ws: Path) -> bool:
        """Nothing but plain directories with nothing else in them: the overlay targets
        the sandbox builder makes, nested ones (``var/lib/dpkg``) included."""
        todo = [str(ws / "upper")]
        try:
            while todo:
                with os.scandir(todo.pop()) as it:
                    for entry in it:
                        if not entry.is_dir(follow_symlinks=False) or _has_xattr(entry.path, OPAQUE_XATTRS):
                            return False
                        todo.append(entry.path)
        except FileNotFoundError:
            pass  # nothing to freeze: recover() gives it a fresh upper
        return True

    # -- running a journal ---------------------------------------------------------------

    def _do(self, step: _Step) -> None:
        if isinstance(step, _Move):
            src, dst = self.root / step.src, self.root / step.dst
            if not os.path.lexists(dst) and os.path.lexists(src):
                self._fs.rename(str(src), str(dst))
        elif isinstance(step, _Mkdir):
            self._make_private(self.root / step.path)
        elif isinstance(step, _WriteStack):
            self._write_stack(step.name, step.new)
        else:
            directory = self._templates / step.name
            if not os.path.lexists(directory):
                self._fs.mkdir(str(directory), 0o700)
            self._write_json(directory / TEMPLATE, step.new.to_dict())

    def _undo(self, step: _Step) -> None:
        if isinstance(step, _Move):
            src, dst = self.root / step.src, self.root / step.dst
            if os.path.lexists(dst) and not os.path.lexists(src):
                self._fs.rename(str(dst), str(src))
        elif isinstance(step, _Mkdir):
            with contextlib.suppress(FileNotFoundError):
                self._fs.rmdir(str(self.root / step.path))
        elif isinstance(step, _WriteStack):
            current = _read_json(self._ws(step.name) / STACK, "")
            if current != (None if step.old is None else step.old.to_dict()):  # a failed write changed nothing
                self._write_stack(step.name, step.old)
        else:
            with contextlib.suppress(FileNotFoundError):
                self._fs.unlink(str(self._templates / step.name / TEMPLATE))
            with contextlib.suppress(FileNotFoundError):
                self._fs.rmdir(str(self._templates / step.name))

    def _play(self, steps: Sequence[_Step], done: list[_Step]) -> None:
        """Do ``steps``; the renames and mkdirs are made durable before the first file write."""
        synced = False
        for step in steps:
            if not synced and isinstance(step, (_WriteStack, _WriteTemplate)):
                dirs = {os.path.dirname(self.root / p) for s in steps if isinstance(s, _Move) for p in (s.src, s.dst)}
                dirs |= {os.path.dirname(self.root / s.path) for s in steps if isinstance(s, _Mkdir)}
                for directory in sorted(dirs):
                    if os.path.isdir(directory):
                        self._fs.fsync_dir(directory)
                synced = True
            done.append(step)
            self._do(step)

    def _run(self, name: str, what: str, steps: Sequence[_Step]) -> None:
        """Journal ``steps`` in ``name``'s directory, do them, drop the journal; undo on failure."""
        journal = self._ws(name) / JOURNAL
        done: list[_Step] = []
        committed = False
        try:
            self._write_json(journal, {"format": FORMAT, "op": what, "steps": [_step_to_json(s) for s in steps]})
            self._play(steps, done)
            self._fs.unlink(str(journal))
            committed = True
            self._fs.fsync_dir(str(journal.parent))
        except BaseException as e:
            if not committed and os.path.lexists(journal):
                try:
                    for step in reversed(done):
                        self._undo(step)
                    self._fs.unlink(str(journal))
                except BaseException:  # noqa: S110 - the journal stays: recover() finishes the operation
                    pass
            if isinstance(e, OSError):
                raise _os_error(e, what) from None
            raise

    def _freeze(self, name: str, s: _StackFile) -> tuple[list[_Step], tuple[str, ...]]:
        """Steps that make the upper a new top layer (none when it is empty), and the new own layers."""
        ws = self._ws(name)
        if self._upper_is_empty(ws):
            return [], s.layers
        count = len(s.layers) + len(s.template_layers)
        if count >= MAX_LAYERS:
            raise WorkspaceStateError(
                f"cannot freeze workspace {name!r}: it stacks {count} layers already, the most is {MAX_LAYERS}; "
                f"run 'silo reset {name}' to drop its own layers, or make a fresh workspace")
        (lid,) = self._new_ids(1)
        freeze = _Move(self._rel(ws / "upper"), f"layers/{lid}")
        return [freeze, *self._fresh(ws, name, ("work",))], (lid, *s.layers)

    def _fresh(self, ws: Path, label: str, drop: Sequence[str] = ("upper", "work")) -> list[_Step]:
        """Steps that trash what ``drop`` of upper/ and work/ hold and make both again, empty."""
        steps: list[_Step] = [self._to_trash(ws / sub, f"{label}.{sub}") for sub in drop
                              if os.path.lexists(ws / sub)]
        return [*steps, _Mkdir(self._rel(ws / "upper")), _Mkdir(self._rel(ws / "work"))]

    def _claim(self, name: str, message: str, *, record_too: bool = False) -> tuple[Path, bool]:
        """``name``'s directory, made (0711) if missing; WorkspaceExists if it has storage."""
        ws = self._ws(name)
        if os.path.lexists(ws / STACK) or (record_too and os.path.lexists(ws / RECORD)):
            raise WorkspaceExists(message)
        return ws, self._ensure_dir(ws, 0o711)

    def _unclaim(self, ws: Path, made: bool) -> None:
        if made:
            with contextlib.suppress(OSError):
                self._fs.rmdir(str(ws))

    # -- workspaces ----------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        """Whether ``name`` has storage (a ``stack.json``)."""
        return os.path.lexists(self._ws(name) / STACK)

    def names(self) -> list[str]:
        """The workspaces that have storage (compare with the Store's names to find orphans)."""
        return [n for n in self._names_in(self._workspaces, "workspace name")
                if os.path.lexists(self._workspaces / n / STACK)]

    def create(self, name: str, base: str, template: str | None = None) -> None:
        """Make the storage of a new workspace: empty upper/ and work/, and its stack.json.

        With a template, the base and template layers are the template's and ``base`` is
        ignored (the daemon may pass the spec's root, which names the template). Nothing is
        left behind when it fails; a crash leaves at most what :meth:`recover` trashes.
        """
        with self._mutex:
            if template is not None:
                tpl = self._load_template(template)
                stack = _StackFile(base=tpl.base, template=template, template_layers=tpl.layers)
            else:
                stack = _StackFile(base=check_base(base))
            ws, made = self._claim(name, f"a workspace named {name!r} already exists: pick another name, "
                                         f"or 'silo rm {name}' first")
            done: list[Path] = []
            try:
                for sub in ("upper", "work"):
                    if os.path.lexists(ws / sub):  # left by a create that crashed
                        self._fs.rename(str(ws / sub), str(self.root / self._to_trash(ws / sub, name).dst))
                    done.append(ws / sub)
                    self._make_private(ws / sub)
                self._write_stack(name, stack)
            except BaseException as e:
                for path in reversed(done):
                    with contextlib.suppress(OSError):
                        self._fs.rmdir(str(path))
                self._unclaim(ws, made)
                if isinstance(e, OSError):
                    raise _os_error(e, f"create the storage of workspace {name!r}") from None
                raise

    def stack(self, name: str) -> Stack:
        """What the planner mounts; refuses a workspace whose layers are missing."""
        with self._mutex:
            s = self._load(name)
            ws = self._ws(name)
            lowers = tuple(str(self._layers / lid) for lid in (*s.layers, *s.template_layers))
            for path in (*lowers, str(ws / "upper"), str(ws / "work")):
                st = _lstat(path)
                if st is None or not stat.S_ISDIR(st.st_mode):
                    raise UserError(f"workspace {name!r} is damaged: {path} is missing; "
                                    f"remove it ('silo rm {name}') and make it again")
            return Stack(s.base, lowers, str(ws / "upper"), str(ws / "work"),
                         str(self._images / s.resume) if s.resume is not None else None)

    def remove(self, name: str) -> None:
        """Trash stack.json (the commit point), upper/, work/ and any journal; the record and
        the directory stay for the Store. Removing a workspace without storage does nothing."""
        with self._mutex:
            ws = self._ws(name)
            if not os.path.isdir(ws):
                return
            try:
                for entry in (STACK, "upper", "work", JOURNAL, CHECKPOINT):
                    if os.path.lexists(ws / entry):
                        self._do(self._to_trash(ws / entry, f"{name}.{entry}"))
                for leftover in os.listdir(ws):
                    if _TMP_RE.fullmatch(leftover):
                        self._fs.unlink(str(ws / leftover))
                self._fs.fsync_dir(str(ws))
            except OSError as e:
                raise _os_error(e, f"remove the storage of workspace {name!r}") from None

    def fork(self, name: str, new_name: str) -> None:
        """A new workspace on ``name``'s layers: its upper is frozen first (if not empty), the
        new one shares the frozen and template layers and gets an empty upper, no snapshots."""
        with self._mutex:
            s = self._load(name)
            message = f"a workspace named {new_name!r} already exists: pick another name for the fork"
            if parse_name(new_name) == name:
                raise WorkspaceExists(message)
            steps, layers = self._freeze(name, s)
            target, made = self._claim(new_name, message)
            try:
                steps += self._fresh(target, new_name)
                if layers != s.layers:
                    steps.append(_WriteStack(name, replace(s, layers=layers), s))
                steps.append(_WriteStack(new_name, replace(s, layers=layers, snapshots=(), resume=None), None))
                self._run(name, f"fork workspace {name!r}", steps)
            except BaseException:
                self._unclaim(target, made)
                raise

    def reset(self, name: str) -> None:
        """Drop the workspace's own layers and upper; template layers and snapshots stay."""
        with self._mutex:
            s = self._load(name)
            self._run(name, f"reset workspace {name!r}",
                      [*self._fresh(self._ws(name), name), _WriteStack(name, replace(s, layers=(), resume=None), s)])

    # -- snapshots -----------------------------------------------------------------------

    def _tag(self, name: str, s: _StackFile, tag: str | None) -> str:
        tags = {snap.tag for snap in s.snapshots}
        if tag is None:
            n = len(tags) + 1
            while f"snap-{n}" in tags:
                n += 1
            return f"snap-{n}"
        if parse_name(tag, "snapshot tag") in tags:
            raise WorkspaceExists(f"workspace {name!r} already has a snapshot {tag!r}: pick another tag, "
                                  f"or delete that snapshot first ('silo snapshot rm {name} {tag}')")
        return tag

    def new_tag(self, name: str, tag: str | None = None) -> str:
        """The tag :meth:`snapshot` would give (``tag`` checked), without snapshotting."""
        with self._mutex:
            return self._tag(name, self._load(name), tag)

    def memory_stage(self, name: str) -> str:
        """A fresh, empty directory of the owner's for ``runsc checkpoint`` to write the
        workspace's memory image in; :meth:`snapshot` with ``memory`` keeps it."""
        with self._mutex:
            stage = self._ws(name) / CHECKPOINT
            try:
                self._drop_stage(name)
                self._make_private(stage)
            except OSError as e:
                raise _os_error(e, f"make room for workspace {name!r}'s memory image") from None
            return str(stage)

    def _drop_stage(self, name: str) -> None:
        stage = self._ws(name) / CHECKPOINT
        if os.path.lexists(stage):
            self._do(self._to_trash(stage, f"{name}.{CHECKPOINT}"))

    def drop_memory_stage(self, name: str) -> None:
        """Trash what :meth:`memory_stage` made, when no snapshot keeps it."""
        with self._mutex, contextlib.suppress(OSError):
            self._drop_stage(name)

    def snapshot(self, name: str, tag: str | None = None, *, memory: bool = False) -> SnapshotInfo:
        """Freeze the upper (when not empty) and name the resulting stack ``tag`` ("snap-N" by
        default). With ``memory`` the image in :meth:`memory_stage` becomes the snapshot's,
        and the next start resumes from it."""
        with self._mutex:
            s = self._load(name)
            tag = self._tag(name, s, tag)
            image = None
            steps: list[_Step] = []
            if memory:
                stage = self._ws(name) / CHECKPOINT
                if not os.path.isfile(stage / "checkpoint.img"):
                    raise InternalError(f"workspace {name!r} has no memory image to keep ({stage} is empty)")
                (image,) = self._new_ids(1)
                steps.append(_Move(self._rel(stage), f"images/{image}"))
            freeze, layers = self._freeze(name, s)
            steps += freeze
            info = SnapshotInfo(tag, self._clock(), memory)
            new = replace(s, layers=layers, snapshots=(*s.snapshots, _Snap(tag, info.created, layers, image)),
                          resume=image if memory else s.resume)
            if steps:
                self._run(name, f"snapshot workspace {name!r}", [*steps, _WriteStack(name, new, s)])
            else:
                self._commit(name, new, f"snapshot workspace {name!r}")
            return info

    def _commit(self, name: str, new: _StackFile, what: str) -> None:
        try:
            self._write_stack(name, new)
        except OSError as e:
            raise _os_error(e, what) from None

    def snapshots(self, name: str) -> list[SnapshotInfo]:
        """The snapshots of ``name``, oldest first."""
        with self._mutex:
            return [SnapshotInfo(s.tag, s.created, s.memory is not None) for s in self._load(name).snapshots]

    def resumes(self, name: str) -> str | None:
        """The tag of the snapshot whose processes the next start resumes, if any."""
        with self._mutex:
            s = self._load(name)
            return next((snap.tag for snap in s.snapshots if s.resume is not None and snap.memory == s.resume),
                        None)

    def take_resume(self, name: str) -> tuple[str, str] | None:
        """The snapshot whose processes the next start resumes and its memory image (tag,
        directory), forgotten here: a start resumes it once, whether it succeeds or not
        (the snapshot keeps the image)."""
        with self._mutex:
            s = self._load(name)
            if s.resume is None:
                return None
            tag = next((snap.tag for snap in s.snapshots if snap.memory == s.resume), s.resume)  # or its image id
            self._commit(name, replace(s, resume=None), f"start workspace {name!r}")
            return tag, str(self._images / s.resume)

    def _find(self, name: str, s: _StackFile, tag: str) -> _Snap:
        parse_name(tag, "snapshot tag")
        for snap in s.snapshots:
            if snap.tag == tag:
                return snap
        raise NotFoundError(f"workspace {name!r} has no snapshot {tag!r}: see 'silo snapshot ls {name}'")

    def delete_snapshot(self, name: str, tag: str) -> None:
        """Forget a snapshot; its layers go to the trash at the next :meth:`gc` unless still used."""
        with self._mutex:
            s = self._load(name)
            snap = self._find(name, s, tag)
            self._commit(name, replace(s, snapshots=tuple(x for x in s.snapshots if x is not snap)),
                         f"delete snapshot {tag!r} of workspace {name!r}")

    def restore(self, name: str, tag: str) -> None:
        """The snapshot's layers become the workspace's, under a fresh empty upper (the old one is trashed)."""
        with self._mutex:
            s = self._load(name)
            snap = self._find(name, s, tag)
            for lid in snap.layers:
                if not os.path.isdir(self._layers / lid):
                    raise UserError(f"snapshot {tag!r} of workspace {name!r} is damaged: layer {lid} is missing; "
                                    f"delete it ('silo snapshot rm {name} {tag}')")
            if snap.memory is not None and not os.path.isdir(self._images / snap.memory):
                raise UserError(f"snapshot {tag!r} of workspace {name!r} is damaged: its memory image "
                                f"{snap.memory} is missing; delete it ('silo snapshot rm {name} {tag}')")
            self._run(name, f"restore snapshot {tag!r} of workspace {name!r}",
                      [*self._fresh(self._ws(name), name),
                       _WriteStack(name, replace(s, layers=snap.layers, resume=snap.memory), s)])

    # -- templates -----------------------------------------------------------------------

    def _template_info(self, tname: str, t: _TemplateFile) -> TemplateInfo:
        return TemplateInfo(tname, t.base, t.source, t.created, tuple(str(self._layers / lid) for lid in t.layers),
                            t.owner)

    def create_template(self, tname: str, source: str, owner: int = 0) -> TemplateInfo:
        """Freeze ``source``'s upper; the template's layers are then ``source``'s whole stack."""
        with self._mutex:
            if os.path.lexists(self._templates / parse_name(tname, "template name") / TEMPLATE):
                raise WorkspaceExists(f"a template named {tname!r} already exists: pick another name, "
                                      f"or 'silo template rm {tname}' first")
            s = self._load(source)
            steps, layers = self._freeze(source, s)
            if layers != s.layers:
                steps.append(_WriteStack(source, replace(s, layers=layers), s))
            tpl = _TemplateFile(s.base, (*layers, *s.template_layers), source, self._clock(), owner)
            self._run(source, f"make template {tname!r} from workspace {source!r}",
                      [*steps, _WriteTemplate(tname, tpl)])
            return self._template_info(tname, tpl)

    def templates(self) -> list[TemplateInfo]:
        with self._mutex:
            return [self._template_info(t, self._load_template(t))
                    for t in self._names_in(self._templates, "template name")
                    if os.path.lexists(self._templates / t / TEMPLATE)]

    def template(self, tname: str) -> TemplateInfo:
        with self._mutex:
            return self._template_info(tname, self._load_template(tname))

    def remove_template(self, tname: str) -> None:
        """Trash a template; refused while a workspace's stack names it (its layers stay
        until :meth:`gc` finds nothing using them)."""
        with self._mutex:
            self._load_template(tname)
            users = [n for n in self.names() if self._load(n).template == tname]
            if users:
                more = f" (and {len(users) - 1} more)" if len(users) > 1 else ""
                raise WorkspaceStateError(f"cannot remove template {tname!r}: workspace {users[0]!r}{more} is made "
                                          f"from it; remove {'them' if more else 'it'} first")
            try:
                self._do(self._to_trash(self._templates / tname, f"template.{tname}"))
                self._fs.fsync_dir(str(self._templates))
            except OSError as e:
                raise _os_error(e, f"remove template {tname!r}") from None

    # -- reading the files ---------------------------------------------------------------

    def diff(self, name: str) -> list[Change]:
        """The workspace's own changes (upper and own layers against template layers and
        base), sorted by path. A directory that exists below is reported only when its
        type or mode changed or it is opaque (its content replaced)."""
        with self._mutex:
            s = self._load(name)
            own = [str(self._ws(name) / "upper"), *(str(self._layers / lid) for lid in s.layers)]
            below = [str(self._layers / lid) for lid in s.template_layers]
            base = "/" if s.base == "host" else s.base
        out: list[Change] = []
        targets = sorted({t for layer in own if os.path.isdir(layer) for t in os.listdir(layer)})
        for target in targets:
            dirs = [d for d in (os.path.join(layer, target) for layer in own) if os.path.isdir(d)
                    and not os.path.islink(d)]
            base_dir = base if target == "root" else os.path.join(base, target)
            prefix = "/" if target == "root" else f"/{target}/"
            self._diff_dir(dirs, "", [*(os.path.join(b, target) for b in below), base_dir], prefix, out)
        return sorted(out, key=lambda c: (c.path, c.kind))

    def _diff_dir(self, dirs: list[str], rel: str, below: list[str], prefix: str, out: list[Change]) -> None:
        todo = [(dirs, rel)]
        while todo:
            dirs, rel = todo.pop()
            top: dict[str, tuple[int, str, os.stat_result]] = {}
            for index, directory in enumerate(dirs):
                with contextlib.suppress(OSError), os.scandir(directory) as it:
                    for entry in it:
                        if entry.name not in top:
                            top[entry.name] = (index, entry.path, entry.stat(follow_symlinks=False))
            for entry_name, (index, path, st) in top.items():
                sub = f"{rel}/{entry_name}" if rel else entry_name
                was = _lookup(below, sub)
                if is_whiteout(path, st):
                    if was is not None:
                        out.append(Change("deleted", prefix + sub))
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    out.append(Change("added" if was is None else "changed", prefix + sub))
                    continue
                opaque = is_opaque(path)
                if was is None:
                    out.append(Change("added", prefix + sub))
                elif opaque or not stat.S_ISDIR(was.st_mode) or stat.S_IMODE(was.st_mode) != stat.S_IMODE(st.st_mode):
                    out.append(Change("changed", prefix + sub))
                children = [path]
                for lower in ([] if opaque else dirs[index + 1:]):
                    candidate = os.path.join(lower, entry_name)
                    cst = _lstat(candidate)
                    if cst is None:
                        continue
                    if not stat.S_ISDIR(cst.st_mode):
                        break  # a whiteout or a file hides the rest
                    children.append(candidate)
                    if is_opaque(candidate):
                        break
                todo.append((children, sub))

    def usage(self, name: str) -> int:
        """Bytes the upper and own layers take on disk (allocated blocks, hard links once)."""
        with self._mutex:
            s = self._load(name)
            tops = [str(self._ws(name) / "upper"), *(str(self._layers / lid) for lid in s.layers)]
        seen: set[tuple[int, int]] = set()
        total = 0
        for top in tops:
            for st in _scan(top):
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
        return total

    # -- maintenance ---------------------------------------------------------------------

    def recover(self) -> None:
        """At daemon start: roll every journal forward, give a workspace with layers but no
        upper/work fresh ones, trash the leftovers of cut-short creates, removes, templates
        and imports, and delete temporary files. Raises InternalError naming what it could
        not finish (the rest is done)."""
        with self._mutex:
            problems = []
            names = self._names_in(self._workspaces, "workspace name")
            for name in names:
                ws = self._workspaces / name
                for leftover in os.listdir(ws):
                    if _TMP_RE.fullmatch(leftover):
                        self._fs.unlink(str(ws / leftover))
                try:
                    self._replay(ws / JOURNAL)
                except (SiloError, OSError, ValueError) as e:
                    problems.append(f"workspace {name!r}: {e}")
            for name in names:
                ws = self._workspaces / name
                if os.path.lexists(ws / JOURNAL):
                    continue
                if os.path.lexists(ws / STACK):
                    steps: list[_Step] = [_Mkdir(self._rel(ws / sub)) for sub in ("upper", "work")
                                          if not os.path.lexists(ws / sub)]
                else:
                    steps = [self._to_trash(ws / sub, f"{name}.{sub}") for sub in ("upper", "work")
                             if os.path.lexists(ws / sub)]
                if os.path.lexists(ws / CHECKPOINT):  # a snapshot --memory the crash cut short
                    steps.append(self._to_trash(ws / CHECKPOINT, f"{name}.{CHECKPOINT}"))
                for step in steps:
                    self._do(step)
            for tname in self._names_in(self._templates, "template name"):
                directory = self._templates / tname
                for leftover in os.listdir(directory):
                    if _TMP_RE.fullmatch(leftover):
                        self._fs.unlink(str(directory / leftover))
                if not os.path.lexists(directory / TEMPLATE):
                    self._do(self._to_trash(directory, f"template.{tname}"))
            for entry in os.listdir(self._staging):
                self._do(self._to_trash(self._staging / entry, f"staging.{entry}"))
            if problems:
                raise InternalError("could not finish an interrupted storage operation: " + "; ".join(problems))

    def _replay(self, journal: Path) -> None:
        untrusted = _read_json(journal, "")
        if untrusted is None:
            return
        top = _table(untrusted, ("format", "op", "steps"), "the journal")
        if top["format"] != FORMAT or not isinstance(top["steps"], list):
            raise ValueError(f"{journal}: not a journal of this version of silo")
        self._play([_step_from_json(s) for s in top["steps"]], [])
        self._fs.unlink(str(journal))
        self._fs.fsync_dir(str(journal.parent))

    def gc(self) -> None:
        """Trash the layers and memory images no stack, snapshot or template uses. Does nothing while a journal
        is pending (:meth:`recover` first), and nothing at all if any file cannot be read."""
        with self._mutex:
            used: set[str] = set()
            images: set[str] = set()
            for name in self._names_in(self._workspaces, "workspace name"):
                if os.path.lexists(self._workspaces / name / JOURNAL):
                    return
                if os.path.lexists(self._workspaces / name / STACK):
                    stack = self._load(name)
                    used |= stack.all_layers()
                    images |= stack.all_images()
            for tname in self._names_in(self._templates, "template name"):
                if os.path.lexists(self._templates / tname / TEMPLATE):
                    used |= set(self._load_template(tname).layers)
            try:
                for lid in os.listdir(self._layers):
                    if _ID_RE.fullmatch(lid) and lid not in used:
                        self._do(self._to_trash(self._layers / lid, f"layer.{lid}"))
                self._fs.fsync_dir(str(self._layers))
                for iid in os.listdir(self._images):
                    if _ID_RE.fullmatch(iid) and iid not in images:
                        self._do(self._to_trash(self._images / iid, f"image.{iid}"))
                self._fs.fsync_dir(str(self._images))
            except OSError as e:
                raise _os_error(e, "collect unused layers") from None

    def empty_trash(self) -> None:
        """Delete what is in the trash (slow: call it in the background). Entries are listed
        under the lock, so an operation that is still undoing its steps keeps its own; an
        entry with a mount point inside is left alone and named in the InternalError raised."""
        with self._mutex:
            entries = sorted(os.listdir(self._trash))
        prefix = str(self._trash) + "/"
        mounts = [m for m in _mount_points() if m.startswith(prefix)]
        problems = []
        for entry in entries:
            path = self._trash / entry
            if any(m == str(path) or m.startswith(f"{path}/") for m in mounts):
                problems.append(f"{path} has a mount point inside")
                continue
            try:
                remove_tree(path)
            except OSError as e:
                problems.append(f"{path}: {e.strerror}")
        if problems:
            raise InternalError(f"could not empty the trash: {problems[0]}"
                                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))

    # -- for silo.store.archive ----------------------------------------------------------

    @contextlib.contextmanager
    def staging(self, label: str) -> Iterator[Path]:
        """A fresh private directory under ``staging/``, deleted on the way out (whatever happens)."""
        path = self._staging / f"{label}-{secrets.token_hex(8)}"
        os.mkdir(path, 0o700)
        try:
            yield path
        finally:
            try:
                remove_tree(path)
            except OSError:
                with contextlib.suppress(OSError):
                    os.rename(path, self._trash / path.name)

    def adopt(self, name: str, base: str, layers: Sequence[Path], upper: Path) -> None:
        """The end of an import: directories under :meth:`staging` become the new workspace
        ``name``'s own layers (top first) and its upper. WorkspaceExists if ``name`` has
        storage or a record."""
        with self._mutex:
            if len(layers) > MAX_LAYERS:
                raise WorkspaceStateError(f"the workspace has {len(layers)} layers, the most is {MAX_LAYERS}")
            for path in (*layers, upper):
                if path.parent.parent != self._staging or not os.path.isdir(path) or os.path.islink(path):
                    raise InternalError(f"{path} is not a staged layer")
            ws, made = self._claim(name, f"a workspace named {name!r} already exists: import it under another "
                                         "name", record_too=True)
            try:
                ids = self._new_ids(len(layers))
                steps: list[_Step] = [self._to_trash(ws / sub, f"{name}.{sub}") for sub in ("upper", "work")
                                      if os.path.lexists(ws / sub)]
                steps += [_Move(self._rel(p), f"layers/{lid}") for p, lid in zip(layers, ids, strict=True)]
                steps += [_Move(self._rel(upper), self._rel(ws / "upper")), _Mkdir(self._rel(ws / "upper")),
                          _Mkdir(self._rel(ws / "work")),
                          _WriteStack(name, _StackFile(base=check_base(base), layers=tuple(ids)), None)]
                self._run(name, f"import workspace {name!r}", steps)
            except BaseException:
                self._unclaim(ws, made)
                raise
