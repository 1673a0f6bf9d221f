"""silod: the daemon that owns workspaces (see :mod:`silo.daemon.manager`) and serves
them as an HTTP API on a unix socket (:mod:`silo.daemon.api`, docs/api.md)."""
