"""The daemon's store: atomic records, one owner, hostile names and corrupt files refused cleanly."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from silo.model.errors import InternalError, NotFoundError, SpecError, UserError
from silo.model.workspace import (
    IllegalTransition,
    Snapshot,
    State,
    WorkspaceExists,
    WorkspaceRecord,
    WorkspaceSpec,
)
from silo.store import CorruptRecord, Store, StoreFull, StoreLocked

T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        self.now += 1
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state", clock=Clock()) as s:
        yield s


def _record(name: str = "web", state: State = State.CREATED, **spec: object) -> WorkspaceRecord:
    return WorkspaceRecord(spec=WorkspaceSpec(name, **spec), state=state, created=T0, updated=T0)  # type: ignore[arg-type]


def _file(store: Store, name: str = "web") -> Path:
    return store.root / "workspaces" / name / "record.json"


# basics -------------------------------------------------------------------------------------


def test_create_load_list_delete(store: Store) -> None:
    record = _record()
    store.create(record)
    store.create(_record("db"))
    assert store.load("web") == record
    assert store.names() == ["db", "web"]
    assert store.exists("web") and not store.exists("nope")
    path = _file(store)
    assert json.loads(path.read_text())["spec"]["name"] == "web"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    assert store.delete("web") is True
    assert not path.parent.exists()
    assert store.names() == ["db"]
    with pytest.raises(NotFoundError, match="no workspace named 'web': see 'silo ls'"):
        store.load("web")
    with pytest.raises(NotFoundError):
        store.delete("web")


def test_create_refuses_a_taken_name(store: Store) -> None:
    store.create(_record())
    with pytest.raises(WorkspaceExists, match="a workspace named 'web' already exists: pick another name"):
        store.create(_record(state=State.STOPPED))
    assert store.load("web").state is State.CREATED


def test_create_reuses_a_directory_without_a_record(store: Store) -> None:
    (store.root / "workspaces" / "web").mkdir()
    store.create(_record())
    assert store.load("web").name == "web"


def test_save_needs_an_existing_workspace(store: Store) -> None:
    with pytest.raises(NotFoundError):
        store.save(_record())


def test_delete_never_removes_what_it_did_not_write(store: Store) -> None:
    store.create(_record())
    leftover = _file(store).parent / "upper"
    leftover.mkdir()
    (leftover / "file").write_text("data")
    assert store.delete("web") is False  # the record is gone; the directory stays for the storage layer
    assert not store.exists("web") and (leftover / "file").read_text() == "data"
    assert store.names() == []


# transitions --------------------------------------------------------------------------------


def test_transition_checks_the_table_and_stamps_the_time(store: Store) -> None:
    store.create(_record())
    running = store.transition("web", State.RUNNING)
    assert running.state is State.RUNNING and running.updated == T0 + 1 and running.created == T0
    assert store.load("web") == running
    broken = store.transition("web", State.BROKEN, error="init died: signal 9")
    assert store.load("web").error == "init died: signal 9"
    with pytest.raises(IllegalTransition, match="no transition from broken to running"):
        store.transition("web", State.RUNNING)
    assert store.load("web") == broken  # nothing written
    stopped = store.transition("web", State.STOPPED)
    assert stopped.error == "init died: signal 9"  # the last error stays until replaced


def test_update_changes_fields_without_a_state_change(store: Store) -> None:
    store.create(_record(state=State.STOPPED))
    updated = store.update("web", snapshots=(Snapshot("clean", T0),))
    assert store.load("web").snapshots == (Snapshot("clean", T0),)
    assert updated.state is State.STOPPED
    with pytest.raises(TypeError):
        store.update("web", state=State.RUNNING)


def test_bad_changes_are_internal_errors(store: Store) -> None:
    store.create(_record())
    with pytest.raises(InternalError, match="cannot rename"):
        store.update("web", spec=WorkspaceSpec("other"))
    with pytest.raises(InternalError, match="bad record change"):
        store.update("web", template="Bad/Name")
    assert store.load("web") == _record()


# atomicity ----------------------------------------------------------------------------------


def test_a_failed_rename_leaves_the_old_record(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store.create(_record())
    before = _file(store).read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError(errno.EIO, "simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(InternalError, match="cannot save the record of 'web'"):
        store.transition("web", State.RUNNING)
    monkeypatch.undo()
    assert _file(store).read_bytes() == before
    assert store.load("web").state is State.CREATED
    assert os.listdir(_file(store).parent) == ["record.json"]  # the temp file was removed


def test_a_full_disk_is_a_user_error_and_keeps_the_old_record(store: Store,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    store.create(_record())
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StoreFull, match=r"no space left to save workspace 'web'.*free some space") as info:
        store.transition("web", State.RUNNING)
    assert isinstance(info.value, UserError)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert store.load("web").state is State.CREATED


def test_a_crash_after_the_temp_write_is_cleaned_up_on_open(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        store.create(_record())
        good = _file(store).read_bytes()
    # what a SIGKILL between write and rename leaves: a complete or partial temp file
    stray = tmp_path / "workspaces" / "web" / ".record.json.abc123.tmp"
    stray.write_text('{"format": 1, "spec": {"na')
    other = tmp_path / "workspaces" / "web" / "keep.tmp"  # not ours: left alone
    other.write_text("x")
    with Store(tmp_path) as store:
        assert not stray.exists() and other.exists()
        assert _file(store).read_bytes() == good
        assert store.load("web") == _record()


# corrupt records ----------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "detail"), [
    (b"", "not valid JSON"),
    (b'{"format": 1, "spec": {"name": "web"', "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[]", "must be a table"),
    (b'{"format": 1, "spec": {"name": "web"}, "state": "running", "created": NaN, "updated": 1}',
     "NaN is not a number a record may hold"),
    (b'{"format": 1, "spec": {"name": "web"}, "state": "exploded", "created": 1, "updated": 1}',
     "state: unknown state the string 'exploded'"),
    (b'{"format": 1, "spec": {"name": "web", "limits": {"memory": "lots"}}, "state": "running", '
     b'"created": 1, "updated": 1}', "spec.limits.memory: bad memory size 'lots'"),
    (b'{"format": 1, "spec": {"name": "db"}, "state": "running", "created": 1, "updated": 1}',
     "it is the record of 'db', in the directory of 'web'"),
    (b'{"format": 7, "spec": {"name": "web"}, "state": "running", "created": 1, "updated": 1}',
     "record format 7 is not 1"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
])
def test_corrupt_records_are_one_line_errors_naming_the_file(store: Store, content: bytes, detail: str) -> None:
    store.create(_record())
    _file(store).write_bytes(content)
    with pytest.raises(CorruptRecord) as info:
        store.load("web")
    message = info.value.message
    assert isinstance(info.value, UserError)
    assert "\n" not in message
    assert message.startswith(f"{_file(store)}: corrupt workspace record: ")
    assert detail in message
    assert message.endswith(f"fix the file, or remove {_file(store).parent} to forget the workspace")
    assert info.value.path == _file(store)


def test_a_corrupt_spec_reports_its_own_path(store: Store) -> None:
    store.create(_record())
    data = json.loads(_file(store).read_text())
    data["spec"]["mount"] = [{"source": "rel", "target": "/x"}]
    _file(store).write_text(json.dumps(data))
    with pytest.raises(CorruptRecord, match=r"spec\.mount\[0\]\.source: bad mount source 'rel'"):
        store.load("web")


def test_an_oversized_record(store: Store) -> None:
    store.create(_record())
    _file(store).write_bytes(b" " * ((1 << 20) + 1))
    with pytest.raises(CorruptRecord, match="larger than"):
        store.load("web")


def test_symlinks_are_refused(store: Store, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    store.create(_record())
    elsewhere.write_bytes(_file(store).read_bytes())
    _file(store).unlink()
    _file(store).symlink_to(elsewhere)
    with pytest.raises(CorruptRecord, match="cannot open it: it is a symbolic link"):
        store.load("web")
    target_dir = tmp_path / "victim"
    target_dir.mkdir()
    (store.root / "workspaces" / "evil").symlink_to(target_dir)
    with pytest.raises(CorruptRecord, match="is not a directory"):
        store.load("evil")
    with pytest.raises(CorruptRecord):
        store.create(_record("evil"))
    assert list(target_dir.iterdir()) == []


def test_load_all_separates_good_and_corrupt(store: Store) -> None:
    for name in ("a", "b", "c"):
        store.create(_record(name))
    _file(store, "b").write_text("{}")
    (store.root / "workspaces" / "Not-A-Name").mkdir()  # never a workspace: skipped
    (store.root / "workspaces" / "empty").mkdir()  # no record: skipped
    records, problems = store.load_all()
    assert [r.name for r in records] == ["a", "c"]
    assert len(problems) == 1 and problems[0].path == _file(store, "b")


# hostile names ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "a/b", "", "x" * 64, "..", ".", "/etc", "A", "a\0b", "../../tmp/pwn"])
def test_hostile_names_never_become_paths(store: Store, tmp_path: Path, name: str) -> None:
    before = sorted(p for p in tmp_path.rglob("*"))
    for call in (lambda: store.load(name), lambda: store.delete(name), lambda: store.exists(name),
                 lambda: store.workspace_dir(name), lambda: store.transition(name, State.RUNNING),
                 lambda: store.update(name, error="x")):
        with pytest.raises(SpecError, match="bad workspace name"):
            call()
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_records_cannot_be_built_with_hostile_names() -> None:
    with pytest.raises(SpecError):
        _record("../x")


# one owner ----------------------------------------------------------------------------------


def test_a_second_store_on_the_same_root_fails_clearly(tmp_path: Path) -> None:
    first = Store(tmp_path)
    with pytest.raises(StoreLocked) as info:
        Store(tmp_path)
    assert info.value.message == (f"another silo daemon (pid {os.getpid()}) owns the store {tmp_path}: "
                                  "stop it first, or give this one another state directory")
    first.close()
    with Store(tmp_path) as second:
        second.create(_record())
    with pytest.raises(InternalError, match="was closed"):
        first.load("web")


def test_the_lock_dies_with_its_process(tmp_path: Path) -> None:
    code = ("import sys, time; from silo.store import Store; s = Store(sys.argv[1]); "
            "print('ready', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLocked, match=f"pid {holder.pid}"):
            Store(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with Store(tmp_path) as store:  # no stale lock after a SIGKILL
        assert store.names() == []
