"""
:class:`SQLiteKeyStore`: the key store in an SQLite file.

One connection, in autocommit mode with explicit ``BEGIN IMMEDIATE`` for
writes, in WAL journal mode (readers in other processes do not block the
writer). ``synchronous=NORMAL`` by default: in WAL mode a committed write
survives the process being killed (``kill -9``), though the last commits
may be lost if the machine loses power. That is the right trade for a
cache of signed responses that can be fetched again, where a notary may
store hundreds of responses for one query; pass ``synchronous="FULL"`` to
fsync every commit and survive power loss too. A database locked by
another process is waited for ``busy_timeout_s``, then the call fails with
:class:`~synkeys.storage.errors.StoreUnavailable`.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from twisted.enterprise.adbapi import ConnectionPool
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger

from synkeys.errors import ConfigError
from synkeys.storage.dialect import SQLITE
from synkeys.storage.errors import StoreUnavailable
from synkeys.storage.migrations import MigrationResult, apply_migrations
from synkeys.storage.sql import SQLKeyStore

log = Logger()

#: UPSERT (``INSERT ... ON CONFLICT DO UPDATE``) arrived in SQLite 3.24.
MIN_SQLITE_VERSION = (3, 24, 0)
#: How long a call waits for another process's lock before failing.
DEFAULT_BUSY_TIMEOUT_S = 5.0
_SYNCHRONOUS_MODES = ("NORMAL", "FULL", "EXTRA")

#: Errors meaning the database cannot be used now (locked, I/O error,
#: disk full, unopenable file, closed connection).
UNAVAILABLE_ERRORS = (sqlite3.OperationalError, sqlite3.InterfaceError)


def check_sqlite_path(path: str | os.PathLike[str]) -> str:
    """
    Check an SQLite database path can be created or opened.

    :raises ConfigError: when its directory does not exist, or it names a
        directory.
    """
    text = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent):
        raise ConfigError(
            f"cannot open SQLite database {text}: directory {parent} does not exist"
        )
    if os.path.isdir(text):
        raise ConfigError(f"cannot open SQLite database {text}: it is a directory")
    if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
        raise ConfigError(
            f"SQLite {sqlite3.sqlite_version} is too old; synkeys needs "
            f"{'.'.join(map(str, MIN_SQLITE_VERSION))} or later"
        )
    return text


def _configure(
    conn: sqlite3.Connection, path: str, busy_timeout_s: float, synchronous: str
) -> None:
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
    if str(mode).lower() != "wal":
        log.warn(  # noqa: G010 - twisted.logger.Logger has no warning()
            "SQLite database {path} is in journal mode {mode}, not WAL",
            path=path,
            mode=mode,
        )
    conn.execute(f"PRAGMA synchronous = {synchronous}")


def _check_synchronous(synchronous: str) -> str:
    mode = synchronous.upper()
    if mode not in _SYNCHRONOUS_MODES:
        raise ConfigError(
            f"SQLite synchronous must be one of {', '.join(_SYNCHRONOUS_MODES)}, "
            f"not {synchronous!r}"
        )
    return mode


def connect_sqlite(
    path: str | os.PathLike[str],
    *,
    busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    synchronous: str = "NORMAL",
) -> sqlite3.Connection:
    """
    A blocking connection configured as the store's (for ``migrate``).

    :raises ConfigError: for a bad path or setting.
    :raises StoreUnavailable: when the database cannot be opened.
    """
    text = check_sqlite_path(path)
    mode = _check_synchronous(synchronous)
    try:
        conn = sqlite3.connect(text, timeout=busy_timeout_s, isolation_level=None)
        _configure(conn, text, busy_timeout_s, mode)
    except UNAVAILABLE_ERRORS as e:
        raise StoreUnavailable("sqlite", f"{text}: {e}") from e
    return conn


class SQLiteKeyStore(SQLKeyStore):
    """
    A key store in one SQLite file. Open it with :meth:`open`.
    """

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        reactor: IReactorCore,
        *,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        synchronous: str = "NORMAL",
    ) -> Deferred[SQLiteKeyStore]:
        """
        Open (creating if need be) the database at ``path`` and bring its
        schema up to date.

        :param reactor: Runs the connection's thread.
        :param busy_timeout_s: How long to wait for another process's lock.
        :param synchronous: ``"NORMAL"`` (survives a process crash) or
            ``"FULL"`` (survives power loss too); see the module docstring.
        :raises ConfigError: (in the Deferred) for a bad path or setting,
            or a database with a newer schema.
        :raises StoreUnavailable: (in the Deferred) when it cannot be opened.
        """
        return Deferred.fromCoroutine(
            cls._open(path, reactor, busy_timeout_s, synchronous)
        )

    @classmethod
    async def _open(
        cls,
        path: str | os.PathLike[str],
        reactor: IReactorCore,
        busy_timeout_s: float,
        synchronous: str,
    ) -> SQLiteKeyStore:
        text = check_sqlite_path(path)
        mode = _check_synchronous(synchronous)

        def configure(conn: Any) -> None:
            _configure(conn, text, busy_timeout_s, mode)

        pool = ConnectionPool(
            "sqlite3",
            text,
            timeout=busy_timeout_s,
            # Autocommit: transactions are opened explicitly with BEGIN
            # IMMEDIATE, which DDL in migrations needs too.
            isolation_level=None,
            # One connection: SQLite serialises writers anyway, and a second
            # connection in this process would only wait on the first.
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_openfun=configure,
            cp_reactor=reactor,
        )
        store = cls(pool, SQLITE, text, UNAVAILABLE_ERRORS)
        try:
            result: MigrationResult = await store.migrate()
        except BaseException:
            await store.close()
            raise
        log.info(
            "Opened SQLite key store {path} (schema version {version})",
            path=text,
            version=result.after,
        )
        return store


def migrate_sqlite(path: str | os.PathLike[str]) -> MigrationResult:
    """Bring the SQLite database at ``path`` up to date, blocking."""
    conn = connect_sqlite(path)
    try:
        cursor = conn.cursor()
        try:
            result = apply_migrations(cursor, SQLITE, os.fspath(path))
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
    except UNAVAILABLE_ERRORS as e:
        raise StoreUnavailable("sqlite", f"{os.fspath(path)}: {e}") from e
    finally:
        conn.close()
    return result
