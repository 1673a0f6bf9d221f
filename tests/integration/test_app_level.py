"""The app level (``--isolation app``): a copy-on-write view of $HOME and ``--cow`` paths.

NOT a security boundary: the app runs as the calling user with the host's network; the
promise tested here is only that its writes never reach the host's files, that
``--keep DIR`` keeps them for inspection and that ``silo diff DIR`` lists them.

Root's tests point HOME at a throwaway directory (so a failure cannot touch /root);
the unprivileged test runs as ``silotest`` with its real home. Each user talks to its
own CLI server in a private runtime directory, stopped at the end.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.skip("the app-level tests run as root (and as a user root creates)", allow_module_level=True)

TEST_USER = "silotest"


def _stop_server(base: list[str], env: dict[str, str]) -> None:
    subprocess.run([*base, sys.executable, "-m", "silo.cli.main", "server", "stop"], env=env,
                   capture_output=True, timeout=30, cwd="/")


@pytest.fixture(scope="module")
def runtime_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="silo-app-rt-")
    os.chmod(path, 0o711)
    yield path
    _stop_server([], {**os.environ, "SILO_RUNTIME_DIR": path})
    time.sleep(0.1)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A throwaway $HOME with a file to change, a file to delete and a subdirectory."""
    h = tmp_path / "home"
    (h / "sub").mkdir(parents=True)
    (h / "changed.txt").write_text("old\n")
    (h / "deleted.txt").write_text("bye\n")
    (h / "sub" / "kept.txt").write_text("kept\n")
    return h


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its content (files) or link target; silo's own
    cache (``.cache/silo``, where an unprivileged user's skeleton lives) is left out."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if os.path.relpath(dirpath, root) == ".cache":
            dirnames[:] = [d for d in dirnames if d != "silo"]
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            if os.path.islink(p):
                out[os.path.relpath(p, root)] = b"-> " + os.fsencode(os.readlink(p))
                continue
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


@pytest.fixture
def cli(silo_cli: list[str], runtime_dir: str, home: Path):  # type: ignore[no-untyped-def]
    def run(*args: str, cwd: str = "/", timeout: float = 60,
            extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SILO_")}
        env.update({"SILO_RUNTIME_DIR": runtime_dir, "HOME": str(home), **(extra_env or {})})
        return subprocess.run([*silo_cli, *args], capture_output=True, text=True, env=env, cwd=cwd,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    return run


def _ok(cp: subprocess.CompletedProcess[str]) -> str:
    assert cp.returncode == 0, (cp.returncode, cp.stdout, cp.stderr)
    return cp.stdout


def _one_line_error(cp: subprocess.CompletedProcess[str], *words: str, code: int = 125) -> None:
    assert cp.returncode == code, (cp.returncode, cp.stderr)
    assert "Traceback" not in cp.stderr
    lines = cp.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("silo: "), cp.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


CHANGES = ("echo x > $HOME/newfile; echo more >> $HOME/changed.txt; rm $HOME/deleted.txt; "
           "mkdir $HOME/newdir; cat $HOME/newfile $HOME/changed.txt; test -e $HOME/deleted.txt || echo gone")


# writes stay off the host ----------------------------------------------------------------------


def test_writes_to_home_stay_off_the_host(cli, home: Path) -> None:  # type: ignore[no-untyped-def]
    before = _snapshot(home)
    out = _ok(cli("run", "--isolation", "app", "--", "sh", "-c", CHANGES))
    assert out == "x\nold\nmore\ngone\n"  # the app saw its own writes
    assert _snapshot(home) == before  # the host did not


def test_each_run_starts_from_the_host_again(cli, home: Path) -> None:  # type: ignore[no-untyped-def]
    _ok(cli("run", "--isolation", "app", "--", "sh", "-c", "echo x > $HOME/once"))
    assert _ok(cli("run", "--isolation", "app", "--", "sh", "-c", "test -e $HOME/once && echo seen || echo fresh")) \
        == "fresh\n"


def test_keep_keeps_the_upper_and_diff_lists_changes(cli, home: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    keep = tmp_path / "kept"
    before = _snapshot(home)
    _ok(cli("run", "--isolation", "app", "--keep", str(keep), "--", "sh", "-c", CHANGES))
    assert _snapshot(home) == before
    assert (keep / "silo-keep.json").is_file()
    uppers = [p for p in keep.rglob("newfile")]
    assert len(uppers) == 1 and uppers[0].read_text() == "x\n"
    diff = _ok(cli("diff", str(keep))).splitlines()
    assert sorted(diff) == sorted([
        f"A {home}/newfile",
        f"A {home}/newdir",
        f"C {home}/changed.txt",
        f"D {home}/deleted.txt",
    ])
    # a relative DIR works too
    assert sorted(_ok(cli("diff", "kept", cwd=str(tmp_path))).splitlines()) == sorted(diff)


def test_cow_dir(cli, home: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    project = tmp_path / "project"
    project.mkdir()
    (project / "main.c").write_text("int main;\n")
    (project / "old.o").write_text("obj\n")
    before = _snapshot(project)
    script = f"cd {project} && echo built > app && rm old.o && echo '// x' >> main.c && ls"
    out = _ok(cli("run", "--isolation", "app", "--cow", str(project), "--", "sh", "-c", script))
    assert out.split() == ["app", "main.c"]
    assert _snapshot(project) == before
    keep = tmp_path / "kept"
    _ok(cli("run", "--isolation", "app", "--cow", str(project), "--keep", str(keep), "--",
            "sh", "-c", script + "; echo h > $HOME/h"))
    assert _snapshot(project) == before
    assert sorted(_ok(cli("diff", str(keep))).splitlines()) == sorted([
        f"A {project}/app", f"C {project}/main.c", f"D {project}/old.o", f"A {home}/h"])
    # a relative --cow is the caller's
    out = _ok(cli("run", "--isolation", "app", "--cow", "project", "--", "sh", "-c",
                  f"echo y > {project}/rel && cat {project}/rel", cwd=str(tmp_path)))
    assert out == "y\n" and not (project / "rel").exists()


def test_paths_outside_home_and_cow_are_the_hosts(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Not a boundary: anything outside the copy-on-write paths is the host's own.
    outside = tmp_path / "outside"
    outside.mkdir()
    _ok(cli("run", "--isolation", "app", "--", "sh", "-c", f"echo direct > {outside}/f"))
    assert (outside / "f").read_text() == "direct\n"


# identity and network ----------------------------------------------------------------------------


def test_runs_as_the_calling_user_with_its_env_and_cwd(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = _ok(cli("run", "--isolation", "app", "-e", "EXTRA=1", "--", "sh", "-c",
                  'id -u; id -g; pwd; echo "$MY_VAR $EXTRA"', cwd=str(tmp_path), extra_env={"MY_VAR": "mine"}))
    assert out.splitlines() == ["0", "0", str(tmp_path), "mine 1"]


def test_sees_the_host_network(cli) -> None:  # type: ignore[no-untyped-def]
    out = _ok(cli("run", "--isolation", "app", "--", "sh", "-c", "readlink /proc/self/ns/net; ls /sys/class/net"))
    lines = out.splitlines()
    assert lines[0] == os.readlink("/proc/self/ns/net")
    assert sorted(lines[1:]) == sorted(os.listdir("/sys/class/net"))
    assert len(lines) > 2  # more than loopback: the host's interfaces


def test_timeout_and_exit_leave_no_process(silo_cli: list[str], runtime_dir: str, home: Path,
                                          tmp_path: Path) -> None:
    tag = f"{time.time_ns() % 10**6 + 10**6}.5"  # a sleep duration nothing else uses
    env = {k: v for k, v in os.environ.items() if not k.startswith("SILO_")}
    env.update({"SILO_RUNTIME_DIR": runtime_dir, "HOME": str(home)})

    def run(*args: str) -> tuple[int, str]:
        # Output to a file, not a pipe: a leftover process would hold a pipe open forever.
        with open(tmp_path / "err", "w+") as err:
            code = subprocess.run([*silo_cli, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=err, env=env, cwd="/", timeout=30).returncode
            err.seek(0)
            return code, err.read()

    try:
        code, err = run("run", "--isolation", "app", "--timeout", "500ms", "--", "sh", "-c",
                        f"sleep {tag} & sleep {tag}")
        assert code == 137 and "timeout" in err
        code, err = run("run", "--isolation", "app", "--", "sh", "-c", f"sleep {tag} & echo started")
        assert code == 0, err
        time.sleep(0.3)
        assert _find(["sleep", tag]) == [], "processes of finished app-level runs are still alive"
    finally:
        for pid in _find(["sleep", tag]):
            os.kill(pid, signal.SIGKILL)


def _find(argv: list[str]) -> list[int]:
    want = ("\0".join(argv) + "\0").encode()
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read() == want:
                        out.append(int(entry))
            except OSError:
                pass
    return out


# errors ----------------------------------------------------------------------------------


def test_errors(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious").write_text("mine\n")
    _one_line_error(cli("run", "--isolation", "app", "--keep", str(foreign), "--", "true"), "did not make")
    assert (foreign / "precious").read_text() == "mine\n"
    _one_line_error(cli("run", "--isolation", "app", "--cow", str(tmp_path / "missing"), "--", "true"), "--cow")
    _one_line_error(cli("run", "--cow", str(tmp_path), "--", "true"), "--isolation app")
    # diff is not run: its codes are the workspace verbs' (2: bad input)
    _one_line_error(cli("diff", str(foreign)), "silo-keep.json", code=2)
    _one_line_error(cli("diff"), "usage", code=2)


def test_help_says_not_a_security_boundary(cli) -> None:  # type: ignore[no-untyped-def]
    assert "NOT a security boundary" in _ok(cli("run", "--help"))


# the unprivileged user ----------------------------------------------------------------------------


def test_unprivileged_user(user_silo_cli: list[str]) -> None:
    try:
        user = pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", TEST_USER], check=True,
                       capture_output=True)
        user = pwd.getpwnam(TEST_USER)
    uhome = Path(user.pw_dir)
    rt = tempfile.mkdtemp(prefix="silo-app-user-rt-")
    os.chown(rt, user.pw_uid, user.pw_gid)
    os.chmod(rt, 0o711)
    keep_parent = tempfile.mkdtemp(prefix="silo-app-user-keep-")
    os.chown(keep_parent, user.pw_uid, user.pw_gid)
    keep = os.path.join(keep_parent, "kept")
    name = f"silo-test-{uuid.uuid4().hex[:8]}"
    changed = uhome / f"{name}-changed"
    changed.write_text("old\n")
    os.chown(changed, user.pw_uid, user.pw_gid)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(uhome), "SILO_RUNTIME_DIR": rt}
    base = ["runuser", "-u", TEST_USER, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items())]
    try:
        before = _snapshot(uhome)
        # the user namespace's capabilities (carried across silo-setup's exec) reach
        # nothing of the app's: no inheritable or ambient set a file capability could use
        script = (f'id -u; echo x > "$HOME/{name}"; echo more >> "$HOME/{name}-changed"; '
                  f'cat "$HOME/{name}"; readlink /proc/self/ns/net; '
                  "grep -E '^Cap(Inh|Prm|Eff|Amb):' /proc/self/status | cut -f2")
        cp = subprocess.run([*base, *user_silo_cli, "run", "--isolation", "app", "--keep", keep, "--",
                             "sh", "-c", script], capture_output=True, text=True, timeout=60, cwd="/")
        assert cp.returncode == 0, cp.stderr
        assert cp.stdout.splitlines() == [str(user.pw_uid), "x", os.readlink("/proc/self/ns/net"),
                                          *["0000000000000000"] * 4]
        assert not (uhome / name).exists()
        assert _snapshot(uhome) == before
        cp = subprocess.run([*base, *user_silo_cli, "diff", keep], capture_output=True, text=True, timeout=60, cwd="/")
        assert cp.returncode == 0, cp.stderr
        assert sorted(cp.stdout.splitlines()) == sorted([f"A {uhome}/{name}", f"C {uhome}/{name}-changed"])
    finally:
        for p in (uhome / name, changed):
            if p.exists():
                p.unlink()
        _stop_server(base, os.environ.copy())
        time.sleep(0.1)
        shutil.rmtree(rt, ignore_errors=True)
        shutil.rmtree(keep_parent, ignore_errors=True)
