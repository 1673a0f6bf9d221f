"""silo.store: the daemon's persisted state (workspace records), one locked directory.

Daemon-side: it imports only :mod:`silo.model`, and nothing but the daemon imports it.
"""

from silo.store.records import CorruptRecord, Store, StoreFull, StoreLocked

__all__ = ["CorruptRecord", "Store", "StoreFull", "StoreLocked"]
