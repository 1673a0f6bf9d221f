"""The error tree, sorted by audience.

One shallow hierarchy (after Qubes' ``qubes/exc.py``):

* :class:`UserError` and its children are problems a user can fix; their message
  names the problem and says what to do. The CLI prints them as one line and exits
  with a code that tells the kind apart (see below).
* :class:`ProtocolError` is a malformed request (HTTP 400 in the daemon's API).
* :class:`PermissionDenied` is a request the caller may not make (HTTP 403).
* :class:`InternalError` is everything else; its text is logged, users see an
  opaque message.

The wire name of a class is its ``__name__``; :func:`error_from_wire` rebuilds the
same class on the client side so the SDK raises what the server raised.

Exit codes. ``silo run``, ``silo plan`` and ``silo exec`` exit with the command's own
code, so their own failures use the codes above any command's usual ones, as docker
and podman do: :attr:`SiloError.exit_code`, 125 (126, 127: the command cannot be
executed, or is not found). Every other verb has no command's code to pass on, so it
exits with :attr:`SiloError.verb_exit_code`, one per kind of failure, which a script
can test: 2 bad input, 3 not found, 4 wrong state, 5 exists, 6 not allowed, 7 limit
unavailable, 8 no space, 9 daemon unreachable, 10 protocol, 11 other precondition,
1 silo's own fault.
"""

from __future__ import annotations

EXIT_SILO = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127

# The exit codes of the verbs other than run, plan and exec (see the module's text).
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_NO_SUCH = 3
EXIT_WRONG_STATE = 4
EXIT_EXISTS = 5
EXIT_NOT_ALLOWED = 6
EXIT_LIMIT = 7
EXIT_NO_SPACE = 8
EXIT_NO_DAEMON = 9
EXIT_PROTOCOL = 10
EXIT_PRECONDITION = 11


class SiloError(Exception):
    """Base of every error silo raises on purpose."""

    exit_code: int = EXIT_SILO
    verb_exit_code: int = EXIT_INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_wire(self) -> dict[str, object]:
        """The nearest class the wire knows (a module's own subclass travels as its parent)."""
        name = next(c.__name__ for c in type(self).__mro__ if c.__name__ in _CLASSES)
        return {"class": name, "message": self.message}


class UserError(SiloError):
    """Bad input or an unmet precondition the user can fix."""

    verb_exit_code = EXIT_PRECONDITION


class SpecError(UserError):
    """An invalid spec: option, size, duration, mount, env, ..."""

    verb_exit_code = EXIT_BAD_INPUT


class NotFoundError(UserError):
    """A named thing (workspace, template, snapshot, root directory, mount source, file) does not exist."""

    verb_exit_code = EXIT_NO_SUCH


class LimitUnavailable(UserError):
    """A resource limit was asked for but its cgroup controller cannot be used."""

    verb_exit_code = EXIT_LIMIT


class PrivilegeError(UserError):
    """The feature needs privileges the caller lacks."""

    verb_exit_code = EXIT_NOT_ALLOWED


class StoreFull(UserError):
    """The disk or quota is full: nothing was changed (the old state is intact)."""

    verb_exit_code = EXIT_NO_SPACE


class DaemonUnavailable(SiloError):
    """silod cannot be reached or started."""

    verb_exit_code = EXIT_NO_DAEMON


class CommandNotFound(UserError):
    """The command to run does not exist inside the sandbox."""

    exit_code = EXIT_NOT_FOUND


class CommandNotExecutable(UserError):
    """The command exists inside the sandbox but cannot be executed."""

    exit_code = EXIT_NOT_EXECUTABLE


class ProtocolError(SiloError):
    """A malformed request or reply between silo's own processes."""

    verb_exit_code = EXIT_PROTOCOL


class PermissionDenied(SiloError):
    """The caller may not do this."""

    verb_exit_code = EXIT_NOT_ALLOWED


class InternalError(SiloError):
    """A failure that is silo's fault, not the user's."""


class WorkspaceStateError(UserError):
    """A verb was asked of a workspace whose state does not allow it."""

    verb_exit_code = EXIT_WRONG_STATE


class WorkspaceExists(UserError):
    """``create`` or ``fork`` to a name that a workspace (or template) already has."""

    verb_exit_code = EXIT_EXISTS


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
        StoreFull,
        DaemonUnavailable,
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


def http_status(err: SiloError) -> int:
    """The HTTP status of ``err`` in silod's API (docs/api.md)."""
    if isinstance(err, PermissionDenied):
        return 403
    if isinstance(err, NotFoundError):
        return 404
    if isinstance(err, WorkspaceExists | WorkspaceStateError):
        return 409
    if isinstance(err, StoreFull):
        return 507
    if isinstance(err, UserError | ProtocolError):
        return 400
    return 500


def error_from_wire(untrusted: object) -> SiloError:
    """Rebuild an error sent by :meth:`SiloError.to_wire`; unknown shapes become InternalError."""
    if isinstance(untrusted, dict):
        name = untrusted.get("class")
        message = untrusted.get("message")
        if isinstance(name, str) and isinstance(message, str):
            return _CLASSES.get(name, InternalError)(message[:4096])
    return InternalError("malformed error from silo's spawner")
