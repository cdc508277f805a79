"""
:class:`PostgresKeyStore`: the key store in PostgreSQL, through psycopg2.

psycopg2 is imported only when a PostgreSQL store is opened, so synkeys
works without it (``pip install 'synkeys[postgres]'`` adds it). Every
connection has a connect timeout and a statement timeout, and the pool
reconnects after losing a connection, so a database outage makes calls
fail fast with :class:`~synkeys.storage.errors.StoreUnavailable` instead of
hanging, and the store recovers by itself when the database returns.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from twisted.enterprise.adbapi import ConnectionPool
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger

from synkeys.errors import ConfigError
from synkeys.storage.dialect import POSTGRES
from synkeys.storage.errors import StoreUnavailable
from synkeys.storage.migrations import MigrationResult, apply_migrations
from synkeys.storage.sql import SQLKeyStore

log = Logger()

#: URI schemes libpq accepts, and that select PostgreSQL in ``--database``.
DSN_PREFIXES = ("postgresql://", "postgres://")
DEFAULT_CONNECT_TIMEOUT_S = 5
DEFAULT_STATEMENT_TIMEOUT_MS = 10_000


def is_postgres_dsn(database: str) -> bool:
    """Whether ``database`` is a PostgreSQL URI."""
    return database.startswith(DSN_PREFIXES)


def import_psycopg2() -> ModuleType:
    """
    Import psycopg2.

    :raises ConfigError: saying how to install it, when it is missing.
    """
    try:
        import psycopg2  # type: ignore[import-untyped]
        import psycopg2.errors  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError(
            "a postgresql:// database needs the psycopg2 driver: "
            "pip install 'synkeys[postgres]'"
        ) from None
    return psycopg2


def unavailable_errors(psycopg2: ModuleType) -> tuple[type[BaseException], ...]:
    """
    psycopg2's errors meaning the database cannot be used now: unreachable,
    connection lost, timed out (``QueryCanceled`` is an
    ``OperationalError``), shutting down, or a read-only replica.
    """
    return (
        psycopg2.OperationalError,
        psycopg2.InterfaceError,
        psycopg2.errors.ReadOnlySqlTransaction,
    )


def describe_dsn(dsn: str, psycopg2: ModuleType) -> str:
    """``dsn`` for logs and errors: host, port, database and user, no password."""
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "postgresql://<unparseable DSN>"
    host = params.get("host", "")
    port = f":{params['port']}" if "port" in params else ""
    user = f"{params['user']}@" if "user" in params else ""
    return f"postgresql://{user}{host}{port}/{params.get('dbname', '')}"


def connection_kwargs(
    dsn: str, psycopg2: ModuleType, connect_timeout_s: int
) -> dict[str, Any]:
    """
    Keyword arguments for ``psycopg2.connect(dsn, ...)``: defaults the
    DSN does not set itself.

    :raises ConfigError: when the DSN cannot be parsed.
    """
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as e:
        raise ConfigError(f"invalid PostgreSQL DSN: {e}") from None
    defaults: dict[str, Any] = {
        "connect_timeout": connect_timeout_s,
        "application_name": "synkeys",
        # Notice a peer that vanished (a failed-over server, a dropped NAT
        # entry) within about a minute, rather than the kernel's two hours.
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
    }
    return {k: v for k, v in defaults.items() if k not in params}


def _configure(conn: Any, statement_timeout_ms: int) -> None:
    with conn.cursor() as cursor:
        cursor.execute("SET statement_timeout = %s", (int(statement_timeout_ms),))
    conn.commit()


def connect_postgres(
    dsn: str,
    *,
    connect_timeout_s: int = DEFAULT_CONNECT_TIMEOUT_S,
    statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
) -> Any:
    """
    A blocking psycopg2 connection configured as the store's (for
    ``migrate``).

    :raises ConfigError: when psycopg2 is missing or the DSN is invalid.
    :raises StoreUnavailable: when the database cannot be reached.
    """
    psycopg2 = import_psycopg2()
    kwargs = connection_kwargs(dsn, psycopg2, connect_timeout_s)
    try:
        conn = psycopg2.connect(dsn, **kwargs)
        _configure(conn, statement_timeout_ms)
    except unavailable_errors(psycopg2) as e:
        raise StoreUnavailable("postgres", f"{describe_dsn(dsn, psycopg2)}: {e}") from e
    return conn


class PostgresKeyStore(SQLKeyStore):
    """A key store in a PostgreSQL database. Open it with :meth:`open`."""

    @classmethod
    def open(
        cls,
        dsn: str,
        reactor: IReactorCore,
        *,
        connect_timeout_s: int = DEFAULT_CONNECT_TIMEOUT_S,
        statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
        min_connections: int = 1,
        max_connections: int = 5,
    ) -> Deferred[PostgresKeyStore]:
        """
        Connect to the database at ``dsn`` (``postgresql://`` or
        ``postgres://`` URI, or libpq ``key=value`` form) and bring its
        schema up to date.

        :param reactor: Runs the pool's threads.
        :param connect_timeout_s: How long a connection attempt may take
            (unless the DSN sets ``connect_timeout``).
        :param statement_timeout_ms: How long one statement may run,
            waiting for locks included.
        :raises ConfigError: (in the Deferred) when psycopg2 is missing, the
            DSN is invalid, or the database has a newer schema.
        :raises StoreUnavailable: (in the Deferred) when the database
            cannot be reached.
        """
        return Deferred.fromCoroutine(
            cls._open(
                dsn,
                reactor,
                connect_timeout_s,
                statement_timeout_ms,
                min_connections,
                max_connections,
            )
        )

    @classmethod
    async def _open(
        cls,
        dsn: str,
        reactor: IReactorCore,
        connect_timeout_s: int,
        statement_timeout_ms: int,
        min_connections: int,
        max_connections: int,
    ) -> PostgresKeyStore:
        psycopg2 = import_psycopg2()
        kwargs = connection_kwargs(dsn, psycopg2, connect_timeout_s)
        where = describe_dsn(dsn, psycopg2)

        def configure(conn: Any) -> None:
            _configure(conn, statement_timeout_ms)

        pool = ConnectionPool(
            "psycopg2",
            dsn,
            cp_min=min_connections,
            cp_max=max_connections,
            # After a failed transaction, check the connection with
            # "SELECT 1" and replace it if it is dead, so the store
            # recovers once the database is back.
            cp_reconnect=True,
            cp_openfun=configure,
            cp_reactor=reactor,
            **kwargs,
        )
        store = cls(pool, POSTGRES, where, unavailable_errors(psycopg2))
        try:
            result: MigrationResult = await store.migrate()
        except BaseException:
            await store.close()
            raise
        log.info(
            "Opened PostgreSQL key store {where} (schema version {version})",
            where=where,
            version=result.after,
        )
        return store


def migrate_postgres(dsn: str) -> MigrationResult:
    """Bring the PostgreSQL database at ``dsn`` up to date, blocking."""
    conn = connect_postgres(dsn)
    psycopg2 = import_psycopg2()
    where = describe_dsn(dsn, psycopg2)
    try:
        cursor = conn.cursor()
        try:
            result = apply_migrations(cursor, POSTGRES, where)
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
    except unavailable_errors(psycopg2) as e:
        raise StoreUnavailable("postgres", f"{where}: {e}") from e
    finally:
        conn.close()
    return result
