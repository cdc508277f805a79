"""
Tests for L{synkeys.notary} through the real resource tree
(L{synkeys.resource.QueryResource}), a real keyring and direct fetcher,
in-memory origins and store, and a fake clock.
"""

import json
from typing import Any, Dict, List, Mapping, Optional, Sequence

from nacl.signing import SigningKey as NaclSigningKey
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from synkeys.fetchers import DirectKeyFetcher
from synkeys.interfaces import FetchResult
from synkeys.keyfile import generate_signing_key
from synkeys.keyring import Keyring
from synkeys.keyserver import KeyPublisher
from synkeys.notary import Notary
from synkeys.query import Query, ServerQuery
from synkeys.resource import QueryResource, build_root
from synkeys.signing import canonical_json, decode_b64, encode_b64, verify_signature
from synkeys.storage import MemoryKeyStore
from synkeys.testing import FakeFederationClient, FakeOrigin
from tests.helpers import make_server_keys, make_signing_key
from tests.stubhttp import Answer

NOTARY = "notary.test"
ORIGIN = "origin.test"
NOW_S = 1_700_000_000
NOW_MS = NOW_S * 1000
HOUR_S = 3600
DAY_MS = 86_400_000
MAX_KEYS = 2048


class Served(Resource):
    """An origin's whole site: ``body`` with ``code`` at every path."""

    isLeaf = True

    def __init__(self, body: bytes, code: int = 200) -> None:
        super().__init__()
        self.body = body
        self.code = code

    def render(self, request: Request) -> bytes:
        request.setResponseCode(self.code)
        request.setHeader(b"Content-Type", b"application/json")
        return self.body


def signed_body(
    server_name: str,
    keys: Mapping[str, NaclSigningKey],
    valid_until_ts: int,
    extra: Optional[Mapping[str, Any]] = None,
) -> bytes:
    """A ``/server`` body of ``server_name`` listing and signed by ``keys``."""
    return make_server_keys(
        server_name, keys, valid_until_ts=valid_until_ts, extra_fields=extra
    ).raw


class NotaryTestCase(SynchronousTestCase):
    """A notary behind its resource tree, with fake origins and a fake clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW_S)
        self.store = MemoryKeyStore()
        self.client = FakeFederationClient()
        self.keyring = Keyring(
            [DirectKeyFetcher(self.client, self.clock)],
            self.clock,
            store=self.store,
            local_server_name=NOTARY,
        )
        self.notary_key = generate_signing_key("notary")
        self.publisher = KeyPublisher(NOTARY, [self.notary_key], self.clock)
        self.notary = Notary(
            self.store,
            self.keyring,
            self.clock,
            server_name=NOTARY,
            signing_keys=[self.notary_key],
            local_publisher=self.publisher,
        )
        self.root = build_root(self.publisher, QueryResource(self.notary, MAX_KEYS))
        self.stub = StubTreq(self.root)

    # -- helpers --------------------------------------------------------

    def now_ms(self) -> int:
        """The fake clock's time in ms."""
        return int(self.clock.seconds() * 1000)

    def add_origin(self, name: str = ORIGIN, **kwargs: Any) -> FakeOrigin:
        """A fake origin reachable by the notary."""
        return self.client.add(FakeOrigin(name, self.clock, **kwargs))

    def settle(self) -> None:
        """Run everything that can run without time passing."""
        for _ in range(10):
            self.stub.flush()
            self.clock.advance(0)

    def start(self, method: str, path: str, body: Optional[bytes] = None) -> "Deferred[Any]":
        """Start a request; the response is not delivered until :meth:`settle`."""
        return self.stub.request(method, "http://notary.test" + path, data=body)

    def finish(self, d: "Deferred[Any]") -> Answer:
        """Let a started request complete and read its whole answer."""
        self.settle()
        response = self.successResultOf(d)
        content = response.content()
        self.settle()
        return Answer(response.code, response.headers, self.successResultOf(content))

    def request(self, method: str, path: str, body: Optional[bytes] = None) -> Answer:
        """One whole request."""
        return self.finish(self.start(method, path, body))

    def get(
        self, server: str = ORIGIN, key_id: Optional[str] = None, minimum: Optional[int] = None
    ) -> Answer:
        """GET /query/{server}[/{keyId}][?minimum_valid_until_ts=]."""
        path = "/_matrix/key/v2/query/" + server
        if key_id is not None:
            path += "/" + key_id
        if minimum is not None:
            path += f"?minimum_valid_until_ts={minimum}"
        return self.request("GET", path)

    def post(self, server_keys: Any) -> Answer:
        """POST /query with ``{"server_keys": server_keys}``."""
        return self.request(
            "POST", "/_matrix/key/v2/query", json.dumps({"server_keys": server_keys}).encode()
        )

    def post_key(self, key_id: str, minimum: int, server: str = ORIGIN) -> Answer:
        """POST /query for one key with a minimum_valid_until_ts."""
        return self.post({server: {key_id: {"minimum_valid_until_ts": minimum}}})

    def elements(self, answer: Answer) -> List[Dict[str, Any]]:
        """The server_keys of a 200 answer."""
        self.assertEqual(answer.code, 200, answer.body)
        body = answer.json()
        self.assertEqual(list(body), ["server_keys"])
        elements: List[Dict[str, Any]] = body["server_keys"]
        return elements

    def only_element(self, answer: Answer) -> Dict[str, Any]:
        """The one element of a 200 answer."""
        elements = self.elements(answer)
        self.assertEqual(len(elements), 1, elements)
        return elements[0]

    def assert_error(self, answer: Answer, code: int, errcode: str) -> Dict[str, Any]:
        """The answer is a Matrix error; returns its body."""
        self.assertEqual(answer.code, code, answer.body)
        self.assertEqual(answer.header("Content-Type"), "application/json")
        body: Dict[str, Any] = answer.json()
        self.assertEqual(body["errcode"], errcode, body)
        return body

    def assert_countersigned(
        self, element: Mapping[str, Any], origin_keys: Mapping[str, bytes]
    ) -> None:
        """
        ``element`` carries exactly one notary signature, which verifies with
        the notary's key, and an origin signature by each of ``origin_keys``.
        """
        signatures = element["signatures"]
        self.assertEqual(list(signatures[NOTARY]), [self.notary_key.key_id])
        self.assertTrue(
            verify_signature(element, NOTARY, self.notary_key.key_id, self.notary_key.public_key)
        )
        server_name = element["server_name"]
        for key_id, key in origin_keys.items():
            self.assertTrue(verify_signature(element, server_name, key_id, key), key_id)

    def cached_rows(self, server: str = ORIGIN) -> Dict[str, bytes]:
        """The store's rows of ``server``: key id to raw response."""
        rows = self.successResultOf(self.store.get_server_keys({server: None}))
        return {key_id: keys.raw for key_id, keys in rows.get(server, {}).items()}


class EndpointTests(NotaryTestCase):
    """Every form of the query answers the origin's keys."""

    def test_get_server_and_key_id(self) -> None:
        """GET /query/{server}/{keyId} fetches and answers the origin's countersigned keys."""
        origin = self.add_origin()
        element = self.only_element(self.get(ORIGIN, "ed25519:a"))
        self.assertEqual(element["server_name"], ORIGIN)
        self.assertEqual(list(element["verify_keys"]), ["ed25519:a"])
        self.assert_countersigned(element, origin.verify_keys)
        self.assertEqual(origin.paths, [b"/_matrix/key/v2/server"])

    def test_get_server_fetches(self) -> None:
        """GET /query/{server} really fetches from the origin (not cache only)."""
        origin = self.add_origin()
        element = self.only_element(self.get(ORIGIN))
        self.assertEqual(origin.hits, 1)
        self.assert_countersigned(element, origin.verify_keys)

    def test_post_todays_form(self) -> None:
        """POST with today's body form answers the key asked for."""
        origin = self.add_origin()
        element = self.only_element(self.post_key("ed25519:a", self.now_ms()))
        self.assertIn("ed25519:a", element["verify_keys"])
        self.assert_countersigned(element, origin.verify_keys)

    def test_post_seed_form(self) -> None:
        """POST with the seed's list of key ids answers the key asked for."""
        origin = self.add_origin()
        element = self.only_element(self.post({ORIGIN: ["ed25519:a"]}))
        self.assertIn("ed25519:a", element["verify_keys"])
        self.assert_countersigned(element, origin.verify_keys)

    def test_post_empty_object_is_all_keys(self) -> None:
        """``"origin": {}`` answers every key of the origin."""
        origin = self.add_origin(
            signing_keys=[generate_signing_key("a"), generate_signing_key("b")]
        )
        element = self.only_element(self.post({ORIGIN: {}}))
        self.assertEqual(sorted(element["verify_keys"]), ["ed25519:a", "ed25519:b"])
        self.assert_countersigned(element, origin.verify_keys)

    def test_no_servers(self) -> None:
        """A query naming no server is answered with an empty list and no fetch."""
        answer = self.post({})
        self.assertEqual((answer.code, answer.json()), (200, {"server_keys": []}))
        self.assertEqual(self.client.requests, [])

    def test_several_servers(self) -> None:
        """One POST answers several origins, each countersigned."""
        one = self.add_origin("one.test")
        two = self.add_origin("two.test:8448")
        elements = self.elements(self.post({"one.test": {}, "two.test:8448": ["ed25519:a"]}))
        by_name = {e["server_name"]: e for e in elements}
        self.assertEqual(sorted(by_name), ["one.test", "two.test:8448"])
        self.assert_countersigned(by_name["one.test"], one.verify_keys)
        self.assert_countersigned(by_name["two.test:8448"], two.verify_keys)

    def test_element_is_origin_object_as_received(self) -> None:
        """An element is the origin's object exactly (unknown fields kept) plus the notary's signature."""
        key = make_signing_key("origin")
        raw = signed_body(
            ORIGIN,
            {"ed25519:o": key},
            NOW_MS + DAY_MS,
            extra={"m.unknown": {"nested": [1, "two", None, True]}, "zzz": "last"},
        )
        self.add_origin(resource=Served(raw))
        element = self.only_element(self.get(ORIGIN, "ed25519:o"))
        self.assert_countersigned(element, {"ed25519:o": bytes(key.verify_key)})
        relayed = dict(element)
        relayed["signatures"] = {k: v for k, v in element["signatures"].items() if k != NOTARY}
        self.assertEqual(canonical_json(relayed), raw)
        self.assertNotIn(self.notary_key.public_key_b64, json.dumps(element["verify_keys"]))

    def test_unreachable_nothing_cached(self) -> None:
        """A server that cannot be reached and has nothing cached has no element, and is no error."""
        good = self.add_origin()
        self.assertEqual(self.elements(self.get("nowhere.test")), [])
        elements = self.elements(self.post({"nowhere.test": {}, ORIGIN: {}}))
        self.assertEqual([e["server_name"] for e in elements], [ORIGIN])
        self.assert_countersigned(elements[0], good.verify_keys)

    def test_own_server_answered_locally(self) -> None:
        """The notary's own keys are answered from its publisher, without any fetch."""
        for answer in [
            self.get(NOTARY),
            self.post({NOTARY: {}}),
            self.get(NOTARY, "ed25519:notary"),
        ]:
            element = self.only_element(answer)
            self.assertEqual(element, self.publisher.json())
            self.assert_countersigned(element, {})
        self.assertEqual(self.client.requests, [])

    def test_countersign_cache(self) -> None:
        """A warm query signs nothing: the countersigned bytes are reused."""
        self.add_origin()
        first = self.get()
        self.assertEqual(self.notary.counters.get("countersigned"), 1)
        second = self.get()
        third = self.post({ORIGIN: ["ed25519:a"]})
        self.assertEqual(self.notary.counters.get("countersigned"), 1)
        self.assertEqual(self.notary.counters.get("countersign_cache_hit"), 2)
        self.assertEqual(first.body, second.body)
        self.assertEqual(self.only_element(third), self.only_element(first))


class FreshnessTests(NotaryTestCase):
    """When the notary goes back to an origin."""

    def test_half_life(self) -> None:
        """A response valid for a day is served from cache for twelve hours, then refetched."""
        origin = self.add_origin()  # valid for one day
        self.get()
        self.clock.advance(12 * HOUR_S - 1)
        self.only_element(self.get())
        self.assertEqual(origin.hits, 1)
        self.clock.advance(1)
        self.only_element(self.get())
        self.assertEqual(origin.hits, 2)

    def test_one_hour_rule(self) -> None:
        """A short-lived response past its half-life is not refetched within the hour."""
        origin = self.add_origin(refresh_interval_ms=20 * 60_000)
        first = self.now_ms()
        self.post_key("ed25519:a", first)
        self.clock.advance(30 * 60)  # past half-life, and even expired
        self.only_element(self.post_key("ed25519:a", first))
        self.assertEqual(origin.hits, 1)
        self.clock.advance(30 * 60)
        self.only_element(self.post_key("ed25519:a", first))
        self.assertEqual(origin.hits, 2)

    def test_minimum_forces_refetch(self) -> None:
        """Two requests in a row whose minimum the cache cannot meet both reach the origin."""
        origin = self.add_origin()  # valid for one day
        self.get()
        beyond = self.now_ms() + 2 * DAY_MS
        self.only_element(self.post_key("ed25519:a", beyond))
        self.assertEqual(origin.hits, 2)
        self.only_element(self.post_key("ed25519:a", beyond))
        self.assertEqual(origin.hits, 3)

    def test_forced_refetch_budget(self) -> None:
        """Forced refetches come in a small burst, are then refused, and refill after a minute."""
        origin = self.add_origin()
        self.get()
        beyond = self.now_ms() + 2 * DAY_MS
        for _ in range(3):
            self.post_key("ed25519:a", beyond)
        self.assertEqual(origin.hits, 4)
        refused = self.post_key("ed25519:a", beyond)
        self.assertEqual(origin.hits, 4)
        self.only_element(refused)  # still answered from cache
        self.assertEqual(self.notary.counters.get("decision_budget_spent"), 1)
        self.clock.advance(59)
        self.post_key("ed25519:a", beyond)
        self.assertEqual(origin.hits, 4)
        self.clock.advance(1)
        self.post_key("ed25519:a", beyond)
        self.assertEqual(origin.hits, 5)
        self.post_key("ed25519:a", beyond)
        self.assertEqual(origin.hits, 5)

    def test_minimum_clamped_to_seven_days(self) -> None:
        """A minimum more than seven days ahead counts as seven days, which a ten-day response meets."""
        origin = self.add_origin(refresh_interval_ms=10 * DAY_MS)
        self.get()
        self.only_element(self.post_key("ed25519:a", self.now_ms() + 30 * DAY_MS))
        self.only_element(self.get(minimum=self.now_ms() + 365 * DAY_MS))
        self.assertEqual(origin.hits, 1)
        self.assertEqual(self.notary.counters.get("decision_cached"), 2)

    def test_failure_backoff(self) -> None:
        """A failing origin is not asked again inside its back-off, which grows."""
        origin = self.add_origin()
        origin.online = False
        self.assertEqual(self.elements(self.get()), [])
        self.assertEqual(origin.hits, 1)
        for _ in range(5):
            self.assertEqual(self.elements(self.get()), [])
            self.post_key("ed25519:a", self.now_ms() + DAY_MS)
        self.assertEqual(origin.hits, 1)
        self.clock.advance(60)
        self.get()
        self.assertEqual(origin.hits, 2)
        self.clock.advance(60)
        self.get()
        self.assertEqual(origin.hits, 2)  # the second failure backs off two minutes
        origin.online = True
        self.clock.advance(60)
        self.only_element(self.get())
        self.assertEqual(origin.hits, 3)

    def test_stale_cache_served_while_backing_off(self) -> None:
        """A stale response is served, without hitting the failing origin again, during the back-off."""
        origin = self.add_origin()
        self.get()
        self.clock.advance(13 * HOUR_S)
        origin.online = False
        self.only_element(self.get())
        self.assertEqual(origin.hits, 2)
        for _ in range(3):
            self.only_element(self.get())
        self.assertEqual(origin.hits, 2)


class OriginBehaviourTests(NotaryTestCase):
    """What origins send, and what the notary keeps."""

    def force(self, key_id: str = "ed25519:a") -> Answer:
        """A request whose minimum no one-day response meets."""
        return self.post_key(key_id, self.now_ms() + 2 * DAY_MS)

    def assert_spurious_ignored(self, body: bytes) -> None:
        """After a good fetch, ``body`` from the origin changes neither the cache nor the answer."""
        origin = self.add_origin()
        before = self.get(ORIGIN, "ed25519:a").body
        rows = self.cached_rows()
        origin.override = (200, body)
        after = self.force()
        self.assertEqual(origin.hits, 2)
        self.assertEqual(after.body, before)
        self.assertEqual(self.cached_rows(), rows)
        self.assertEqual(self.notary.counters.get("fetch_failed"), 1)

    def test_spurious_bad_signature(self) -> None:
        """A response whose signature does not verify is rejected without touching the cache."""
        obj = json.loads(signed_body(ORIGIN, {"ed25519:a": make_signing_key("x")}, NOW_MS + DAY_MS))
        obj["valid_until_ts"] += 1
        self.assert_spurious_ignored(canonical_json(obj))

    def test_spurious_wrong_server_name(self) -> None:
        """A validly signed response of another server is rejected without touching the cache."""
        self.assert_spurious_ignored(
            signed_body("evil.test", {"ed25519:a": make_signing_key("x")}, NOW_MS + DAY_MS)
        )

    def test_spurious_garbage(self) -> None:
        """Garbage from the origin is rejected without touching the cache."""
        self.assert_spurious_ignored(b"\x00<html>not keys")

    def test_valid_key_not_overwritten_by_spurious_result(self) -> None:
        """When the origin later lists only a new key, the old key is still served (sytest)."""
        key1, key2 = make_signing_key("k1"), make_signing_key("k2")
        key1_expiry = self.now_ms() - DAY_MS
        served = Served(signed_body(ORIGIN, {"ed25519:key_1": key1}, key1_expiry))
        self.add_origin(resource=served)
        self.assertIn(
            "ed25519:key_1", self.only_element(self.post_key("ed25519:key_1", 0))["verify_keys"]
        )
        served.body = signed_body(ORIGIN, {"ed25519:key_2": key2}, key1_expiry + 1000)
        self.post_key("ed25519:key_1", self.now_ms())
        element = self.only_element(self.post_key("ed25519:key_1", key1_expiry))
        self.assertEqual(list(element["verify_keys"]), ["ed25519:key_1"])
        self.assert_countersigned(element, {"ed25519:key_1": bytes(key1.verify_key)})

    def test_key_rotation(self) -> None:
        """After the origin rotates, the new key is fetched and the old one is served in old_verify_keys."""
        origin = self.add_origin()
        old_key = origin.verify_keys["ed25519:a"]
        self.get()
        self.clock.advance(60)
        origin.rotate("b")
        element = self.only_element(self.get(ORIGIN, "ed25519:b"))
        self.assertEqual(origin.hits, 2)
        self.assertEqual(list(element["verify_keys"]), ["ed25519:b"])
        self.assertEqual(decode_b64(element["old_verify_keys"]["ed25519:a"]["key"]), old_key)
        self.assert_countersigned(element, origin.verify_keys)
        # The old key id is now answered by the newest response listing it.
        self.assertEqual(self.only_element(self.get(ORIGIN, "ed25519:a")), element)

    def test_expired_key_returned_when_origin_fails(self) -> None:
        """An expired key is still returned when the origin answers 400 on refetch (sytest)."""
        key = make_signing_key("key_0")
        expiry = self.now_ms() - DAY_MS
        served = Served(signed_body(ORIGIN, {"ed25519:key_0": key}, expiry))
        origin = self.add_origin(resource=served)
        self.post_key("ed25519:key_0", 0)
        for code in (200, 400):
            served.code = code
            if code == 400:
                served.body = b"{}"
            element = self.only_element(self.post_key("ed25519:key_0", expiry + 1000))
            self.assertEqual(element["server_name"], ORIGIN)
            self.assertEqual(element["valid_until_ts"], expiry)
            self.assertIn("ed25519:key_0", element["verify_keys"])
        self.assertEqual(origin.hits, 3)

    def test_expired_key_returned_when_origin_offline(self) -> None:
        """With the origin gone, a GET without a minimum still gets the last, expired, response."""
        origin = self.add_origin(refresh_interval_ms=HOUR_S * 1000)
        self.get()
        origin.online = False
        self.clock.advance(2 * HOUR_S)
        for _ in range(5):
            element = self.only_element(self.get())
            self.assertLess(element["valid_until_ts"], self.now_ms())
        self.assertLessEqual(origin.hits, 4)  # the first fetch and at most the burst

    def test_rebound_key_id_kept_out(self) -> None:
        """A key id the origin rebinds to other bytes keeps its first binding, and the rebinding response is not served."""
        first, second, other = make_signing_key("x"), make_signing_key("y"), make_signing_key("z")
        served = Served(signed_body(ORIGIN, {"ed25519:a": first}, NOW_MS + DAY_MS))
        self.add_origin(resource=served)
        self.get()
        served.body = signed_body(
            ORIGIN, {"ed25519:a": second, "ed25519:b": other}, NOW_MS + DAY_MS
        )
        element = self.only_element(self.force("ed25519:a"))
        self.assertEqual(
            element["verify_keys"]["ed25519:a"]["key"], encode_b64(bytes(first.verify_key))
        )
        self.assertEqual(self.notary.counters.get("rebound_key_ids"), 1)
        for answer in [self.get(), self.get(ORIGIN, "ed25519:b")]:
            for element in self.elements(answer):
                self.assertEqual(
                    element["verify_keys"]["ed25519:a"]["key"],
                    encode_b64(bytes(first.verify_key)),
                )

    def test_evict(self) -> None:
        """Evicting a server forgets its keys, so a legitimate re-key of the same key id is then served."""
        origin = self.add_origin()
        self.get()
        origin.signing_keys = [generate_signing_key("a")]
        origin.publisher = KeyPublisher(ORIGIN, origin.signing_keys, self.clock)
        origin.resource = build_root(origin.publisher)
        self.assertEqual(self.successResultOf(self.notary.evict(ORIGIN)), 1)
        self.assertEqual(self.cached_rows(), {})
        element = self.only_element(self.get())
        self.assertEqual(origin.hits, 2)
        self.assert_countersigned(element, origin.verify_keys)
        self.assertEqual(
            element["verify_keys"]["ed25519:a"]["key"], origin.signing_keys[0].public_key_b64
        )


class ConcurrencyTests(NotaryTestCase):
    """Concurrent requests and fan-out."""

    def test_concurrent_fetches_deduplicated(self) -> None:
        """Many concurrent requests for one origin cause one origin request."""
        origin = self.add_origin()
        origin.gate = Deferred()
        pending = [self.start("GET", "/_matrix/key/v2/query/origin.test") for _ in range(5)]
        pending += [
            self.start(
                "POST",
                "/_matrix/key/v2/query",
                json.dumps(
                    {"server_keys": {ORIGIN: {"ed25519:a": {"minimum_valid_until_ts": NOW_MS}}}}
                ).encode(),
            )
            for _ in range(5)
        ]
        self.settle()
        self.assertEqual(origin.hits, 1)
        for d in pending:
            self.assertNoResult(d)
        origin.gate.callback(None)
        answers = [self.finish(d) for d in pending]
        for answer in answers:
            self.assert_countersigned(self.only_element(answer), origin.verify_keys)
        self.assertEqual(origin.hits, 1)
        self.assertEqual(self.notary.counters.get("fetch_joined"), 9)

    def test_concurrent_forced_requests_share_one_fetch(self) -> None:
        """Concurrent forcing requests join one refetch and spend one token."""
        origin = self.add_origin()
        self.get()
        origin.gate = Deferred()
        body = json.dumps(
            {
                "server_keys": {
                    ORIGIN: {"ed25519:a": {"minimum_valid_until_ts": NOW_MS + 2 * DAY_MS}}
                }
            }
        ).encode()
        pending = [self.start("POST", "/_matrix/key/v2/query", body) for _ in range(10)]
        self.settle()
        origin.gate.callback(None)
        for d in pending:
            self.only_element(self.finish(d))
        self.assertEqual(origin.hits, 2)
        self.assertEqual(self.notary.counters.get("fetch_joined"), 9)
        # Two tokens of the burst of three are left.
        origin.gate = None
        for _ in range(3):
            self.request("POST", "/_matrix/key/v2/query", body)
        self.assertEqual(origin.hits, 4)

    def test_fan_out(self) -> None:
        """One POST for twenty origins requests all of them before any answers."""
        origins = [self.add_origin(f"o{i}.test") for i in range(20)]
        for origin in origins:
            origin.gate = Deferred()
        d = self.start(
            "POST",
            "/_matrix/key/v2/query",
            json.dumps({"server_keys": {o.server_name: {} for o in origins}}).encode(),
        )
        self.settle()
        self.assertEqual([o.hits for o in origins], [1] * 20)
        self.assertNoResult(d)
        for origin in origins:
            assert origin.gate is not None
            origin.gate.callback(None)
        elements = self.elements(self.finish(d))
        self.assertEqual(
            sorted(e["server_name"] for e in elements), sorted(o.server_name for o in origins)
        )
        self.assertEqual([o.hits for o in origins], [1] * 20)

    def test_client_gone_does_not_cancel_shared_fetch(self) -> None:
        """A client that disconnects does not cancel the fetch other requests wait for."""
        origin = self.add_origin()
        origin.gate = Deferred()
        gone = self.start("GET", "/_matrix/key/v2/query/origin.test")
        staying = self.start("GET", "/_matrix/key/v2/query/origin.test")
        self.settle()
        gone.cancel()
        self.failureResultOf(gone)
        origin.gate.callback(None)
        self.assert_countersigned(self.only_element(self.finish(staying)), origin.verify_keys)
        self.assertEqual(origin.hits, 1)


class ErrorTests(NotaryTestCase):
    """Every error is a Matrix error with the right code, never a 500."""

    def test_not_json(self) -> None:
        """A body that is not JSON is 400 M_NOT_JSON."""
        self.assert_error(
            self.request("POST", "/_matrix/key/v2/query", b"{nope"), 400, "M_NOT_JSON"
        )

    def test_wrong_shape(self) -> None:
        """JSON of the wrong shape is 400 M_BAD_JSON."""
        for body in [b"[]", b"{}", b'{"server_keys": []}', b'{"server_keys": {"a.test": 5}}']:
            self.assert_error(
                self.request("POST", "/_matrix/key/v2/query", body), 400, "M_BAD_JSON"
            )

    def test_invalid_server_name(self) -> None:
        """An invalid server name, in a POST or a GET path, is 400 M_INVALID_PARAM."""
        self.assert_error(self.post({"a b": {}}), 400, "M_INVALID_PARAM")
        self.assert_error(
            self.request("GET", "/_matrix/key/v2/query/a%20b"), 400, "M_INVALID_PARAM"
        )
        self.assert_error(
            self.request("GET", "/_matrix/key/v2/query/a:http"), 400, "M_INVALID_PARAM"
        )

    def test_invalid_key_id(self) -> None:
        """An invalid key id, in a POST or a GET path, is 400 M_INVALID_PARAM."""
        self.assert_error(self.post({ORIGIN: ["nokey"]}), 400, "M_INVALID_PARAM")
        self.assert_error(self.post({ORIGIN: {"ed25519:a b": {}}}), 400, "M_INVALID_PARAM")
        self.assert_error(self.get(ORIGIN, "ed25519:"), 400, "M_INVALID_PARAM")

    def test_bad_minimum_in_get(self) -> None:
        """A minimum_valid_until_ts that is not a timestamp is 400 M_INVALID_PARAM."""
        answer = self.request(
            "GET", "/_matrix/key/v2/query/origin.test?minimum_valid_until_ts=soon"
        )
        self.assert_error(answer, 400, "M_INVALID_PARAM")

    def test_too_large(self) -> None:
        """A body over 1 MiB is 413 M_TOO_LARGE."""
        body = b'{"server_keys": {}, "pad": "' + b"x" * (1024 * 1024) + b'"}'
        self.assert_error(self.request("POST", "/_matrix/key/v2/query", body), 413, "M_TOO_LARGE")

    def test_limit_exceeded_before_any_fetch(self) -> None:
        """More (server, key id) pairs than the limit is 400 M_LIMIT_EXCEEDED naming it, with no fetch."""
        origin = self.add_origin()
        wanted = {f"ed25519:k{i}": {} for i in range(MAX_KEYS + 1)}
        body = self.assert_error(self.post({ORIGIN: wanted}), 400, "M_LIMIT_EXCEEDED")
        self.assertIn(str(MAX_KEYS), body["error"])
        self.assertEqual((origin.hits, self.client.requests), (0, []))
        del wanted["ed25519:k0"]
        self.assertEqual(self.post({ORIGIN: wanted}).code, 200)

    def test_wrong_methods(self) -> None:
        """Methods the endpoints do not serve are 405 M_UNRECOGNIZED."""
        for method, path in [
            ("GET", "/_matrix/key/v2/query"),
            ("GET", "/_matrix/key/v2/query/"),
            ("POST", "/_matrix/key/v2/query/origin.test"),
            ("PUT", "/_matrix/key/v2/query"),
            ("DELETE", "/_matrix/key/v2/query/origin.test"),
            ("PATCH", "/_matrix/key/v2/query"),
        ]:
            answer = self.request(method, path, b"{}" if method != "GET" else None)
            self.assert_error(answer, 405, "M_UNRECOGNIZED")
        self.assertEqual(self.client.requests, [])

    def test_store_outage(self) -> None:
        """When the store is down, the notary answers 503 M_UNKNOWN."""
        self.add_origin()
        self.store.fail_with("database is down")
        self.assert_error(self.get(), 503, "M_UNKNOWN")
        self.assert_error(self.post({ORIGIN: {}}), 503, "M_UNKNOWN")
        self.store.fail_with(None)
        self.only_element(self.get())

    def test_never_a_500(self) -> None:
        """Hostile bodies and paths get 4xx answers, never a 500."""
        bodies: Sequence[bytes] = [
            b"",
            b"null",
            b"\xff\xfe",
            b'{"server_keys": {"a.test": {"ed25519:a": {"minimum_valid_until_ts": 1e400}}}}',
            b'{"server_keys": {"a.test": {"ed25519:a": {"minimum_valid_until_ts": 99999999999999999999}}}}',
            b'{"server_keys": {"a.test": {"ed25519:a": null}}}',
            b'{"server_keys": {"a.test": [[]]}}',
            b'{"server_keys": {"a.test": [{}]}}',
            b'{"server_keys": {"\\ud800": {}}}',
            b'{"server_keys": {}, "server_keys": {}}',
            b"[" * 5000 + b"]" * 5000,
            b'{"server_keys": {"a.test": {"ed25519:a": {"minimum_valid_until_ts": NaN}}}}',
        ]
        for body in bodies:
            answer = self.request("POST", "/_matrix/key/v2/query", body)
            self.assertTrue(400 <= answer.code < 500, (body[:60], answer.code, answer.body))
            self.assertIn("errcode", answer.json())
        for path in [
            "/_matrix/key/v2/query/%FF",
            "/_matrix/key/v2/query/a.test/ed25519:%FF",
            "/_matrix/key/v2/query/a.test/ed25519:a/x",
            "/_matrix/key/v2/query/[::1",
        ]:
            answer = self.request("GET", path)
            self.assertTrue(400 <= answer.code < 500, (path, answer.code, answer.body))


class RecordingSource:
    """A key source answering with ``fetch(requests)`` and recording each call in ``calls``."""

    def __init__(self, fetch: Any, calls: List[Any]) -> None:
        self._fetch = fetch
        self.calls = calls

    def fetch_server_keys(self, requests: Any) -> "Deferred[FetchResult]":
        """Record ``requests`` and answer them."""
        self.calls.append(requests)
        result: Deferred[FetchResult] = self._fetch(requests)
        return result


class KeySourceTests(SynchronousTestCase):
    """The notary over key sources other than the real keyring."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW_S)
        self.store = MemoryKeyStore()
        self.notary_key = generate_signing_key("notary")
        self.keys = make_server_keys(
            ORIGIN,
            {"ed25519:a": make_signing_key("a")},
            valid_until_ts=NOW_MS + DAY_MS,
            fetched_ts=NOW_MS,
        )
        self.calls: List[Any] = []

    def notary(self, fetch: Any) -> Notary:
        """A notary whose key source is ``fetch``, recording its calls."""
        return Notary(
            self.store,
            RecordingSource(fetch, self.calls),
            self.clock,
            server_name=NOTARY,
            signing_keys=[self.notary_key],
        )

    def forced(self) -> Query:
        """A query whose minimum the one-day response never meets."""
        return {ORIGIN: ServerQuery(None, NOW_MS + 2 * DAY_MS)}

    def test_synchronous_source(self) -> None:
        """A source that answers at once leaves no fetch behind to be joined by later requests."""

        def fetch(requests: Any) -> "Deferred[FetchResult]":
            self.store.store_server_keys(self.keys)
            return succeed(FetchResult(responses={ORIGIN: [self.keys]}))

        notary = self.notary(fetch)
        for _ in range(2):
            body = json.loads(self.successResultOf(notary.query(self.forced())))
            self.assertEqual([e["server_name"] for e in body["server_keys"]], [ORIGIN])
        self.assertEqual(len(self.calls), 2)
        self.assertEqual(self.calls[0], {ORIGIN: {}})

    def test_crashing_source(self) -> None:
        """A source that fails is logged and counted as a failed fetch; the query still answers."""
        notary = self.notary(lambda requests: fail(RuntimeError("boom")))
        body = self.successResultOf(notary.query({ORIGIN: ServerQuery(None, None)}))
        self.assertEqual(body, b'{"server_keys":[]}')
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(notary.counters.get("fetch_failed"), 1)
        # Backing off now: the next query does not call the source.
        self.successResultOf(notary.query({ORIGIN: ServerQuery(None, None)}))
        self.assertEqual(len(self.calls), 1)

    def test_key_ids_asked_for(self) -> None:
        """A query for key ids asks the source for those ids with the clamped minimum."""
        notary = self.notary(lambda requests: succeed(FetchResult()))
        self.successResultOf(
            notary.query({ORIGIN: ServerQuery(frozenset(["ed25519:a"]), NOW_MS + 30 * DAY_MS)})
        )
        self.assertEqual(self.calls, [{ORIGIN: {"ed25519:a": NOW_MS + 7 * DAY_MS}}])
