"""silo.store: the daemon's persisted state (workspace records), one locked directory.

Daemon-side: it imports only :mod:`silo.model`, and nothing but the daemon imports it.
"""

from silo.model.errors import StoreFull
from silo.store.records import CorruptRecord, Store, StoreLocked

__all__ = ["CorruptRecord", "Store", "StoreFull", "StoreLocked"]
