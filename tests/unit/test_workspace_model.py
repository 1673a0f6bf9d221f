"""The workspace model: names, the spec, overrides, the state machine and records.

Pure data: no daemon, no system calls. Every refusal a user can meet is checked for
its exact wording or, across the whole verb x state table, for its shape and for a hint
that actually leads to a state where the verb is allowed.
"""

from __future__ import annotations

import re

import pytest

from silo.model.errors import InternalError, SpecError, UserError
from silo.model.network import NetworkPolicy
from silo.model.spec import Isolation, Limits, Mount, User
from silo.model.workspace import (
    TRANSITIONS,
    VERBS,
    FieldError,
    IllegalTransition,
    Overrides,
    RestartPolicy,
    Snapshot,
    State,
    WorkspaceRecord,
    WorkspaceSpec,
    WorkspaceStateError,
    check_transition,
    format_path,
    parse_name,
    parse_root,
    refusal,
    require,
)

GiB = 1 << 30


def _one_line(err: SpecError) -> str:
    assert isinstance(err, UserError)
    assert "\n" not in err.message
    return err.message


# names --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["web", "a", "0", "x" * 63, "web-1.2_3", "a.b"])
def test_good_names(name: str) -> None:
    assert parse_name(name) == name


@pytest.mark.parametrize("name", ["", "../x", "a/b", "..", ".", ".x", "x" * 64, "Web", "a..b", "a\0b", "-a",
                                  "_a", "a b", "/abs", "é", "web\n"])
def test_hostile_or_bad_names_are_refused(name: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_name(name)
    message = _one_line(info.value)
    assert message.startswith("bad workspace name ")
    assert "lowercase letters, digits" in message and "no '..'" in message


def test_a_non_string_name_is_refused() -> None:
    with pytest.raises(SpecError):
        parse_name(3)  # type: ignore[arg-type]


# roots --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("root", "value"), [
    ("host", "host"), ("/srv/img", "/srv/img"), ("/srv/img/", "/srv/img"), ("/a/../b", "/b"),
    ("debian-base", "debian-base"),
])
def test_roots(root: str, value: str) -> None:
    assert parse_root(root) == value


@pytest.mark.parametrize("root", ["rel/dir", "Base", "./img", "", "/a\0b"])
def test_bad_roots(root: str) -> None:
    with pytest.raises(SpecError, match="bad root"):
        parse_root(root)


def test_template_is_the_root_when_it_is_a_name() -> None:
    assert WorkspaceSpec("web").template is None
    assert WorkspaceSpec("web", root="/srv/img").template is None
    assert WorkspaceSpec("web", root="base").template == "base"


# the spec -----------------------------------------------------------------------------------


def _full() -> WorkspaceSpec:
    return WorkspaceSpec(
        name="web", isolation=Isolation.APP, root="/srv/img", disposable=True,
        mounts=(Mount("/srv/data", "/data", True), Mount("/tmp/x", "/x")),
        env=(("LANG", "C.UTF-8"), ("A", "")), workdir="/work", user=User(1000, 100), hostname="webhost",
        limits=Limits(memory=512 << 20, cpus=1.5, pids=256), on_start=("sh", "-c", "echo hi"),
        restart=RestartPolicy.ON_FAILURE, network=NetworkPolicy(),
    )


def test_spec_round_trips_through_dict() -> None:
    spec = _full()
    assert WorkspaceSpec.from_dict(spec.to_dict()) == spec
    minimal = WorkspaceSpec("db")
    assert minimal.to_dict() == {"name": "db", "isolation": "process", "root": "host", "disposable": False,
                                 "restart": "no", "network": {"mode": "none"}}
    assert WorkspaceSpec.from_dict(minimal.to_dict()) == minimal
    assert WorkspaceSpec.from_dict({"name": "db"}) == minimal


def test_from_dict_name_argument_wins() -> None:
    assert WorkspaceSpec.from_dict({"name": "file"}, name="cli").name == "cli"
    assert WorkspaceSpec.from_dict({}, name="cli").name == "cli"


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"name": "../x"}, "bad workspace name"),
    ({"workdir": "/proc/self/fd/3"}, "cannot be inside /proc"),
    ({"workdir": "rel"}, "absolute path"),
    ({"hostname": "a_b"}, "bad hostname"),
    ({"on_start": ()}, "give a command"),
    ({"on_start": ("sh", "a\0b")}, "NUL"),
    ({"mounts": (Mount("/a", "/x"), Mount("/b", "/x/"))}, "two mounts have the target /x"),
    ({"env": (("A", "1"), ("A", "2"))}, "set twice"),
    ({"env": (("1A", "1"),)}, "bad environment variable name '1A'"),
    ({"env": (("A=B", "1"),)}, "bad environment variable name 'A=B'"),
    ({"limits": Limits(memory=0)}, "greater than zero"),
    ({"limits": Limits(cpus=0.0)}, "cpu count"),
    ({"limits": Limits(pids=-1)}, "pids limit"),
    ({"root": "Not A Template"}, "bad root"),
])
def test_direct_construction_validates(kwargs: dict[str, object], match: str) -> None:
    kwargs.setdefault("name", "web")
    with pytest.raises(SpecError, match=match) as info:
        WorkspaceSpec(**kwargs)  # type: ignore[arg-type]
    _one_line(info.value)


def test_construction_normalises_paths() -> None:
    spec = WorkspaceSpec("web", workdir="/a/./b/", root="/srv//img/")
    assert spec.workdir == "/a/b"
    assert spec.root == "/srv/img"


def test_sandbox_spec() -> None:
    spec = _full().sandbox_spec()
    assert spec.isolation is Isolation.APP and spec.root == "/srv/img" and spec.hostname == "webhost"
    assert spec.limits.memory == 512 << 20 and spec.env == (("LANG", "C.UTF-8"), ("A", ""))
    assert WorkspaceSpec("web").sandbox_spec().hostname == "web"
    assert WorkspaceSpec("my_ws").sandbox_spec().hostname == "silo"  # '_' is no hostname character
    templated = WorkspaceSpec("web", root="base")
    with pytest.raises(SpecError, match="template"):
        templated.sandbox_spec()
    assert templated.sandbox_spec(root="host").root == "host"


# untrusted dicts ----------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "path", "message"), [
    ({"name": "web", "limits": {"memroy": 1}}, ("limits", "memroy"),
     "unknown key 'memroy' in [limits]: did you mean 'memory'? allowed keys are memory, cpus, pids"),
    ({"name": "web", "isolaton": "app"}, ("isolaton",), "did you mean 'isolation'?"),
    ({"name": "web", "limits": {"memory": True}}, ("limits", "memory"),
     "memory must be a size like \"512M\" or a number of bytes, not true"),
    ({"name": "web", "limits": {"memory": "12Q"}}, ("limits", "memory"), "bad memory size '12Q'"),
    ({"name": "web", "limits": {"cpus": "lots"}}, ("limits", "cpus"), "bad cpu count"),
    ({"name": "web", "limits": {"pids": 1.5}}, ("limits", "pids"), "pids must be a whole number"),
    ({"name": "web", "limits": []}, ("limits",), "limits must be a table, not an array"),
    ({"name": "web", "mount": [{"source": "rel", "target": "/x"}]}, ("mount", 0, "source"),
     "bad mount source 'rel': it must be an absolute host path"),
    ({"name": "web", "mount": [{"source": "/a", "target": "x"}]}, ("mount", 0, "target"), "bad mount target"),
    ({"name": "web", "mount": [{"target": "/x"}]}, ("mount", 0, "source"), "this mount has no source"),
    ({"name": "web", "mount": ["/a:/x", "/b:/x:ro"]}, ("mount", 1), "another mount already has the target /x"),
    ({"name": "web", "mount": ["/a"]}, ("mount", 0), "bad mount '/a'"),
    ({"name": "web", "mount": {"source": "/a"}}, ("mount",), "mount must be an array of tables"),
    ({"name": "web", "env": {"A": 5}}, ("env", "A"), "A must be a string"),
    ({"name": "web", "env": {"1A": "x"}}, ("env", "1A"), "bad environment variable name '1A'"),
    ({"name": "web", "isolation": "kvm"}, ("isolation",), "unknown isolation 'kvm': use one of"),
    ({"name": "web", "network": {"mode": "lan"}}, ("network", "mode"), "unknown network mode"),
    ({"name": "web", "restart": "sometimes"}, ("restart",), "use one of no, on-failure, always"),
    ({"name": "web", "on_start": "echo hi"}, ("on_start",), "on_start must be a list of strings"),
    ({"name": "web", "on_start": ["sh", 3]}, ("on_start", 1), "not a list holding the number 3"),
    ({"name": "web", "on_start": []}, ("on_start",), "give a command"),
    ({"name": "web", "user": "root"}, ("user",), "bad user 'root'"),
    ({"name": "web", "user": True}, ("user",), "user must be a UID"),
    ({"name": "web", "disposable": "yes"}, ("disposable",), "disposable must be true or false, not the string"),
    ({"name": 5}, ("name",), "name must be a string"),
    ({}, ("name",), "the workspace has no name"),
    ({"name": "web", "workdir": "/proc"}, ("workdir",), "cannot be inside /proc"),
])
def test_from_dict_names_the_bad_key(data: dict[str, object], path: tuple[object, ...], message: str) -> None:
    with pytest.raises(FieldError) as info:
        WorkspaceSpec.from_dict(data)
    err = info.value
    assert err.path == path
    assert message in err.detail
    assert err.message == f"{format_path(err.path)}: {err.detail}"
    _one_line(err)


@pytest.mark.parametrize(("level", "extra", "what"), [
    ("vm", {"limits": {"pids": 100}}, "a pids limit"),
])
def test_workspaces_refuse_what_their_level_lacks(level: str, extra: dict[str, object], what: str) -> None:
    with pytest.raises(SpecError) as info:
        WorkspaceSpec.from_dict({"name": "web", "isolation": level, **extra})
    assert info.value.message.endswith(
        f"a workspace at isolation {level!r} cannot have {what} yet: drop it, or use isolation 'process'")
    _one_line(info.value)
    assert WorkspaceSpec.from_dict({"name": "web", "isolation": "vm", "limits": {"memory": "1G", "cpus": 2},
                                    "network": {"mode": "internet"}, "mount": ["/a:/x"]})
    assert WorkspaceSpec.from_dict({"name": "web", "isolation": "gvisor",
                                    "limits": {"memory": "1G", "cpus": 2, "pids": 100},
                                    "mount": ["/a:/x"], "network": {"mode": "internet"}})


def test_from_dict_refuses_non_tables() -> None:
    for data in ([], "name", None, 3):
        with pytest.raises(FieldError, match="must be a table"):
            WorkspaceSpec.from_dict(data)


def test_format_path() -> None:
    assert format_path(("mount", 0, "source")) == "mount[0].source"
    assert format_path(("limits",)) == "limits"
    assert format_path(()) == ""


# overrides ----------------------------------------------------------------------------------


def test_overrides_build_a_spec_from_nothing() -> None:
    spec = Overrides(name="web", memory="1G", cpus="2", pids=10, mounts=["/srv:/data:ro"], env={"A": "b"},
                     user=1000, isolation="app", restart="always", network="none", on_start=["true"]).apply()
    assert spec.limits == Limits(memory=GiB, cpus=2.0, pids=10)
    assert spec.mounts == (Mount("/srv", "/data", True),)
    assert spec.user == User(1000, 1000) and spec.isolation is Isolation.APP
    assert spec.restart is RestartPolicy.ALWAYS and spec.on_start == ("true",)


def test_overrides_win_over_a_base_and_merge_tables() -> None:
    base = _full()
    spec = Overrides(memory="1G", env={"LANG": "C", "NEW": "1"}, mounts=[Mount("/other", "/data")],
                     disposable=False).apply(base)
    assert spec.limits == Limits(memory=GiB, cpus=1.5, pids=256)  # cpus and pids kept
    assert dict(spec.env) == {"LANG": "C", "A": "", "NEW": "1"}
    assert spec.mounts == (Mount("/tmp/x", "/x"), Mount("/other", "/data"))  # same target replaced
    assert spec.disposable is False
    assert spec.name == "web" and spec.on_start == base.on_start
    assert Overrides().apply(base) == base


def test_bad_overrides_are_plain_one_line_spec_errors() -> None:
    with pytest.raises(SpecError) as info:
        Overrides(name="web", memory="12Q").apply()
    assert not isinstance(info.value, FieldError)
    assert info.value.message.startswith("bad memory size '12Q'")
    with pytest.raises(SpecError, match="no name: give one, like 'silo create web'"):
        Overrides(memory="1G").apply()
    with pytest.raises(SpecError, match="bad workspace name"):
        Overrides(name="../etc").apply()
    with pytest.raises(SpecError, match="bad mount"):
        Overrides(name="web", mounts=["nope"]).apply()


# the state machine --------------------------------------------------------------------------

ISSUE_VERBS = ("start stop restart exec cp snapshot restore reset fork rm template-create export diff logs "
               "inspect").split()
C, R, S, P, B = State.CREATED, State.RUNNING, State.STOPPED, State.PAUSED, State.BROKEN


def test_every_verb_of_the_issue_has_a_rule() -> None:
    assert set(ISSUE_VERBS) <= set(VERBS)
    assert set(VERBS) - set(ISSUE_VERBS) == {"pause", "resume"}


def test_the_issue_example() -> None:
    with pytest.raises(WorkspaceStateError) as info:
        require("exec", "web", S)
    assert info.value.message == "cannot exec in 'web': it is stopped; run 'silo start web'"
    assert isinstance(info.value, UserError)


@pytest.mark.parametrize(("verb", "state", "message"), [
    ("exec", C, "cannot exec in 'web': it has not been started; run 'silo start web'"),
    ("exec", P, "cannot exec in 'web': it is paused; run 'silo resume web'"),
    ("exec", B, "cannot exec in 'web': it is broken; run 'silo stop web' to clean it up, then 'silo start web'"),
    ("start", R, "cannot start 'web': it is already running"),
    ("start", P, "cannot start 'web': it is paused; run 'silo resume web'"),
    ("start", B, "cannot start 'web': it is broken; run 'silo stop web' to clean it up first"),
    ("stop", S, "cannot stop 'web': it is already stopped"),
    ("stop", C, "cannot stop 'web': it has not been started"),
    ("restart", B, "cannot restart 'web': it is broken; run 'silo stop web' to clean it up first"),
    ("snapshot", R, "cannot snapshot 'web': it is running; run 'silo stop web' first"),
    ("restore", P, "cannot restore a snapshot of 'web': it is paused; run 'silo stop web' first"),
    ("reset", R, "cannot reset 'web': it is running; run 'silo stop web' first"),
    ("fork", R, "cannot fork 'web': it is running; run 'silo stop web' first"),
    ("template-create", R, "cannot make a template from 'web': it is running; run 'silo stop web' first"),
    ("export", B, "cannot export 'web': it is broken; run 'silo stop web' to clean it up first"),
    ("cp", P, "cannot copy files to or from 'web': it is paused; run 'silo resume web'"),
    ("rm", R, "cannot remove 'web': it is running; run 'silo stop web' first, or 'silo rm -f web'"),
    ("pause", S, "cannot pause 'web': it is stopped; run 'silo start web'"),
    ("resume", R, "cannot resume 'web': it is not paused"),
    ("resume", S, "cannot resume 'web': it is stopped, not paused; run 'silo start web'"),
])
def test_refusal_wording(verb: str, state: State, message: str) -> None:
    assert refusal(verb, "web", state) == message


# What each hinted command does to the state (restart is stop + start).
_EFFECT = {verb: rule.to for verb, rule in VERBS.items() if rule.to is not None}
_DONE = re.compile(r"it is (already \w+|not paused)$|it has not been started$")


@pytest.mark.parametrize("verb", sorted(VERBS))
@pytest.mark.parametrize("state", list(State))
def test_every_refusal_is_one_actionable_line(verb: str, state: State) -> None:
    rule = VERBS[verb]
    message = refusal(verb, "web", state)
    if state in rule.allowed:
        assert message is None
        require(verb, "web", state)
        return
    assert message is not None
    with pytest.raises(WorkspaceStateError) as info:
        require(verb, "web", state)
    assert info.value.message == message
    assert "\n" not in message
    assert message.startswith(f"cannot {rule.phrase} 'web': ")
    if _DONE.search(message):  # the verb's goal is reached already (stop a stopped one ...)
        return
    # follow the hint: each 'silo VERB web' it names must be allowed where it is run and
    # must end in a state where the refused verb is allowed (or its goal reached).
    current = state
    hinted = re.findall(r"'silo ([a-z-]+) web'", message.split("; ", 1)[1])
    assert hinted, message
    for step in hinted:
        if step == "rm":
            continue  # the forced alternative of 'rm'
        assert current in VERBS[step].allowed, (message, step, current)
        current = _EFFECT[step]
    assert current in rule.allowed or current is rule.to, (message, current)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_verbs_that_change_the_state_follow_the_table(verb: str) -> None:
    rule = VERBS[verb]
    if rule.to is None:
        return
    for state in rule.allowed:
        assert rule.to in TRANSITIONS[state], (verb, state)


def test_restart_is_stop_then_start() -> None:
    for state in VERBS["restart"].allowed:
        via = S if state in VERBS["stop"].allowed else state
        assert via == state or S in TRANSITIONS[state]
        assert via in VERBS["start"].allowed


def test_the_transition_table() -> None:
    assert set(TRANSITIONS) == set(State)
    for state, targets in TRANSITIONS.items():
        assert state not in targets  # an unchanged state is an update, not a transition
    for state in (C, R, S, P):
        assert B in TRANSITIONS[state]  # anything can break
    # every state is reachable from created
    seen, todo = {C}, [C]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(State)
    check_transition("web", C, R)
    with pytest.raises(IllegalTransition, match="no transition from stopped to paused") as info:
        check_transition("web", S, P)
    assert isinstance(info.value, InternalError)
    with pytest.raises(IllegalTransition):
        check_transition("web", B, R)


@pytest.mark.parametrize("state", [C, S])
def test_disposable_files_exist_only_while_running(state: State) -> None:
    assert refusal("cp", "tmp", state) is None
    assert refusal("cp", "tmp", state, disposable=True) == (
        "cannot copy files to or from 'tmp': it is disposable and not running (its files exist only while it "
        "runs); run 'silo start tmp'")
    require("cp", "tmp", R, disposable=True)
    for verb in ("snapshot", "restore"):
        message = refusal(verb, "tmp", state, disposable=True)
        assert message is not None and "it is disposable, so nothing of it is kept" in message
    # a state refusal still reads as one
    assert refusal("snapshot", "tmp", R, disposable=True) == \
        "cannot snapshot 'tmp': it is running; run 'silo stop tmp' first"
    require("reset", "tmp", state, disposable=True)


def test_unknown_verb_is_a_programming_error() -> None:
    with pytest.raises(KeyError):
        require("frobnicate", "web", R)


# records ------------------------------------------------------------------------------------


def _record(**changes: object) -> WorkspaceRecord:
    base: dict[str, object] = {"spec": _full(), "state": S, "created": 1700000000.0, "updated": 1700000100.5,
                               "snapshots": (Snapshot("clean", 1700000050.0),), "template": "base",
                               "error": "init exited with 1"}
    base.update(changes)
    return WorkspaceRecord(**base)  # type: ignore[arg-type]


def test_record_round_trips() -> None:
    record = _record()
    assert record.name == "web"
    data = record.to_dict()
    assert data["format"] == 1 and data["state"] == "stopped"
    assert WorkspaceRecord.from_dict(data) == record
    bare = _record(snapshots=(), template=None, error=None, state=C)
    assert WorkspaceRecord.from_dict(bare.to_dict()) == bare


def test_record_validation() -> None:
    with pytest.raises(SpecError, match="snapshot tag appears twice"):
        _record(snapshots=(Snapshot("a", 1.0), Snapshot("a", 2.0)))
    with pytest.raises(SpecError, match="bad snapshot tag"):
        Snapshot("../x", 1.0)
    with pytest.raises(SpecError, match="bad template name"):
        _record(template="a/b")


def _corrupt(**changes: object) -> dict[str, object]:
    data = _record().to_dict()
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    return data


@pytest.mark.parametrize(("data", "message"), [
    (_corrupt(format=2), "format: record format 2 is not 1"),
    (_corrupt(format=...), "format: record format None is not 1"),
    (_corrupt(state="zombie"), "state: unknown state the string 'zombie'"),
    (_corrupt(state=...), "state: state is missing"),
    (_corrupt(spec=...), "spec: spec is missing"),
    (_corrupt(spec={"name": "web", "limits": {"memory": -1}}), "spec.limits.memory: bad memory size"),
    (_corrupt(created=-1), "created: created must be a unix time"),
    (_corrupt(updated=float("nan")), "updated: updated must be a unix time"),
    (_corrupt(updated="yesterday"), "updated: updated must be a unix time, not the string"),
    (_corrupt(created=True), "created must be a unix time, not true"),
    (_corrupt(snapshots=[{"tag": "a"}]), "snapshots[0].created: created is missing"),
    (_corrupt(snapshots=[{"tag": "A", "created": 1}]), "snapshots[0].tag: bad workspace name"),
    (_corrupt(snapshots=[{"tag": "a", "created": 1}, {"tag": "a", "created": 2}]), "snapshot tag appears twice"),
    (_corrupt(snapshots="a"), "snapshots: snapshots must be an array"),
    (_corrupt(template=5), "template: template must be a string or null"),
    (_corrupt(error=["x"]), "error: error must be a string or null"),
    (_corrupt(extra=1), "unknown key 'extra' in the record"),
    ([1, 2], "must be a table"),
])
def test_corrupt_record_data(data: object, message: str) -> None:
    with pytest.raises(SpecError) as info:
        WorkspaceRecord.from_dict(data)
    assert message in _one_line(info.value)
    assert not info.value.message.startswith("spec.spec")


@pytest.mark.parametrize("cls", [WorkspaceStateError, IllegalTransition])
def test_workspace_errors_cross_the_wire_as_themselves(cls: type[Exception]) -> None:
    from silo.model.errors import WorkspaceExists, error_from_wire

    for c in (cls, WorkspaceExists):
        err = c("cannot exec in 'web': it is stopped; run 'silo start web'")
        back = error_from_wire(err.to_wire())  # type: ignore[attr-defined]
        assert type(back) is c and str(back) == str(err)


def test_encrypted_is_a_vm_workspaces_and_survives_a_round_trip() -> None:
    spec = WorkspaceSpec.from_dict({"name": "safe", "isolation": "vm", "encrypted": True})
    assert spec.encrypted and spec.to_dict()["encrypted"] is True
    assert WorkspaceSpec.from_dict(spec.to_dict()) == spec
    assert "encrypted" not in WorkspaceSpec(name="plain", isolation=Isolation.VM).to_dict()
    with pytest.raises(SpecError, match=r"an encrypted workspace needs isolation 'vm'.*not 'process'"):
        WorkspaceSpec.from_dict({"name": "safe", "encrypted": True})
    with pytest.raises(SpecError, match="a disposable workspace keeps nothing on a disk"):
        WorkspaceSpec.from_dict({"name": "safe", "isolation": "vm", "encrypted": True, "disposable": True})
    with pytest.raises(FieldError, match="encrypted"):
        WorkspaceSpec.from_dict({"name": "safe", "isolation": "vm", "encrypted": "yes"})


def test_diskless_is_a_vm_workspaces_and_implies_disposable() -> None:
    spec = WorkspaceSpec.from_dict({"name": "ram", "isolation": "vm", "diskless": True})
    assert (spec.diskless, spec.disposable) == (True, True)
    assert WorkspaceSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(SpecError, match="a diskless workspace needs isolation 'vm'"):
        WorkspaceSpec.from_dict({"name": "ram", "diskless": True})
    with pytest.raises(SpecError, match="a diskless workspace has no disk to encrypt"):
        WorkspaceSpec.from_dict({"name": "ram", "isolation": "vm", "diskless": True, "encrypted": True})


def test_kernel_is_a_vm_workspaces_choice() -> None:
    spec = WorkspaceSpec.from_dict({"name": "k", "isolation": "vm", "kernel": "/boot/vmlinuz"})
    assert spec.kernel == "/boot/vmlinuz" and spec.sandbox_spec().kernel == "/boot/vmlinuz"
    assert WorkspaceSpec.from_dict(spec.to_dict()) == spec
    assert "kernel" not in WorkspaceSpec(name="k", isolation=Isolation.VM).to_dict()
    with pytest.raises(SpecError, match="--kernel belongs to the vm level"):
        WorkspaceSpec.from_dict({"name": "k", "kernel": "debian"})
    with pytest.raises(SpecError, match="bad kernel 'newest'"):
        WorkspaceSpec.from_dict({"name": "k", "isolation": "vm", "kernel": "newest"})
