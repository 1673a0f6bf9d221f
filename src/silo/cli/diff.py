"""``silo diff DIR``: what an app-level run kept in ``--keep DIR`` changed.

Walks each upper directory and compares it with the path it shadowed: a whiteout
(a 0/0 character device, or an overlay whiteout xattr) is a deletion, an entry the
lower path lacks is an addition, anything else a change. Reads only; never follows
symlinks found in the upper (they are the app's data, not ours).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

from silo.engine import keep as keepmod

_WHITEOUT_XATTRS = (b"user.overlay.whiteout", b"trusted.overlay.whiteout")
_OPAQUE_XATTRS = (b"user.overlay.opaque", b"trusted.overlay.opaque")


def _xattr(path: str, names: tuple[bytes, ...]) -> bool:
    for name in names:
        try:
            os.getxattr(path, name, follow_symlinks=False)
            return True
        except OSError:
            continue
    return False


def changes(keep: str) -> Iterator[tuple[str, str]]:
    """Yields ``(kind, path)`` with kind ``A`` (added), ``C`` (changed) or ``D`` (deleted)."""
    for layer in keepmod.load(keep):
        lower = layer["path"]
        upper = os.path.join(keep, layer["upper"])
        if os.path.isdir(upper):
            yield from _walk(upper, lower, "")


def _walk(upper: str, lower: str, rel: str) -> Iterator[tuple[str, str]]:
    try:
        entries = sorted(os.scandir(os.path.join(upper, rel)), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        sub = os.path.join(rel, entry.name)
        up_path = entry.path
        low_path = os.path.join(lower, sub)
        st = entry.stat(follow_symlinks=False)
        whiteout = (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0) or _xattr(up_path, _WHITEOUT_XATTRS)
        if whiteout:
            yield "D", low_path
            continue
        existed = os.path.lexists(low_path)
        if stat.S_ISDIR(st.st_mode):
            if not existed:
                yield "A", low_path
            elif _xattr(up_path, _OPAQUE_XATTRS):
                yield "C", low_path
            yield from _walk(upper, lower, sub)
        else:
            yield ("C" if existed else "A"), low_path
