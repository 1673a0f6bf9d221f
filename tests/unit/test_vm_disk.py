"""The vm workspace's disk chain (silo.backends.vm.disk): real qemu-img and mkfs.ext4."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from silo.agent import protocol as P
from silo.backends.vm import disk
from silo.model.errors import SiloError


def info(path: str) -> dict[str, object]:
    out = subprocess.run([disk.QEMU_IMG, "info", "--output=json", path], capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout))


def test_the_empty_base_is_ext4_read_only_and_made_once(tmp_path: Path) -> None:
    base = disk.empty_base(str(tmp_path))
    data = info(base)
    assert (data["format"], data["virtual-size"], "backing-filename" in data) == ("qcow2", disk.SIZE, False)
    assert os.stat(base).st_mode & 0o777 == 0o444
    raw = subprocess.run([disk.QEMU_IMG, "dd", "-f", "qcow2", "-O", "raw", f"if={base}", f"of={tmp_path}/sb",
                          "bs=4096", "count=1"], capture_output=True, check=True)
    assert raw.returncode == 0
    superblock = (tmp_path / "sb").read_bytes()
    assert superblock[1024 + 0x38:1024 + 0x3A] == b"\x53\xef"  # the ext4 magic
    mtime = os.stat(base).st_mtime_ns
    assert disk.empty_base(str(tmp_path)) == base and os.stat(base).st_mtime_ns == mtime
    assert [n for n in os.listdir(tmp_path) if n.startswith(".empty-")] == []


def test_a_top_names_no_backing_file_and_is_made_only_when_missing(tmp_path: Path) -> None:
    top = disk.ensure_top(str(tmp_path), None)
    data = info(top)
    assert (data["format"], data["virtual-size"], "backing-filename" in data) == ("qcow2", disk.SIZE, False)
    inode = os.stat(top).st_ino
    assert disk.ensure_top(str(tmp_path), None) == top and os.stat(top).st_ino == inode
    assert sorted(os.listdir(tmp_path)) == [disk.DISK]


def test_the_bottom_of_a_chain_starts_as_a_copy_of_the_base(tmp_path: Path) -> None:
    base = disk.empty_base(str(tmp_path / "vm"))
    (tmp_path / "upper").mkdir()
    top = disk.ensure_top(str(tmp_path / "upper"), base, (os.getuid(), os.getgid()))
    assert Path(top).read_bytes() == Path(base).read_bytes()  # the file system travels with the layer
    assert os.stat(top).st_mode & 0o777 == 0o600


def test_layer_disks_are_bottom_first_and_refuse_a_layer_of_another_level(tmp_path: Path) -> None:
    layers = []
    for name in ("top", "bottom"):
        (tmp_path / name).mkdir()
        (tmp_path / name / disk.DISK).write_bytes(b"")
        layers.append(str(tmp_path / name))
    assert disk.layer_disks(layers) == [f"{tmp_path}/bottom/{disk.DISK}", f"{tmp_path}/top/{disk.DISK}"]
    (tmp_path / "files" / "root").mkdir(parents=True)
    with pytest.raises(SiloError, match="holds no VM disk: it was made at another isolation level"):
        disk.layer_disks([str(tmp_path / "files")])


def test_blockdev_args_chain_the_fds_and_never_a_path() -> None:
    args = disk.blockdev_args([7, 8, 9], writable_top=True)
    assert args[0:2] == ["-add-fd", "fd=7,set=1"]
    nodes = [json.loads(args[i + 1]) for i, a in enumerate(args) if a == "-blockdev"]
    assert [(n["node-name"], n["backing"], n["read-only"], n["file"]["filename"]) for n in nodes] == [
        ("disk1", None, True, "/dev/fdset/1"), ("disk2", "disk1", True, "/dev/fdset/2"),
        ("disk3", "disk2", False, "/dev/fdset/3")]
    assert args[-2:] == ["-device", "virtio-blk-device,drive=disk3"]
    ro = [json.loads(a)["read-only"] for a in disk.blockdev_args([7], writable_top=False) if a.startswith("{")]
    assert ro == [True]
    assert disk.blockdev_args([], writable_top=True) == []


def test_shutdown_carries_the_grace_for_a_workspace_stop() -> None:
    assert P.shutdown() == P.HEADER.pack(0, P.SHUTDOWN, 0)
    assert P.shutdown(1500) == P.HEADER.pack(4, P.SHUTDOWN, 0) + (1500).to_bytes(4, "big")
    assert P.shutdown(-5)[-4:] == b"\0\0\0\0"


def test_an_encrypted_top_is_luks_opened_by_the_key_through_an_fd(tmp_path: Path) -> None:
    key = disk.disk_key(str(tmp_path / "vm"))
    assert disk.disk_key(str(tmp_path / "vm")) == key  # made once
    assert os.stat(key).st_mode & 0o777 == 0o600 and len(Path(key).read_text()) == 64
    (tmp_path / "plain").mkdir()
    (tmp_path / "secret").mkdir()
    plain = disk.ensure_top(str(tmp_path / "plain"), None)
    secret = disk.ensure_top(str(tmp_path / "secret"), None, key=key)
    assert info(secret)["encrypted"] is True
    fds = [os.open(p, os.O_RDONLY) for p in (plain, secret)]
    try:
        flags = [disk.is_encrypted(fd) for fd in fds]
        assert flags == [False, True]
        args = disk.blockdev_args(fds, True, flags, key_fd=9)
    finally:
        for fd in fds:
            os.close(fd)
    assert args[:2] == ["-object", f"secret,id={disk.KEY_SECRET},file=/dev/fd/9"]
    nodes = [json.loads(a) for a in args if a.startswith("{")]
    assert [n.get("encrypt") for n in nodes] == [None, {"format": "luks", "key-secret": disk.KEY_SECRET}]
    assert "-object" not in disk.blockdev_args([3], True, [False])  # no key for a plain chain
