"""
The few ways SQLite and PostgreSQL differ for synkeys, as values, so the
schema and the queries are written once.
"""

from __future__ import annotations

import attr


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Dialect:
    """
    One SQL engine's spelling of what synkeys needs.

    :ivar name: ``"sqlite"`` or ``"postgres"``; used in logs and errors.
    :ivar bytes_type: The column type for binary data.
    :ivar param: The DB-API parameter placeholder.
    :ivar begin_write: A statement that opens a write transaction and
        takes the write lock up front, or ``None`` when the driver opens
        transactions itself.
    :ivar migration_lock: A statement run first in the migration
        transaction so that two processes never migrate at once.
    """

    name: str
    bytes_type: str
    param: str
    begin_write: str | None
    migration_lock: str

    def sql(self, statement: str) -> str:
        """``statement``, written with ``?`` placeholders, in this dialect."""
        return statement.replace("?", self.param)


#: SQLite, used through :mod:`sqlite3` in autocommit mode: every write
#: transaction starts with ``BEGIN IMMEDIATE``, so it holds the write lock
#: from its first statement and cannot deadlock on a lock upgrade.
SQLITE = Dialect(
    name="sqlite",
    bytes_type="BLOB",
    param="?",
    begin_write="BEGIN IMMEDIATE",
    migration_lock="BEGIN IMMEDIATE",
)

#: PostgreSQL through psycopg2, which opens a transaction before the first
#: statement; migrations serialise on a transaction-scoped advisory lock.
POSTGRES = Dialect(
    name="postgres",
    bytes_type="BYTEA",
    param="%s",
    begin_write=None,
    # int.from_bytes(b"synkeys", "big"): a constant other programs are
    # unlikely to use for their own advisory locks.
    migration_lock="SELECT pg_advisory_xact_lock(32503137476901235)",
)
