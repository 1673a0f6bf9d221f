"""``silo cp`` in a vm workspace: the guest's own tar, run by the agent as the workspace's user.

The tar stream goes through the agent's exec channel, and the guest's tar reads or
writes it: the paths are resolved by the guest's kernel in the guest's root, so no
path of the workspace is ever resolved on the host (SECURITY.md #19), and the host
neither parses nor writes the guest's file system. The rules are those of the process
level's copier (silo.backends.process.copier): ``get`` archives PATH under its last
component, symlinks stored, not followed; ``put`` unpacks into PATH when it is a
directory, else renames the archive's top entry to PATH; files belong to the user who
runs the copy. Exit codes 3 and 4 say "missing" and "denied", as the copier's do.

The helper object looks like the :class:`asyncio.subprocess.Process` of the copier
(``stdin``, ``stdout``, ``stderr``, ``wait``, ``kill``, ``returncode``), so the API's
streaming code is the same for both levels.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from silo.model import plan as p

# $1: get|put, $2: the path. Runs under the guest's /bin/sh; tar is the host's GNU tar
# from the read-only view. In an image root (which may have no shell or tar at all), $3
# is set and it runs under the agent's own busybox (TOOLS), whose shell finds its
# applets without a PATH; its tar has no --transform, so a renaming put unpacks into a
# new directory beside the target and moves the entry.
TOOLS = "/.silo/busybox"
SCRIPT = r'''
p=$2
case $p in /) echo "cannot copy / itself: name a path below it" >&2; exit 2;; esac
d=$(dirname -- "$p"); b=$(basename -- "$p")
if [ "$1" = get ]; then
    [ -e "$p" ] || [ -L "$p" ] || { echo "$p: no such file or directory in the workspace" >&2; exit 3; }
    cd -- "$d" 2>/dev/null || { echo "$d: permission denied" >&2; exit 4; }
    exec tar -c -f - -- "$b"
fi
if [ -d "$p" ]; then
    cd -- "$p" 2>/dev/null || { echo "$p: permission denied" >&2; exit 4; }
    exec tar -x -f - --no-same-owner
fi
[ -d "$d" ] || { echo "$d is not a directory in the workspace" >&2; exit 3; }
cd -- "$d" 2>/dev/null || { echo "$d: permission denied" >&2; exit 4; }
if [ -n "$3" ]; then
    t=$(mktemp -d "$d/.silo-cp.XXXXXX") || { echo "$d: permission denied" >&2; exit 4; }
    tar -x -f - --no-same-owner -C "$t" || { rm -rf -- "$t"; exit 1; }
    for e in "$t"/* "$t"/.[!.]* "$t"/..?*; do
        [ -e "$e" ] || [ -L "$e" ] || continue
        mv -f -- "$e" "$p" || { rm -rf -- "$t"; exit 1; }
    done
    rm -rf -- "$t"
    exit 0
fi
e=$(printf '%s\n' "$b" | sed 's/[\\&|]/\\&/g')
exec tar -x -f - --no-same-owner --transform "s|^[^/]*|$e|S"
'''


class GuestCopy:
    """A copy running in the guest, with asyncio streams on its stdio."""

    def __init__(self, command: Any, stdin: asyncio.StreamWriter, stdout: asyncio.StreamReader,
                 stderr: asyncio.StreamReader) -> None:
        self.command = command
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None

    async def wait(self) -> int:
        self.returncode = await self.command.exited
        self.command.close()
        return self.returncode

    def kill(self) -> None:
        self.command.signal(signal.SIGKILL)


async def _reader(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 22)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
    return reader


async def _writer(fd: int) -> asyncio.StreamWriter:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, os.fdopen(fd, "wb", 0))
    return asyncio.StreamWriter(transport, protocol, None, loop)


async def start(mode: str, path: str, target: Any, plan: p.Plan, runtime: Any,
                joined: Callable[[tuple[str, ...]], p.Plan] | None = None) -> GuestCopy:
    """Run the copy of ``path`` (``get`` or ``put``) in the running workspace whose init
    is ``target``: a vm workspace's guest, or (``joined``: the plan of a command in it)
    a gvisor workspace's Sentry, whose cache of the workspace's files a copy from the
    host would miss."""
    image = plan.vm is not None and plan.vm.image
    argv = (TOOLS, "sh", "-c", SCRIPT, "silo-cp", mode, path, TOOLS) if image else (
        "/bin/sh", "-c", SCRIPT, "silo-cp", mode, path)
    command_plan = joined(argv) if joined is not None else replace(plan, process=replace(plan.process, argv=argv,
                                                                                           tty=False))
    ends = [os.pipe2(os.O_CLOEXEC) for _ in range(3)]
    theirs = (ends[0][0], ends[1][1], ends[2][1])
    ours = (ends[0][1], ends[1][0], ends[2][0])
    try:
        command = await runtime.join(target, command_plan, theirs)
    except BaseException:
        for fd in ours:
            os.close(fd)
        raise
    finally:
        for fd in theirs:
            os.close(fd)
    try:
        return GuestCopy(command, await _writer(ours[0]), await _reader(ours[1]), await _reader(ours[2]))
    except BaseException:
        command.signal(signal.SIGKILL)
        for fd in ours:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
