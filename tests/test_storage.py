"""
Tests for :mod:`synkeys.storage`: one contract run against the memory,
SQLite and PostgreSQL stores, plus what is particular to each.

PostgreSQL tests run only when ``SYNKEYS_TEST_POSTGRES`` names a database
(e.g. ``postgresql://postgres@127.0.0.1:5432/test``); each test works in a
schema of its own, dropped afterwards.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import uuid
from typing import TYPE_CHECKING, Any
from unittest import mock
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, gatherResults
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from synkeys.errors import ConfigError
from synkeys.interfaces import IKeyStore, StoreResult
from synkeys.storage import (
    SCHEMA_VERSION,
    MemoryKeyStore,
    PostgresKeyStore,
    SQLiteKeyStore,
    StoreUnavailable,
    migrate,
    open_store,
)
from tests.helpers import make_server_keys, make_signing_key

if TYPE_CHECKING:
    _MixinBase = TestCase
else:
    _MixinBase = object

K1 = make_signing_key("key one")
K2 = make_signing_key("key two")
K3 = make_signing_key("key three")
IMPOSTOR = make_signing_key("impostor")

POSTGRES_DSN = os.environ.get("SYNKEYS_TEST_POSTGRES", "")
NO_POSTGRES = "set SYNKEYS_TEST_POSTGRES to a PostgreSQL DSN to run PostgreSQL tests"


class KeyStoreContractMixin(_MixinBase):
    """
    The behaviour every :class:`IKeyStore` must have. Mix into a
    :class:`TestCase` that defines :meth:`make_store`.
    """

    store: Any

    async def make_store(self) -> Any:
        """Open a new, empty store; the test closes it."""
        raise NotImplementedError

    async def setUp(self) -> None:  # type: ignore[override]
        self.store = await self.make_store()
        self.addCleanup(self.store.close)

    def test_provides_interface(self) -> None:
        """The store provides IKeyStore."""
        self.assertTrue(verifyObject(IKeyStore, self.store))

    async def test_store_then_get_one_key(self) -> None:
        """A stored response is found again under its key id, equal in every field."""
        keys = make_server_keys("a.example", {"ed25519:1": K1}, source="notary.example")
        result = await self.store.store_server_keys(keys)
        self.assertEqual(result, StoreResult(stored=frozenset({"ed25519:1"})))
        found = await self.store.get_server_keys({"a.example": ["ed25519:1"]})
        self.assertEqual(list(found), ["a.example"])
        got = found["a.example"]["ed25519:1"]
        self.assertEqual(got, keys)
        self.assertEqual(got.raw, keys.raw)
        self.assertEqual(got.json, keys.json)
        self.assertEqual(got.valid_until_ts, keys.valid_until_ts)
        self.assertEqual(got.verify_keys, keys.verify_keys)
        self.assertEqual(got.old_verify_keys, {})
        self.assertEqual(got.source, "notary.example")

    async def test_store_then_get_several_keys(self) -> None:
        """Every key id of a response is stored, and they share one rebuilt object."""
        keys = make_server_keys("a.example", {"ed25519:1": K1, "ed25519:2": K2})
        result = await self.store.store_server_keys(keys)
        self.assertEqual(result.stored, {"ed25519:1", "ed25519:2"})
        found = await self.store.get_server_keys({"a.example": None})
        self.assertEqual(set(found["a.example"]), {"ed25519:1", "ed25519:2"})
        self.assertIs(found["a.example"]["ed25519:1"], found["a.example"]["ed25519:2"])
        self.assertEqual(found["a.example"]["ed25519:2"].key_bytes("ed25519:2"), bytes(K2.verify_key))

    async def test_old_keys(self) -> None:
        """Keys under old_verify_keys are stored and come back with their expiry."""
        keys = make_server_keys(
            "a.example", {"ed25519:2": K2}, old_keys={"ed25519:1": (K1, 123_456)}
        )
        result = await self.store.store_server_keys(keys)
        self.assertEqual(result.stored, {"ed25519:1", "ed25519:2"})
        found = await self.store.get_server_keys({"a.example": ["ed25519:1"]})
        got = found["a.example"]["ed25519:1"]
        self.assertEqual(got.old_verify_keys, {"ed25519:1": (bytes(K1.verify_key), 123_456)})
        verify_key = got.verify_key("ed25519:1")
        self.assertTrue(verify_key.is_old)
        self.assertEqual(verify_key.expired_ts, 123_456)

    async def test_unknown_servers_and_keys(self) -> None:
        """Servers and key ids never stored are left out of the answer."""
        await self.store.store_server_keys(make_server_keys("a.example", {"ed25519:1": K1}))
        found = await self.store.get_server_keys(
            {"nobody.example": None, "a.example": ["ed25519:nope"]}
        )
        self.assertEqual(found, {})
        self.assertEqual(await self.store.get_server_keys({}), {})

    async def test_get_some_key_ids(self) -> None:
        """Naming key ids returns only those; an empty list returns all."""
        await self.store.store_server_keys(
            make_server_keys("a.example", {"ed25519:1": K1, "ed25519:2": K2})
        )
        some = await self.store.get_server_keys({"a.example": ["ed25519:2", "ed25519:9"]})
        self.assertEqual(set(some["a.example"]), {"ed25519:2"})
        every = await self.store.get_server_keys({"a.example": []})
        self.assertEqual(set(every["a.example"]), {"ed25519:1", "ed25519:2"})

    async def test_server_names_are_case_sensitive(self) -> None:
        """Server names differing only in case are different servers."""
        await self.store.store_server_keys(make_server_keys("a.example", {"ed25519:1": K1}))
        self.assertEqual(await self.store.get_server_keys({"A.example": None}), {})

    async def test_batch_get_many_servers(self) -> None:
        """One look-up over many servers, some unknown, answers each known one."""
        if hasattr(self.store, "query_batch_size"):
            self.store.query_batch_size = 7
        names = [f"s{i}.example" for i in range(40)]
        stored = {}
        for i, name in enumerate(names):
            stored[name] = make_server_keys(name, {"ed25519:1": K1}, fetched_ts=1000 + i)
            await self.store.store_server_keys(stored[name])
        wanted: dict[str, Any] = {name: None for name in names}
        wanted.update({f"unknown{i}.example": None for i in range(10)})
        found = await self.store.get_server_keys(wanted)
        self.assertEqual(set(found), set(names))
        for name in names:
            self.assertEqual(found[name]["ed25519:1"], stored[name])

    async def test_newer_replaces_older(self) -> None:
        """A response fetched later with the same key bytes replaces the stored one."""
        old = make_server_keys("a.example", {"ed25519:1": K1}, fetched_ts=1000)
        new = make_server_keys("a.example", {"ed25519:1": K1}, fetched_ts=2000, valid_until_ts=5000)
        await self.store.store_server_keys(old)
        result = await self.store.store_server_keys(new)
        self.assertEqual(result, StoreResult(stored=frozenset({"ed25519:1"})))
        found = await self.store.get_server_keys({"a.example": None})
        self.assertEqual(found["a.example"]["ed25519:1"], new)
        self.assertEqual(found["a.example"]["ed25519:1"].valid_until_ts, 5000)

    async def test_older_never_replaces_newer(self) -> None:
        """A response fetched earlier is reported as kept and not written."""
        new = make_server_keys("a.example", {"ed25519:1": K1}, fetched_ts=2000)
        old = make_server_keys("a.example", {"ed25519:1": K1}, fetched_ts=1000, valid_until_ts=9 * 10**12)
        await self.store.store_server_keys(new)
        result = await self.store.store_server_keys(old)
        self.assertEqual(result, StoreResult(kept=frozenset({"ed25519:1"})))
        found = await self.store.get_server_keys({"a.example": None})
        self.assertEqual(found["a.example"]["ed25519:1"], new)

    async def test_tie_broken_by_valid_until(self) -> None:
        """Of two responses fetched at the same time, the longer-valid one wins."""
        short = make_server_keys("a.example", {"ed25519:1": K1}, fetched_ts=1000, valid_until_ts=5000)
        long = make_server_keys("a.example", {"ed25519:1": K1}, fetched_ts=1000, valid_until_ts=6000)
        await self.store.store_server_keys(short)
        self.assertEqual((await self.store.store_server_keys(long)).stored, {"ed25519:1"})
        self.assertEqual((await self.store.store_server_keys(short)).kept, {"ed25519:1"})
        found = await self.store.get_server_keys({"a.example": None})
        self.assertEqual(found["a.example"]["ed25519:1"].valid_until_ts, 6000)

    async def test_same_response_twice(self) -> None:
        """Storing the very same response again keeps the row."""
        keys = make_server_keys("a.example", {"ed25519:1": K1})
        await self.store.store_server_keys(keys)
        result = await self.store.store_server_keys(keys)
        self.assertEqual(result, StoreResult(kept=frozenset({"ed25519:1"})))

    async def test_conflicting_key_bytes(self) -> None:
        """A key id rebound to different bytes is reported and not written, even when newer."""
        honest = make_server_keys("a.example", {"ed25519:1": K1}, fetched_ts=1000)
        forged = make_server_keys(
            "a.example", {"ed25519:1": IMPOSTOR, "ed25519:2": K2}, fetched_ts=2000
        )
        await self.store.store_server_keys(honest)
        result = await self.store.store_server_keys(forged)
        self.assertEqual(result.conflicts, {"ed25519:1": bytes(K1.verify_key)})
        self.assertEqual(result.stored, {"ed25519:2"})
        self.assertEqual(result.kept, frozenset())
        found = await self.store.get_server_keys({"a.example": None})
        self.assertEqual(found["a.example"]["ed25519:1"], honest)
        self.assertEqual(found["a.example"]["ed25519:2"], forged)

    async def test_conflict_with_old_key(self) -> None:
        """An old key listed with different bytes than stored is a conflict too."""
        await self.store.store_server_keys(make_server_keys("a.example", {"ed25519:1": K1}, fetched_ts=1000))
        forged = make_server_keys(
            "a.example", {"ed25519:2": K2}, old_keys={"ed25519:1": (IMPOSTOR, 1500)}, fetched_ts=2000
        )
        result = await self.store.store_server_keys(forged)
        self.assertEqual(set(result.conflicts), {"ed25519:1"})

    async def test_dropped_key_still_returned(self) -> None:
        """A key id a newer response no longer lists is still served from the older response."""
        old = make_server_keys("a.example", {"ed25519:1": K1}, fetched_ts=1000)
        new = make_server_keys("a.example", {"ed25519:2": K2}, fetched_ts=2000)
        await self.store.store_server_keys(old)
        await self.store.store_server_keys(new)
        found = await self.store.get_server_keys({"a.example": None})
        self.assertEqual(found["a.example"], {"ed25519:1": old, "ed25519:2": new})

    async def test_key_moved_to_old_keys(self) -> None:
        """A newer response listing a key as old replaces the row, with the expiry."""
        await self.store.store_server_keys(make_server_keys("a.example", {"ed25519:1": K1}, fetched_ts=1000))
        rotated = make_server_keys(
            "a.example", {"ed25519:2": K2}, old_keys={"ed25519:1": (K1, 1500)}, fetched_ts=2000
        )
        result = await self.store.store_server_keys(rotated)
        self.assertEqual(result.stored, {"ed25519:1", "ed25519:2"})
        found = await self.store.get_server_keys({"a.example": ["ed25519:1"]})
        self.assertEqual(found["a.example"]["ed25519:1"].verify_key("ed25519:1").expired_ts, 1500)

    async def test_evict_server(self) -> None:
        """Evicting a server removes all its rows and no one else's."""
        await self.store.store_server_keys(make_server_keys("a.example", {"ed25519:1": K1, "ed25519:2": K2}))
        await self.store.store_server_keys(make_server_keys("b.example", {"ed25519:1": K1}))
        self.assertEqual(await self.store.evict_server("a.example"), 2)
        self.assertEqual(await self.store.evict_server("a.example"), 0)
        found = await self.store.get_server_keys({"a.example": None, "b.example": None})
        self.assertEqual(list(found), ["b.example"])

    async def test_concurrent_stores(self) -> None:
        """Stores racing on one server leave the newest response, and a rebinding never wins."""
        responses = [
            make_server_keys("a.example", {"ed25519:1": K1}, fetched_ts=1000 + i) for i in range(8)
        ]
        forged = make_server_keys("a.example", {"ed25519:1": IMPOSTOR}, fetched_ts=5000)
        await self.store.store_server_keys(responses[0])
        order = responses[4:] + [forged] + responses[1:4]
        results = await gatherResults([self.store.store_server_keys(r) for r in order])
        found = await self.store.get_server_keys({"a.example": None})
        self.assertEqual(found["a.example"]["ed25519:1"], responses[-1])
        self.assertEqual(results[4].conflicts, {"ed25519:1": bytes(K1.verify_key)})
        self.assertEqual(sum(len(r.conflicts) for r in results), 1)

    async def test_ping(self) -> None:
        """An open store answers a ping."""
        self.assertIsNone(await self.store.ping())

    async def test_closed_store_unavailable(self) -> None:
        """Every call on a closed store fails with StoreUnavailable."""
        await self.store.close()
        keys = make_server_keys("a.example", {"ed25519:1": K1})
        for call in (
            lambda: self.store.store_server_keys(keys),
            lambda: self.store.get_server_keys({"a.example": None}),
            lambda: self.store.evict_server("a.example"),
            self.store.ping,
        ):
            with self.assertRaises(StoreUnavailable):
                await call()


class MemoryKeyStoreTests(KeyStoreContractMixin, TestCase):
    """The contract, for :class:`MemoryKeyStore`."""

    async def make_store(self) -> Any:
        return await open_store(":memory:", reactor)

    async def test_fail_with(self) -> None:
        """A memory store told to fail answers StoreUnavailable until told to work."""
        self.store.fail_with("simulated outage")
        with self.assertRaises(StoreUnavailable) as raised:
            await self.store.ping()
        self.assertIn("simulated outage", str(raised.exception))
        self.store.fail_with(None)
        self.assertIsNone(await self.store.ping())


class SQLGroupCommitMixin(_MixinBase):
    """
    Writes given while a write transaction runs are committed together in
    the next one, each caller still getting its own result. Mix into a
    store contract test case of an SQL store.
    """

    store: Any

    def count_transactions(self) -> list[int]:
        """Record the size of every write batch the store runs."""
        sizes: list[int] = []
        store_txn = self.store._store_txn

        def counting(txn: Any, batch: list[Any]) -> Any:
            sizes.append(len(batch))
            return store_txn(txn, batch)

        self.store._store_txn = counting
        return sizes

    async def test_concurrent_writes_share_a_transaction(self) -> None:
        """Twenty writes given at once take at most two transactions; each caller gets its own."""
        await self.store.store_server_keys(make_server_keys("held.example", {"ed25519:1": K1}))
        sizes = self.count_transactions()
        older = make_server_keys("s0.example", {"ed25519:1": K1}, fetched_ts=10)
        newer = make_server_keys("s0.example", {"ed25519:1": K1}, fetched_ts=20)
        impostor = make_server_keys("held.example", {"ed25519:1": IMPOSTOR})
        rest = [make_server_keys(f"s{i}.example", {"ed25519:1": K2}) for i in range(1, 18)]
        writes = [newer, older, impostor, *rest]
        results = await gatherResults([self.store.store_server_keys(k) for k in writes])
        # The first write may start alone, before the others are given.
        self.assertEqual(sum(sizes), 20)
        self.assertLessEqual(len(sizes), 2)
        self.assertEqual(results[0], StoreResult(stored=frozenset({"ed25519:1"})))
        self.assertEqual(results[1], StoreResult(kept=frozenset({"ed25519:1"})))
        self.assertEqual(results[2].conflicts, {"ed25519:1": bytes(K1.verify_key)})
        for result in results[3:]:
            self.assertEqual(result, StoreResult(stored=frozenset({"ed25519:1"})))
        found = await self.store.get_server_keys({k.server_name: None for k in writes})
        self.assertEqual(len(found), 19)
        self.assertEqual(found["s0.example"]["ed25519:1"].fetched_ts, 20)
        self.assertEqual(
            found["held.example"]["ed25519:1"].key_bytes("ed25519:1"), bytes(K1.verify_key)
        )

    async def test_write_batch_size(self) -> None:
        """No transaction writes more than write_batch_size responses."""
        self.store.write_batch_size = 4
        sizes = self.count_transactions()
        writes = [make_server_keys(f"s{i}.example", {"ed25519:1": K1}) for i in range(10)]
        results = await gatherResults([self.store.store_server_keys(k) for k in writes])
        self.assertEqual(sum(sizes), 10)
        self.assertEqual(max(sizes), 4)
        self.assertLessEqual(len(sizes), 4)
        self.assertEqual({r.stored for r in results}, {frozenset({"ed25519:1"})})

    async def test_one_failing_write_fails_alone(self) -> None:
        """A batch that fails for an unexpected reason is retried one response at a time."""
        store_txn = self.store._store_txn

        def failing(txn: Any, batch: list[Any]) -> Any:
            if any(keys.server_name == "bad.example" for keys in batch):
                raise ValueError("cannot write bad.example")
            return store_txn(txn, batch)

        self.store._store_txn = failing
        writes = [
            make_server_keys(name, {"ed25519:1": K1})
            for name in ("first.example", "a.example", "bad.example", "b.example")
        ]
        ds = [self.store.store_server_keys(k) for k in writes]
        first, a, b = await gatherResults([ds[0], ds[1], ds[3]])
        for result in (first, a, b):
            self.assertEqual(result.stored, {"ed25519:1"})
        with self.assertRaises(ValueError):
            await ds[2]
        found = await self.store.get_server_keys({k.server_name: None for k in writes})
        self.assertEqual(sorted(found), ["a.example", "b.example", "first.example"])

    async def test_unavailable_fails_the_batch(self) -> None:
        """When the database cannot be used, every queued write fails with StoreUnavailable."""
        ds = [
            self.store.store_server_keys(make_server_keys(f"s{i}.example", {"ed25519:1": K1}))
            for i in range(3)
        ]
        await self.store.close()
        for d in ds[1:]:
            with self.assertRaises(StoreUnavailable):
                await d
        await ds[0]  # was already running when the store closed

    async def test_cancelled_caller(self) -> None:
        """A caller that gives up does not disturb the others' results."""
        writes = [make_server_keys(f"s{i}.example", {"ed25519:1": K1}) for i in range(3)]
        ds = [self.store.store_server_keys(k) for k in writes]
        ds[1].cancel()
        self.failureResultOf(ds[1], CancelledError)
        first, last = await gatherResults([ds[0], ds[2]])
        self.assertEqual(first.stored, {"ed25519:1"})
        self.assertEqual(last.stored, {"ed25519:1"})
        self.assertEqual(self.flushLoggedErrors(), [])


class SQLiteKeyStoreTests(SQLGroupCommitMixin, KeyStoreContractMixin, TestCase):
    """The contract, for :class:`SQLiteKeyStore` in a temporary file."""

    async def make_store(self) -> Any:
        self.path = self.mktemp() + ".db"
        store = await open_store(self.path, reactor)
        self.assertIsInstance(store, SQLiteKeyStore)
        return store

    async def test_persists_across_reopen(self) -> None:
        """What was stored is found again after closing and reopening the file."""
        keys = make_server_keys("a.example", {"ed25519:1": K1}, old_keys={"ed25519:0": (K2, 7)})
        await self.store.store_server_keys(keys)
        await self.store.close()
        self.store = await open_store(self.path, reactor)
        self.addCleanup(self.store.close)
        found = await self.store.get_server_keys({"a.example": None})
        self.assertEqual(found["a.example"], {"ed25519:0": keys, "ed25519:1": keys})

    def test_wal_mode(self) -> None:
        """The database file is in WAL journal mode."""
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")

    async def test_locked_database(self) -> None:
        """A database locked by another process fails with StoreUnavailable, then recovers."""
        store = await SQLiteKeyStore.open(self.path, reactor, busy_timeout_s=0.01)
        self.addCleanup(store.close)
        other = sqlite3.connect(self.path, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN EXCLUSIVE")
        keys = make_server_keys("a.example", {"ed25519:1": K1})
        with self.assertRaises(StoreUnavailable) as raised:
            await store.store_server_keys(keys)
        self.assertIn("locked", str(raised.exception))
        other.execute("ROLLBACK")
        self.assertEqual((await store.store_server_keys(keys)).stored, {"ed25519:1"})

    async def test_unreadable_row_ignored(self) -> None:
        """A row whose stored response is corrupt is left out rather than failing the look-up."""
        await self.store.store_server_keys(make_server_keys("a.example", {"ed25519:1": K1}))
        await self.store.store_server_keys(make_server_keys("b.example", {"ed25519:1": K1}))
        conn = sqlite3.connect(self.path)
        conn.execute("UPDATE server_keys SET response = ? WHERE server_name = 'a.example'", (b"{",))
        conn.commit()
        conn.close()
        found = await self.store.get_server_keys({"a.example": None, "b.example": None})
        self.assertEqual(list(found), ["b.example"])

    def test_bad_synchronous(self) -> None:
        """An unknown synchronous setting is a ConfigError."""
        self.failureResultOf(
            SQLiteKeyStore.open(self.path, reactor, synchronous="OFF"), ConfigError
        )


class SQLMigrationMixin(_MixinBase):
    """Schema migrations, for an SQL store reached through :attr:`database`."""

    database: str

    async def test_migrations_idempotent(self) -> None:
        """Migrating an up-to-date database does nothing, however often."""
        result = migrate(self.database)
        self.assertEqual((result.before, result.after), (SCHEMA_VERSION, SCHEMA_VERSION))
        self.assertEqual(result.applied, ())
        store: Any = await open_store(self.database, reactor)
        self.addCleanup(store.close)
        self.assertIsNone(await store.ping())

    async def test_newer_schema_refused(self) -> None:
        """A database whose schema is newer than the code is a ConfigError naming both versions."""
        self.run_sql("INSERT INTO schema_version (version, name) VALUES (999, 'future')")
        for attempt in (lambda: open_store(self.database, reactor), lambda: _later(migrate, self.database)):
            with self.assertRaises(ConfigError) as raised:
                await attempt()
            self.assertIn("999", str(raised.exception))
            self.assertIn(f"version {SCHEMA_VERSION} ", str(raised.exception))

    def run_sql(self, statement: str) -> None:
        """Run ``statement`` on the database outside the store."""
        raise NotImplementedError


async def _later(function: Any, *args: Any) -> Any:
    return function(*args)


class SQLiteMigrationTests(SQLMigrationMixin, TestCase):
    """Migrations of an SQLite file."""

    def setUp(self) -> None:
        self.database = self.mktemp() + ".db"
        result = migrate(self.database)
        self.assertEqual(result.applied, tuple(range(1, SCHEMA_VERSION + 1)))

    def run_sql(self, statement: str) -> None:
        conn = sqlite3.connect(self.database)
        conn.execute(statement)
        conn.commit()
        conn.close()

    def test_schema_version_rows(self) -> None:
        """Each migration is recorded once in schema_version."""
        migrate(self.database)
        conn = sqlite3.connect(self.database)
        self.addCleanup(conn.close)
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_version")]
        self.assertEqual(versions, list(range(1, SCHEMA_VERSION + 1)))


def postgres_dsn_for_schema(dsn: str, schema: str) -> str:
    """``dsn`` with its ``search_path`` set to ``schema``."""
    parts = urlsplit(dsn)
    query = parse_qsl(parts.query) + [("options", f"-csearch_path={schema}")]
    return urlunsplit(parts._replace(query=urlencode(query)))


class PostgresSchemaMixin(_MixinBase):
    """Give each test a PostgreSQL schema of its own, dropped afterwards."""

    skip = None if POSTGRES_DSN else NO_POSTGRES

    def make_database(self) -> str:
        """Create a fresh schema; answer a DSN that uses it."""
        import psycopg2  # type: ignore[import-untyped]

        schema = f"synkeys_test_{uuid.uuid4().hex[:16]}"
        admin = psycopg2.connect(POSTGRES_DSN)
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE SCHEMA "{schema}"')

        def drop() -> None:
            with admin.cursor() as cursor:
                cursor.execute(f'DROP SCHEMA "{schema}" CASCADE')
            admin.close()

        self.addCleanup(drop)
        self.admin = admin
        return postgres_dsn_for_schema(POSTGRES_DSN, schema)


class PostgresKeyStoreTests(
    PostgresSchemaMixin, SQLGroupCommitMixin, KeyStoreContractMixin, TestCase
):
    """The contract, for :class:`PostgresKeyStore`."""

    async def make_store(self) -> Any:
        self.database = self.make_database()
        store = await open_store(self.database, reactor)
        self.assertIsInstance(store, PostgresKeyStore)
        return store

    async def test_statement_timeout(self) -> None:
        """A table locked past the statement timeout fails with StoreUnavailable, then recovers."""
        import psycopg2  # type: ignore[import-untyped]

        store = await PostgresKeyStore.open(self.database, reactor, statement_timeout_ms=50)
        self.addCleanup(store.close)
        locker = psycopg2.connect(self.database)
        self.addCleanup(locker.close)
        with locker.cursor() as cursor:
            cursor.execute("LOCK TABLE server_keys IN ACCESS EXCLUSIVE MODE")
        keys = make_server_keys("a.example", {"ed25519:1": K1})
        with self.assertRaises(StoreUnavailable) as raised:
            await store.store_server_keys(keys)
        self.assertIn("timeout", str(raised.exception))
        locker.rollback()
        self.assertEqual((await store.store_server_keys(keys)).stored, {"ed25519:1"})


class PostgresMigrationTests(PostgresSchemaMixin, SQLMigrationMixin, TestCase):
    """Migrations of a PostgreSQL schema."""

    def setUp(self) -> None:
        self.database = self.make_database()
        result = migrate(self.database)
        self.assertEqual(result.applied, tuple(range(1, SCHEMA_VERSION + 1)))

    def run_sql(self, statement: str) -> None:
        import psycopg2  # type: ignore[import-untyped]

        conn = psycopg2.connect(self.database)
        with conn, conn.cursor() as cursor:
            cursor.execute(statement)
        conn.close()


class OpenStoreTests(TestCase):
    """Choosing and opening a store from the ``--database`` setting."""

    def test_memory(self) -> None:
        """``:memory:`` opens a MemoryKeyStore."""
        store = self.successResultOf(open_store(":memory:", reactor))
        self.assertIsInstance(store, MemoryKeyStore)

    def test_missing_directory(self) -> None:
        """An SQLite path in a directory that does not exist is a ConfigError."""
        path = os.path.join(self.mktemp(), "sub", "keys.db")
        failure = self.failureResultOf(open_store(path, reactor), ConfigError)
        self.assertIn("does not exist", str(failure.value))
        self.assertRaises(ConfigError, migrate, path)

    def test_directory_as_path(self) -> None:
        """An SQLite path naming a directory is a ConfigError."""
        path = self.mktemp()
        os.mkdir(path)
        self.failureResultOf(open_store(path, reactor), ConfigError)

    def test_postgres_driver_missing(self) -> None:
        """A PostgreSQL DSN without psycopg2 installed is a ConfigError saying what to install."""
        for dsn in ("postgresql://db.invalid/keys", "postgres://db.invalid/keys"):
            with mock.patch.dict(sys.modules, {"psycopg2": None, "psycopg2.errors": None}):
                failure = self.failureResultOf(open_store(dsn, reactor), ConfigError)
            self.assertIn("pip install 'synkeys[postgres]'", str(failure.value))

    async def test_postgres_unreachable(self) -> None:
        """A PostgreSQL server that refuses connections fails with StoreUnavailable."""
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            raise self.skipTest("psycopg2 is not installed") from None
        dsn = "postgresql://synkeys:secret@127.0.0.1:1/keys"
        with self.assertRaises(StoreUnavailable) as raised:
            await open_store(dsn, reactor)
        self.assertNotIn("secret", str(raised.exception))
        self.assertRaises(StoreUnavailable, migrate, dsn)
