"""Where silo keeps per-user runtime state; import-light (the CLI's fast path uses it)."""

from __future__ import annotations

import os


def runtime_dir() -> str:
    """``/run/silo`` for root, else ``$XDG_RUNTIME_DIR/silo`` or ``/tmp/silo-UID``;
    ``SILO_RUNTIME_DIR`` overrides."""
    override = os.environ.get("SILO_RUNTIME_DIR")
    if override:
        return override
    uid = os.geteuid()
    if uid == 0:
        return "/run/silo"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return os.path.join(xdg, "silo")
    return f"/tmp/silo-{uid}"


def server_socket() -> str:
    return os.path.join(runtime_dir(), "spawner.sock")


def code_token() -> str:
    """Changes whenever silo's code changes, so a lingering server never runs stale code."""
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    newest = 0
    count = 0
    stack = [top]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.name.endswith((".py", ".json")):
                    newest = max(newest, entry.stat().st_mtime_ns)
                    count += 1
                elif entry.is_dir() and not entry.name.startswith(("_", ".")):
                    stack.append(entry.path)
    return f"{top}:{count}:{newest}"


def state_dir() -> str:
    """Where the daemon keeps workspaces: ``/var/lib/silo`` for root, else
    ``$XDG_DATA_HOME/silo`` (``~/.local/share/silo``); ``SILO_STATE_DIR`` overrides."""
    override = os.environ.get("SILO_STATE_DIR")
    if override:
        return override
    if os.geteuid() == 0:
        return "/var/lib/silo"
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data, "silo")


def daemon_dir() -> str:
    """The directory of silod's sockets: ``/run/silod`` for root (system-wide, reachable by
    the ``silo`` group), else the caller's private runtime dir; ``SILO_DAEMON_DIR`` overrides."""
    override = os.environ.get("SILO_DAEMON_DIR")
    if override:
        return override
    if os.geteuid() == 0 and not os.environ.get("SILO_RUNTIME_DIR"):
        return "/run/silod"
    return runtime_dir()


def daemon_socket() -> str:
    """silod's HTTP API."""
    return os.path.join(daemon_dir(), "silod.sock")


def exec_socket() -> str:
    """silod's streamed-exec socket (SOCK_SEQPACKET, fds passed)."""
    return os.path.join(daemon_dir(), "exec.sock")
