"""silo's small C programs, built from source by ``make install``.

- ``silo-init`` (``init.c``): the sandbox's PID 1, statically linked because it runs
  inside image roots that have no libc of the host's. Reaps zombies, forwards signals
  to the command's process group, exits with the command's status; in ``--wait`` mode
  it is a warm sandbox's init, parked until the spawner sends the command.
- ``silo-setup`` (``setup.c``): builds a sandbox from the setup script the spawner
  writes (:mod:`silo.backends.process.script`) inside the sandbox's new namespaces,
  then execs ``silo-init``. Static: it is exec'd before the id maps exist and must
  not depend on the dynamic loader finding anything.
- ``libsilo-spawn.so`` (``spawn.c``): ``silo_spawn``, clone into new namespaces and
  exec silo-setup without copying the spawner's memory (vfork-style), for
  :func:`silo.sys.kernel.spawn`.
- ``silo-agent`` (``agent.c``): PID 1 of a silo VM once its init has built the root;
  runs the host's commands over the agent protocol (:mod:`silo.agent.protocol`).
  Static, so it runs in any guest root, and it starts in a millisecond under TCG.
- ``silo`` (``client.c``): the CLI's fast path for ``silo run``, which hands anything
  else to the Python CLI. Built by :mod:`silo.cli.launcher` with the virtualenv's
  interpreter and source path compiled in.

Why C and not Python or tini: see docs/design.md ("Native helpers").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping

from silo.model.errors import InternalError

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.join(HERE, "bin")
CFLAGS = ("-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-D_GNU_SOURCE")
PROGRAMS = {"silo-init": ("init.c", ("-static",)), "silo-setup": ("setup.c", ("-static",)),
            "silo-agent": ("agent.c", ("-static",)),
            "libsilo-spawn.so": ("spawn.c", ("-shared", "-fPIC")), "silo": ("client.c", ())}


def source(name: str) -> str:
    return os.path.join(HERE, PROGRAMS[name][0])


def built(name: str) -> str:
    """Path of a built program; a one-line InternalError when it is missing or stale."""
    path = os.path.join(BIN, name)
    try:
        fresh = os.stat(path).st_mtime_ns >= os.stat(source(name)).st_mtime_ns
    except FileNotFoundError:
        fresh = False
    if not fresh:
        raise InternalError(f"{path} is missing or older than its source: run 'make install'")
    return path


def sealed(name: str) -> int:
    """A close-on-exec memfd holding the built program ``name``, sealed against any change.

    SECURITY: sealed, so nobody - least of all a sandbox or workspace through
    /proc/1/exe - can rewrite the programs every sandbox runs (CVE-2019-5736).
    """
    import fcntl

    with open(built(name), "rb") as f:
        data = f.read()
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK
                | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    return fd


def build(name: str, out: str | None = None, defines: Mapping[str, str] | None = None) -> str:
    """Compile ``name`` to ``out`` (default ``bin/NAME``) atomically; returns the path."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise InternalError("no C compiler: install gcc and libc6-dev (make install does)")
    src, extra = PROGRAMS[name]
    out = out or os.path.join(BIN, name)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=os.path.dirname(out))
    os.close(fd)
    args = [cc, *CFLAGS, *extra, *(f"-D{k}={_c_string(v)}" for k, v in (defines or {}).items()),
            "-o", tmp, os.path.join(HERE, src)]
    try:
        proc = subprocess.run(args, capture_output=True, text=True)
        if proc.returncode != 0:
            raise InternalError(f"building {name} failed: {proc.stderr.strip()}")
        os.chmod(tmp, 0o755)  # noqa: S103 - a program everyone may run
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _c_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def main(argv: list[str]) -> int:
    if argv[:1] != ["build"]:
        print("usage: python -m silo.native build [NAME...]")
        return 2
    for name in argv[1:] or ["silo-init", "silo-setup", "silo-agent", "libsilo-spawn.so"]:
        print(build(name))
    return 0
