"""
Choosing a store from the ``--database`` setting:

- ``postgresql://...`` or ``postgres://...``: :class:`PostgresKeyStore`;
- ``:memory:``: :class:`MemoryKeyStore` (nothing survives a restart);
- anything else: the path of an SQLite file, :class:`SQLiteKeyStore`.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorCore

from synkeys.interfaces import IKeyStore
from synkeys.storage.memory import MemoryKeyStore
from synkeys.storage.migrations import SCHEMA_VERSION, MigrationResult
from synkeys.storage.postgres import PostgresKeyStore, is_postgres_dsn, migrate_postgres
from synkeys.storage.sqlite import SQLiteKeyStore, migrate_sqlite

#: The ``--database`` value that selects :class:`MemoryKeyStore`.
MEMORY = ":memory:"


def open_store(database: str, reactor: IReactorCore) -> Deferred[IKeyStore]:
    """
    Open the store ``database`` names, applying pending migrations.

    :param reactor: Runs the database threads (unused for ``:memory:``).
    :raises ConfigError: (in the Deferred) when psycopg2 is missing for a
        PostgreSQL DSN, an SQLite file's directory does not exist, or the
        database's schema is newer than this code.
    :raises StoreUnavailable: (in the Deferred) when the database cannot
        be reached.
    """
    opened: Deferred
    if is_postgres_dsn(database):
        opened = PostgresKeyStore.open(database, reactor)
    elif database == MEMORY:
        opened = succeed(MemoryKeyStore())
    else:
        opened = SQLiteKeyStore.open(database, reactor)
    return cast("Deferred[IKeyStore]", opened)


def migrate(database: str) -> MigrationResult:
    """
    Bring ``database``'s schema up to date now, blocking (for
    ``synkeys migrate``; stores also migrate when opened). Running it again
    does nothing.

    :raises ConfigError: as for :func:`open_store`.
    :raises StoreUnavailable: when the database cannot be reached.
    """
    if is_postgres_dsn(database):
        return migrate_postgres(database)
    if database == MEMORY:
        return MigrationResult(SCHEMA_VERSION, SCHEMA_VERSION)
    return migrate_sqlite(database)
