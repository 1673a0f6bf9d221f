"""The workspace model: a named spec, its lifecycle states and the rules of each verb.

This module owns what a workspace *is* as data: :class:`WorkspaceSpec` (what ``silo
create`` and ``silo.toml`` can say), :class:`State` and the transition table,
:func:`require` (the state check every verb makes before it acts, with the message a
user sees when it refuses), and :class:`WorkspaceRecord` (what the daemon's store
persists). It never touches the system and imports nothing of silo but the model.

Every value a spec holds is validated by the parsers of :mod:`silo.model.spec`; this
module only adds the workspace's own fields (name, disposable, on_start, restart).
:meth:`WorkspaceSpec.from_dict` is the one reader of untrusted spec data: the spec file
loader (:mod:`silo.model.specfile`), the store and command-line overrides all go
through it, so a value is accepted or refused the same way whatever it came from.
Its errors are :class:`FieldError`, which carry the path of the offending key so the
spec file loader can turn them into ``FILE:LINE:COL`` positions.

Isolation levels are the ones :class:`silo.model.spec.Isolation` knows; what a level
cannot do yet is refused by the spec's own checks (``_check_vm``).
"""

from __future__ import annotations

import difflib
import enum
import math
import posixpath
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from silo.model.errors import IllegalTransition as IllegalTransition  # the workspace errors live with
from silo.model.errors import SpecError  # the others (registered for the wire); re-exported here
from silo.model.errors import WorkspaceExists as WorkspaceExists
from silo.model.errors import WorkspaceStateError as WorkspaceStateError
from silo.model.network import NETWORK_KEYS, Network, NetworkPolicy, build_policy, policy_from_dict
from silo.model.spec import (
    Isolation,
    Limits,
    Mount,
    Spec,
    User,
    check_kernel,
    check_vm_mounts,
    parse_count,
    parse_cpus,
    parse_env_entry,
    parse_hostname,
    parse_size,
)

FieldPath = tuple[str | int, ...]
In = TypeVar("In")
Out = TypeVar("Out")

RECORD_FORMAT = 1  # bump when the record's shape changes incompatibly

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
NAME_RULE = "1 to 63 lowercase letters, digits, '_', '.' or '-', starting with a letter or digit, no '..'"


# -- errors --------------------------------------------------------------------------------
class FieldError(SpecError):
    """A bad value in spec or record data, with the path of its key.

    ``message`` is ``path: detail`` (for records and the API); :mod:`silo.model.specfile`
    uses ``detail`` and turns ``path`` into a line and column. ``at_key`` says the key
    itself is wrong (unknown, missing), not its value.
    """

    def __init__(self, path: FieldPath, detail: str, *, at_key: bool = False) -> None:
        super().__init__(f"{format_path(path)}: {detail}" if path else detail)
        self.path = path
        self.detail = detail
        self.at_key = at_key


def format_path(path: FieldPath) -> str:
    """``("mount", 0, "source")`` -> ``mount[0].source``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


# -- names and the workspace's own fields --------------------------------------------------


def parse_name(untrusted: str, what: str = "workspace name") -> str:
    """A workspace, template or snapshot name: safe as one path component, by construction.

    The rule forbids '/', NUL, a leading '.', '..' and upper case, so a valid name can be
    joined to a directory without escaping it and means the same on every filesystem.
    """
    if not isinstance(untrusted, str) or not _NAME_RE.fullmatch(untrusted) or ".." in untrusted:
        raise SpecError(f"bad {what} {untrusted!r}: use {NAME_RULE}")
    return untrusted


_E = TypeVar("_E", bound=enum.Enum)


def _choice(cls: type[_E], untrusted: str, what: str) -> _E:
    """``untrusted`` as a member of ``cls``, or a SpecError listing the values."""
    try:
        return cls(untrusted)
    except ValueError:
        values = ", ".join(m.value for m in cls)
        raise SpecError(f"unknown {what} {untrusted!r}: use one of {values}") from None


def parse_isolation(untrusted: str) -> Isolation:
    """A workspace's isolation (checked here, so a spec file's error points at the value)."""
    return _choice(Isolation, untrusted, "isolation")


class RestartPolicy(enum.Enum):
    """What the daemon does when a workspace's init exits on its own."""

    NO = "no"
    ON_FAILURE = "on-failure"  # restart after a non-zero exit
    ALWAYS = "always"


def parse_restart(untrusted: str) -> RestartPolicy:
    return _choice(RestartPolicy, untrusted, "restart policy")


def parse_root(untrusted: str) -> str:
    """``host``, an absolute path to an image directory, or a template name."""
    if untrusted == "host":
        return untrusted
    if untrusted.startswith("/"):
        if "\0" in untrusted or len(untrusted) > 4096:
            raise SpecError("bad root: the path contains a NUL byte or is too long")
        return posixpath.normpath(untrusted)
    try:
        return parse_name(untrusted, "root")
    except SpecError:
        raise SpecError(f"bad root {untrusted!r}: use 'host', an absolute path to an image directory, "
                        f"or a template name ({NAME_RULE})") from None


def parse_command(untrusted: Sequence[str], what: str = "on_start") -> tuple[str, ...]:
    """An argv: a non-empty list of strings without NUL bytes."""
    argv = tuple(untrusted)
    if not argv or not argv[0]:
        raise SpecError(f"bad {what}: give a command as a list of strings, like [\"sh\", \"-c\", \"echo hi\"]")
    if any("\0" in arg for arg in argv):
        raise SpecError(f"bad {what}: an argument contains a NUL byte")
    return argv


def _check_workdir(untrusted: str) -> str:
    # Spec owns the working-directory rules (absolute, no '..', not under /proc):
    # building one is how they are applied here without a second copy of them.
    workdir = Spec(workdir=untrusted).workdir
    assert workdir is not None
    return workdir


def _duplicate_target(mounts: Sequence[Mount]) -> int | None:
    """The index of the first mount whose target an earlier mount already has."""
    seen: set[str] = set()
    for index, mount in enumerate(mounts):
        if mount.target in seen:
            return index
        seen.add(mount.target)
    return None


# -- the spec ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkspaceSpec:
    """Everything ``silo create`` can say about a workspace; validated on construction.

    ``root`` is ``"host"``, an absolute image directory or a template name (see
    :attr:`template`). ``hostname`` None means the engine picks one (the name when it is
    a valid hostname). ``disposable`` keeps the private layer in RAM: gone on stop.
    ``encrypted`` (isolation vm) keeps the workspace's disks encrypted at rest;
    ``diskless`` (isolation vm, disposable implied) keeps it in its VM's locked RAM only.
    """

    name: str
    isolation: Isolation = Isolation.PROCESS
    root: str = "host"
    disposable: bool = False
    mounts: tuple[Mount, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    workdir: str | None = None
    user: User = field(default_factory=User)
    hostname: str | None = None
    limits: Limits = field(default_factory=Limits)
    on_start: tuple[str, ...] | None = None
    restart: RestartPolicy = RestartPolicy.NO
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    encrypted: bool = False
    diskless: bool = False
    kernel: str = "auto"  # isolation vm: the guest's kernel (silo.model.spec.check_kernel)

    def __post_init__(self) -> None:
        parse_name(self.name)
        check_kernel(self.kernel, self.isolation)
        if self.isolation is Isolation.VM:
            self._check_vm()
        for flag, what in (("encrypted", "an encrypted workspace needs isolation 'vm' (its files on a disk "
                                         "of its own)"),
                           ("diskless", "a diskless workspace needs isolation 'vm' (its files in its VM's RAM)")):
            if getattr(self, flag) and self.isolation is not Isolation.VM:
                raise SpecError(f"{what}, not {self.isolation.value!r}: drop {flag}, or use isolation 'vm'")
        if self.encrypted and self.diskless:
            raise SpecError("a diskless workspace has no disk to encrypt: drop encrypted or diskless")
        if self.diskless:  # nothing kept past a stop: a disposable workspace
            object.__setattr__(self, "disposable", True)
        if self.encrypted and self.disposable:
            raise SpecError("a disposable workspace keeps nothing on a disk, so there is nothing to encrypt: "
                            "drop encrypted or disposable")
        for link in self.network.links:
            parse_name(link, "linked workspace")
        if self.name in self.network.links:
            raise SpecError(f"workspace {self.name!r} cannot link to itself")
        object.__setattr__(self, "root", parse_root(self.root))
        if self.workdir is not None:
            object.__setattr__(self, "workdir", _check_workdir(self.workdir))
        if self.hostname is not None:
            parse_hostname(self.hostname)
        if self.on_start is not None:
            object.__setattr__(self, "on_start", parse_command(self.on_start))
        for name, value in self.env:
            if _env_name(name) != name:
                raise SpecError(f"bad environment variable name {name!r}: use letters, digits and '_', "
                                "not starting with a digit")
            parse_env_entry(f"{name}={value}")
        if len({name for name, _ in self.env}) != len(self.env):
            raise SpecError("an environment variable is set twice: keep one")
        duplicate = _duplicate_target(self.mounts)
        if duplicate is not None:
            raise SpecError(f"two mounts have the target {self.mounts[duplicate].target}: keep one")
        limits = self.limits
        if limits.memory is not None:
            parse_size(str(limits.memory), "memory size")
        if limits.cpus is not None:
            parse_cpus(limits.cpus)
        if limits.pids is not None:
            parse_count(limits.pids, "pids limit")

    def _check_vm(self) -> None:
        check_vm_mounts(self.mounts)
        missing = [what for what, asked in (("a pids limit", self.limits.pids is not None),) if asked]
        if missing:
            raise SpecError(f"a workspace at isolation 'vm' cannot have {', '.join(missing)} yet: "
                            "drop it, or use isolation 'process'")

    @property
    def template(self) -> str | None:
        """The template this workspace stacks on, when its root names one."""
        return None if self.root == "host" or self.root.startswith("/") else self.root

    def sandbox_spec(self, root: str | None = None) -> Spec:
        """The sandbox :class:`Spec` of this workspace's init; ``root`` replaces a template name.

        The engine resolves a template root to its base (``host`` or a directory) and
        stacks the template's layers itself; the sandbox spec only knows the base.
        """
        base = root if root is not None else self.root
        if self.template is not None and root is None:
            raise SpecError(f"root {self.root!r} is a template: resolve it to its base first")
        hostname = self.hostname
        if hostname is None:
            try:
                hostname = parse_hostname(self.name)
            except SpecError:  # '_' and '.' are fine in a name, not in a hostname
                hostname = "silo"
        return Spec(isolation=self.isolation, root=base, mounts=self.mounts, env=self.env,
                    workdir=self.workdir, user=self.user, hostname=hostname, limits=self.limits,
                    network=self.network, kernel=self.kernel)

    def to_dict(self) -> dict[str, object]:
        """The spec as JSON-able data, shaped like ``silo.toml`` (unset fields left out)."""
        out: dict[str, object] = {
            "name": self.name,
            "isolation": self.isolation.value,
            "root": self.root,
            "disposable": self.disposable,
            "restart": self.restart.value,
            "network": self.network.to_dict(),
        }
        if self.encrypted:
            out["encrypted"] = True
        if self.diskless:
            out["diskless"] = True
        if self.kernel != "auto":
            out["kernel"] = self.kernel
        if self.mounts:
            out["mount"] = [{"source": m.source, "target": m.target, "readonly": m.readonly} for m in self.mounts]
        if self.env:
            out["env"] = dict(self.env)
        if self.workdir is not None:
            out["workdir"] = self.workdir
        if self.user != User():
            out["user"] = f"{self.user.uid}:{self.user.gid}"
        if self.hostname is not None:
            out["hostname"] = self.hostname
        limits = {k: v for k, v in (("memory", self.limits.memory), ("cpus", self.limits.cpus),
                                    ("pids", self.limits.pids)) if v is not None}
        if limits:
            out["limits"] = limits
        if self.on_start is not None:
            out["on_start"] = list(self.on_start)
        return out

    @classmethod
    def from_dict(cls, untrusted: object, *, name: str | None = None) -> WorkspaceSpec:
        """Validate spec data (a parsed ``silo.toml``, a record, an API body).

        ``name``, when given, wins over the data's own (``silo create NAME -f FILE``).
        Raises :class:`FieldError` naming the key of the first bad value.
        """
        return _spec_from_dict(untrusted, name)


# -- reading untrusted data ----------------------------------------------------------------

SPEC_KEYS = ("name", "isolation", "root", "disposable", "encrypted", "diskless", "kernel", "mount", "env",
             "workdir", "user", "hostname", "limits", "on_start", "restart", "network")
MOUNT_KEYS = ("source", "target", "readonly")
LIMIT_KEYS = ("memory", "cpus", "pids")


def _describe(value: object) -> str:
    """How a value of untrusted data reads in an error ("an array", "true", ...)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if value is None:
        return "null"
    return f"a {type(value).__name__}"


def _unknown_key(key: str, allowed: Sequence[str], table: str) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    where = f" in {table}" if table else ""
    guess = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown key '{key}'{where}: {guess}allowed keys are {', '.join(allowed)}"


def _read_table(untrusted: object, path: FieldPath, allowed: Sequence[str], table: str) -> dict[str, object]:
    """A table whose keys are all in ``allowed``; ``table`` names it in errors (``[limits]``)."""
    if not isinstance(untrusted, dict):
        raise FieldError(path, f"{format_path(path) or 'the data'} must be a table, not {_describe(untrusted)}")
    for key in untrusted:
        if not isinstance(key, str) or key not in allowed:
            raise FieldError((*path, str(key)), _unknown_key(str(key), allowed, table), at_key=True)
    return untrusted


def _parsed(path: FieldPath, parse: Callable[[In], Out], value: In) -> Out:
    """``parse(value)``, its SpecError moved to ``path`` (so a file can say where)."""
    try:
        return parse(value)
    except FieldError:
        raise
    except SpecError as e:
        raise FieldError(path, e.message) from None


def _typed(value: object, path: FieldPath, types: tuple[type, ...], expected: str) -> object:
    # bool is an int in Python; TOML and JSON keep them apart, and so does a spec.
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise FieldError(path, f"{path[-1]} must be {expected}, not {_describe(value)}")
    return value


def _str(table: Mapping[str, object], key: str, path: FieldPath, expected: str) -> str | None:
    if key not in table:
        return None
    value = _typed(table[key], (*path, key), (str,), expected)
    assert isinstance(value, str)
    return value


def _bool(table: Mapping[str, object], key: str, path: FieldPath) -> bool:
    value = _typed(table.get(key, False), (*path, key), (bool,), "true or false")
    return value is True


def _spec_from_dict(untrusted: object, name: str | None) -> WorkspaceSpec:
    top = _read_table(untrusted, (), SPEC_KEYS, "")
    if name is None:
        name = _str(top, "name", (), 'a string like "web"')
        if name is None:
            raise FieldError(("name",), 'the workspace has no name: add name = "web"', at_key=True)
    _parsed(("name",), parse_name, name)
    isolation = _parsed(("isolation",), parse_isolation, _str(top, "isolation", (), 'a string like "process"')
                       or Isolation.PROCESS.value)
    root = _parsed(("root",), parse_root, _str(top, "root", (), 'a string: "host", an absolute path '
                                              "or a template name") or "host")
    workdir = _str(top, "workdir", (), 'an absolute path like "/work"')
    if workdir is not None:
        workdir = _parsed(("workdir",), _check_workdir, workdir)
    user = User()
    if "user" in top:
        raw_user = _typed(top["user"], ("user",), (str, int), 'a UID or "UID:GID", like "1000:1000"')
        user = _parsed(("user",), User.parse, str(raw_user))
    hostname = _str(top, "hostname", (), 'a string like "web"')
    if hostname is not None:
        _parsed(("hostname",), parse_hostname, hostname)
    on_start = _argv(top["on_start"], ("on_start",)) if "on_start" in top else None
    restart = _parsed(("restart",), parse_restart, _str(top, "restart", (), 'a string like "on-failure"')
                     or RestartPolicy.NO.value)
    net = _read_table(top.get("network", {}), ("network",), NETWORK_KEYS, "[network]")
    network = _network(net)
    try:
        return WorkspaceSpec(name=name, isolation=isolation, root=root, disposable=_bool(top, "disposable", ()),
                             encrypted=_bool(top, "encrypted", ()), diskless=_bool(top, "diskless", ()),
                             kernel=_str(top, "kernel", (), 'a string like "debian"') or "auto",
                             mounts=_mounts(top.get("mount", [])), env=_env(top.get("env", {})),
                             workdir=workdir, user=user, hostname=hostname, limits=_limits(top.get("limits", {})),
                             on_start=on_start, restart=restart, network=network)
    except FieldError:
        raise
    except SpecError as e:  # a rule across fields: no single key to point at
        raise FieldError((), e.message) from None


def _network(table: Mapping[str, object]) -> NetworkPolicy:
    for key, expected in (("mode", 'a string like "internet"'), ("bandwidth", 'a string like "10mbit"')):
        _str(table, key, ("network",), expected)
    for key in ("allow", "publish", "links", "dns"):
        values = _typed(table.get(key, []), ("network", key), (list,), "a list of strings")
        assert isinstance(values, list)
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise FieldError(("network", key, i), f"each {key} entry must be a string, not {_describe(value)}")
    try:
        return policy_from_dict(table)
    except SpecError as e:
        words = {"--allow": "allow", "publish": "publish", "link": "links", "bandwidth": "bandwidth", "dns": "dns"}
        key = next((k for word, k in words.items() if e.message.startswith(("bad " + word, word)) and k in table),
                   "mode")
        raise FieldError(("network", key), e.message) from None


def _mounts(untrusted: object) -> tuple[Mount, ...]:
    if not isinstance(untrusted, list):
        raise FieldError(("mount",), "mount must be an array of tables ([[mount]]), not " + _describe(untrusted))
    mounts: list[Mount] = []
    for index, item in enumerate(untrusted):
        path: FieldPath = ("mount", index)
        if isinstance(item, str):  # the -v form, "HOST:GUEST[:ro]"
            mounts.append(_parsed(path, Mount.parse, item))
        else:
            table = _read_table(item, path, MOUNT_KEYS, "[[mount]]")
            paths = {}
            for key in ("source", "target"):
                value = _str(table, key, path, "an absolute path")
                if value is None:
                    raise FieldError((*path, key), f'this mount has no {key}: add {key} = "/..."', at_key=True)
                paths[key] = value
            # Mount checks both paths at once; a known-good partner tells which one is bad.
            _parsed((*path, "source"), lambda s: Mount(s, "/mnt"), paths["source"])
            _parsed((*path, "target"), lambda t: Mount("/", t), paths["target"])
            mounts.append(Mount(paths["source"], paths["target"], _bool(table, "readonly", path)))
            path = (*path, "target")
        if _duplicate_target(mounts) is not None:
            raise FieldError(path, f"another mount already has the target {mounts[-1].target}: keep one")
    return tuple(mounts)


def _env(untrusted: object) -> tuple[tuple[str, str], ...]:
    table = _typed(untrusted, ("env",), (dict,), 'a table of NAME = "value"')
    assert isinstance(table, dict)
    env = []
    for key, value in table.items():
        path = ("env", key)
        if _env_name(key) != key:
            raise FieldError(path, f"bad environment variable name {key!r}: use letters, digits and '_', "
                             "not starting with a digit", at_key=True)
        _typed(value, path, (str,), f'a string (write {key} = "{value}" with quotes)')
        env.append(_parsed(path, parse_env_entry, f"{key}={value}"))
    return tuple(env)


def _env_name(untrusted: str) -> str | None:
    """The name parse_env_entry finds in ``untrusted=``; not ``untrusted`` itself if it is bad."""
    try:
        return parse_env_entry(f"{untrusted}=")[0]
    except SpecError:
        return None


def _limits(untrusted: object) -> Limits:
    table = _read_table(untrusted, ("limits",), LIMIT_KEYS, "[limits]")
    memory = cpus = pids = None
    if "memory" in table:
        path: FieldPath = ("limits", "memory")
        raw = _typed(table["memory"], path, (str, int), 'a size like "512M" or a number of bytes')
        memory = _parsed(path, lambda v: parse_size(str(v), "memory size"), raw)
    if "cpus" in table:
        path = ("limits", "cpus")
        raw = _typed(table["cpus"], path, (int, float, str), "a number of CPUs like 1.5")
        cpus = _parsed(path, lambda v: parse_cpus(v if isinstance(v, str) else float(str(v))), raw)
    if "pids" in table:
        path = ("limits", "pids")
        raw = _typed(table["pids"], path, (int, str), "a whole number like 256")
        pids = _parsed(path, lambda v: parse_count(str(v), "pids limit"), raw)
    return Limits(memory=memory, cpus=cpus, pids=pids)


def _argv(untrusted: object, path: FieldPath) -> tuple[str, ...]:
    example = 'a list of strings like ["sh", "-c", "echo hi"]'
    items = _typed(untrusted, path, (list,), example)
    assert isinstance(items, list)
    argv: list[str] = []
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise FieldError((*path, index), f"{path[-1]} must be {example}, not a list holding {_describe(item)}")
        argv.append(item)
    return _parsed(path, parse_command, argv)


# -- overrides (command line, SDK keyword arguments) ---------------------------------------


@dataclass(frozen=True)
class Overrides:
    """Values given beside a spec (``silo create NAME -f FILE --memory 1G``); None = not given.

    :meth:`apply` lays them over a spec: scalars replace, ``env`` and limits merge key by
    key, a mount replaces the spec's mount of the same target and otherwise is added.
    """

    name: str | None = None
    isolation: str | Isolation | None = None
    root: str | None = None
    disposable: bool | None = None
    encrypted: bool | None = None
    diskless: bool | None = None
    kernel: str | None = None
    mounts: Sequence[str | Mount] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = None
    user: str | int | User | None = None
    hostname: str | None = None
    memory: str | int | None = None
    cpus: str | float | None = None
    pids: str | int | None = None
    on_start: Sequence[str] | None = None
    restart: str | RestartPolicy | None = None
    network: str | Network | NetworkPolicy | None = None
    allow: Sequence[str] = ()
    publish: Sequence[str] = ()
    links: Sequence[str] = ()
    bandwidth: str | None = None
    dns: Sequence[str] = ()

    def to_dict(self) -> dict[str, object]:
        """The given values in :meth:`WorkspaceSpec.to_dict`'s shape."""
        out: dict[str, object] = {}
        for key in ("name", "root", "disposable", "encrypted", "diskless", "kernel", "workdir", "hostname"):
            if (value := getattr(self, key)) is not None:
                out[key] = value
        for key, value in (("isolation", self.isolation), ("restart", self.restart)):
            if value is not None:
                out[key] = value.value if isinstance(value, enum.Enum) else value
        if isinstance(self.network, NetworkPolicy):
            out["network"] = self.network.to_dict()
        elif self.network is not None or self.allow or self.publish or self.links or self.bandwidth or self.dns:
            mode = self.network.value if isinstance(self.network, Network) else self.network
            out["network"] = build_policy(mode, allow=self.allow, publish=self.publish, links=self.links,
                                          bandwidth=self.bandwidth, dns=self.dns).to_dict()
        if self.mounts:
            mounts = [m if isinstance(m, Mount) else Mount.parse(m) for m in self.mounts]
            out["mount"] = [{"source": m.source, "target": m.target, "readonly": m.readonly} for m in mounts]
        if self.env:
            out["env"] = dict(self.env)
        if self.user is not None:
            out["user"] = f"{self.user.uid}:{self.user.gid}" if isinstance(self.user, User) else self.user
        limits = {k: v for k, v in (("memory", self.memory), ("cpus", self.cpus), ("pids", self.pids))
                  if v is not None}
        if limits:
            out["limits"] = limits
        if self.on_start is not None:
            out["on_start"] = list(self.on_start)
        return out

    def apply(self, base: WorkspaceSpec | None = None) -> WorkspaceSpec:
        """A new spec: ``base`` (or the defaults) with these values over it; SpecError if bad."""
        data = base.to_dict() if base is not None else {}
        merged = _merge_dicts(data, self.to_dict())
        try:
            return _spec_from_dict(merged, None)
        except FieldError as e:
            if e.path == ("name",) and e.at_key:
                raise SpecError("the workspace has no name: give one, like 'silo create web'") from None
            raise SpecError(e.detail) from None


def _merge_dicts(base: Mapping[str, object], over: Mapping[str, object]) -> dict[str, object]:
    """``over`` laid on ``base`` in spec-dict shape (tables merge, mounts by target)."""
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        if key == "mount" and isinstance(old, list) and isinstance(value, list):
            targets = {m.get("target") for m in value if isinstance(m, dict)}
            out[key] = [m for m in old if not (isinstance(m, dict) and m.get("target") in targets)] + value
        elif isinstance(old, dict) and isinstance(value, dict):
            out[key] = {**old, **value}
        else:
            out[key] = value
    return out


# -- lifecycle -----------------------------------------------------------------------------


class State(enum.Enum):
    """Where a workspace is in its lifecycle; persisted on every change.

    No transitional states (``starting``...): after a crash the daemon probes what is
    really there (init alive? mounts? cgroup?) and writes the truthful state, which a
    transitional one would not spare it.
    """

    CREATED = "created"  # made, never started: private layer exists (persistent), nothing runs
    RUNNING = "running"  # its init and namespaces are alive
    STOPPED = "stopped"  # nothing runs; the private layer is kept (persistent) or gone (disposable)
    PAUSED = "paused"  # its processes are frozen (cgroup freezer)
    BROKEN = "broken"  # the daemon could not bring it to a clean state; see the record's error


C, R, S, P, B = State.CREATED, State.RUNNING, State.STOPPED, State.PAUSED, State.BROKEN

TRANSITIONS: Mapping[State, frozenset[State]] = {
    C: frozenset({R, B}),
    R: frozenset({S, P, B}),
    S: frozenset({R, B}),
    P: frozenset({R, S, B}),
    B: frozenset({S}),  # 'silo stop' cleans up what is left
}

_IS = {C: "it has not been started", R: "it is running", S: "it is stopped", P: "it is paused",
       B: "it is broken"}


def check_transition(name: str, old: State, new: State) -> None:
    """Raise :class:`IllegalTransition` unless the table has ``old -> new``."""
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"workspace {name!r}: no transition from {old.value} to {new.value}")


@dataclass(frozen=True)
class VerbRule:
    """The states a verb acts in; ``disposable`` overrides them for disposable workspaces."""

    phrase: str  # "cannot {phrase} 'web': ..."
    allowed: frozenset[State]
    disposable: frozenset[State] | None = None
    to: State | None = None  # the state the verb leaves the workspace in, when it changes it


_ALL = frozenset(State)
_QUIET = frozenset({C, S})  # verbs that need the private layer at rest

VERBS: Mapping[str, VerbRule] = {
    "start": VerbRule("start", frozenset({C, S}), to=R),
    "stop": VerbRule("stop", frozenset({R, P, B}), to=S),
    "restart": VerbRule("restart", frozenset({C, R, S, P})),  # stop (when running) + start
    "pause": VerbRule("pause", frozenset({R}), to=P),
    "resume": VerbRule("resume", frozenset({P}), to=R),
    "exec": VerbRule("exec in", frozenset({R})),
    "cp": VerbRule("copy files to or from", frozenset({C, R, S}), disposable=frozenset({R})),
    "snapshot": VerbRule("snapshot", _QUIET, disposable=frozenset()),
    "restore": VerbRule("restore a snapshot of", _QUIET, disposable=frozenset()),
    "reset": VerbRule("reset", _QUIET),
    "fork": VerbRule("fork", _QUIET),
    "rm": VerbRule("remove", frozenset({C, S, B})),
    "template-create": VerbRule("make a template from", _QUIET),
    "export": VerbRule("export", _QUIET),
    "diff": VerbRule("diff", _ALL),
    "logs": VerbRule("show the logs of", _ALL),
    "inspect": VerbRule("inspect", _ALL),
}

# Refusals whose generic wording would mislead: the verb's goal is reached already, or the
# way out is not the generic one.
_SPECIAL: Mapping[tuple[str, State], str] = {
    ("start", R): "it is already running",
    ("start", P): "it is paused; run 'silo resume {name}'",
    ("stop", C): "it has not been started",
    ("stop", S): "it is already stopped",
    ("pause", P): "it is already paused",
    ("resume", R): "it is not paused",
    ("resume", C): "it has not been started; run 'silo start {name}'",
    ("resume", S): "it is stopped, not paused; run 'silo start {name}'",
    ("resume", B): "it is broken, not paused; run 'silo stop {name}' to clean it up, then 'silo start {name}'",
    ("rm", R): "it is running; run 'silo stop {name}' first, or 'silo rm -f {name}'",
    ("rm", P): "it is paused; run 'silo stop {name}' first, or 'silo rm -f {name}'",
}


def _hint(allowed: frozenset[State], state: State, name: str) -> str:
    if state is B:
        if S in allowed:
            return f"run 'silo stop {name}' to clean it up first"
        return f"run 'silo stop {name}' to clean it up, then 'silo start {name}'"
    if state is P:
        return f"run 'silo resume {name}'" if R in allowed else f"run 'silo stop {name}' first"
    if state is R:
        return f"run 'silo stop {name}' first"
    return f"run 'silo start {name}'"


def refusal(verb: str, name: str, state: State, *, disposable: bool = False) -> str | None:
    """The message of :func:`require`, or None when the verb is allowed."""
    rule = VERBS[verb]
    allowed = rule.disposable if disposable and rule.disposable is not None else rule.allowed
    if state in allowed:
        return None
    head = f"cannot {rule.phrase} '{name}': "
    if state in rule.allowed:  # refused only because it is disposable
        if not allowed:
            return head + "it is disposable, so nothing of it is kept; create it without --disposable to keep snapshots"
        return head + f"it is disposable and not running (its files exist only while it runs); run 'silo start {name}'"
    if (verb, state) in _SPECIAL:
        return head + _SPECIAL[verb, state].format(name=name)
    return head + f"{_IS[state]}; {_hint(allowed, state, name)}"


def require(verb: str, name: str, state: State, *, disposable: bool = False) -> None:
    """Refuse ``verb`` on workspace ``name`` in ``state`` with a user-facing one-line reason.

    ``verb`` is a key of :data:`VERBS` (an unknown verb is a programming error: KeyError).
    """
    message = refusal(verb, name, state, disposable=disposable)
    if message is not None:
        raise WorkspaceStateError(message)


# -- the persisted record ------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    tag: str
    created: float  # unix time
    memory: bool = False  # it saved a gvisor workspace's processes too (snapshot --memory)

    def __post_init__(self) -> None:
        parse_name(self.tag, "snapshot tag")


@dataclass(frozen=True)
class WorkspaceRecord:
    """What the daemon keeps of a workspace between transitions (see :mod:`silo.store`).

    ``template`` is the template the workspace's layers stack on (from its root, or
    inherited by a fork); ``error`` the last failure, kept for ``inspect`` until replaced.
    """

    spec: WorkspaceSpec
    state: State
    created: float
    updated: float
    snapshots: tuple[Snapshot, ...] = ()
    template: str | None = None
    error: str | None = None
    owner: int = 0  # the host uid that created it: only it (and root) may see or touch it

    def __post_init__(self) -> None:
        if not isinstance(self.owner, int) or isinstance(self.owner, bool) or not 0 <= self.owner < 1 << 32:
            raise SpecError(f"bad owner {self.owner!r}: a host uid")
        if self.template is not None:
            parse_name(self.template, "template name")
        tags = [s.tag for s in self.snapshots]
        if len(set(tags)) != len(tags):
            raise SpecError("a snapshot tag appears twice: tags are unique per workspace")

    @property
    def name(self) -> str:
        return self.spec.name

    def to_dict(self) -> dict[str, object]:
        return {
            "format": RECORD_FORMAT,
            "spec": self.spec.to_dict(),
            "state": self.state.value,
            "created": self.created,
            "updated": self.updated,
            "snapshots": [{"tag": s.tag, "created": s.created} for s in self.snapshots],
            "template": self.template,
            "error": self.error,
            "owner": self.owner,
        }

    @classmethod
    def from_dict(cls, untrusted: object) -> WorkspaceRecord:
        """Validate record data read back from disk; FieldError names the bad key."""
        top = _read_table(untrusted, (), ("format", "spec", "state", "created", "updated", "snapshots",
                                         "template", "error", "owner"), "the record")
        version = top.get("format")
        if version != RECORD_FORMAT:
            raise FieldError(("format",), f"record format {version!r} is not {RECORD_FORMAT}: "
                             "it was written by another version of silo")
        raw_spec = _required(top, "spec", ())
        try:
            spec = WorkspaceSpec.from_dict(raw_spec)
        except FieldError as e:
            raise FieldError(("spec", *e.path), e.detail, at_key=e.at_key) from None
        raw_state = _required(top, "state", ())
        try:
            state = State(raw_state)
        except ValueError:
            raise FieldError(("state",), f"unknown state {_describe(raw_state)}: use one of "
                             f"{', '.join(s.value for s in State)}") from None
        snapshots = []
        raw_snaps = _typed(top.get("snapshots", []), ("snapshots",), (list,), "an array")
        assert isinstance(raw_snaps, list)
        for index, item in enumerate(raw_snaps):
            path: FieldPath = ("snapshots", index)
            snap = _read_table(item, path, ("tag", "created"), "a snapshot")
            tag = _parsed((*path, "tag"), parse_name, _str(snap, "tag", path, "a string") or "")
            snapshots.append(Snapshot(tag, _time(snap, "created", path)))
        template = _optional_str(top, "template")
        try:
            return cls(spec=spec, state=state, created=_time(top, "created", ()), updated=_time(top, "updated", ()),
                       snapshots=tuple(snapshots), template=template, error=_optional_str(top, "error"),
                       owner=top.get("owner", 0))  # type: ignore[arg-type]  # checked by __post_init__
        except SpecError as e:
            raise FieldError((), e.message) from None


def _optional_str(table: Mapping[str, object], key: str) -> str | None:
    value = table.get(key)
    if value is None:
        return None
    _typed(value, (key,), (str,), "a string or null")
    assert isinstance(value, str)
    return value


def _required(table: Mapping[str, object], key: str, path: FieldPath) -> object:
    if key not in table:
        raise FieldError((*path, key), f"{key} is missing", at_key=True)
    return table[key]


def _time(table: Mapping[str, object], key: str, path: FieldPath) -> float:
    value = _typed(_required(table, key, path), (*path, key), (int, float), "a unix time")
    assert isinstance(value, (int, float))
    if not math.isfinite(value) or value < 0:
        raise FieldError((*path, key), f"{key} must be a unix time, not {value!r}")
    return float(value)
