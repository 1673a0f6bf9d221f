"""The error tree, sorted by audience.

One shallow hierarchy (after Qubes' ``qubes/exc.py``):

* :class:`UserError` and its children are problems a user can fix; their message
  names the problem and says what to do. The CLI prints them as one line and exits
  with :attr:`SiloError.exit_code` (125, silo's own error code).
* :class:`ProtocolError` is a malformed request (HTTP 400 in the daemon's API).
* :class:`PermissionDenied` is a request the caller may not make (HTTP 403).
* :class:`InternalError` is everything else; its text is logged, users see an
  opaque message.

The wire name of a class is its ``__name__``; :func:`error_from_wire` rebuilds the
same class on the client side so the SDK raises what the server raised.
"""

from __future__ import annotations

EXIT_SILO = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127


class SiloError(Exception):
    """Base of every error silo raises on purpose."""

    exit_code: int = EXIT_SILO

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_wire(self) -> dict[str, object]:
        """The nearest class the wire knows (a module's own subclass travels as its parent)."""
        name = next(c.__name__ for c in type(self).__mro__ if c.__name__ in _CLASSES)
        return {"class": name, "message": self.message}


class UserError(SiloError):
    """Bad input or an unmet precondition the user can fix."""


class SpecError(UserError):
    """An invalid spec: option, size, duration, mount, env, ..."""


class NotFoundError(UserError):
    """A named thing (root directory, mount source, file) does not exist."""


class LimitUnavailable(UserError):
    """A resource limit was asked for but its cgroup controller cannot be used."""


class PrivilegeError(UserError):
    """The feature needs privileges the caller lacks."""


class CommandNotFound(UserError):
    """The command to run does not exist inside the sandbox."""

    exit_code = EXIT_NOT_FOUND


class CommandNotExecutable(UserError):
    """The command exists inside the sandbox but cannot be executed."""

    exit_code = EXIT_NOT_EXECUTABLE


class ProtocolError(SiloError):
    """A malformed request or reply between silo's own processes."""


class PermissionDenied(SiloError):
    """The caller may not do this."""


class InternalError(SiloError):
    """A failure that is silo's fault, not the user's."""


class WorkspaceStateError(UserError):
    """A verb was asked of a workspace whose state does not allow it."""


class WorkspaceExists(UserError):
    """``create`` or ``fork`` to a name that a workspace already has."""


class IllegalTransition(InternalError):
    """The daemon tried a state change the table forbids: a bug, never the user's doing."""


_CLASSES: dict[str, type[SiloError]] = {
    cls.__name__: cls
    for cls in (
        SiloError,
        UserError,
        SpecError,
        NotFoundError,
        LimitUnavailable,
        PrivilegeError,
        CommandNotFound,
        CommandNotExecutable,
        ProtocolError,
        PermissionDenied,
        InternalError,
        WorkspaceStateError,
        WorkspaceExists,
        IllegalTransition,
    )
}


def error_from_wire(untrusted: object) -> SiloError:
    """Rebuild an error sent by :meth:`SiloError.to_wire`; unknown shapes become InternalError."""
    if isinstance(untrusted, dict):
        name = untrusted.get("class")
        message = untrusted.get("message")
        if isinstance(name, str) and isinstance(message, str):
            return _CLASSES.get(name, InternalError)(message[:4096])
    return InternalError("malformed error from silo's spawner")
