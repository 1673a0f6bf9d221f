"""silo: isolated workspaces for Linux, driven from Python.

The public API is what ``__all__`` lists; everything else is private. Names are
loaded lazily (PEP 562) so that ``import silo`` stays cheap for the CLI's fast path.
"""

from __future__ import annotations

# No `typing` import at run time: it costs the CLI's fast path ~10 ms.
TYPE_CHECKING = False

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "CommandNotExecutable",
    "CommandNotFound",
    "DaemonUnavailable",
    "ExecResult",
    "InternalError",
    "Isolation",
    "LimitUnavailable",
    "MockTransport",
    "Mount",
    "NotFoundError",
    "PermissionDenied",
    "PoolStatus",
    "PrivilegeError",
    "ProtocolError",
    "Result",
    "Sandbox",
    "SiloError",
    "Spec",
    "SpecError",
    "StoreFull",
    "Template",
    "Transport",
    "UserError",
    "Workspace",
    "WorkspaceExists",
    "WorkspaceInfo",
    "WorkspaceStateError",
    "__version__",
]

_LAZY = {
    "Sandbox": "silo.sdk.sandbox",
    "Result": "silo.sdk.sandbox",
    "PoolStatus": "silo.sdk.sandbox",
    "Spec": "silo.model.spec",
    "Mount": "silo.model.spec",
    "Isolation": "silo.model.spec",
    "Client": "silo.sdk.client",
    "AsyncClient": "silo.sdk.client",
    "Workspace": "silo.sdk.client",
    "WorkspaceInfo": "silo.sdk.client",
    "Template": "silo.sdk.client",
    "ExecResult": "silo.sdk.client",
    "Transport": "silo.sdk.transport",
    "MockTransport": "silo.sdk.transport",
}

if TYPE_CHECKING:
    from typing import Any

    from silo.model.errors import (
        CommandNotExecutable,
        CommandNotFound,
        DaemonUnavailable,
        InternalError,
        LimitUnavailable,
        NotFoundError,
        PermissionDenied,
        PrivilegeError,
        ProtocolError,
        SiloError,
        SpecError,
        StoreFull,
        UserError,
        WorkspaceExists,
        WorkspaceStateError,
    )
    from silo.model.spec import Isolation, Mount, Spec
    from silo.sdk.client import AsyncClient, Client, ExecResult, Template, Workspace, WorkspaceInfo
    from silo.sdk.sandbox import PoolStatus, Result, Sandbox
    from silo.sdk.transport import MockTransport, Transport


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in __all__:
        return getattr(importlib.import_module("silo.model.errors"), name)
    raise AttributeError(f"module 'silo' has no attribute {name!r}")
