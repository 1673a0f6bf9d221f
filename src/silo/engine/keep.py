"""The ``--keep DIR`` layout of the app level: one upper/work pair per copy-on-write path.

``DIR/silo-keep.json`` maps each path to its directory, so ``silo diff DIR`` can
compare uppers with what they shadow.
"""

from __future__ import annotations

import json
import os

from silo.engine.planner import keep_layout
from silo.model.errors import SpecError, UserError

MANIFEST = "silo-keep.json"


def prepare(keep: str, paths: list[str]) -> None:
    """Create the keep directory's layout (idempotent); refuses a non-empty foreign dir."""
    if os.path.exists(keep) and not os.path.isdir(keep):
        raise SpecError(f"--keep {keep} exists and is not a directory: choose another path")
    manifest = os.path.join(keep, MANIFEST)
    if os.path.isdir(keep) and os.listdir(keep) and not os.path.exists(manifest):
        raise SpecError(f"--keep {keep} is a non-empty directory that silo did not make: choose an empty or new one")
    layers = []
    for path in paths:
        upper, work = keep_layout(keep, path)
        os.makedirs(upper, mode=0o755, exist_ok=True)
        os.makedirs(work, mode=0o700, exist_ok=True)
        layers.append({"path": path, "upper": os.path.relpath(upper, keep)})
    old: list[dict[str, str]] = []
    if os.path.exists(manifest):
        old = load(keep)
    known = {layer["path"] for layer in old}
    merged = old + [layer for layer in layers if layer["path"] not in known]
    tmp = manifest + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"version": 1, "layers": merged}, f, indent=1)
    os.replace(tmp, manifest)


def load(keep: str) -> list[dict[str, str]]:
    path = os.path.join(keep, MANIFEST)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise SpecError(f"{keep} is not a kept app-level directory (no {MANIFEST}): "
                        "make one with 'silo run --isolation app --keep DIR ...'") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, list) or not all(
            isinstance(x, dict) and isinstance(x.get("path"), str) and isinstance(x.get("upper"), str)
            for x in layers):
        raise UserError(f"{path} is malformed: remove the directory and run again")
    return layers
