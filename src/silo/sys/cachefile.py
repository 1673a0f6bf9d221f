"""Files in silo's cache (unpacked kernels, initramfs images, probe verdicts) and the VM
pools' settings (cli.server): each written whole or not at all, so a crash or a
concurrent builder never leaves a half-written file under the name readers look for."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence


def publish(path: str, data: bytes, mode: int = 0o644) -> None:
    """``data`` at ``path``, atomically, ``mode`` 0644 by default (the cache serves every
    user); the directory must exist."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def cached(path: str, field: str, choices: Sequence[str]) -> str | None:
    """The verdict cached in the JSON file ``path`` under ``field``, if it is one of
    ``choices``; None when there is none (never probed, or unreadable)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        with open(path) as f:
            value = json.load(f)[field]
        if value in choices:
            return str(value)
    return None


def verdict(path: str, field: str, choices: Sequence[str], decide: Callable[[], str]) -> str:
    """A probe's verdict, cached in the JSON file ``path`` under ``field``: the
    :func:`cached` one, else what ``decide()`` says, written for the next caller (a
    write that fails only costs that caller a probe)."""
    known = cached(path, field, choices)
    if known is not None:
        return known
    result = decide()
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        publish(path, json.dumps({field: result, "probed": time.time()}).encode())
    return result
