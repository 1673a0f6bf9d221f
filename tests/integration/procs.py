"""Helpers shared by the integration tests: who is whose child, names, waiting."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def ppid(pid: int | str) -> int | None:
    """The parent of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rindex(b")") + 2:].split()[1])


def children(pid: int) -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and ppid(e) == pid]


def comm(pid: int) -> str:
    """``/proc/PID/comm`` (``silo-warm`` for a parked sandbox), "" when it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def sdk_spawner() -> int:
    """This test process's SDK spawner (there is exactly one once the SDK ran)."""
    found = []
    for pid in children(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"silo.spawner" in f.read():
                    found.append(pid)
        except OSError:
            continue
    assert len(found) == 1, f"expected one spawner child of the test process, found {found}"
    return found[0]


def settle(probe: Callable[[], T], good: Callable[[T], bool], timeout: float = 5.0) -> T:
    """Call ``probe`` until ``good`` says its value is right or ``timeout`` passes; the last value."""
    deadline = time.monotonic() + timeout
    value = probe()
    while not good(value) and time.monotonic() < deadline:
        time.sleep(0.02)
        value = probe()
    return value
