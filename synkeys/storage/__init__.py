"""
Persistent storage of checked server-keys responses behind one interface,
:class:`synkeys.interfaces.IKeyStore`: in memory, in SQLite, or in
PostgreSQL. :func:`open_store` picks one from the ``--database`` setting.

Each store keeps one row per ``(server_name, key_id)`` with the newest
response that lists that key id, so a key the origin stops listing is
still served from the last response that did, and a key id is never
silently rebound to different key bytes.
"""

from synkeys.storage.database import MEMORY, migrate, open_store
from synkeys.storage.errors import StoreUnavailable
from synkeys.storage.memory import MemoryKeyStore
from synkeys.storage.migrations import SCHEMA_VERSION, MigrationResult
from synkeys.storage.postgres import PostgresKeyStore
from synkeys.storage.sqlite import SQLiteKeyStore

__all__ = [
    "MEMORY",
    "SCHEMA_VERSION",
    "MemoryKeyStore",
    "MigrationResult",
    "PostgresKeyStore",
    "SQLiteKeyStore",
    "StoreUnavailable",
    "migrate",
    "open_store",
]
