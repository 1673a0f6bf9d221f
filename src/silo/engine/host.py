"""Facts about the host the engine plans for, and the cached skeleton root.

The skeleton is the read-only lower layer of a ``root = "host"`` sandbox's ``/``:
empty mount points, the host's ``/bin``-style symlinks, and a *curated* copy of
``/etc`` (only the entries in :data:`ETC_ENTRIES`: no shadow, no ssh keys, no
host secrets; inside them nothing of :data:`ETC_EXCLUDED` and no file or directory
other users may not read). It is built once per set of host files and reused by
every sandbox; it is rebuilt when an entry's metadata changes. A root-run workspace's
skeleton also has the mount points of the host's package state (:data:`WORKSPACE_DIRS`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from functools import cache

from silo.engine import paths
from silo.model.errors import SpecError

# The host's system directories a host-root sandbox sees (read-only, under an overlay).
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")

# The curated /etc: enough for the dynamic linker, TLS, name lookup, locales, shells
# and package tools; never passwd/shadow/group (generated), ssh, sudoers or keys.
ETC_ENTRIES = (
    "alternatives", "bash.bashrc", "ca-certificates", "ca-certificates.conf", "debian_version",
    "default", "dpkg", "environment", "gai.conf", "host.conf", "inputrc", "issue", "ld.so.cache",
    "ld.so.conf", "ld.so.conf.d", "locale.alias", "locale.conf", "localtime", "lsb-release",
    "magic", "mailcap", "mime.types", "nsswitch.conf", "os-release", "profile", "profile.d",
    "protocols", "python3", "python3.11", "resolv.conf", "rpc", "services", "shells", "skel",
    "ssl", "terminfo", "timezone", "xattr.conf", "apt",
)
# Never copied, whatever their mode: apt's logins to its sources.
ETC_EXCLUDED = ("apt/auth.conf", "apt/auth.conf.d")
# Inside ETC_ENTRIES' directories, watched for changes too (editing a file in place does
# not change its directory's mtime).
ETC_WATCHED = ("ssl/certs", "apt/sources.list", "apt/sources.list.d", "apt/apt.conf.d", "apt/preferences.d",
               "apt/trusted.gpg", "apt/trusted.gpg.d", "apt/keyrings")

# The package manager's state: a root-run workspace gets copy-on-write views of the host's
# (see planner.plan_workspace), so its apt and dpkg start from what the host has installed.
# Not /var/cache/debconf: the host's holds passwords (passwords.dat); the workspace's
# skeleton has an empty one, so debconf starts a database of the workspace's own.
PACKAGE_STATE = ("var/lib/dpkg", "var/lib/apt", "var/cache/apt")

# The skeleton's directories besides /etc and the system dirs' mount points, parents first.
SKELETON_DIRS = (
    ("etc", 0o755), ("proc", 0o555), ("dev", 0o755), ("tmp", 0o1777), ("root", 0o700), ("home", 0o755),
    ("run", 0o755), ("var", 0o755), ("var/tmp", 0o1777), ("mnt", 0o755), ("opt", 0o755), ("srv", 0o755),
)
# And in a workspace's skeleton: mount points for the package state, and empty
# directories where apt, dpkg and debconf write (into the workspace's own layer). A
# one-shot sandbox's /var stays empty.
WORKSPACE_DIRS = (
    ("var/lib", 0o755), ("var/cache", 0o755), ("var/log", 0o755), *((name, 0o755) for name in PACKAGE_STATE),
    ("var/cache/debconf", 0o755), ("var/log/apt", 0o755),
)

# Ids up to this are the system's (Debian's SYS_UID_MAX, SYS_GID_MAX); above are people's.
SYSTEM_ID_MAX = 999
# apt drops privileges to this user (setgroups, setuid), which a workspace's root, with no
# capabilities, may not do: without the account apt stays root, with a warning.
NO_ACCOUNT = ("_apt",)

DEFAULT_IDMAP = (1_000_000_000, 65536)  # host ids a root-run sandbox's ids 0..65535 map to


@dataclass(frozen=True)
class Host:
    uid: int
    gid: int
    runtime_dir: str  # private to the caller: 0700
    cache_dir: str
    idmap_base: int
    idmap_count: int

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    @property
    def scratch(self) -> str:
        """An empty directory a sandbox mounts its scratch tmpfs on, in its own mount namespace."""
        return os.path.join(self.runtime_dir, "scratch")


def _read_subid(path: str, name: str) -> tuple[int, int] | None:
    try:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[0] == name:
                    return int(parts[1]), int(parts[2])
    except (OSError, ValueError):
        return None
    return None


def idmap_config() -> tuple[int, int]:
    """Host id range for root-run sandboxes: ``SILO_IDMAP=BASE:COUNT``, the ``silo`` entry
    of /etc/subuid, or :data:`DEFAULT_IDMAP`. The range never includes host id 0."""
    raw = os.environ.get("SILO_IDMAP")
    if raw:
        try:
            base_s, count_s = raw.split(":")
            base, count = int(base_s), int(count_s)
        except ValueError:
            raise SpecError(f"bad SILO_IDMAP {raw!r}: use BASE:COUNT, like 1000000000:65536") from None
    else:
        base, count = _read_subid("/etc/subuid", "silo") or DEFAULT_IDMAP
    if base <= 0 or count < 1 or base + count > 2**32 - 2:
        raise SpecError(f"bad id range {base}:{count}: it must not include host id 0")
    return base, min(count, 65536)


def _private_dir(path: str, uid: int) -> str:
    """Owned by ``uid``, mode 0711: sandboxes' mapped ids may pass through it to the
    scratch mount point, nobody else may list or write it."""
    os.makedirs(path, mode=0o711, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o066:
        raise SpecError(f"{path} must be a directory owned by uid {uid} that others cannot read "
                        "or write; remove it and retry")
    os.chmod(path, 0o711)  # noqa: S103 - traversable, not listable (see docstring)
    return path


@cache
def host() -> Host:
    uid, gid = os.geteuid(), os.getegid()
    runtime = paths.runtime_dir()
    _private_dir(runtime, uid)
    # Rootless, the cache sits in the runtime dir: the skeleton's path shows in the
    # sandbox's mountinfo, and a home directory's path is the host's business.
    cache_dir = "/var/cache/silo" if uid == 0 else os.path.join(runtime, "cache")
    os.makedirs(os.path.join(runtime, "scratch"), mode=0o711, exist_ok=True)
    os.makedirs(cache_dir, mode=0o755, exist_ok=True)
    base, count = idmap_config() if uid == 0 else (uid, 1)
    return Host(uid, gid, runtime, cache_dir, base, count)


def _etc_fingerprint() -> str:
    h = hashlib.sha256(b"silo-skeleton-v5")
    for name in SYSTEM_DIRS + tuple("etc/" + e for e in ETC_ENTRIES + ETC_WATCHED):
        try:
            st = os.lstat("/" + name)
        except OSError:
            h.update(name.encode() + b":-")
            continue
        link = os.readlink("/" + name) if stat.S_ISLNK(st.st_mode) else ""
        h.update(f"{name}:{st.st_mode}:{st.st_mtime_ns}:{st.st_size}:{st.st_ino}:{link}".encode())
    return h.hexdigest()[:16]


def _left_out(etc: str, path: str, st: os.stat_result) -> bool:
    """Whether the curated copy of ``etc`` leaves ``path`` out: a credential
    (:data:`ETC_EXCLUDED`), or a file or directory the host keeps from its other users
    (``/etc/ssl/private``): a sandbox's root sees the skeleton as its own."""
    if os.path.relpath(path, etc) in ETC_EXCLUDED:
        return True
    return not stat.S_ISLNK(st.st_mode) and not st.st_mode & stat.S_IROTH


def _copy_entry(etc: str, entry: str, dst: str) -> None:
    src = os.path.join(etc, entry)
    st = os.lstat(src)
    if _left_out(etc, src, st):
        return
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(src)
        if entry == "resolv.conf" and target.startswith("/run"):
            shutil.copyfile(src, dst)  # the stub's target is not inside the sandbox
            return
        os.symlink(target, dst)
    elif stat.S_ISDIR(st.st_mode):
        def ignore(directory: str, names: list[str]) -> set[str]:
            out = set()
            for name in names:
                path = os.path.join(directory, name)
                try:
                    if _left_out(etc, path, os.lstat(path)):
                        out.add(name)
                except OSError:
                    out.add(name)
            return out

        shutil.copytree(src, dst, symlinks=True, ignore=ignore, ignore_dangling_symlinks=True)
    elif stat.S_ISREG(st.st_mode) and os.access(src, os.R_OK):
        shutil.copy2(src, dst)


def copy_etc(etc: str, dst: str) -> None:
    """Copy the curated entries of ``etc`` (:data:`ETC_ENTRIES`, less what :func:`_left_out`
    names) into the existing directory ``dst``; an entry that cannot be copied is skipped."""
    for entry in ETC_ENTRIES:
        if os.path.lexists(os.path.join(etc, entry)):
            with contextlib.suppress(OSError):
                _copy_entry(etc, entry, os.path.join(dst, entry))


_checked: dict[bool, tuple[float, str]] = {}  # by `workspace`: when, which
RECHECK_SECONDS = 2.0


def skeleton(workspace: bool = False) -> str:
    """Path of the skeleton root for this host's current files, building it if needed;
    ``workspace``: the one with :data:`WORKSPACE_DIRS` too.

    The host's files are re-checked at most every :data:`RECHECK_SECONDS` per process.
    """
    now = time.monotonic()
    checked, path = _checked.get(workspace, (0.0, ""))
    if now - checked < RECHECK_SECONDS and os.path.isdir(path):
        return path
    path = _skeleton(workspace)
    _checked[workspace] = (now, path)
    return path


def _skeleton(workspace: bool) -> str:
    h = host()
    fingerprint = _etc_fingerprint()
    key = fingerprint + ("-workspace" if workspace else "")
    base = os.path.join(h.cache_dir, "skeleton")
    path = os.path.join(base, key)
    if os.path.isdir(path):
        return path
    os.makedirs(base, mode=0o755, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".build-", dir=base)
    try:
        os.chmod(tmp, 0o755)  # noqa: S103 - the skeleton is read by sandboxes
        for d, mode in SKELETON_DIRS + (WORKSPACE_DIRS if workspace else ()):
            os.mkdir(os.path.join(tmp, d))
            os.chmod(os.path.join(tmp, d), mode)
        for name, real in system_dirs():
            if real:
                os.mkdir(os.path.join(tmp, name), 0o755)  # a mount point for its overlay
            else:
                os.symlink(os.readlink("/" + name), os.path.join(tmp, name))
        # Owned by whoever builds it: host root for a root-run silo (sandboxes see it
        # through an idmapped clone, as their own root's, so the overlay can copy it
        # up), the user when rootless (whose one id the sandbox maps).
        copy_etc("/etc", os.path.join(tmp, "etc"))
        try:
            os.rename(tmp, path)
        except OSError:
            if not os.path.isdir(path):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process built it first
        for old in os.listdir(base):
            if not old.startswith((fingerprint, ".build-")):  # both kinds of this fingerprint stay
                shutil.rmtree(os.path.join(base, old), ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def system_dirs() -> list[tuple[str, bool]]:
    """The host's system directories as ``(name, is_real_dir)``; symlinks come from the skeleton."""
    out = []
    for name in SYSTEM_DIRS:
        src = "/" + name
        if os.path.islink(src):
            out.append((name, False))
        elif os.path.isdir(src):
            out.append((name, True))
    return out


def package_state_dirs() -> list[str]:
    """The entries of :data:`PACKAGE_STATE` that are real directories on the host (no
    symlink on the way), as paths relative to ``/``."""
    return [name for name in PACKAGE_STATE
            if os.path.isdir("/" + name) and os.path.realpath("/" + name) == "/" + name]


def _system_entries(path: str, width: int) -> list[list[str]]:
    """The lines of a passwd-style file of ``width`` fields whose id (the third) is a
    system id from 1 to :data:`SYSTEM_ID_MAX`, less :data:`NO_ACCOUNT`; what does not parse is skipped."""
    out = []
    with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.rstrip("\n").split(":")
            if (len(fields) == width and fields[0] not in NO_ACCOUNT and fields[2].isdecimal()
                    and 0 < int(fields[2]) <= SYSTEM_ID_MAX):
                out.append(fields)
    return out


def system_accounts() -> tuple[list[tuple[str, int, int, str, str, str]], list[tuple[str, int, tuple[str, ...]]]]:
    """The host's system users ``(name, uid, gid, gecos, home, shell)`` and groups ``(name,
    gid, members)`` (see :func:`_system_entries`); a group's members only among those
    users, so the host's people stay unnamed. No passwords: a workspace that shows the
    host's package state needs the names its files and ``dpkg-statoverride`` use."""
    users = [(f[0], int(f[2]), int(f[3]), f[4], f[5], f[6])
             for f in _system_entries("/etc/passwd", 7) if f[3].isdecimal()]
    names = {u[0] for u in users}
    groups = [(f[0], int(f[2]), tuple(m for m in f[3].split(",") if m in names))
              for f in _system_entries("/etc/group", 4)]
    return users, groups
