"""
:class:`SQLKeyStore`: the :class:`~synkeys.interfaces.IKeyStore` queries,
written once for SQLite and PostgreSQL and run on a Twisted
:class:`~twisted.enterprise.adbapi.ConnectionPool`.

The engine modules (:mod:`synkeys.storage.sqlite`,
:mod:`synkeys.storage.postgres`) only connect and configure.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from twisted.enterprise.adbapi import ConnectionLost, ConnectionPool
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from synkeys.errors import InvalidSignedJson
from synkeys.interfaces import IKeyStore, StoreResult
from synkeys.keys import ServerKeys
from synkeys.storage.dialect import Dialect
from synkeys.storage.errors import StoreUnavailable
from synkeys.storage.migrations import MigrationResult, apply_migrations
from synkeys.storage.records import rebuild_server_keys

log = Logger()

# Replace a row only with a later response binding the same key bytes: the
# SQL form of synkeys.storage.records.supersedes, evaluated under the row
# lock the UPSERT takes, so concurrent writers cannot interleave.
_UPSERT = """
INSERT INTO server_keys (
    server_name, key_id, key_bytes, expired_ts, valid_until_ts, fetched_ts,
    source, response
) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (server_name, key_id) DO UPDATE SET
    expired_ts = excluded.expired_ts,
    valid_until_ts = excluded.valid_until_ts,
    fetched_ts = excluded.fetched_ts,
    source = excluded.source,
    response = excluded.response
WHERE server_keys.key_bytes = excluded.key_bytes
  AND (excluded.fetched_ts > server_keys.fetched_ts
       OR (excluded.fetched_ts = server_keys.fetched_ts
           AND excluded.valid_until_ts > server_keys.valid_until_ts))
"""

_SELECT_KEY_BYTES = (
    "SELECT key_bytes FROM server_keys WHERE server_name = ? AND key_id = ?"
)

_SELECT_SERVERS = """
SELECT server_name, key_id, key_bytes, fetched_ts, source, response
FROM server_keys WHERE server_name IN ({placeholders})
"""

_DELETE_SERVER = "DELETE FROM server_keys WHERE server_name = ?"

#: A row as :meth:`SQLKeyStore.get_server_keys` reads it:
#: ``(server_name, key_id, key_bytes, fetched_ts, source, response)``.
Row = tuple[str, str, bytes, int, str, bytes]


@implementer(IKeyStore)
class SQLKeyStore:
    """
    A key store in an SQL database reached through ``pool``.

    Use :meth:`synkeys.storage.sqlite.SQLiteKeyStore.open`,
    :meth:`synkeys.storage.postgres.PostgresKeyStore.open` or
    :func:`synkeys.storage.open_store` rather than this constructor: they
    configure the connections and run the migrations.

    :ivar query_batch_size: How many server names one ``SELECT`` names at
        most; a larger look-up is split into several queries.
    :ivar write_batch_size: How many responses one write transaction holds
        at most (see :meth:`store_server_keys`).
    """

    query_batch_size = 500
    write_batch_size = 256

    def __init__(
        self,
        pool: ConnectionPool,
        dialect: Dialect,
        where: str,
        unavailable_errors: tuple[type[BaseException], ...],
    ) -> None:
        """
        :param pool: Connections to the database, configured.
        :param dialect: The engine's SQL spelling.
        :param where: The database, for messages (never a password).
        :param unavailable_errors: Driver exceptions that mean the database
            cannot be used right now, reported as :class:`StoreUnavailable`.
        """
        self._pool = pool
        self._dialect = dialect
        self._where = where
        self._unavailable_errors = unavailable_errors + (ConnectionLost,)
        self._closed = False
        self._write_queue: list[tuple[ServerKeys, Deferred[StoreResult]]] = []
        self._writing = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._where}>"

    async def _run(self, interaction: Callable[..., Any], *args: Any) -> Any:
        if self._closed:
            raise StoreUnavailable(self._dialect.name, f"{self._where}: store is closed")
        try:
            return await self._pool.runInteraction(interaction, *args)
        except self._unavailable_errors as e:
            log.warn(  # noqa: G010 - twisted.logger.Logger has no warning()
                "{dialect} key store {where} unavailable: {error}",
                dialect=self._dialect.name,
                where=self._where,
                error=e,
            )
            raise StoreUnavailable(
                self._dialect.name, f"{self._where}: {type(e).__name__}: {e}".strip()
            ) from e

    def migrate(self) -> Deferred[MigrationResult]:
        """Apply any pending schema migrations (the open functions do)."""
        return Deferred.fromCoroutine(self._run(apply_migrations, self._dialect, self._where))

    def store_server_keys(self, keys: ServerKeys) -> Deferred[StoreResult]:
        """
        See :meth:`synkeys.interfaces.IKeyStore.store_server_keys`.

        Writes are committed in groups: while one transaction runs, the
        responses given meanwhile queue up, and the next transaction writes
        them all (at most :attr:`write_batch_size`). A notary fetching many
        servers at once then commits a few times instead of once per server,
        and each caller still gets its own :class:`StoreResult`.
        """
        written: Deferred[StoreResult] = Deferred()
        self._write_queue.append((keys, written))
        if not self._writing:
            self._writing = True
            Deferred.fromCoroutine(self._write_queued())
        return written

    async def _write_queued(self) -> None:
        try:
            while self._write_queue:
                size = max(1, self.write_batch_size)
                batch = self._write_queue[:size]
                del self._write_queue[:size]
                await self._write_batch(batch)
        finally:
            self._writing = False

    async def _write_batch(self, batch: list[tuple[ServerKeys, Deferred[StoreResult]]]) -> None:
        try:
            results: list[StoreResult] = await self._run(
                self._store_txn, [keys for keys, _ in batch]
            )
        except StoreUnavailable:
            failure = Failure()
            for _, written in batch:
                if not written.called:
                    written.errback(failure)
            return
        except Exception:
            if len(batch) == 1:
                failure = Failure()
                if not batch[0][1].called:
                    batch[0][1].errback(failure)
                return
            # Something about one response; do not fail the others with it.
            for one in batch:
                await self._write_batch([one])
            return
        for (_, written), result in zip(batch, results):
            if not written.called:
                written.callback(result)

    def _store_txn(self, txn: Any, batch: list[ServerKeys]) -> list[StoreResult]:
        sql = self._dialect.sql
        if self._dialect.begin_write is not None:
            txn.execute(self._dialect.begin_write)
        stored: list[set[str]] = [set() for _ in batch]
        kept: list[set[str]] = [set() for _ in batch]
        conflicts: list[dict[str, bytes]] = [{} for _ in batch]
        # Sorted, so two transactions writing the same servers lock their
        # rows in the same order and cannot deadlock; responses for the same
        # key id are written in the order they were given.
        rows = sorted(
            (keys.server_name, key_id, index)
            for index, keys in enumerate(batch)
            for key_id in keys.key_ids
        )
        for server_name, key_id, index in rows:
            keys = batch[index]
            key = keys.verify_key(key_id)
            assert key is not None
            txn.execute(
                sql(_UPSERT),
                (
                    server_name,
                    key_id,
                    key.key,
                    key.expired_ts,
                    keys.valid_until_ts,
                    keys.fetched_ts,
                    keys.source,
                    keys.raw,
                ),
            )
            if txn.rowcount == 1:
                stored[index].add(key_id)
                continue
            # Not written, so the row exists, and the UPSERT locked it (or,
            # for SQLite, the transaction holds the database's write lock).
            txn.execute(sql(_SELECT_KEY_BYTES), (server_name, key_id))
            existing = bytes(txn.fetchone()[0])
            if existing != key.key:
                conflicts[index][key_id] = existing
            else:
                kept[index].add(key_id)
        return [
            StoreResult(frozenset(s), frozenset(k), c)
            for s, k, c in zip(stored, kept, conflicts)
        ]

    def get_server_keys(
        self, requests: Mapping[str, Collection[str] | None]
    ) -> Deferred[dict[str, dict[str, ServerKeys]]]:
        """
        See :meth:`synkeys.interfaces.IKeyStore.get_server_keys`.

        Every row of the named servers is read with one query per
        :attr:`query_batch_size` servers and filtered by key id here (a
        server has few key ids). Key ids whose rows hold the same response
        share one :class:`ServerKeys`.
        """
        return Deferred.fromCoroutine(self._get(requests))

    async def _get(
        self, requests: Mapping[str, Collection[str] | None]
    ) -> dict[str, dict[str, ServerKeys]]:
        if not requests:
            return {}
        rows: list[Row] = await self._run(self._select_txn, sorted(requests))
        built: dict[tuple[str, int, bytes, str], ServerKeys | None] = {}
        result: dict[str, dict[str, ServerKeys]] = {}
        for server_name, key_id, key_bytes, fetched_ts, source, raw in rows:
            wanted = requests.get(server_name)
            if wanted and key_id not in wanted:
                continue
            cache_key = (server_name, fetched_ts, raw, source)
            if cache_key not in built:
                built[cache_key] = self._rebuild(server_name, raw, fetched_ts, source)
            keys = built[cache_key]
            if keys is None:
                continue
            if keys.key_bytes(key_id) != key_bytes:
                log.error(
                    "Stored response for {server} does not bind {key_id} to the "
                    "row's key bytes; ignoring the row",
                    server=server_name,
                    key_id=key_id,
                )
                continue
            result.setdefault(server_name, {})[key_id] = keys
        return result

    def _rebuild(
        self, server_name: str, raw: bytes, fetched_ts: int, source: str
    ) -> ServerKeys | None:
        try:
            return rebuild_server_keys(server_name, raw, fetched_ts, source)
        except InvalidSignedJson as e:
            log.error(
                "Ignoring unreadable stored response for {server} in {where}: {error}",
                server=server_name,
                where=self._where,
                error=e,
            )
            return None

    def _select_txn(self, txn: Any, server_names: list[str]) -> list[Row]:
        # Batches may read different snapshots; that is harmless, as every
        # row stands on its own.
        rows: list[Row] = []
        size = max(1, self.query_batch_size)
        for start in range(0, len(server_names), size):
            batch = server_names[start : start + size]
            placeholders = ", ".join("?" * len(batch))
            txn.execute(
                self._dialect.sql(_SELECT_SERVERS.format(placeholders=placeholders)),
                batch,
            )
            for server_name, key_id, key_bytes, fetched_ts, source, raw in txn.fetchall():
                # psycopg2 reads BYTEA as memoryview; make plain bytes here,
                # in the database thread.
                rows.append(
                    (server_name, key_id, bytes(key_bytes), fetched_ts, source, bytes(raw))
                )
        return rows

    def evict_server(self, server_name: str) -> Deferred[int]:
        """See :meth:`synkeys.interfaces.IKeyStore.evict_server`."""
        return Deferred.fromCoroutine(self._run(self._evict_txn, server_name))

    def _evict_txn(self, txn: Any, server_name: str) -> int:
        if self._dialect.begin_write is not None:
            txn.execute(self._dialect.begin_write)
        txn.execute(self._dialect.sql(_DELETE_SERVER), (server_name,))
        return int(txn.rowcount)

    def ping(self) -> Deferred[None]:
        """Run ``SELECT 1``; see :meth:`synkeys.interfaces.IKeyStore.ping`."""
        return Deferred.fromCoroutine(self._run(self._ping_txn))

    @staticmethod
    def _ping_txn(txn: Any) -> None:
        txn.execute("SELECT 1")
        txn.fetchall()

    def close(self) -> Deferred[None]:
        """
        Close the connections (waiting for a query in progress); later
        calls fail with :class:`StoreUnavailable`.
        """
        if not self._closed:
            self._closed = True
            self._pool.close()
        return succeed(None)
