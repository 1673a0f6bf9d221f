"""Export and import: a round trip keeps every layer as it was; hostile archives are refused
with one line and leave nothing in the state directory."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from test_layers import whiteout

from silo.model.errors import UserError, WorkspaceExists
from silo.model.workspace import WorkspaceSpec
from silo.store.archive import export, import_
from silo.store.layers import Storage, is_opaque, is_whiteout

IS_ROOT = os.geteuid() == 0
OWNER = (100_000, 100_000) if IS_ROOT else (os.getuid(), os.getgid())
OTHER_OWNER = (300_000, 300_000) if IS_ROOT else OWNER
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (chown, mknod)")


def spec(name: str = "web") -> dict[str, object]:
    return WorkspaceSpec(name).to_dict()


@pytest.fixture
def s(tmp_path: Path) -> Storage:
    return Storage(tmp_path / "state", OWNER)


@pytest.fixture
def dest(tmp_path: Path) -> Storage:
    return Storage(tmp_path / "other", OTHER_OWNER)


def tree(root: Path) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files}


def write(path: Path, data: bytes = b"x", mode: int = 0o644, ids: tuple[int, int] = (0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if IS_ROOT:
        os.chown(path, OWNER[0] + ids[0], OWNER[1] + ids[1])
    os.chmod(path, mode)
    return path


def own(top: str | Path) -> None:
    """As root, what a test made as host root becomes the owner's (as the sandbox would have made it)."""
    if IS_ROOT:
        for d, dirs, files in os.walk(top):
            for n in dirs + files:
                if os.lstat(os.path.join(d, n)).st_uid == 0:
                    os.chown(os.path.join(d, n), *OWNER, follow_symlinks=False)


def describe(layer: str, owner: tuple[int, int]) -> dict[str, tuple[object, ...]]:
    """What matters of every entry of a layer, with ids relative to ``owner``."""
    out: dict[str, tuple[object, ...]] = {}
    for d, dirs, files in os.walk(layer):
        for n in dirs + files:
            path = os.path.join(d, n)
            st = os.lstat(path)
            rel = os.path.relpath(path, layer)
            if is_whiteout(path, st):
                out[rel] = ("whiteout",)
                continue
            ids = (st.st_uid - owner[0], st.st_gid - owner[1]) if IS_ROOT else ()
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = (kind, os.readlink(path), ids)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = (kind, stat.S_IMODE(st.st_mode), ids, int(st.st_mtime), is_opaque(path))
            else:
                out[rel] = (kind, stat.S_IMODE(st.st_mode), ids, int(st.st_mtime), Path(path).read_bytes())
    return out


def make_workspace(s: Storage) -> None:
    """'web' on template 'py': a template layer, an own frozen layer and an upper with every kind of entry."""
    s.create("src", "host")
    write(Path(s.stack("src").upper) / "usr/lib/tpl.so", b"template")
    own(s.stack("src").upper)
    s.create_template("py", "src")
    s.create("web", "host", "py")
    upper = Path(s.stack("web").upper)
    write(upper / "root/etc/old", b"old")
    (upper / "root/opt/gone").mkdir(parents=True)
    write(upper / "root/opt/gone/file")
    own(upper)
    s.snapshot("web")
    upper = Path(s.stack("web").upper)
    write(upper / "root/bin/tool", b"#!/bin/sh\n", 0o755)
    write(upper / "root/bin/suid", b"s", 0o4755, ids=(5, 7) if IS_ROOT else (0, 0))
    os.link(upper / "root/bin/tool", upper / "root/bin/tool-link")
    os.makedirs(upper / "root/etc/alternatives")
    os.symlink("/usr/bin/vim.basic", upper / "root/etc/alternatives/editor")
    os.symlink("../bin/tool", upper / "root/etc/relative")
    whiteout(upper / "root/etc/old")
    (upper / "root/opt/gone").mkdir(parents=True)
    os.setxattr(upper / "root/opt/gone", "user.overlay.opaque", b"y")
    write(upper / "root/opt/gone/new", b"new")
    os.mkdir(upper / "root/private", 0o750)
    write(upper / "root/private/f", "ü".encode())
    write(upper / "root/name with spaces \udcff", b"odd name")
    own(upper)


# round trip ----------------------------------------------------------------------------------


def test_round_trip_keeps_every_layer(s: Storage, dest: Storage) -> None:
    make_workspace(s)
    out = io.BytesIO()
    seen: list[tuple[int, int]] = []
    export(s, "web", spec(), out, progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1] > 0
    read: list[int] = []
    name, got = import_(dest, io.BytesIO(out.getvalue()), "copy", progress=read.append)
    assert name == "copy" and got == WorkspaceSpec("copy").to_dict()
    assert read[-1] == len(out.getvalue())
    src, new = s.stack("web"), dest.stack("copy")
    assert new.base == "host" and len(new.lowers) == len(src.lowers) == 2
    for before, after in zip([src.upper, *src.lowers], [new.upper, *new.lowers], strict=True):
        assert describe(after, OTHER_OWNER) == describe(before, OWNER)
    assert dest.snapshots("copy") == []
    upper = Path(new.upper)
    assert os.lstat(upper / "root/bin/tool").st_ino == os.lstat(upper / "root/bin/tool-link").st_ino
    assert stat.S_IMODE(os.lstat(upper).st_mode) == 0o700
    assert (os.lstat(upper).st_uid, os.lstat(upper).st_gid) == OTHER_OWNER
    assert os.listdir(dest.root / "staging") == [] and os.listdir(s.root / "staging") == []
    # It stacks like any workspace: snapshot, fork.
    dest.snapshot("copy")
    dest.fork("copy", "copy2")


def test_import_keeps_the_archive_name_and_refuses_a_taken_one(s: Storage) -> None:
    make_workspace(s)
    out = io.BytesIO()
    export(s, "web", spec(), out)
    before = tree(s.root)
    with pytest.raises(WorkspaceExists, match=r"^a workspace named 'web' already exists: import it under another"):
        import_(s, io.BytesIO(out.getvalue()), None)
    assert tree(s.root) == before
    (s.root / "workspaces" / "db").mkdir()
    (s.root / "workspaces" / "db" / "record.json").write_text("{}")  # the Store has a workspace 'db'
    with pytest.raises(WorkspaceExists):
        import_(s, io.BytesIO(out.getvalue()), "db")
    s.remove("web")
    assert import_(s, io.BytesIO(out.getvalue()), None)[0] == "web"


def test_export_refuses_a_fifo(s: Storage) -> None:
    s.create("web", "host")
    os.makedirs(Path(s.stack("web").upper) / "root")
    os.mkfifo(Path(s.stack("web").upper) / "root/pipe")
    own(s.stack("web").upper)
    with pytest.raises(UserError, match=r"^cannot export workspace 'web': .*/root/pipe is a fifo, which an archive "
                                        r"does not hold: remove it from the workspace first$"):
        export(s, "web", spec(), io.BytesIO())
    assert os.listdir(s.root / "staging") == []


@needs_root
def test_export_refuses_ids_outside_the_workspace(s: Storage) -> None:
    s.create("web", "host")
    path = write(Path(s.stack("web").upper) / "root/f")
    own(s.stack("web").upper)
    os.chown(path, 0, 0)
    with pytest.raises(UserError, match=r"^cannot export workspace 'web': root/f is owned by host ids 0:0, "
                                        r"outside the workspace's ids$"):
        export(s, "web", spec(), io.BytesIO())


# hostile archives ----------------------------------------------------------------------------------

Member = tuple[tarfile.TarInfo, bytes]


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **attrs: object) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def layer_blob(members: list[Member]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.size else None)
    return gzip.compress(raw.getvalue())


ROOT = entry("root", tarfile.DIRTYPE)


def archive(layers: list[list[Member]] | None = None, *, blobs: list[bytes] | None = None,
            manifest: Callable[[dict[str, object]], object] | None = None, extra: bool = False) -> bytes:
    """An archive made by hand; the manifest describes the blobs truly unless ``manifest`` edits it."""
    if blobs is None:
        blobs = [layer_blob(members) for members in (layers or [[ROOT]])]
    data: object = {"format": 1, "kind": "silo-workspace", "spec": spec(), "base": "host",
                    "layers": [{"blob": f"layer-{i}.tar.gz", "sha256": hashlib.sha256(b).hexdigest(), "size": len(b)}
                               for i, b in enumerate(blobs)]}
    if manifest is not None:
        data = manifest(data)  # type: ignore[arg-type]
    raw = json.dumps(data).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, payload in [("manifest.json", raw)] + [(f"layer-{i}.tar.gz", b) for i, b in enumerate(blobs)] + (
                [("extra", b"x")] if extra else []):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def refused(s: Storage, data: bytes, message: str, **kwargs: object) -> None:
    """Importing ``data`` fails with ``message`` and leaves the state directory as it was."""
    before = tree(s.root)
    src = io.BytesIO(data)
    src.name = "/tmp/evil.silo"  # type: ignore[misc]
    with pytest.raises(UserError, match=message) as e:
        import_(s, src, "evil", **kwargs)  # type: ignore[arg-type]
    assert "\n" not in e.value.message and e.value.message.startswith("cannot import /tmp/evil.silo: ")
    assert tree(s.root) == before


def test_a_minimal_archive_imports(s: Storage) -> None:
    name, _ = import_(s, io.BytesIO(archive([[ROOT, entry("root/f", data=b"hi")]])), "ok")
    assert (Path(s.stack(name).upper) / "root/f").read_bytes() == b"hi"


def test_only_a_vm_layer_may_hold_its_disk_at_its_top(s: Storage) -> None:
    disk = entry("disk.qcow2", data=b"QFI\xfb")
    refused(s, archive([[disk]]), r"member 'disk.qcow2' is not inside an overlay target's directory$")

    def vm(data: dict[str, object]) -> dict[str, object]:
        return {**data, "spec": {**spec(), "isolation": "vm"}}

    name, _ = import_(s, io.BytesIO(archive([[disk]], manifest=vm)), "box")
    assert (Path(s.stack(name).upper) / "disk.qcow2").read_bytes() == b"QFI\xfb"
    refused(s, archive([[entry("other.img", data=b"x")]], manifest=vm),
            r"member 'other.img' is not inside an overlay target's directory$")


def test_absolute_member(s: Storage) -> None:
    refused(s, archive([[ROOT, entry("/etc/evil")]]), r"member '/etc/evil' has an absolute path$")


def test_dotdot_member(s: Storage) -> None:
    refused(s, archive([[ROOT, entry("root/../../evil")]]), r"member 'root/\.\./\.\./evil' has a '\.\.' component$")


def test_member_through_a_symlink(s: Storage, tmp_path: Path) -> None:
    target = tmp_path / "outside"
    target.mkdir()
    members = [ROOT, entry("root/link", tarfile.SYMTYPE, linkname=str(target)), entry("root/link/evil", data=b"x")]
    refused(s, archive([members]), r"member 'root/link/evil' goes through a symbolic link$")
    assert os.listdir(target) == []


def test_member_before_its_directory(s: Storage) -> None:
    refused(s, archive([[ROOT, entry("root/dir/f")]]), r"member 'root/dir/f' is not below a directory made before it$")


def test_a_symlink_replaced_by_a_directory_is_a_duplicate(s: Storage) -> None:
    members = [ROOT, entry("root/x", tarfile.SYMTYPE, linkname="/etc"), entry("root/x", tarfile.DIRTYPE)]
    refused(s, archive([members]), r"member 'root/x' appears twice in a layer$")


def test_hard_link_outside_the_layer(s: Storage) -> None:
    members = [ROOT, entry("root/h", tarfile.LNKTYPE, linkname="/etc/shadow")]
    refused(s, archive([members]), r"member 'root/h' is a hard link to '/etc/shadow', which is not an earlier "
                                   r"file of its layer$")


def test_hard_link_to_another_layer(s: Storage) -> None:
    layers = [[ROOT, entry("root/h", tarfile.LNKTYPE, linkname="root/f")], [ROOT, entry("root/f", data=b"x")]]
    refused(s, archive(layers), r"member 'root/h' is a hard link to 'root/f', which is not an earlier file")


@pytest.mark.parametrize(("kind", "what"), [(tarfile.CHRTYPE, "a character device"),
                                            (tarfile.BLKTYPE, "a block device"), (tarfile.FIFOTYPE, "a fifo")])
def test_device_nodes_and_fifos(s: Storage, kind: bytes, what: str) -> None:
    refused(s, archive([[ROOT, entry("root/dev", kind, devmajor=1, devminor=3)]]), rf"member 'root/dev' is {what}$")


def test_a_raw_whiteout_device_is_refused_too(s: Storage) -> None:
    refused(s, archive([[ROOT, entry("root/wh", tarfile.CHRTYPE, devmajor=0, devminor=0)]]),
            r"member 'root/wh' is a character device$")


def test_whiteout_names_must_be_empty_files(s: Storage) -> None:
    refused(s, archive([[ROOT, entry("root/.wh.x", data=b"data")]]),
            r"member 'root/\.wh\.x' has a whiteout's name but is not an empty file$")


def test_ids_outside_the_range(s: Storage) -> None:
    refused(s, archive([[ROOT, entry("root/f", uid=70000)]]),
            r"member 'root/f' is owned by 70000:0, outside the ids 0 to 65535 a workspace has$")


def test_a_file_larger_than_the_limit(s: Storage) -> None:
    refused(s, archive([[ROOT, entry("root/big", data=b"x" * 5000)]]),
            r"it unpacks to more than 4096 bytes, the most this import may take$", max_bytes=4096)


def test_a_compressed_bomb_counts_real_bytes(s: Storage) -> None:
    data = archive([[ROOT, *(entry(f"root/z{i}", data=bytes(400_000)) for i in range(10))]])
    assert len(data) < 100_000
    refused(s, data, r"it unpacks to more than 1000000 bytes", max_bytes=1_000_000)


def test_a_size_that_lies(s: Storage) -> None:
    info, _ = entry("root/f", data=b"x" * 10)
    info.size = 1 << 20  # the header claims a megabyte; the blob ends first
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(ROOT[0])
        tar.fileobj.write(info.tobuf(tarfile.PAX_FORMAT) + b"x" * 10)  # type: ignore[union-attr]
    cut = gzip.compress(raw.getvalue()[: raw.tell()])
    refused(s, archive(blobs=[cut]), r"truncated or corrupt")


def test_many_empty_members_count_too(s: Storage) -> None:
    refused(s, archive([[ROOT, *(entry(f"root/e{i}") for i in range(100))]]), r"it unpacks to more than",
            max_bytes=100 * 512)


def test_a_huge_pax_header(s: Storage) -> None:
    info, _ = entry("root/f")
    info.pax_headers = {"comment": "x" * (2 << 20)}
    refused(s, archive([[ROOT, (info, b"")]]), r"it has a \d+-byte member header$")


def test_a_truncated_archive(s: Storage) -> None:
    data = archive([[ROOT, entry("root/f", data=os.urandom(20000))]])
    for cut in (len(data) // 2, 600, 5000):
        refused(s, data[:cut], r"(truncated|corrupt|not a silo workspace archive)")


def test_a_corrupt_blob(s: Storage) -> None:
    good = layer_blob([ROOT, entry("root/f", data=b"hello" * 100)])
    blob = bytearray(good)
    blob[-6] ^= 0xFF  # in the gzip trailer: the tar still reads, the checksum does not match
    bad = archive(blobs=[bytes(blob)], manifest=lambda m: json.loads(json.dumps(m).replace(
        hashlib.sha256(bytes(blob)).hexdigest(), hashlib.sha256(good).hexdigest())))
    refused(s, bad, r"layer 0 does not match its checksum \(a corrupt or altered archive\)$")


def test_a_tampered_blob(s: Storage) -> None:
    honest = layer_blob([ROOT, entry("root/f", data=b"honest")])
    evil = layer_blob([ROOT, entry("root/f", data=b"evil!!")])
    refused(s, archive(blobs=[evil], manifest=lambda m: {**m, "layers": [
        {"blob": "layer-0.tar.gz", "sha256": hashlib.sha256(honest).hexdigest(), "size": len(evil)}]}),
        r"layer 0 does not match its checksum")


def test_manifest_checks(s: Storage) -> None:
    refused(s, archive(manifest=lambda m: {**m, "format": 2}), r"archive format 2 is not 1: another version")
    refused(s, archive(manifest=lambda m: {**m, "extra": 1}), r"manifest.json does not have the keys of format 1$")
    refused(s, archive(manifest=lambda m: {**m, "base": "../rel"}), r"its base is not valid: bad base '\.\./rel'")
    refused(s, archive(manifest=lambda m: {**m, "spec": {"name": "x", "isolation": "nope"}}),
            r"its spec is not valid: .*isolation")
    refused(s, archive(manifest=lambda m: {**m, "layers": []}), r"it must have 1 to 61 layers$")
    refused(s, archive(manifest=lambda m: [1]), r"does not have the keys of format 1$")
    refused(s, b"\x00" * 10240, r"not a silo workspace archive|truncated or corrupt")
    refused(s, b"not a tar at all" * 100, r"truncated or corrupt")
    refused(s, archive(extra=True), r"it has members after its last layer$")


def test_an_interrupted_import_leaves_nothing(s: Storage) -> None:
    data = archive([[ROOT, entry("root/f", data=os.urandom(200_000))]])
    before = tree(s.root)

    def interrupt(n: int) -> None:
        if n > 50_000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        import_(s, io.BytesIO(data), "x", progress=interrupt)
    assert tree(s.root) == before


def test_import_of_whiteouts_and_opaque_dirs(s: Storage) -> None:
    members = [ROOT, entry("root/etc", tarfile.DIRTYPE), entry("root/etc/.wh.passwd"),
               entry("root/etc/.wh..wh..opq"), entry("root/etc/.wh.passwd2")]
    name, _ = import_(s, io.BytesIO(archive([members])), "wh")
    etc = Path(s.stack(name).upper) / "root/etc"
    assert is_opaque(str(etc))
    for n in ("passwd", "passwd2"):
        assert is_whiteout(str(etc / n), os.lstat(etc / n))
    assert sorted(os.listdir(etc)) == ["passwd", "passwd2"]
    refused(s, archive([[ROOT, entry("root/f"), entry("root/.wh.f")]]), r"member 'root/f' appears twice in a layer$")
