"""nftables through libnftables' JSON API (ctypes; no ``nft`` process, no rule strings).

Debian's Python binding (``python3-nftables``) is not on PyPI and is itself a thin
ctypes wrapper over the same four calls; silo carries its own so the virtual
environment needs nothing from outside it (docs/design.md, "Network").

A context's netlink socket is opened when the context is made and stays in the network
namespace the calling thread was in then: make a :class:`Nft` while inside the
namespace it is meant for, and it keeps acting there wherever the thread goes next.
"""

from __future__ import annotations

import ctypes
import json
from typing import Any

from silo.model.errors import SiloError

_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON
_lib: ctypes.CDLL | None = None


class NftError(SiloError):
    """A ruleset silo built was refused by the kernel (a silo bug, or a kernel without nftables)."""


def _load() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL("libnftables.so.1")
        except OSError:
            raise NftError("libnftables.so.1 is missing: install Debian's libnftables1 "
                           "(make install does)") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        _lib = lib
    return _lib


class Nft:
    """One libnftables context, bound to the network namespace it was made in."""

    def __init__(self) -> None:
        self._lib = _load()
        ctx = self._lib.nft_ctx_new(0)
        if not ctx:
            raise NftError("libnftables could not make a context")
        self._ctx: int | None = ctx
        self._lib.nft_ctx_output_set_flags(ctx, _JSON)
        self._lib.nft_ctx_buffer_output(ctx)
        self._lib.nft_ctx_buffer_error(ctx)

    def run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run a batch of JSON commands (one transaction: all or nothing); returns the
        objects of the reply (``list`` commands)."""
        if self._ctx is None:
            raise NftError("this nftables context is closed")
        doc = json.dumps({"nftables": commands}).encode()
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, doc)
        out = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
        if rc != 0:
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace").strip()
            raise NftError(f"nftables refused silo's rules: {err.splitlines()[0] if err else 'no reason given'}")
        if not out.strip():
            return []
        reply = json.loads(out)
        items: list[dict[str, Any]] = reply.get("nftables", [])
        return [i for i in items if "metainfo" not in i]

    def list(self, what: str, **names: Any) -> list[dict[str, Any]]:
        """``list(table, family="inet", name="silo")`` and the like."""
        return self.run([{"list": {what: names}}])

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> Nft:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
