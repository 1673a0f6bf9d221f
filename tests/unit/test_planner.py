"""The planner turns a Spec into the exact list of operations; nothing is executed.

The planner reads the host (system directories, the skeleton cache, mount sources);
these tests let it, but give it a fake :class:`~silo.engine.host.Host` whose runtime
and cache directories are temporary, so planning "as root" and "as uid 1000" can both
be checked on any machine, without root.
"""

from __future__ import annotations

import dataclasses
import marshal
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from silo.backends.process import script
from silo.engine import host as hostmod
from silo.engine import planner
from silo.model import plan as p
from silo.model.errors import NotFoundError, ProtocolError, SpecError, UserError
from silo.model.spec import Isolation, Limits, Mount, Spec, User

BASE = 1_000_000_000
DEV_NODES = {"null", "zero", "full", "random", "urandom", "tty"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("silo-cache")


@pytest.fixture
def fake_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache_dir: Path) -> Callable[[int], hostmod.Host]:
    """``fake_host(uid)`` makes the planner see a host where silo runs as ``uid``."""

    def use(uid: int) -> hostmod.Host:
        runtime = tmp_path / f"run-{uid}"
        (runtime / "scratch").mkdir(parents=True, exist_ok=True)
        base, count = (BASE, 65536) if uid == 0 else (uid, 1)
        h = hostmod.Host(uid, uid, str(runtime), str(cache_dir), base, count)
        monkeypatch.setattr(hostmod, "host", lambda: h)
        monkeypatch.setattr(hostmod, "_checked", {})  # no skeleton from another cache
        return h

    return use


@pytest.fixture
def root_host(fake_host: Callable[[int], hostmod.Host]) -> hostmod.Host:
    return fake_host(0)


@pytest.fixture
def every_proc_entry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Pretend every /proc entry exists (a fresh procfs on another kernel may have them all)."""
    real = os.path.lexists

    def lexists(path: Any) -> bool:
        return True if os.fsdecode(path).startswith("/proc/") else real(path)

    monkeypatch.setattr(planner.os.path, "lexists", lexists)
    yield


def _ops(plan: p.Plan, cls: type[Any]) -> list[Any]:
    return [op for op in plan.ops if isinstance(op, cls)]


def _index(plan: p.Plan, op: Any) -> int:
    return plan.ops.index(op)


# process level, root = host ---------------------------------------------------------------------


def test_host_root_plan_shape(root_host: hostmod.Host, every_proc_entry: None, tmp_path: Path) -> None:
    src_dir = tmp_path / "data"
    src_dir.mkdir()
    src_file = tmp_path / "conf.txt"
    src_file.write_text("x")
    spec = Spec(mounts=(Mount(str(src_dir), "/data"), Mount(str(src_file), "/etc/app.conf", True)),
                hostname="box1")
    plan = planner.plan(spec, ["/bin/true"])
    scratch = root_host.scratch
    root = f"{scratch}/root"
    ops = plan.ops

    # make-private first, pivot-root last
    assert ops[0] == p.MakePrivate()
    assert ops[-1] == p.PivotRoot(root)
    assert len(_ops(plan, p.PivotRoot)) == 1

    # the scratch tmpfs comes right after, before anything is created in it
    assert isinstance(ops[1], p.Tmpfs) and ops[1].target == scratch
    assert "size=" in ops[1].options and not ops[1].readonly
    assert all(_index(plan, m) > 1 for m in _ops(plan, p.Mkdir))

    # the overlay of the skeleton onto the new root, upper and work inside the scratch tmpfs
    skeleton = hostmod.skeleton()
    assert skeleton.startswith(str(root_host.cache_dir))
    # as root, the lower layers come as clones idmapped into the sandbox (attached in the scratch)
    # (the skeleton is idmapped when host root owns it, i.e. when a root-run silo built it)
    idmapped = (f"{scratch}/l/root",) if os.stat(skeleton).st_uid == 0 else ()
    root_ov = p.Overlay(root, (skeleton,), f"{scratch}/u/root", f"{scratch}/w/root", idmapped=idmapped)
    assert root_ov in ops
    for attach in idmapped:
        assert _index(plan, p.Mkdir(attach)) < _index(plan, root_ov)
    for d in (f"{scratch}/u/root", f"{scratch}/w/root"):
        assert _index(plan, p.Mkdir(d)) < _index(plan, root_ov)
    # generated passwd/group land in the upper, never the host's
    passwd = [w for w in _ops(plan, p.WriteFile) if w.path == f"{scratch}/u/root/etc/passwd"]
    assert len(passwd) == 1 and passwd[0].data.startswith(b"root:x:0:0:")
    assert all(w.path.startswith(f"{scratch}/u/root/etc/") for w in _ops(plan, p.WriteFile))
    hosts = [w for w in _ops(plan, p.WriteFile) if w.path.endswith("/etc/hosts")]
    assert b"box1" in hosts[0].data

    # each of the host's real system directories gets its own overlay, /usr above all
    usr_ov = p.Overlay(f"{root}/usr", ("/usr",), f"{scratch}/u/usr", f"{scratch}/w/usr",
                       idmapped=(f"{scratch}/l/usr",))
    assert usr_ov in ops
    assert _index(plan, root_ov) < _index(plan, usr_ov)
    for name, real in hostmod.system_dirs():
        overlays = [o for o in _ops(plan, p.Overlay) if o.target == f"{root}/{name}"]
        assert len(overlays) == (1 if real else 0), name
    assert all(o.userxattr for o in _ops(plan, p.Overlay))

    # a fresh /proc with the masks and read-only /proc/sys, all after the proc mount
    proc = p.Proc(f"{root}/proc")
    assert proc in ops
    masks = {m.path for m in _ops(plan, p.Mask)}
    for name in ("kcore", "keys", "sysrq-trigger", "timer_list", "sched_debug", "kallsyms"):
        assert f"{root}/proc/{name}" in masks, name
    assert all(_index(plan, m) > _index(plan, proc) for m in _ops(plan, p.Mask))
    ro = p.ReadOnly(f"{root}/proc/sys")
    assert ro in ops and _index(plan, ro) > _index(plan, proc)

    # /dev: a small tmpfs with exactly these nodes, devpts, shm
    dev = [t for t in _ops(plan, p.Tmpfs) if t.target == f"{root}/dev"]
    assert len(dev) == 1
    nodes = _ops(plan, p.DevNode)
    assert {n.target for n in nodes} == {f"{root}/dev/{n}" for n in DEV_NODES}
    assert len(nodes) == len(DEV_NODES)
    assert all(n.source == "/dev/" + n.target.rsplit("/", 1)[1] for n in nodes)
    assert all(_index(plan, n) > _index(plan, dev[0]) for n in nodes)
    assert p.Devpts(f"{root}/dev/pts") in ops
    assert p.Symlink("pts/ptmx", f"{root}/dev/ptmx") in ops
    assert any(t.target == f"{root}/dev/shm" for t in _ops(plan, p.Tmpfs))

    # user mounts: resolved inside the new root (within=root), after the root is built
    binds = _ops(plan, p.Bind)
    assert binds == [
        p.Bind(str(src_dir), "/data", root, readonly=False, create="dir"),
        p.Bind(str(src_file), "/etc/app.conf", root, readonly=True, create="file"),
    ]
    assert all(_index(plan, b) > _index(plan, usr_ov) for b in binds)
    assert all(_index(plan, b) > _index(plan, dev[0]) for b in binds)

    assert p.Hostname("box1") in ops
    assert p.LoopbackUp() in ops
    assert plan.namespaces == ("user", "mnt", "pid", "ipc", "uts", "net", "cgroup")
    proc_ = plan.process
    assert proc_.harden and proc_.init and proc_.no_new_privs and proc_.new_session
    assert proc_.seccomp == "default" and proc_.caps == ()


def test_masks_only_what_the_host_has(root_host: hostmod.Host) -> None:
    plan = planner.plan(Spec(), ["true"])
    root = f"{root_host.scratch}/root"
    masked = {m.path.rsplit("/", 1)[1] for m in _ops(plan, p.Mask)}
    for name in planner.PROC_MASKED:
        assert (name in masked) == os.path.lexists(f"/proc/{name}"), name
    assert p.ReadOnly(f"{root}/proc/sys") in plan.ops  # /proc/sys always exists


def test_uid_map_as_root_never_maps_host_zero(root_host: hostmod.Host) -> None:
    for user in (User(0, 0), User(1000, 1000), User(65535, 65535)):
        plan = planner.plan(Spec(user=user), ["id"])
        for maps in (plan.uid_map, plan.gid_map):
            assert maps == (p.IdMap(0, BASE, 65536),)
            for m in maps:
                assert not (m.outside <= 0 < m.outside + m.count)
        assert plan.process.uid == user.uid and plan.process.gid == user.gid
        assert plan.process.setgroups is True


def test_uid_map_unprivileged_maps_only_the_caller(fake_host: Callable[[int], hostmod.Host]) -> None:
    fake_host(1000)
    plan = planner.plan(Spec(), ["id"])
    assert plan.uid_map == (p.IdMap(0, 1000, 1),)
    assert plan.gid_map == (p.IdMap(0, 1000, 1),)
    assert plan.process.setgroups is False  # rootless: setgroups is denied
    plan = planner.plan(Spec(user=User(1234, 99)), ["id"])
    assert plan.uid_map == (p.IdMap(1234, 1000, 1),)
    assert plan.gid_map == (p.IdMap(99, 1000, 1),)
    assert (plan.process.uid, plan.process.gid) == (1234, 99)


@pytest.mark.parametrize("raw", ["0:65536", "-5:10", "1:0", "x:y", "100"])
def test_idmap_config_refuses_ranges_with_host_zero(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("SILO_IDMAP", raw)
    with pytest.raises(SpecError):
        hostmod.idmap_config()


def test_idmap_config_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SILO_IDMAP", "200000:1000")
    assert hostmod.idmap_config() == (200000, 1000)


def test_non_root_sandbox_user_gets_a_home(root_host: hostmod.Host) -> None:
    plan = planner.plan(Spec(user=User(1000, 1001)), ["id"])
    upper = f"{root_host.scratch}/u/root"
    assert p.Mkdir(f"{upper}/home/user", 0o755, 1000, 1001) in plan.ops
    passwd = next(w for w in _ops(plan, p.WriteFile) if w.path.endswith("/passwd"))
    assert b"user:x:1000:1001:" in passwd.data
    assert dict(plan.process.env)["HOME"] == "/home/user"


def test_environment_is_only_spec_env_and_path_home_term(root_host: hostmod.Host,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    monkeypatch.setenv("LD_PRELOAD", "/evil.so")
    spec = Spec(env=(("A", "1"), ("PATH", "/opt/bin")))
    env = dict(planner.plan(spec, ["env"], term="xterm-256color").process.env)
    assert env == {"PATH": "/opt/bin", "HOME": "/root", "TERM": "xterm-256color", "A": "1"}
    env = dict(planner.plan(Spec(), ["env"]).process.env)
    assert env == {"PATH": planner.DEFAULT_PATH, "HOME": "/root"}


def test_limits_and_timeout_are_carried(root_host: hostmod.Host) -> None:
    spec = Spec(limits=Limits(memory=32 << 20, cpus=1.5, pids=16), timeout=2.5,
                rlimits=(("nofile", 64, 64),), caps=("NET_BIND_SERVICE",), workdir="/w")
    plan = planner.plan(spec, ["x"])
    assert (plan.memory, plan.cpus, plan.pids, plan.timeout) == (32 << 20, 1.5, 16, 2.5)
    assert plan.process.rlimits == (("nofile", 64, 64),)
    assert plan.process.caps == ("NET_BIND_SERVICE",)
    assert plan.process.cwd == "/w"


# errors ----------------------------------------------------------------------------------


def test_missing_mount_source(root_host: hostmod.Host, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(NotFoundError, match=f"mount source {missing} does not exist"):
        planner.plan(Spec(mounts=(Mount(str(missing), "/data"),)), ["true"])


def test_relative_mount_source(root_host: hostmod.Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SpecError, match="absolute host path"):
        Mount.parse("data:/data")
    # A Mount built directly (silo.Mount is public) is validated too: a relative source is
    # refused even when it happens to exist in the planner's cwd.
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError):
        planner.plan(Spec(mounts=(Mount("data", "/data"),)), ["true"])


def test_no_command(root_host: hostmod.Host) -> None:
    with pytest.raises(SpecError, match="no command given"):
        planner.plan(Spec(), [])
    with pytest.raises(SpecError, match="NUL"):
        planner.plan(Spec(), ["a\0b"])


def test_missing_root_dir(root_host: hostmod.Host, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=r"root directory .* does not exist"):
        planner.plan(Spec(root=str(tmp_path / "image")), ["true"])


def test_missing_seccomp_profile(root_host: hostmod.Host, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="seccomp profile"):
        planner.plan(Spec(seccomp=str(tmp_path / "p.json")), ["true"])


# image root ----------------------------------------------------------------------------------


def test_image_root_plan(root_host: hostmod.Host, tmp_path: Path) -> None:
    image = tmp_path / "image"
    (image / "etc").mkdir(parents=True)
    (image / "bin").mkdir()
    link = tmp_path / "image-link"
    link.symlink_to(image)
    plan = planner.plan(Spec(root=str(link), hostname="img"), ["/bin/sh"])
    scratch = root_host.scratch
    root, upper = f"{scratch}/root", f"{scratch}/u/root"
    overlays = _ops(plan, p.Overlay)
    # only the image as the lower layer (its real path), no host system directories
    idmapped = (f"{scratch}/l/root",) if image.stat().st_uid == 0 else ()
    assert overlays == [p.Overlay(root, (str(image),), upper, f"{scratch}/w/root", idmapped=idmapped)]
    assert not any(o.lower == ("/usr",) for o in overlays)
    assert p.Mkdir(f"{upper}/proc") in plan.ops
    assert p.Mkdir(f"{upper}/dev") in plan.ops
    assert p.Mkdir(f"{upper}/tmp", 0o1777) in plan.ops
    written = {w.path: w.data for w in _ops(plan, p.WriteFile)}
    assert written == {f"{upper}/etc/hosts": planner._hosts("img"), f"{upper}/etc/hostname": b"img\n"}
    assert plan.ops[0] == p.MakePrivate() and plan.ops[-1] == p.PivotRoot(root)
    assert p.Proc(f"{root}/proc") in plan.ops
    assert {n.target for n in _ops(plan, p.DevNode)} == {f"{root}/dev/{n}" for n in DEV_NODES}


def test_image_root_idmapped_only_when_host_root_owns_it(root_host: hostmod.Host, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "image"
    image.mkdir()
    real_stat = os.stat
    for owner, idmapped in ((0, (f"{root_host.scratch}/l/root",)), (BASE, ())):
        def fake_stat(path: Any, *args: Any, owner: int = owner, **kw: Any) -> Any:
            st = real_stat(path, *args, **kw)
            if os.fsdecode(path) == str(image):
                return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, owner, owner,
                                       st.st_size, 0, 0, 0))
            return st
        monkeypatch.setattr(planner.os, "stat", fake_stat)
        plan = planner.plan(Spec(root=str(image)), ["/bin/sh"])
        assert [o.idmapped for o in _ops(plan, p.Overlay)] == [idmapped], owner
        assert (p.Mkdir(f"{root_host.scratch}/l/root") in plan.ops) == bool(idmapped)
    monkeypatch.setattr(planner.os, "stat", real_stat)


def test_rootless_plans_never_idmap(fake_host: Callable[[int], hostmod.Host]) -> None:
    fake_host(1000)
    plan = planner.plan(Spec(), ["/bin/true"])
    assert all(o.idmapped == () for o in _ops(plan, p.Overlay))
    assert not any(m.path.endswith("/l") for m in _ops(plan, p.Mkdir))


def test_image_root_without_etc_writes_no_etc(root_host: hostmod.Host, tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.mkdir()
    plan = planner.plan(Spec(root=str(image)), ["/bin/sh"])
    assert _ops(plan, p.WriteFile) == []


# workspaces: the host's package state ----------------------------------------------------------

PACKAGE_STATE = ("var/lib/dpkg", "var/lib/apt", "var/cache/apt")


@pytest.fixture
def package_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host with all of :data:`hostmod.PACKAGE_STATE`, whatever this machine has."""
    monkeypatch.setattr(hostmod, "package_state_dirs", lambda: list(PACKAGE_STATE))


def _storage(tmp_path: Path) -> planner.Layers:
    (tmp_path / "ws" / "upper").mkdir(parents=True)
    (tmp_path / "ws" / "work").mkdir()
    return planner.Layers(upper=str(tmp_path / "ws" / "upper"), work=str(tmp_path / "ws" / "work"))


def test_a_workspace_gets_the_host_package_state_copy_on_write(root_host: hostmod.Host, package_state: None,
                                                                tmp_path: Path) -> None:
    layers = _storage(tmp_path)
    upper, work, attach = layers.upper, layers.work, f"{root_host.scratch}/l"
    plan = planner.plan_workspace(Spec(), layers)
    root = f"{root_host.scratch}/root"
    # on a skeleton with the mount points (a one-shot sandbox's /var stays empty)
    skeleton = hostmod.skeleton(workspace=True)
    assert next(o for o in _ops(plan, p.Overlay) if o.target == root).lower == (skeleton,)
    assert sorted(os.listdir(f"{skeleton}/var/lib")) == ["apt", "dpkg"]
    assert sorted(os.listdir(f"{hostmod.skeleton()}/var")) == ["tmp"]
    usr = next(o for o in _ops(plan, p.Overlay) if o.target == f"{root}/usr")
    for name in PACKAGE_STATE:
        # like /usr: the host's directory under the workspace's nested upper, idmapped
        overlay = p.Overlay(f"{root}/{name}", (f"/{name}",), f"{upper}/{name}", f"{work}/{name}",
                            idmapped=(f"{attach}/{name}",))
        assert overlay in plan.ops, name
        assert _index(plan, usr) < _index(plan, overlay)
        # every directory on the way is made once, before the overlay that needs it
        for top in (upper, work, attach):
            parts = name.split("/")
            for i in range(1, len(parts) + 1):
                path = "/".join((top, *parts[:i]))
                assert _ops(plan, p.Mkdir).count(p.Mkdir(path)) == 1, path
                assert _index(plan, p.Mkdir(path)) < _index(plan, overlay)
    # with the host's system accounts (dpkg's statoverride names them), never _apt
    passwd = next(w.data for w in _ops(plan, p.WriteFile) if w.path.endswith("/etc/passwd")).decode()
    assert passwd.startswith("root:x:0:0:") and passwd.endswith("nobody:x:65534:65534:nobody:/nonexistent:"
                                                               "/usr/sbin/nologin\n")
    assert "\n_apt:" not in passwd


def test_one_shot_and_rootless_sandboxes_get_no_package_state(fake_host: Callable[[int], hostmod.Host],
                                                              package_state: None, tmp_path: Path) -> None:
    fake_host(0)
    one_shot = planner.plan(Spec(), ["true"])
    fake_host(1000)
    rootless = planner.plan_workspace(Spec(user=User(1000, 1000)), _storage(tmp_path))
    for plan in (one_shot, rootless):
        assert not any("/var/" in o.target for o in _ops(plan, p.Overlay))
        assert not any(o.lower[-1].endswith("-workspace") for o in _ops(plan, p.Overlay))
        passwd = next(w.data for w in _ops(plan, p.WriteFile) if w.path.endswith("/etc/passwd"))
        assert passwd.count(b"\n") <= 3  # root, the user, nobody: nothing of the host's


def test_a_restart_keeps_the_nested_uppers(root_host: hostmod.Host, package_state: None, tmp_path: Path) -> None:
    layers = _storage(tmp_path)
    assert layers.upper and layers.work
    for name in ("root", "var/lib/dpkg", "var/lib/apt"):
        for top in (layers.upper, layers.work):
            os.makedirs(f"{top}/{name}")
    plan = planner.plan_workspace(Spec(), layers)
    made = {m.path for m in _ops(plan, p.Mkdir)}
    for top in (layers.upper, layers.work):
        assert not {f"{top}/var", f"{top}/var/lib", f"{top}/var/lib/dpkg", f"{top}/var/lib/apt"} & made
        assert {f"{top}/var/cache", f"{top}/var/cache/apt"} <= made  # only what is missing


def test_a_symlink_in_the_storage_is_never_followed(root_host: hostmod.Host, package_state: None,
                                                    tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "dpkg").mkdir(parents=True)
    # a frozen layer (an imported one may hold anything) whose var/lib is a symlink: no layer there
    layer = tmp_path / "layer"
    (layer / "var").mkdir(parents=True)
    (layer / "var" / "lib").symlink_to(elsewhere)
    (layer / "var" / "cache" / "apt").mkdir(parents=True)
    layers = dataclasses.replace(_storage(tmp_path), lowers=(str(layer),))
    plan = planner.plan_workspace(Spec(), layers)
    lowers = {o.target.rsplit("/root/", 1)[1]: o.lower for o in _ops(plan, p.Overlay) if "/var/" in o.target}
    assert lowers["var/lib/dpkg"] == ("/var/lib/dpkg",)
    assert lowers["var/cache/apt"] == (f"{layer}/var/cache/apt", "/var/cache/apt")
    # the same in the upper: refused, nothing made through it
    assert layers.upper
    os.makedirs(f"{layers.upper}/var")
    os.symlink(elsewhere, f"{layers.upper}/var/lib")
    with pytest.raises(UserError, match="var/lib in its storage is not a directory"):
        planner.plan_workspace(Spec(), layers)


def test_host_system_accounts_never_take_ours(root_host: hostmod.Host, monkeypatch: pytest.MonkeyPatch) -> None:
    users = [("daemon", 1, 1, "daemon", "/usr/sbin", "/usr/sbin/nologin"),
             ("www-data", 33, 33, "", "/var/www", "/bin/sh"), ("user", 7, 7, "", "/", "/bin/sh")]
    groups = [("daemon", 1, ()), ("ssl-cert", 103, ("postgres",)), ("tty", 5, ()), ("other", 1000, ())]
    monkeypatch.setattr(hostmod, "system_accounts", lambda: (users, groups))
    passwd = planner._passwd(33, 1000, True).decode().splitlines()
    assert [line.split(":")[0] for line in passwd] == ["root", "user", "daemon", "nobody"]
    group = planner._group(33, 1000, True).decode().splitlines()
    assert group == ["root:x:0:", "tty:x:5:", "user:x:1000:", "daemon:x:1:", "ssl-cert:x:103:postgres",
                     "nogroup:x:65534:"]
    assert planner._passwd(33, 1000) == planner._passwd(33, 1000, False)


def test_the_curated_etc_leaves_credentials_and_private_files_out(tmp_path: Path) -> None:
    etc, out = tmp_path / "etc", tmp_path / "out"
    (etc / "apt" / "auth.conf.d").mkdir(parents=True)
    (etc / "apt" / "sources.list.d").mkdir()
    (etc / "apt" / "sources.list.d" / "debian.sources").write_text("Types: deb\n")
    (etc / "apt" / "auth.conf").write_text("machine example.org login me password secret\n")
    (etc / "apt" / "auth.conf").chmod(0o644)  # even when readable by all
    (etc / "apt" / "auth.conf.d" / "x.conf").write_text("secret\n")
    (etc / "ssl" / "private").mkdir(parents=True)
    (etc / "ssl" / "private").chmod(0o710)
    (etc / "ssl" / "certs").mkdir()
    (etc / "ssl" / "certs" / "ca.pem").write_text("cert\n")
    (etc / "ssl" / "certs" / "key.pem").write_text("key\n")
    (etc / "ssl" / "certs" / "key.pem").chmod(0o600)
    (etc / "shadow").write_text("root:*:1::::::\n")
    (etc / "host.conf").write_text("multi on\n")
    out.mkdir()
    hostmod.copy_etc(str(etc), str(out))
    copied = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert copied == ["apt", "apt/sources.list.d", "apt/sources.list.d/debian.sources", "host.conf", "ssl",
                      "ssl/certs", "ssl/certs/ca.pem"]


# app level ----------------------------------------------------------------------------------


@pytest.mark.parametrize("uid", [0, 1000])
def test_app_level_plan(fake_host: Callable[[int], hostmod.Host], tmp_path: Path, uid: int) -> None:
    h = fake_host(uid)
    home = tmp_path / "home"
    home.mkdir()
    cow = tmp_path / "project"
    cow.mkdir()
    spec = Spec(isolation=Isolation.APP, cow=(str(cow),), env=(("X", "1"),))
    caller_env = {"HOME": str(home), "PATH": "/usr/bin", "SSH_AUTH_SOCK": "/tmp/agent"}
    plan = planner.plan(spec, ["make"], caller_env=caller_env, caller_cwd=str(cow))
    scratch = h.scratch
    assert plan.isolation == "app"
    assert plan.ops[0] == p.MakePrivate()
    assert plan.ops[1] == p.Tmpfs(scratch, plan.ops[1].options)
    assert _ops(plan, p.Overlay) == [
        p.Overlay(str(home), (str(home),), f"{scratch}/u0", f"{scratch}/w0", userxattr=uid != 0),
        p.Overlay(str(cow), (str(cow),), f"{scratch}/u1", f"{scratch}/w1", userxattr=uid != 0),
    ]
    assert plan.ops[-2] == p.Unmount(scratch)  # the overlays keep their own references
    assert plan.ops[-1] == p.Proc("/proc")  # of the app's own pid namespace
    for absent in (p.PivotRoot, p.DevNode, p.Bind, p.Hostname):
        assert _ops(plan, absent) == []
    proc = plan.process
    assert proc.seccomp == "unconfined" and not proc.harden and not proc.no_new_privs
    assert proc.init  # tini reaps and kills everything the app started when it exits
    assert (proc.uid, proc.gid) == (uid, uid)  # the calling user
    assert proc.cwd == str(cow)
    assert dict(proc.env) == {**caller_env, "X": "1"}  # the caller's environment, plus the spec's
    if uid == 0:
        assert plan.namespaces == ("mnt", "pid") and plan.uid_map == ()
    else:
        assert plan.namespaces == ("user", "mnt", "pid")
        assert plan.uid_map == (p.IdMap(1000, 1000, 1),) and plan.gid_map == (p.IdMap(1000, 1000, 1),)
    assert "net" not in plan.namespaces  # the host's network


def test_app_level_keep_uses_the_keep_dir(root_host: hostmod.Host, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    keep = tmp_path / "keep"
    spec = Spec(isolation=Isolation.APP, keep=str(keep))
    plan = planner.plan(spec, ["true"], caller_env={"HOME": str(home)}, caller_cwd="/")
    upper, work = planner.keep_layout(str(keep), str(home))
    assert upper.startswith(str(keep)) and work.startswith(str(keep))
    assert _ops(plan, p.Overlay) == [p.Overlay(str(home), (str(home),), upper, work, userxattr=False)]
    assert _ops(plan, p.Tmpfs) == [] and _ops(plan, p.Unmount) == []


def test_app_level_missing_cow(root_host: hostmod.Host, tmp_path: Path) -> None:
    spec = Spec(isolation=Isolation.APP, cow=(str(tmp_path / "missing"),))
    with pytest.raises(NotFoundError, match="--cow path"):
        planner.plan(spec, ["true"], caller_env={"HOME": str(tmp_path)}, caller_cwd="/")


# the wire form and describe() ----------------------------------------------------------------------


def _full_plan(tmp_path: Path) -> p.Plan:
    src = tmp_path / "src"
    src.mkdir()
    spec = Spec(mounts=(Mount(str(src), "/src", True),), env=(("A", "1"),), user=User(1000, 1000),
                limits=Limits(memory=256 << 20, cpus=0.5, pids=64), timeout=3.0,
                rlimits=(("nofile", 64, 128),), caps=("CHOWN",))
    return planner.plan(spec, ["sh", "-c", "echo hi"], term="xterm")


def test_wire_round_trip(root_host: hostmod.Host, tmp_path: Path) -> None:
    plan = _full_plan(tmp_path)
    wire = plan.to_wire()
    assert p.Plan.from_wire(wire) == plan
    # the spawner receives it through marshal
    assert p.Plan.from_wire(marshal.loads(marshal.dumps(wire))) == plan
    # every op kind survives
    kinds = {op.name for op in plan.ops}
    assert {"make-private", "tmpfs", "mkdir", "symlink", "write-file", "overlay", "bind", "dev-node",
            "proc", "devpts", "read-only", "hostname", "loopback-up", "pivot-root"} <= kinds
    app = planner.plan(Spec(isolation=Isolation.APP), ["true"], caller_env={"HOME": str(tmp_path)},
                       caller_cwd="/")
    assert p.Plan.from_wire(marshal.loads(marshal.dumps(app.to_wire()))) == app
    # the identity cache of the wire form does not confuse two equal-looking plans
    other = dataclasses.replace(plan, ops=plan.ops[:-1])
    assert p.Plan.from_wire(other.to_wire()) == other


@pytest.mark.parametrize("bad", [
    None, (), ("process",), 42,
    ("process", (), (), (), (("no-such-op",),), ("true",), None, None, None, None),
])
def test_from_wire_rejects_garbage(bad: Any) -> None:
    with pytest.raises(ProtocolError, match="malformed plan"):
        p.Plan.from_wire(bad)


def test_describe(root_host: hostmod.Host, tmp_path: Path) -> None:
    plan = _full_plan(tmp_path)
    lines = plan.describe()
    root = f"{root_host.scratch}/root"
    assert lines[0] == "isolation process"
    assert lines[1] == "unshare user mnt pid ipc uts net cgroup"
    assert f"map uid 0 -> host {BASE} (count 65536)" in lines
    assert f"map gid 0 -> host {BASE} (count 65536)" in lines
    assert f"limit memory {256 << 20}" in lines
    assert "limit cpus 0.5" in lines and "limit pids 64" in lines and "limit timeout 3.0" in lines
    assert "make-private" in lines
    assert f"pivot-root new_root={root}" in lines
    assert f"proc target={root}/proc" in lines
    assert f"bind source={tmp_path / 'src'} target=/src within={root} readonly=True recursive=True create=dir" in lines
    passwd = [line for line in lines if line.startswith("write-file") and "/etc/passwd" in line]
    assert len(passwd) == 1 and "data=<" in passwd[0] and " bytes>" in passwd[0]
    assert "identity uid=1000 gid=1000 caps=CHOWN no_new_privs=True seccomp=default" in lines
    assert "rlimit nofile 64:128" in lines
    assert lines[-2] == "env PATH HOME TERM A"  # names only, never values
    assert lines[-1] == "exec cwd=/ sh -c echo hi"
    # one line per operation, in plan order
    op_lines = [line for line in lines if line.split(" ", 1)[0] in p.OP_CLASSES]
    assert [line.split(" ", 1)[0] for line in op_lines] == [op.name for op in plan.ops]


@pytest.mark.parametrize("network", [None, "internet"])
def test_a_gvisor_plan_with_a_network_puts_runscs_netstack_behind_the_keeper(
        root_host: hostmod.Host, monkeypatch: pytest.MonkeyPatch, network: str | None) -> None:
    """runsc takes the links of its own network namespace (--network=sandbox, the
    bundle's network namespace is runsc's own), asks silo's resolver on the keeper's end
    of the link, and does not see /proc/sys/net/core (its root-namespace test); without
    a network, loopback only."""
    import json

    from silo.backends.gvisor import runsc
    from silo.model.network import VM_HOST4, build_policy

    monkeypatch.setenv("SILO_GVISOR_PLATFORM", "ptrace")
    monkeypatch.setattr(runsc, "runsc", lambda: "/usr/bin/runsc")
    spec = Spec(isolation=Isolation.GVISOR, network=build_policy(network))
    plan = planner.plan(spec, ["true"])
    config = json.loads(next(op.data for op in _ops(plan, p.WriteFile) if op.path.endswith("/config.json")))
    netns = next(ns for ns in config["linux"]["namespaces"] if ns["type"] == "network")
    resolv = [op.data for op in _ops(plan, p.WriteFile) if op.path.endswith("/etc/resolv.conf")]
    hidden = [op for op in _ops(plan, p.Tmpfs) if op.target == "/proc/sys/net/core"]
    if network is None:
        assert "--network=none" in plan.process.argv and plan.network is None
        assert netns == {"type": "network"} and resolv == [] and hidden == []
    else:
        assert "--network=sandbox" in plan.process.argv and plan.network is not None
        assert netns == {"type": "network", "path": "/proc/self/ns/net"}
        assert resolv and f"nameserver {VM_HOST4}\n".encode() in resolv[0]
        assert hidden and hidden[0].readonly and _index(plan, hidden[0]) > _index(plan, p.Proc("/proc"))


def test_a_gvisor_workspace_resumes_a_memory_image_with_runsc_restore_of_the_same_bundle(
        root_host: hostmod.Host, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The init of a workspace restored to a snapshot --memory is ``runsc restore`` of
    the image with the bundle a fresh start would have; its commands join it as ever.
    Only the gvisor level resumes processes."""
    from silo.backends.gvisor import runsc

    monkeypatch.setenv("SILO_GVISOR_PLATFORM", "ptrace")
    monkeypatch.setattr(runsc, "runsc", lambda: "/usr/bin/runsc")
    spec = Spec(isolation=Isolation.GVISOR)
    fresh = planner.plan_workspace(spec, planner.Layers())
    image = str(tmp_path / "images" / "0123456789abcdef")
    resumed = planner.plan_workspace(spec, planner.Layers(), image)
    argv = list(resumed.process.argv)
    assert argv[argv.index("restore"):] == ["restore", "--image-path", image, "--bundle", *fresh.process.argv[-2:]]
    assert "run" in fresh.process.argv and "restore" not in fresh.process.argv
    assert resumed.ops == fresh.ops and resumed.gvisor == fresh.gvisor
    # checkpoint, like exec and kill, runs as the workspace's root in its namespaces, no operations
    save = planner.plan_runsc(resumed, runsc.checkpoint_argv(resumed.process.argv, image))
    assert save.ops == () and save.namespaces == ("user", "pid") and save.gvisor is None
    assert save.process.argv[3:] == ("checkpoint", "--image-path", image, runsc.CONTAINER)
    assert (save.process.uid, save.process.gid) == (0, 0)
    with pytest.raises(SpecError, match="only a gvisor workspace resumes saved processes"):
        planner.plan_workspace(Spec(), planner.Layers(), image)


def test_a_gvisor_run_with_t_has_runsc_make_the_pty_and_silo_init_take_its_master(
        root_host: hostmod.Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """-t: the bundle's process has a terminal, runsc hands the master of the pty it
    makes over a socket in the sandbox's scratch, where silo-init (told by the launcher's
    ``console``) takes it; silo-setup makes none. The sandbox's own devpts is mounted
    for that pty, with or without -t; without -t nothing else changes."""
    import json

    from silo.backends.gvisor import runsc

    monkeypatch.setenv("SILO_GVISOR_PLATFORM", "ptrace")
    monkeypatch.setattr(runsc, "runsc", lambda: "/usr/bin/runsc")
    spec = Spec(isolation=Isolation.GVISOR)
    plain, tty = planner.plan(spec, ["sh"]), planner.plan(spec, ["sh"], tty=True, term="xterm")
    console = f"{root_host.scratch}/console"
    argv = list(tty.process.argv)
    assert argv[argv.index("run"):argv.index("--bundle")] == ["run", "--console-socket", console]
    assert (tty.process.tty, tty.process.console) == (True, console)
    assert (plain.process.tty, plain.process.console) == (False, "")
    assert "--console-socket" not in plain.process.argv

    def config(plan: p.Plan) -> dict[str, Any]:
        return json.loads(next(op.data for op in _ops(plan, p.WriteFile) if op.path.endswith("/config.json")))

    assert config(tty)["process"]["terminal"] is True and "terminal" not in config(plain)["process"]
    assert "TERM=xterm" in config(tty)["process"]["env"]
    for plan in (plain, tty):
        assert _index(plan, p.Devpts("/dev/pts")) > _index(plan, p.Proc("/proc"))
    # the script tells silo-setup where silo-init is to take the master
    assert console.encode() + b"\0" in script.encode(tty, None)


def test_a_gvisor_exec_is_a_process_file_the_join_writes_and_t_is_its_terminal(
        root_host: hostmod.Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """runsc exec reads the command from a process file (0600, written by the join as
    the workspace's root, in its scratch): its environment is in no host command line,
    and ``terminal`` is how this runsc gives a command the pty silo-setup made. A signal
    relay (plan_runsc) of a -t run has no terminal of its own."""
    import json

    from silo.backends.gvisor import runsc

    monkeypatch.setenv("SILO_GVISOR_PLATFORM", "ptrace")
    monkeypatch.setattr(runsc, "runsc", lambda: "/usr/bin/runsc")
    ws = planner.plan_workspace(Spec(isolation=Isolation.GVISOR, env=(("SECRET", "s3"),)), planner.Layers())
    for tty in (False, True):
        plan = planner.plan_join(ws, ["sh", "-c", "echo hi"], env=[("K", "V")], cwd="/tmp", uid=1000, tty=tty)
        assert plan.gvisor is not None and plan.gvisor.pid_file.startswith(f"{root_host.scratch}/exec/")
        (write,) = plan.ops
        assert isinstance(write, p.WriteFile) and write.mode == 0o600
        assert write.path == runsc.process_file(plan.gvisor.pid_file)
        spec = json.loads(write.data)
        assert spec["args"] == [runsc.INIT_PATH, "--run", "-1", "--", "sh", "-c", "echo hi"]
        assert spec["terminal"] is tty and spec["cwd"] == "/tmp" and spec["user"] == {"uid": 1000, "gid": 1000}
        assert "K=V" in spec["env"] and "SECRET=s3" in spec["env"]
        assert plan.process.argv[3:] == ("exec", f"--internal-pid-file={plan.gvisor.pid_file}",
                                         f"--process={write.path}", runsc.CONTAINER)
        assert not [a for a in plan.process.argv if "s3" in a]
        assert (plan.process.tty, plan.process.console) == (tty, "")
    run = planner.plan(Spec(isolation=Isolation.GVISOR), ["sh"], tty=True)
    relay = planner.plan_runsc(run, runsc.signal_argv(run.process.argv, 2))
    assert relay.process.argv[3:] == ("kill", runsc.CONTAINER, "2")
    assert (relay.process.tty, relay.process.console, relay.ops) == (False, "", ())


def test_gvisor_pids_is_rlimit_nproc_inside_and_no_cgroup_limit(
        root_host: hostmod.Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """--pids at the gvisor level is the bundle's RLIMIT_NPROC (the Sentry enforces it),
    the lower of it and an --rlimit nproc; the plan asks no pids cgroup, which would
    count runsc's threads."""
    import json

    from silo.backends.gvisor import runsc

    monkeypatch.setenv("SILO_GVISOR_PLATFORM", "ptrace")
    monkeypatch.setattr(runsc, "runsc", lambda: "/usr/bin/runsc")

    def nproc(spec: Spec) -> list[dict[str, Any]]:
        plan = planner.plan(spec, ["true"])
        assert plan.pids is None
        config = json.loads(next(op.data for op in _ops(plan, p.WriteFile) if op.path.endswith("/config.json")))
        return [r for r in config["process"].get("rlimits", []) if r["type"] == "RLIMIT_NPROC"]

    gv = Spec(isolation=Isolation.GVISOR)
    assert nproc(gv) == []
    assert nproc(dataclasses.replace(gv, limits=Limits(pids=16))) == [
        {"type": "RLIMIT_NPROC", "soft": 16, "hard": 16}]
    both = dataclasses.replace(gv, limits=Limits(pids=16), rlimits=(("nofile", 64, 64), ("nproc", 8, 32)))
    assert nproc(both) == [{"type": "RLIMIT_NPROC", "soft": 8, "hard": 16}]


def test_a_gvisor_seccomp_profile_is_silos_program_loaded_by_silo_init_for_each_command(
        root_host: hostmod.Host, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--seccomp FILE at the gvisor level: the process level's compiled program, in hex,
    for silo-init inside to load before a run's command and before each exec's (runsc's
    OCI seccomp would miss the execs); 'default' and 'unconfined' load none; a bad
    profile is refused at planning, in one line."""
    import json

    from silo.backends.gvisor import runsc
    from silo.sys import seccomp

    monkeypatch.setenv("SILO_GVISOR_PLATFORM", "ptrace")
    monkeypatch.setattr(runsc, "runsc", lambda: "/usr/bin/runsc")
    profile = tmp_path / "p.json"
    profile.write_text('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], '
                       '"action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}')
    program = seccomp.compile_profile(str(profile)).hex()

    def args(plan: p.Plan) -> list[str]:
        config = json.loads(next(op.data for op in _ops(plan, p.WriteFile) if op.path.endswith("/config.json")))
        return list(config["process"]["args"])

    gv = Spec(isolation=Isolation.GVISOR)
    for choice in ("default", "unconfined"):
        assert args(planner.plan(dataclasses.replace(gv, seccomp=choice), ["true"])) == [
            runsc.INIT_PATH, "--run", "-1", "--", "true"]
    filtered = dataclasses.replace(gv, seccomp=str(profile))
    assert args(planner.plan(filtered, ["true"])) == [runsc.INIT_PATH, "--run", "-1", "--seccomp", program, "--",
                                                      "true"]
    ws = planner.plan_workspace(filtered, planner.Layers())
    assert ws.gvisor is not None and ws.gvisor.seccomp == program
    assert p.Plan.from_wire(marshal.loads(marshal.dumps(ws.to_wire()))).gvisor == ws.gvisor
    (write,) = planner.plan_join(ws, ["mkdir", "/x"]).ops
    assert isinstance(write, p.WriteFile)
    assert json.loads(write.data)["args"] == [runsc.INIT_PATH, "--run", "-1", "--seccomp", program, "--",
                                              "mkdir", "/x"]
    profile.write_text("{not json")
    with pytest.raises(SpecError, match="invalid JSON"):
        planner.plan(dataclasses.replace(gv, seccomp=str(profile)), ["true"])


def test_open_tcp_connections_and_runscs_refusals_are_read() -> None:
    from silo.backends.gvisor import runsc

    tables = (b"  sl  local_address rem_address   st tx_queue rx_queue\n"
              b"   3: 00000000:1F40 00000000:0000 0A 00000000:00000000\n"  # a listener
              b"   5: FEFFD50A:1F40 FDFFD50A:BC56 01 00000000:00000000\n"  # over eth0: refused by gVisor
              b"   6: 0100007F:2328 0100007F:C001 01 00000000:00000000\n"  # over loopback: saved
              b"  sl  local_address                         remote_address                        st\n"
              b"   0: 00000000000000000000000001000000:2328 00000000000000000000000001000000:C002 01\n"
              b"   1: 000080FE00000000FF00000000000000:1F40 000080FE00000000FF00000001000000:C003 01\n")
    assert runsc.open_connections(tables) == 2
    assert runsc.open_connections(b"") == 0
    said = b"checkpoint failed: ... save rejected due to unsupported networking state: endpoint cannot be saved " \
           b"in connected state: local 10.213.255.254:8000"
    assert "TIME_WAIT" in (runsc.checkpoint_refusal(said) or "")
    assert runsc.checkpoint_refusal(b"something else") is None
