"""Files in silo's VM cache (unpacked kernels, initramfs images, accelerator verdicts)
and the VM pools' settings (cli.server): each written whole or not at all, so a crash
or a concurrent builder never leaves a half-written file under the name readers look for."""

from __future__ import annotations

import os
import tempfile


def publish(path: str, data: bytes) -> None:
    """``data`` at ``path``, atomically, mode 0644 (the cache serves every user); the
    directory must exist."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
