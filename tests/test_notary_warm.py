"""
Tests for the notary's warm path (L{synkeys.notary}): queries answered from
memory without reading the store, while the store stays the source of
truth for every decision to fetch and for what other processes write.
"""

from __future__ import annotations

import json
from typing import Any, Collection, Dict, List, Mapping, Optional

from twisted.internet.defer import Deferred
from zope.interface import implementer

from synkeys.interfaces import IKeyStore, StoreResult
from synkeys.keys import ServerKeys
from synkeys.notary import DEFAULT_WARM_TTL_S, Notary
from synkeys.query import ServerQuery
from synkeys.storage import MemoryKeyStore
from tests.helpers import make_server_keys, make_signing_key
from tests.test_notary import DAY_MS, NOTARY, ORIGIN, NotaryTestCase


@implementer(IKeyStore)
class CountingStore:
    """A :class:`MemoryKeyStore` that counts ``get_server_keys`` calls."""

    def __init__(self, store: MemoryKeyStore) -> None:
        self.store = store
        self.reads: List[List[str]] = []

    def store_server_keys(self, keys: ServerKeys) -> Deferred[StoreResult]:
        """Store through."""
        return self.store.store_server_keys(keys)

    def get_server_keys(
        self, requests: Mapping[str, Optional[Collection[str]]]
    ) -> Deferred[Dict[str, Dict[str, ServerKeys]]]:
        """Count, then read through."""
        self.reads.append(sorted(requests))
        return self.store.get_server_keys(requests)

    def evict_server(self, server_name: str) -> Deferred[int]:
        """Evict through."""
        return self.store.evict_server(server_name)

    def ping(self) -> Deferred[None]:
        """Ping through."""
        return self.store.ping()

    def close(self) -> Deferred[None]:
        """Close through."""
        return self.store.close()


class FailingWrites(CountingStore):
    """A store whose writes fail as a locked database's do."""

    def store_server_keys(self, keys: ServerKeys) -> Deferred[StoreResult]:
        """Fail."""
        from synkeys.storage import StoreUnavailable

        failed: Deferred[StoreResult] = Deferred()
        failed.errback(StoreUnavailable("sqlite", "database is locked"))
        return failed


class UnsavedFetchTests(NotaryTestCase):
    """A fetch whose store write fails."""

    def test_answered_uncached_and_fetched_again_soon(self) -> None:
        """Valid keys the store did not keep are answered once, and fetched again after the back-off."""
        from synkeys.fetchers import DirectKeyFetcher
        from synkeys.keyring import Keyring

        failing = FailingWrites(self.store)
        keyring = Keyring(
            [DirectKeyFetcher(self.client, self.clock)],
            self.clock,
            store=failing,
            local_server_name=NOTARY,
        )
        notary = Notary(
            failing, keyring, self.clock, server_name=NOTARY, signing_keys=[self.notary_key]
        )
        origin = self.add_origin()
        d = notary.query({ORIGIN: ServerQuery(None, None)})
        self.settle()
        body = json.loads(self.successResultOf(d))
        self.flushLoggedErrors()
        [element] = body["server_keys"]
        self.assert_countersigned(element, origin.verify_keys)
        self.assertEqual(notary.counters.get("fetch_unsaved"), 1)
        self.assertIsNone(notary.counters.get("fetch_ok"))
        self.assertEqual(self.cached_rows(), {})
        # Backing off, not the hour a stored fetch waits.
        self.clock.advance(61)
        d = notary.query({ORIGIN: ServerQuery(None, None)})
        self.settle()
        self.successResultOf(d)
        self.flushLoggedErrors()
        self.assertEqual(origin.hits, 2)


class WarmPathTests(NotaryTestCase):
    """A warm notary answers from memory."""

    def ask(self, notary: Notary, name: str) -> bytes:
        """Query ``notary`` for every key of ``name`` and let it finish."""
        d = notary.query({name: ServerQuery(None, None)})
        self.settle()
        answer: bytes = self.successResultOf(d)
        return answer

    def setUp(self) -> None:
        super().setUp()
        self.counting = CountingStore(self.store)
        self.notary = Notary(
            self.counting,
            self.keyring,
            self.clock,
            server_name=NOTARY,
            signing_keys=[self.notary_key],
            local_publisher=self.publisher,
        )
        from treq.testing import StubTreq

        from synkeys.resource import QueryResource, build_root

        self.root = build_root(self.publisher, QueryResource(self.notary, 2048))
        self.stub = StubTreq(self.root)

    def test_warm_query_reads_no_store(self) -> None:
        """Once a server is cached, GET and both POST forms are answered without a store read."""
        origin = self.add_origin()
        cold = self.get()
        reads = len(self.counting.reads)
        self.assertEqual(self.get().body, cold.body)
        self.only_element(self.post({ORIGIN: {}}))
        self.only_element(self.post({ORIGIN: ["ed25519:a"]}))
        self.assertEqual(len(self.counting.reads), reads)
        self.assertEqual(origin.hits, 1)
        self.assertEqual(self.notary.counters.get("warm_queries"), 3)

    def test_answered_from_memory_while_store_down(self) -> None:
        """A warm query is answered while the store is down; once the memory expires it is 503."""
        self.add_origin()
        cold = self.get()
        self.store.fail_with("database is down")
        self.assertEqual(self.get().body, cold.body)
        self.clock.advance(DEFAULT_WARM_TTL_S)
        self.assert_error(self.get(), 503, "M_UNKNOWN")

    def test_other_writers_seen_after_ttl(self) -> None:
        """What another process writes to the shared store is answered once the memory expires."""
        self.add_origin()
        self.get()
        # Another process fetched the origin again, later, with a new key.
        newer = make_server_keys(
            ORIGIN,
            {"ed25519:b": make_signing_key("b")},
            valid_until_ts=self.now_ms() + DAY_MS,
            fetched_ts=self.now_ms() + 1,
        )
        self.successResultOf(self.store.store_server_keys(newer))
        self.assertEqual(
            [list(e["verify_keys"]) for e in self.elements(self.get())], [["ed25519:a"]]
        )
        self.clock.advance(DEFAULT_WARM_TTL_S)
        listed = sorted(k for e in self.elements(self.get()) for k in e["verify_keys"])
        self.assertEqual(listed, ["ed25519:a", "ed25519:b"])

    def test_rules_still_decide(self) -> None:
        """A minimum the memory cannot meet goes to the store and the origin, as the rules say."""
        origin = self.add_origin()  # valid for one day
        self.get()
        self.only_element(self.post_key("ed25519:a", self.now_ms() + 2 * DAY_MS))
        self.assertEqual(origin.hits, 2)
        # Past the half-life, a plain query refetches too.
        self.clock.advance(12 * 3600)
        self.only_element(self.get())
        self.assertEqual(origin.hits, 3)

    def test_unknown_key_id_not_from_memory(self) -> None:
        """A key id the memory lacks is looked for in the store (and at the origin)."""
        origin = self.add_origin()
        self.get()
        reads = len(self.counting.reads)
        self.assertEqual(self.elements(self.post({ORIGIN: ["ed25519:zz"]})), [])
        self.assertGreater(len(self.counting.reads), reads)
        self.assertEqual(origin.hits, 2)

    def test_evict_forgets_memory(self) -> None:
        """After an eviction the next query does not answer the evicted keys from memory."""
        origin = self.add_origin()
        self.get()
        self.successResultOf(self.notary.evict(ORIGIN))
        self.only_element(self.get())
        self.assertEqual(origin.hits, 2)

    def test_fetch_reads_store_twice(self) -> None:
        """A cold query reads the store once to plan and once after the fetch, not more."""
        self.add_origin()
        self.only_element(self.get())
        self.assertEqual(self.counting.reads, [[ORIGIN], [ORIGIN]])

    def test_several_servers_all_warm_or_none(self) -> None:
        """A query with one cold server takes the full path for all, answering every server."""
        self.add_origin()
        self.get()
        two = self.add_origin("two.test")
        reads = len(self.counting.reads)
        elements = self.elements(self.post({ORIGIN: {}, "two.test": {}}))
        self.assertEqual(sorted(e["server_name"] for e in elements), [ORIGIN, "two.test"])
        self.assertGreater(len(self.counting.reads), reads)
        self.assertEqual(two.hits, 1)
        self.assertEqual(self.notary.counters.get("warm_queries"), None)

    def test_disabled(self) -> None:
        """With no warm cache every query reads the store."""
        notary = Notary(
            self.counting,
            self.keyring,
            self.clock,
            server_name=NOTARY,
            signing_keys=[self.notary_key],
            warm_cache_size=0,
        )
        self.add_origin()
        first = self.ask(notary, ORIGIN)
        reads = len(self.counting.reads)
        self.assertEqual(self.ask(notary, ORIGIN), first)
        self.assertEqual(len(self.counting.reads), reads + 1)
        self.assertEqual(json.loads(first)["server_keys"][0]["server_name"], ORIGIN)

    def test_memory_bounded(self) -> None:
        """At most warm_cache_size servers are kept; the least recently used goes first."""
        notary = Notary(
            self.counting,
            self.keyring,
            self.clock,
            server_name=NOTARY,
            signing_keys=[self.notary_key],
            warm_cache_size=2,
        )
        for name in ("a.test", "b.test", "c.test"):
            self.add_origin(name)
            self.ask(notary, name)
        reads = len(self.counting.reads)
        self.ask(notary, "c.test")
        self.ask(notary, "b.test")
        self.assertEqual(len(self.counting.reads), reads)
        self.ask(notary, "a.test")
        self.assertEqual(len(self.counting.reads), reads + 1)

    def test_warm_answer_is_immediate(self) -> None:
        """A warm query's Deferred has fired when query() returns."""
        self.add_origin()
        self.get()
        d: Deferred[Any] = self.notary.query({ORIGIN: ServerQuery(None, None)})
        self.assertTrue(d.called)
        self.assertEqual(
            [e["server_name"] for e in json.loads(self.successResultOf(d))["server_keys"]],
            [ORIGIN],
        )
