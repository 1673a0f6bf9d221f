"""Workspace records on disk: one JSON file per workspace, replaced atomically, one owner.

Layout under the store's root (mode 0700)::

    lock                           flock()ed by the daemon that owns the store; holds its pid
    workspaces/<name>/record.json  the WorkspaceRecord (silo.model.workspace), JSON

Contracts:

* **One owner.** :class:`Store` takes an exclusive, non-blocking ``flock`` on ``lock``
  when it is made; a second store on the same root (another daemon, or a second object
  in this one) fails with :class:`StoreLocked` naming the holder's pid. The lock dies
  with its process, so a SIGKILLed daemon never leaves a stale lock.
* **Atomic.** A record is written to a temporary file in its own directory, fsynced,
  renamed over ``record.json`` and the directory fsynced: after a crash at any point the
  file is the old record or the new one, never a mix. Temporary files a crash left
  behind are removed when the store is opened (the lock says nobody else is writing).
* **Untrusted on the way back.** A record read from disk may have been hand-edited or
  truncated: it is size-limited, parsed with no NaN/Infinity, validated by
  :meth:`WorkspaceRecord.from_dict`, and must name the directory it lies in. Anything
  else is a one-line :class:`CorruptRecord` naming the file.
* **Names before paths.** Every name is checked by :func:`parse_name` before it is
  joined to a path, so no name reaches outside ``workspaces/``; record files are
  opened with ``O_NOFOLLOW`` and a workspace directory that is a symlink is refused.
* **Never a recursive delete.** :meth:`Store.delete` removes the record, then the
  directory only if it is empty: removing a tree could cross a mount point left behind
  (a mapped host folder) and delete the host's files. The storage layer removes its own
  files first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from silo.model.errors import InternalError, NotFoundError, SpecError, StoreFull, UserError, WorkspaceExists
from silo.model.workspace import State, WorkspaceRecord, check_transition, parse_name

RECORD = "record.json"
LOCK = "lock"
WORKSPACES = "workspaces"
MAX_RECORD_BYTES = 1 << 20
_TMP_PREFIX = f".{RECORD}."
_TMP_SUFFIX = ".tmp"


class StoreLocked(UserError):
    """Another daemon (or another Store in this process) owns the store directory."""


class CorruptRecord(UserError):
    """A record file that cannot be read back as a valid record; names the file."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(f"{path}: corrupt workspace record: {detail}; fix the file, "
                         f"or remove {path.parent} to forget the workspace")
        self.path = path


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not a number a record may hold")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """The records of one daemon's workspaces; see the module docstring for the contracts.

    Thread-safe: a lock in the object serializes writes, so :meth:`transition`'s
    read-check-write is atomic against other threads of the same daemon.
    """

    def __init__(self, root: str | os.PathLike[str], *, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self._clock = clock
        self._mutex = threading.RLock()
        self._workspaces = self.root / WORKSPACES
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._workspaces.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise UserError(f"cannot open the store {self.root}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StoreLocked(f"another silo daemon (pid {holder}) owns the store {self.root}: "
                              "stop it first, or give this one another state directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd: int | None = fd
        self._remove_temp_files()

    # -- ownership ---------------------------------------------------------------------

    def close(self) -> None:
        """Release the lock; the object is unusable afterwards."""
        with self._mutex:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # closing the only descriptor releases the flock
                self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._lock_fd is None:
            raise InternalError(f"the store {self.root} was closed")

    # -- paths -------------------------------------------------------------------------

    def workspace_dir(self, name: str) -> Path:
        """The directory of workspace ``name`` (validated; it may not exist yet)."""
        path = self._workspaces / parse_name(name)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return path
        if not stat.S_ISDIR(mode):
            raise CorruptRecord(path / RECORD, f"{path} is not a directory (a symlink?)")
        return path

    def _record_path(self, name: str) -> Path:
        return self.workspace_dir(name) / RECORD

    # -- reading -----------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        return self._record_path(name).is_file()

    def names(self) -> list[str]:
        """Names of the workspaces that have a record (directories with other names are skipped)."""
        self._check_open()
        out = []
        for entry in sorted(os.listdir(self._workspaces)):
            try:
                parse_name(entry)
            except SpecError:
                continue  # not ours: no valid name ever made it
            if os.path.isfile(self._workspaces / entry / RECORD):
                out.append(entry)
        return out

    def load(self, name: str) -> WorkspaceRecord:
        """The record of ``name``; NotFoundError if there is none, CorruptRecord if it is bad."""
        self._check_open()
        path = self._record_path(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFoundError(f"no workspace named {name!r}: see 'silo ls'") from None
        except OSError as e:
            reason = "it is a symbolic link" if e.errno == errno.ELOOP else e.strerror
            raise CorruptRecord(path, f"cannot open it: {reason}") from None
        with os.fdopen(fd, "rb") as f:
            untrusted_data = f.read(MAX_RECORD_BYTES + 1)
        if len(untrusted_data) > MAX_RECORD_BYTES:
            raise CorruptRecord(path, f"it is larger than {MAX_RECORD_BYTES} bytes")
        try:
            untrusted = json.loads(untrusted_data, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:
            raise CorruptRecord(path, f"not valid JSON ({e})") from None
        try:
            record = WorkspaceRecord.from_dict(untrusted)
        except SpecError as e:
            raise CorruptRecord(path, e.message) from None
        if record.name != name:
            raise CorruptRecord(path, f"it is the record of {record.name!r}, in the directory of {name!r}")
        return record

    def load_all(self) -> tuple[list[WorkspaceRecord], list[CorruptRecord]]:
        """Every record, and the errors of those that cannot be read (``silo ls`` shows both)."""
        records, problems = [], []
        for name in self.names():
            try:
                records.append(self.load(name))
            except CorruptRecord as e:
                problems.append(e)
            except NotFoundError:
                continue  # removed since it was listed
        return records, problems

    # -- writing -----------------------------------------------------------------------

    def create(self, record: WorkspaceRecord) -> None:
        """Save the first record of a workspace; WorkspaceExists if the name is taken.

        A directory without a record (left by a create that crashed before its record
        was written) is reused.
        """
        with self._mutex:
            self._check_open()
            if self.exists(record.name):
                raise WorkspaceExists(f"a workspace named {record.name!r} already exists: "
                                      f"pick another name, or 'silo rm {record.name}' first")
            directory = self.workspace_dir(record.name)
            directory.mkdir(mode=0o700, exist_ok=True)
            _fsync_dir(self._workspaces)
            self._write(record)

    def save(self, record: WorkspaceRecord) -> None:
        """Replace the record of an existing workspace (atomically)."""
        with self._mutex:
            self._check_open()
            if not self.exists(record.name):
                raise NotFoundError(f"no workspace named {record.name!r}: see 'silo ls'")
            self._write(record)

    def transition(self, name: str, new_state: State, **changes: object) -> WorkspaceRecord:
        """Move ``name`` to ``new_state`` (the table must allow it), with other field changes.

        ``changes`` are :class:`WorkspaceRecord` fields (``error=...``, ``snapshots=...``);
        ``updated`` is set from the clock. Returns the saved record.
        """
        with self._mutex:
            record = self.load(name)
            check_transition(name, record.state, new_state)
            return self._replace(record, state=new_state, **changes)

    def update(self, name: str, **changes: object) -> WorkspaceRecord:
        """Change fields of ``name``'s record without a state change (e.g. a new snapshot)."""
        if "state" in changes:
            raise TypeError("update() does not change the state: use transition()")
        with self._mutex:
            return self._replace(self.load(name), **changes)

    def delete(self, name: str) -> bool:
        """Forget ``name``: remove its record, then its directory if empty (True if it was).

        The record's removal is the commit point: afterwards the workspace does not exist,
        whatever is left in its directory.
        """
        with self._mutex:
            self._check_open()
            directory = self.workspace_dir(name)
            try:
                os.unlink(directory / RECORD)
            except FileNotFoundError:
                raise NotFoundError(f"no workspace named {name!r}: see 'silo ls'") from None
            _fsync_dir(directory)
            try:
                directory.rmdir()
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    return False
                raise
            _fsync_dir(self._workspaces)
            return True

    def _replace(self, record: WorkspaceRecord, **changes: object) -> WorkspaceRecord:
        try:
            new = dataclasses.replace(record, updated=self._clock(), **changes)  # type: ignore[arg-type]
        except SpecError as e:
            raise InternalError(f"workspace {record.name!r}: bad record change: {e.message}") from None
        if new.name != record.name:
            raise InternalError(f"workspace {record.name!r}: a record change cannot rename it")
        self._write(new)
        return new

    def _write(self, record: WorkspaceRecord) -> None:
        """Temp file in the same directory, fsync, rename over the record, fsync the directory."""
        directory = self.workspace_dir(record.name)
        data = (json.dumps(record.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
        try:
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX, dir=directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, directory / RECORD)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            _fsync_dir(directory)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(f"no space left to save workspace {record.name!r} in {directory}: "
                                "free some space and try again") from None
            raise InternalError(f"cannot save the record of {record.name!r} in {directory}: {e}") from None

    def _remove_temp_files(self) -> None:
        """Temp files of writes a crash interrupted (the lock says no writer is alive)."""
        for directory in self._workspaces.iterdir():
            if directory.is_symlink() or not directory.is_dir():
                continue
            for leftover in directory.glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}"):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
