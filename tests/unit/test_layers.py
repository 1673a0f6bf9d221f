"""Workspace storage: layers, snapshots, templates, diff, gc, and recovery from a crash at any step."""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from silo.model.errors import (
    InternalError,
    NotFoundError,
    SpecError,
    StoreFull,
    UserError,
    WorkspaceExists,
    WorkspaceStateError,
)
from silo.store import layers
from silo.store.layers import MAX_LAYERS, Change, SnapshotInfo, Storage

IS_ROOT = os.geteuid() == 0
OWNER = (100_000, 100_000) if IS_ROOT else (os.getuid(), os.getgid())
T0 = 1_700_000_000.0


def storage(root: Path) -> Storage:
    return Storage(root, OWNER, clock=functools.partial(next, itertools.count(T0 + 1)))


@pytest.fixture
def s(tmp_path: Path) -> Storage:
    return storage(tmp_path / "state")


def put(s: Storage, name: str, rel: str, data: bytes = b"x") -> Path:
    path = Path(s.stack(name).upper) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def view(s: Storage, name: str) -> dict[str, bytes]:
    """The files the workspace sees (upper over its lowers; these tests make no whiteouts)."""
    stack = s.stack(name)
    out: dict[str, bytes] = {}
    for top in (stack.upper, *stack.lowers):
        for dirpath, _, files in os.walk(top):
            for f in files:
                rel = os.path.relpath(os.path.join(dirpath, f), top)
                out.setdefault(rel, Path(dirpath, f).read_bytes())
    return out


def on_template(s: Storage, template_file: str) -> layers.TemplateInfo:
    """Template 'py' (made from 'src', with ``template_file``) and 'web' on it, snapshot 'one' of root/a."""
    s.create("src", "host")
    put(s, "src", template_file, b"template")
    tpl = s.create_template("py", "src")
    s.create("web", "host", "py")
    put(s, "web", "root/a", b"a")
    s.snapshot("web", "one")
    return tpl


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def trash(s: Storage) -> list[str]:
    return os.listdir(s.root / "trash")


# create and stack ---------------------------------------------------------------------------


def test_create_makes_private_dirs_and_a_stack(s: Storage) -> None:
    s.create("web", "host")
    stack = s.stack("web")
    ws = s.root / "workspaces" / "web"
    assert stack == layers.Stack("host", (), str(ws / "upper"), str(ws / "work"))
    for path in (ws / "upper", ws / "work"):
        assert mode(path) == 0o700
        assert (os.lstat(path).st_uid, os.lstat(path).st_gid) == OWNER
    for path in (s.root, s.root / "layers", s.root / "workspaces", ws):
        assert mode(path) == 0o711
    assert json.loads((ws / "stack.json").read_text()) == {
        "format": 1, "layers": [], "template": None, "template_layers": [], "base": "host", "snapshots": []}
    assert s.exists("web") and s.names() == ["web"]


def test_create_fixes_the_mode_the_store_gave_the_workspace_dir(s: Storage) -> None:
    (s.root / "workspaces" / "web").mkdir(mode=0o700)
    s.create("web", "/srv/image")
    assert mode(s.root / "workspaces" / "web") == 0o711
    assert s.stack("web").base == "/srv/image"


def test_create_refusals(s: Storage) -> None:
    s.create("web", "host")
    with pytest.raises(WorkspaceExists, match="a workspace named 'web' already exists: pick another name"):
        s.create("web", "host")
    with pytest.raises(NotFoundError, match=r"^template 'py' does not exist: run 'silo template ls'$"):
        s.create("db", "host", "py")
    with pytest.raises(SpecError, match=r"bad workspace name '\.\./x'"):
        s.create("../x", "host")
    with pytest.raises(SpecError, match="bad base 'rel/dir': use 'host' or an absolute path"):
        s.create("db", "rel/dir")
    assert not (s.root / "workspaces" / "db").exists()
    with pytest.raises(NotFoundError, match="no workspace named 'nope': see 'silo ls'"):
        s.stack("nope")


def test_a_failed_create_leaves_nothing(s: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(path: str, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(s._fs, "write_new", full)
    with pytest.raises(StoreFull, match="no space left to create the storage of workspace 'web': free some space"):
        s.create("web", "host")
    assert os.listdir(s.root / "workspaces") == []


def test_stack_refuses_a_missing_layer(s: Storage) -> None:
    s.create("web", "host")
    put(s, "web", "root/a")
    s.snapshot("web")
    (lower,) = s.stack("web").lowers
    os.rename(lower, s.root / "gone")
    with pytest.raises(UserError, match=rf"workspace 'web' is damaged: {lower} is missing; remove it"):
        s.stack("web")


def test_corrupt_stack_is_one_line(s: Storage) -> None:
    s.create("web", "host")
    (s.root / "workspaces" / "web" / "stack.json").write_text('{"format": 1}')
    with pytest.raises(UserError, match=r"stack.json: corrupt workspace storage: it must be an object with exactly"):
        s.stack("web")


# snapshots ----------------------------------------------------------------------------------


def test_snapshot_freezes_the_upper_into_a_layer(s: Storage) -> None:
    s.create("web", "host")
    put(s, "web", "root/etc/a", b"A")
    work_before = os.lstat(s.stack("web").work).st_ino
    info = s.snapshot("web")
    assert info == SnapshotInfo("snap-1", T0 + 1)
    stack = s.stack("web")
    (lower,) = stack.lowers
    assert Path(lower).parent == s.root / "layers" and len(Path(lower).name) == 16
    assert Path(lower, "root/etc/a").read_bytes() == b"A"
    assert os.listdir(stack.upper) == []
    assert os.lstat(stack.work).st_ino != work_before  # the old work dir went to the trash
    assert len(trash(s)) == 1
    assert s.snapshots("web") == [info]


def test_snapshot_of_an_empty_upper_adds_no_layer(s: Storage) -> None:
    s.create("web", "host")
    for target in ("root", "usr", "var/lib/dpkg", "var/cache/apt"):  # the sandbox builder's target dirs
        os.makedirs(Path(s.stack("web").upper) / target)
    s.snapshot("web", "empty")
    assert s.stack("web").lowers == ()
    assert [x.tag for x in s.snapshots("web")] == ["empty"]
    (Path(s.stack("web").upper) / "var/lib/dpkg/status").write_text("changed\n")
    s.snapshot("web", "changed")
    assert len(s.stack("web").lowers) == 1


def test_snapshot_tags(s: Storage) -> None:
    s.create("web", "host")
    assert s.snapshot("web").tag == "snap-1"
    assert s.snapshot("web", "snap-2").tag == "snap-2"
    assert s.snapshot("web").tag == "snap-3"
    with pytest.raises(WorkspaceExists, match="workspace 'web' already has a snapshot 'snap-1': pick another tag"):
        s.snapshot("web", "snap-1")
    with pytest.raises(SpecError, match="bad snapshot tag 'Bad'"):
        s.snapshot("web", "Bad")
    s.delete_snapshot("web", "snap-2")
    assert [x.tag for x in s.snapshots("web")] == ["snap-1", "snap-3"]
    with pytest.raises(NotFoundError, match="workspace 'web' has no snapshot 'snap-2': see 'silo snapshot ls web'"):
        s.delete_snapshot("web", "snap-2")


def test_restore_drops_later_changes(s: Storage) -> None:
    s.create("web", "host")
    put(s, "web", "root/a", b"1")
    s.snapshot("web", "one")
    one = s.stack("web").lowers
    put(s, "web", "root/a", b"2")
    put(s, "web", "root/b")
    s.snapshot("web", "two")
    put(s, "web", "root/c")
    assert view(s, "web") == {"root/a": b"2", "root/b": b"x", "root/c": b"x"}
    s.restore("web", "one")
    assert s.stack("web").lowers == one
    assert view(s, "web") == {"root/a": b"1"}
    s.restore("web", "two")
    assert view(s, "web") == {"root/a": b"2", "root/b": b"x"}
    with pytest.raises(NotFoundError, match="workspace 'web' has no snapshot 'three'"):
        s.restore("web", "three")


def test_reset_keeps_template_layers_and_snapshots(s: Storage) -> None:
    tpl = on_template(s, "usr/bin/tool")
    put(s, "web", "root/b")
    s.reset("web")
    assert s.stack("web").lowers == tpl.layers
    assert view(s, "web") == {"usr/bin/tool": b"template"}
    assert [x.tag for x in s.snapshots("web")] == ["one"]
    s.restore("web", "one")
    assert view(s, "web") == {"usr/bin/tool": b"template", "root/a": b"a"}


# fork and templates ---------------------------------------------------------------------------


def test_fork_shares_layers_and_the_source_keeps_working(s: Storage) -> None:
    s.create("web", "host")
    put(s, "web", "root/a")
    s.snapshot("web", "one")
    put(s, "web", "root/b")
    s.fork("web", "web2")
    src, new = s.stack("web"), s.stack("web2")
    assert src.lowers == new.lowers and len(new.lowers) == 2  # the upper was frozen, then shared
    assert new.upper != src.upper and os.listdir(new.upper) == [] and os.listdir(src.upper) == []
    assert s.snapshots("web2") == [] and [x.tag for x in s.snapshots("web")] == ["one"]
    put(s, "web", "root/c")
    put(s, "web2", "root/d")
    s.snapshot("web")
    assert view(s, "web") == {"root/a": b"x", "root/b": b"x", "root/c": b"x"}
    assert view(s, "web2") == {"root/a": b"x", "root/b": b"x", "root/d": b"x"}
    with pytest.raises(WorkspaceExists, match="a workspace named 'web2' already exists: pick another name for"):
        s.fork("web", "web2")
    with pytest.raises(WorkspaceExists):
        s.fork("web", "web")


def test_fork_of_an_empty_upper_adds_no_layer(s: Storage) -> None:
    s.create("web", "host")
    s.fork("web", "web2")
    assert s.stack("web2").lowers == () and s.stack("web2").base == "host"


def test_templates(s: Storage) -> None:
    s.create("src", "/srv/image")
    put(s, "src", "root/opt/tool", b"T")
    tpl = s.create_template("py", "src")
    assert tpl.name == "py" and tpl.base == "/srv/image" and tpl.source == "src" and len(tpl.layers) == 1
    assert s.stack("src").lowers == tpl.layers  # the source's upper was frozen into the template's layer
    assert s.templates() == [tpl] and s.template("py") == tpl
    with pytest.raises(WorkspaceExists, match="a template named 'py' already exists"):
        s.create_template("py", "src")
    s.create("web", "ignored", "py")
    put(s, "web", "root/a")
    s.snapshot("web")
    stack = s.stack("web")
    assert stack.base == "/srv/image"
    assert stack.lowers[1:] == tpl.layers and len(stack.lowers) == 2  # own first, then the template's
    tpl2 = s.create_template("py2", "web")
    assert tpl2.layers == stack.lowers
    with pytest.raises(WorkspaceStateError, match=r"^cannot remove template 'py': workspace 'web' is made from it; "
                                                  r"remove it first$"):
        s.remove_template("py")
    s.remove("web")
    s.remove_template("py")
    assert [t.name for t in s.templates()] == ["py2"]
    with pytest.raises(NotFoundError, match="template 'py' does not exist"):
        s.template("py")
    s.create("db", "host", "py2")  # py2 holds py's layers: it does not need py's record
    assert view(s, "db") == {"root/opt/tool": b"T", "root/a": b"x"}


def test_max_layers(s: Storage) -> None:
    s.create("web", "host")
    for i in range(MAX_LAYERS):
        put(s, "web", f"root/{i}")
        s.snapshot("web")
    put(s, "web", "root/more")
    with pytest.raises(WorkspaceStateError, match=f"cannot freeze workspace 'web': it stacks {MAX_LAYERS} layers "
                                                  "already, the most is 60; run 'silo reset web' to drop its own "
                                                  "layers, or make a fresh workspace"):
        s.snapshot("web")
    with pytest.raises(WorkspaceStateError):
        s.fork("web", "web2")
    assert not s.exists("web2") and not (s.root / "workspaces" / "web2").exists()
    assert len(s.stack("web").lowers) == MAX_LAYERS and (Path(s.stack("web").upper) / "root/more").exists()


# remove, gc, trash ------------------------------------------------------------------------------


def test_remove_trashes_the_storage_only(s: Storage) -> None:
    s.create("web", "host")
    ws = s.root / "workspaces" / "web"
    (ws / "record.json").write_text("{}")  # the Store's file
    put(s, "web", "root/a")
    s.remove("web")
    assert os.listdir(ws) == ["record.json"]
    assert not s.exists("web")
    s.remove("web")  # nothing left to remove: no error


def test_gc_keeps_what_is_referenced(s: Storage) -> None:
    tpl = on_template(s, "root/t")
    one = s.stack("web").lowers[0]
    put(s, "web", "root/b")
    s.snapshot("web", "two")
    two = s.stack("web").lowers[0]
    s.restore("web", "one")
    s.gc()
    for layer in (one, two, *tpl.layers):
        assert os.path.isdir(layer)
    s.delete_snapshot("web", "two")
    s.remove("src")
    s.gc()
    assert not os.path.exists(two)
    assert os.path.isdir(one) and all(os.path.isdir(x) for x in tpl.layers)  # web's stack and the template
    s.remove("web")
    s.remove_template("py")
    s.gc()
    assert os.listdir(s.root / "layers") == []
    s.empty_trash()
    assert trash(s) == []


def test_empty_trash_removes_hostile_trees(s: Storage, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    victim = s.root / "trash" / "x"
    deep = victim
    for _ in range(200):
        deep = deep / "d"
    deep.mkdir(parents=True)
    (deep / "f").write_text("f")
    os.symlink(outside, victim / "link")
    os.symlink(outside / "keep", victim / "d" / "file-link")
    (victim / "work" / "work").mkdir(parents=True)
    (victim / "work" / "work" / "inner").mkdir()
    os.chmod(victim / "work" / "work", 0)
    s.empty_trash()
    assert trash(s) == []
    assert (outside / "keep").read_text() == "keep"


# diff and usage ------------------------------------------------------------------------------


def whiteout(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if IS_ROOT:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))
    else:
        path.write_bytes(b"")
        os.setxattr(path, "user.overlay.whiteout", b"y")


def test_diff(s: Storage, tmp_path: Path) -> None:
    base = tmp_path / "image"
    for rel in ("etc/passwd", "etc/hosts", "opt/old/x", "var/keep/y"):
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_text("base")
    s.create("src", str(base))
    put(s, "src", "root/etc/tpl-file")
    s.create_template("py", "src")
    s.create("web", str(base), "py")
    put(s, "web", "root/etc/passwd")          # in the base: changed
    put(s, "web", "root/etc/new")             # added
    put(s, "web", "root/etc/gone-again")      # added in an own layer, deleted later: no change
    put(s, "web", "root/srv/app/main.py")     # a new directory and its file
    s.snapshot("web")
    upper = Path(s.stack("web").upper)
    whiteout(upper / "root/etc/hosts")        # deleted (base)
    whiteout(upper / "root/etc/tpl-file")     # deleted (template layer)
    whiteout(upper / "root/etc/gone-again")
    put(s, "web", "root/opt/old/new")
    os.setxattr(upper / "root/opt/old", "user.overlay.opaque", b"y")  # opaque: content replaced
    put(s, "web", "root/var/keep/z")
    os.chmod(upper / "root/var/keep", mode(base / "var/keep"))        # only copied up: not reported
    os.chmod(upper / "root/etc", mode(base / "etc"))
    os.chmod(upper / "root/opt", mode(base / "opt"))
    os.chmod(Path(s.stack("web").lowers[0]) / "root/etc", mode(base / "etc"))
    assert s.diff("web") == [
        Change("deleted", "/etc/hosts"),
        Change("added", "/etc/new"),
        Change("changed", "/etc/passwd"),
        Change("deleted", "/etc/tpl-file"),
        Change("changed", "/opt/old"),
        Change("added", "/opt/old/new"),
        Change("added", "/srv"),
        Change("added", "/srv/app"),
        Change("added", "/srv/app/main.py"),
        Change("added", "/var/keep/z"),
    ]


def test_diff_on_the_host_maps_targets_to_their_directories(s: Storage) -> None:
    s.create("web", "host")
    put(s, "web", "usr/bin/silo-test-no-such-tool")
    sh = os.path.realpath("/bin/sh")
    assert sh.startswith("/usr/")
    put(s, "web", "usr/" + sh[len("/usr/"):])
    put(s, "web", "root/silo-test-top")
    for d in ("usr", "usr/bin", "usr/" + os.path.dirname(sh)[len("/usr/"):]):
        os.chmod(Path(s.stack("web").upper) / d, mode("/" + d) if d != "usr" else 0o755)
    changes = s.diff("web")
    assert Change("added", "/usr/bin/silo-test-no-such-tool") in changes
    assert Change("changed", sh) in changes
    assert Change("added", "/silo-test-top") in changes


def test_usage_counts_blocks_and_hard_links_once(s: Storage) -> None:
    s.create("web", "host")
    assert s.usage("web") == 0
    a = put(s, "web", "root/a", b"x" * 100_000)
    s.snapshot("web")
    b = put(s, "web", "root/b", b"y" * 50_000)
    os.link(b, b.parent / "b2")
    used = s.usage("web")
    blocks = os.lstat(b).st_blocks * 512 + os.lstat(Path(s.stack("web").lowers[0]) / "root/a").st_blocks * 512
    assert blocks <= used <= blocks + 4 * 8192  # plus the two root/ directories
    assert not a.exists()


# crash safety ---------------------------------------------------------------------------------


class Crash(BaseException):
    """The daemon was SIGKILLed: nothing after this point happens."""


class CrashingOps(layers.FileOps):
    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0

    def tick(self) -> None:
        if self.used >= self.budget:
            raise Crash
        self.used += 1


def _crashing(name: str) -> Callable[..., None]:
    def method(self: CrashingOps, *args: object) -> None:
        self.tick()
        getattr(layers.FileOps, name)(self, *args)
    return method


for _name in ("rename", "mkdir", "chmod", "chown", "write_new", "replace", "unlink", "rmdir", "fsync_dir"):
    setattr(CrashingOps, _name, _crashing(_name))


def setup_workspaces(s: Storage) -> None:
    on_template(s, "root/t")
    s.create_template("unused", "src")
    put(s, "web", "root/b", b"b")  # the upper's data: never lost


def summary(s: Storage) -> dict[str, object]:
    out: dict[str, object] = {"templates": sorted(t.name for t in s.templates())}
    for name in s.names():
        out[name] = (view(s, name), [(x.tag, x.memory) for x in s.snapshots(name)], s.resumes(name))
    return out


def memory_image(s: Storage, name: str, data: bytes = b"image") -> None:
    """What runsc checkpoint leaves in the workspace's stage."""
    Path(s.memory_stage(name), "checkpoint.img").write_bytes(data)


OPS: dict[str, Callable[[Storage], object]] = {
    "snapshot": lambda s: s.snapshot("web", "two"),
    "restore": lambda s: s.restore("web", "one"),
    "reset": lambda s: s.reset("web"),
    "fork": lambda s: s.fork("web", "web2"),
    "template": lambda s: s.create_template("py2", "web"),
    "create": lambda s: s.create("new", "host", "py"),
    "remove": lambda s: s.remove("web"),
    "remove-template": lambda s: s.remove_template("unused"),
    "delete-snapshot": lambda s: s.delete_snapshot("web", "one"),
    "snapshot-memory": lambda s: (memory_image(s, "web"), s.snapshot("web", "two", memory=True)),
}


def no_leftovers(s: Storage) -> None:
    for dirpath, dirnames, files in os.walk(s.root / "workspaces"):
        assert "journal.json" not in files and not [f for f in files if f.endswith(".tmp")], dirpath
        if dirpath != str(s.root / "workspaces"):
            dirnames.clear()
    assert os.listdir(s.root / "staging") == []
    for name in s.names():
        s.stack(name)  # every layer, the upper and the work dir are there


@pytest.mark.parametrize("op", sorted(OPS))
def test_a_crash_at_any_step_recovers_to_before_or_after(tmp_path: Path, op: str) -> None:
    ref = storage(tmp_path / "ref")
    setup_workspaces(ref)
    before = summary(ref)
    counter = CrashingOps(10**6)
    ref._fs = counter
    OPS[op](ref)
    after = summary(ref)
    assert before != after
    assert counter.used > 0
    for budget in range(counter.used):
        s = storage(tmp_path / f"crash{budget}")
        setup_workspaces(s)
        s._fs = CrashingOps(budget)
        with pytest.raises(Crash):
            OPS[op](s)
        fresh = storage(s.root)
        fresh.recover()
        no_leftovers(fresh)
        assert summary(fresh) in (before, after), f"crash after {budget} steps"
        fresh.gc()
        assert summary(fresh) in (before, after)


def test_a_failure_undoes_the_steps_done(s: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    setup_workspaces(s)
    before = summary(s)
    real = s._fs.write_new
    calls = []

    def full_on_stack(path: str, data: bytes) -> None:
        calls.append(path)
        if ".stack.json." in path:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(s._fs, "write_new", full_on_stack)
    with pytest.raises(StoreFull, match=r"^no space left to fork workspace 'web': free some space and try again$"):
        s.fork("web", "web2")
    assert summary(s) == before
    assert not (s.root / "workspaces" / "web2").exists()
    assert not (s.root / "workspaces" / "web" / "journal.json").exists()
    assert os.listdir(s.root / "layers") and calls


def test_recover_trashes_leftovers(s: Storage) -> None:
    s.create("web", "host")
    ws = s.root / "workspaces" / "web"
    (s.root / "workspaces" / "half").mkdir()
    (s.root / "workspaces" / "half" / "upper").mkdir()
    (s.root / "staging" / "import-1").mkdir()
    (s.root / "templates" / "t").mkdir()
    (ws / ".stack.json.0123456789abcdef.tmp").write_text("")
    os.rename(ws / "work", s.root / "w")
    s.recover()
    assert os.listdir(s.root / "workspaces" / "half") == []
    assert os.listdir(s.root / "staging") == [] and os.listdir(s.root / "templates") == []
    assert sorted(os.listdir(ws)) == ["stack.json", "upper", "work"]
    assert len(trash(s)) == 3


def test_a_corrupt_journal_is_reported_and_kept(s: Storage) -> None:
    s.create("web", "host")
    (s.root / "workspaces" / "web" / "journal.json").write_text('{"format": 1, "op": "x", "steps": [["rm", "/"]]}')
    with pytest.raises(InternalError, match="could not finish an interrupted storage operation: workspace 'web'"):
        s.recover()
    assert (s.root / "workspaces" / "web" / "journal.json").exists()
    s.gc()  # does nothing while a journal is pending


# performance budgets ----------------------------------------------------------------------------


def fill(upper: str, total: int) -> None:
    directory = Path(upper) / "root" / "data"
    directory.mkdir(parents=True)
    for i in range(4):
        fd = os.open(directory / f"blob{i}", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.posix_fallocate(fd, 0, total // 4)
        finally:
            os.close(fd)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_snapshot_reset_and_fork_of_1_gib_are_fast(s: Storage) -> None:
    gib = 1 << 30
    s.create("web", "host")
    fill(s.stack("web").upper, gib)
    assert s.usage("web") >= gib
    assert timed(lambda: s.snapshot("web")) < 0.2
    fill(s.stack("web").upper, gib)
    assert timed(lambda: s.reset("web")) < 0.1
    fill(s.stack("web").upper, gib)
    assert timed(lambda: s.fork("web", "web2")) < 0.3
    assert s.usage("web2") >= gib


# snapshot --memory: memory images beside the layers ------------------------------------------


def test_a_memory_snapshot_keeps_the_image_and_the_next_start_resumes_it_once(s: Storage) -> None:
    s.create("web", "host")
    put(s, "web", "root/a", b"a")
    memory_image(s, "web", b"state")
    stage = s.root / "workspaces" / "web" / "checkpoint"
    assert mode(stage) == 0o700 and os.lstat(stage).st_uid == OWNER[0]  # runsc writes it as the workspace's root
    info = s.snapshot("web", "live", memory=True)
    assert (info.tag, info.memory) == ("live", True)
    assert not stage.exists()
    (image,) = (s.root / "images").iterdir()
    assert (image / "checkpoint.img").read_bytes() == b"state"
    assert mode(s.root / "images") == 0o711
    # the snapshot's files are frozen with it, and its image is what the next start resumes
    assert view(s, "web") == {"root/a": b"a"} and s.stack("web").resume == str(image)
    assert s.resumes("web") == "live"
    assert s.take_resume("web") == ("live", str(image))
    assert s.take_resume("web") is None and s.resumes("web") is None and s.stack("web").resume is None
    # restore brings it back; a plain snapshot has none
    s.snapshot("web", "files")
    assert [(x.tag, x.memory) for x in s.snapshots("web")] == [("live", True), ("files", False)]
    s.restore("web", "files")
    assert s.resumes("web") is None
    s.restore("web", "live")
    assert s.resumes("web") == "live"
    s.fork("web", "copy")
    assert s.resumes("copy") is None and s.snapshots("copy") == []
    s.reset("web")
    assert s.resumes("web") is None
    # the image lives while a snapshot or a pending resume names it
    s.restore("web", "live")
    s.delete_snapshot("web", "live")
    s.gc()
    assert image.is_dir()
    s.take_resume("web")
    s.gc()
    assert not image.exists() and os.listdir(s.root / "images") == []


def test_a_memory_snapshot_refusals(s: Storage) -> None:
    s.create("web", "host")
    with pytest.raises(InternalError, match="has no memory image to keep"):
        s.snapshot("web", memory=True)
    s.memory_stage("web")  # made, but runsc wrote nothing
    with pytest.raises(InternalError, match="has no memory image to keep"):
        s.snapshot("web", "x", memory=True)
    assert s.snapshots("web") == [] and s.new_tag("web") == "snap-1"
    s.snapshot("web", "x")
    with pytest.raises(WorkspaceExists, match="already has a snapshot 'x'"):
        s.new_tag("web", "x")
    memory_image(s, "web")
    s.snapshot("web", "y", memory=True)
    shutil.rmtree(next((s.root / "images").iterdir()))
    with pytest.raises(UserError, match=r"^snapshot 'y' of workspace 'web' is damaged: its memory image"):
        s.restore("web", "y")


def test_stack_files_without_memory_are_read_and_written_as_before(s: Storage) -> None:
    s.create("web", "host")
    put(s, "web", "root/a")
    s.snapshot("web", "one")
    raw = json.loads((s.root / "workspaces" / "web" / "stack.json").read_text())
    assert "resume" not in raw and set(raw["snapshots"][0]) == {"tag", "created", "layers"}
    raw["resume"] = "not an id"
    (s.root / "workspaces" / "web" / "stack.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="is not a memory image id"):
        s.stack("web")


def test_recover_trashes_a_memory_image_a_crash_cut_short(s: Storage) -> None:
    s.create("web", "host")
    memory_image(s, "web")
    s.recover()
    assert not (s.root / "workspaces" / "web" / "checkpoint").exists()
    assert s.snapshots("web") == [] and len(trash(s)) == 1
