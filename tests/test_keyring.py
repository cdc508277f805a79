"""
Tests for :mod:`synkeys.keyring`, against fake origins and notaries that
answer with really signed JSON (see :mod:`tests.test_fetchers`).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from synkeys.errors import ConfigError, KeyLookupError, SignatureVerifyError
from synkeys.fetchers import DirectKeyFetcher, PerspectivesKeyFetcher, StoreKeyFetcher
from synkeys.interfaces import FederationResponse, IFederationClient, IKeyFetcher
from synkeys.keyring import Keyring
from synkeys.signing import encode_b64
from synkeys.storage.memory import MemoryKeyStore
from tests.helpers import make_signing_key
from tests.test_fetchers import DAY_MS, NOW_TS, FakeFederation, FakeOrigin, make_clock

EVENT = {"type": "m.room.message", "content": {"body": "hello"}}


@implementer(IFederationClient)
class SlowOrigins:
    """
    A :class:`FakeFederation` in front of which the origins named in
    ``slow`` answer their GETs only ``delay_s`` seconds (of ``clock``)
    after being asked.
    """

    def __init__(
        self, federation: FakeFederation, clock: IReactorTime, slow: set[str], delay_s: float
    ) -> None:
        self._federation = federation
        self._clock = clock
        self.slow = slow
        self._delay_s = delay_s

    def get(self, server_name: str, path: bytes) -> Deferred[FederationResponse]:
        """Ask the federation at once; answer late for a slow origin."""
        answer = self._federation.get(server_name, path)
        if server_name not in self.slow:
            return answer
        late: Deferred[None] = deferLater(self._clock, self._delay_s, lambda: None)
        return late.addCallback(lambda _: answer)

    def post_json(self, server_name: str, path: bytes, body: bytes) -> Deferred[FederationResponse]:
        """Let the federation answer a notary query."""
        return self._federation.post_json(server_name, path, body)


class KeyringTestCase(SynchronousTestCase):
    """Builds a fake federation, two notaries and a keyring over them."""

    def setUp(self) -> None:
        self.clock = make_clock()
        self.federation = FakeFederation()
        self.store = MemoryKeyStore()
        self.notary1 = self.federation.add_notary("notary1.example")
        self.notary2 = self.federation.add_notary("notary2.example")

    def perspective(self, notary_name: str) -> PerspectivesKeyFetcher:
        notary = self.federation.notaries[notary_name]
        return PerspectivesKeyFetcher(self.federation, self.clock, notary_name, notary.verify_keys)

    def direct(self) -> DirectKeyFetcher:
        return DirectKeyFetcher(self.federation, self.clock)

    def keyring(
        self,
        fetchers: list[IKeyFetcher] | None = None,
        **kwargs: Any,
    ) -> Keyring:
        if fetchers is None:
            fetchers = [
                self.perspective("notary1.example"),
                self.perspective("notary2.example"),
                self.direct(),
            ]
        kwargs.setdefault("store", self.store)
        return Keyring(fetchers, self.clock, **kwargs)

    def capture_warnings(self, keyring: Keyring) -> list[str]:
        """Collect ``keyring``'s warnings, formatted."""
        warnings: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if event["log_level"] >= LogLevel.warn:
                warnings.append(formatEvent(event))

        keyring.log = Logger(observer=observe)  # type: ignore[misc]
        return warnings

    def verify(
        self, keyring: Keyring, origin: FakeOrigin, valid_at_ts: int = NOW_TS, **kw: Any
    ) -> Any:
        """Verify a freshly signed event of ``origin`` and run the batch."""
        d = keyring.verify_json_for_server(origin.name, origin.sign(EVENT, **kw), valid_at_ts)
        self.clock.advance(0)
        return d


class BatchingTests(KeyringTestCase):
    """Batching, de-duplication and cancellation."""

    def test_one_post_per_perspective_for_a_turn(self) -> None:
        """100 verify calls across 20 servers in one turn cause one POST to each notary."""
        origins = [self.federation.add_origin(f"s{i}.example") for i in range(20)]
        keyring = self.keyring(policy="quorum", quorum=2)
        ds = keyring.verify_json_objects_for_server(
            (origins[i % 20].name, origins[i % 20].sign(dict(EVENT, n=i)), NOW_TS)
            for i in range(100)
        )
        self.assertEqual(self.federation.requests, [])
        self.clock.advance(0)
        for d in ds:
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.federation.count("POST", "notary1.example"), 1)
        self.assertEqual(self.federation.count("POST", "notary2.example"), 1)
        self.assertEqual(self.federation.count("GET"), 0)

    def test_first_policy_asks_only_first_notary(self) -> None:
        """Under the first policy, one POST to the first notary serves the whole turn."""
        origins = [self.federation.add_origin(f"s{i}.example") for i in range(20)]
        keyring = self.keyring()
        ds = [
            keyring.verify_json_for_server(o.name, o.sign(dict(EVENT, n=i)), NOW_TS)
            for i in range(5)
            for o in origins
        ]
        self.clock.advance(0)
        self.assertEqual([self.successResultOf(d) for d in ds], [None] * 100)
        self.assertEqual(self.federation.count("POST"), 1)
        self.assertEqual(self.federation.count("POST", "notary1.example"), 1)

    def test_batch_window(self) -> None:
        """Calls within batch_window_s share a batch, which waits for the window."""
        a = self.federation.add_origin("a.example")
        b = self.federation.add_origin("b.example")
        keyring = self.keyring(batch_window_s=0.5)
        d1 = keyring.verify_json_for_server(a.name, a.sign(EVENT), NOW_TS)
        self.clock.advance(0.2)
        d2 = keyring.verify_json_for_server(b.name, b.sign(EVENT), NOW_TS)
        self.assertEqual(self.federation.requests, [])
        self.clock.advance(0.3)
        self.successResultOf(d1)
        self.successResultOf(d2)
        self.assertEqual(self.federation.count("POST"), 1)

    def test_second_wave_waits_for_first(self) -> None:
        """A second wave while the first fetch is outstanding fetches nothing again."""
        a = self.federation.add_origin("a.example")
        keyring = self.keyring()
        self.federation.hold()
        first = self.verify(keyring, a)
        second = [self.verify(keyring, a) for _ in range(3)]
        self.clock.advance(1)
        self.assertEqual(self.federation.count("POST"), 1)
        self.assertNoResult(first)
        self.federation.release()
        self.clock.advance(0)
        for d in [first, *second]:
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.federation.count("POST"), 1)

    def test_higher_validity_waits_then_refetches(self) -> None:
        """A caller needing more validity than an outstanding fetch waits, then asks once more."""
        a = self.federation.add_origin("a.example")
        keyring = self.keyring([self.direct()])
        self.federation.hold()
        first = self.verify(keyring, a)
        later = self.verify(keyring, a, valid_at_ts=NOW_TS + 30 * DAY_MS)
        self.assertEqual(self.federation.count("GET"), 1)
        self.federation.release()
        self.successResultOf(first)
        self.clock.advance(0)
        # The 7-day cap makes NOW + 30 days unreachable: asked again, then refused.
        self.assertEqual(self.federation.count("GET"), 2)
        self.failureResultOf(later, SignatureVerifyError)

    def test_cancel_one_waiter(self) -> None:
        """Cancelling one caller's Deferred leaves the fetch and the other callers alone."""
        a = self.federation.add_origin("a.example")
        keyring = self.keyring()
        self.federation.hold()
        d1 = self.verify(keyring, a)
        d2 = self.verify(keyring, a)
        d1.cancel()
        self.failureResultOf(d1, CancelledError)
        self.federation.release()
        self.assertIsNone(self.successResultOf(d2))
        self.assertEqual(self.federation.count("POST"), 1)

    def test_cancel_before_batch_starts(self) -> None:
        """Cancelling a caller before its batch runs still serves the others."""
        a = self.federation.add_origin("a.example")
        keyring = self.keyring()
        d1 = keyring.verify_json_for_server(a.name, a.sign(EVENT), NOW_TS)
        d2 = keyring.verify_json_for_server(a.name, a.sign(EVENT), NOW_TS)
        d1.cancel()
        self.clock.advance(0)
        self.failureResultOf(d1, CancelledError)
        self.assertIsNone(self.successResultOf(d2))

    def test_batches_are_bounded(self) -> None:
        """More pairs than max_batch_keys are split into several batches."""
        origins = [self.federation.add_origin(f"s{i}.example") for i in range(10)]
        keyring = self.keyring(max_batch_keys=4)
        ds = [keyring.verify_json_for_server(o.name, o.sign(EVENT), NOW_TS) for o in origins]
        self.clock.advance(0)
        for d in ds:
            self.successResultOf(d)
        self.assertEqual(self.federation.count("POST"), 3)

    def test_waiters_are_bounded(self) -> None:
        """Callers beyond max_waiters fail at once with KeyLookupError."""
        a = self.federation.add_origin("a.example")
        keyring = self.keyring(max_waiters=2)
        ds = [keyring.verify_json_for_server(a.name, a.sign(EVENT), NOW_TS) for _ in range(3)]
        f = self.failureResultOf(ds[2], KeyLookupError)
        self.assertIn("too many", f.value.reason)
        self.clock.advance(0)
        self.successResultOf(ds[0])
        self.successResultOf(ds[1])


class PolicyTests(KeyringTestCase):
    """Fallback and the quorum policy."""

    def test_fallback_to_next_perspective_then_direct(self) -> None:
        """A failing notary falls through to the next, then to direct."""
        a = self.federation.add_origin("a.example")
        keyring = self.keyring()
        self.notary1.mode = "error"
        self.assertIsNone(self.successResultOf(self.verify(keyring, a)))
        self.assertEqual(self.federation.count("GET"), 0)
        self.assertEqual(self.federation.count("POST", "notary2.example"), 1)

        b = self.federation.add_origin("b.example")
        self.notary2.mode = "down"
        self.assertIsNone(self.successResultOf(self.verify(keyring, b)))
        self.assertEqual(
            [(m, s) for m, s, _p, _b in self.federation.requests[2:]],
            [("POST", "notary1.example"), ("POST", "notary2.example"), ("GET", "b.example")],
        )

    def test_everything_fails(self) -> None:
        """When every fetcher fails, KeyLookupError gives the reasons."""
        keyring = self.keyring()
        self.notary1.mode = self.notary2.mode = "error"
        ghost = FakeOrigin("ghost.example")
        f = self.failureResultOf(self.verify(keyring, ghost), KeyLookupError)
        self.assertIn("HTTP 500", f.value.reason)
        self.assertIn("connection refused", f.value.reason)

    def test_quorum_agreement(self) -> None:
        """Two agreeing notaries satisfy a quorum of two, without direct."""
        a = self.federation.add_origin("a.example")
        keyring = self.keyring(policy="quorum", quorum=2)
        self.assertIsNone(self.successResultOf(self.verify(keyring, a)))
        self.assertEqual(self.federation.count("GET"), 0)
        self.assertEqual(keyring.disagreements, 0)
        self.assertIn(
            "a.example", self.successResultOf(self.store.get_server_keys({"a.example": None}))
        )

    def test_quorum_asks_notaries_in_parallel(self) -> None:
        """Under quorum, both notaries are asked before either answers."""
        a = self.federation.add_origin("a.example")
        keyring = self.keyring(policy="quorum", quorum=2)
        self.federation.hold()
        d = self.verify(keyring, a)
        self.assertEqual(self.federation.count("POST"), 2)
        self.federation.release()
        self.successResultOf(d)

    def test_quorum_disagreement(self) -> None:
        """Disagreeing notaries fail the lookup, named in the error, logged and counted."""
        a = self.federation.add_origin("a.example")
        seen = []
        keyring = self.keyring(
            policy="quorum",
            quorum=2,
            on_disagreement=lambda *args: seen.append(args),
        )
        self.notary2.mode = "forged"
        warnings = self.capture_warnings(keyring)
        f = self.failureResultOf(self.verify(keyring, a), KeyLookupError)
        [warning] = warnings
        self.assertIn("notaries disagree about a.example ed25519:a", warning)
        self.assertIn(encode_b64(a.public("ed25519:a")), warning)
        self.assertIn("notary1.example", f.value.reason)
        self.assertIn("notary2.example", f.value.reason)
        self.assertEqual(keyring.disagreements, 1)
        [(server, key_id, answers)] = seen
        self.assertEqual((server, key_id), ("a.example", "ed25519:a"))
        self.assertEqual(answers["notary1.example"], a.public("ed25519:a"))
        self.assertNotEqual(answers["notary2.example"], a.public("ed25519:a"))
        # Not settled by asking the origin, and nothing was stored.
        self.assertEqual(self.federation.count("GET"), 0)
        self.assertEqual(self.successResultOf(self.store.get_server_keys({"a.example": None})), {})

    def test_quorum_short_falls_through_to_direct(self) -> None:
        """Too few notaries answering (none disagreeing) falls through to direct."""
        a = self.federation.add_origin("a.example")
        keyring = self.keyring(policy="quorum", quorum=2)
        self.notary2.mode = "error"
        self.assertIsNone(self.successResultOf(self.verify(keyring, a)))
        self.assertEqual(self.federation.count("GET", "a.example"), 1)

    def test_quorum_short_without_direct(self) -> None:
        """Without a direct fetcher, a short quorum is a lookup error saying so."""
        a = self.federation.add_origin("a.example")
        keyring = self.keyring(
            [self.perspective("notary1.example"), self.perspective("notary2.example")],
            policy="quorum",
            quorum=2,
        )
        self.notary2.mode = "error"
        f = self.failureResultOf(self.verify(keyring, a), KeyLookupError)
        self.assertIn("only 1 of 2", f.value.reason)

    def test_bad_policy_configuration(self) -> None:
        """An unknown policy or an unreachable quorum is a configuration error."""
        self.assertRaises(ConfigError, self.keyring, policy="majority")
        self.assertRaises(ConfigError, self.keyring, policy="quorum", quorum=3)
        self.assertRaises(ConfigError, self.keyring, quorum=0)


class LyingPerspectiveTests(KeyringTestCase):
    """A lying notary is never trusted."""

    def test_liars_fall_through_to_direct(self) -> None:
        """Bad notary signature, wrong notary key, bad origin signature, unasked server."""
        for i, mode in enumerate(
            ("bad_notary_signature", "wrong_key", "bad_origin_signature", "unasked")
        ):
            origin = self.federation.add_origin(f"o{i}.example")
            self.notary1.mode = self.notary2.mode = mode
            keyring = self.keyring()
            self.successResultOf(self.verify(keyring, origin))
            self.assertEqual(self.federation.count("GET", origin.name), 1, mode)
            stored = self.successResultOf(self.store.get_server_keys({origin.name: None}))
            self.assertEqual(stored[origin.name][origin.key_id].source, origin.name, mode)
            self.assertNotIn(
                "stranger.example",
                self.successResultOf(self.store.get_server_keys({"stranger.example": None})),
            )

    def test_liar_without_fallback(self) -> None:
        """With nothing to fall back on, a lying notary's answer gives KeyLookupError."""
        a = self.federation.add_origin("a.example")
        self.notary1.mode = "bad_origin_signature"
        keyring = self.keyring([self.perspective("notary1.example")])
        f = self.failureResultOf(self.verify(keyring, a), KeyLookupError)
        self.assertIn("no valid signature by a.example", f.value.reason)

    def test_forged_key_conflicts_with_store(self) -> None:
        """A notary rebinding a stored key id to other bytes is not used nor stored."""
        a = self.federation.add_origin("a.example")
        self.successResultOf(self.verify(self.keyring([self.direct()]), a))
        self.notary1.mode = "forged"
        keyring = self.keyring([self.perspective("notary1.example")])
        f = self.failureResultOf(self.verify(keyring, a), KeyLookupError)
        self.assertIn("conflicts with the stored", f.value.reason)
        stored = self.successResultOf(self.store.get_server_keys({"a.example": None}))
        self.assertEqual(
            stored["a.example"]["ed25519:a"].key_bytes("ed25519:a"), a.public("ed25519:a")
        )
        self.assertEqual(stored["a.example"]["ed25519:a"].source, "a.example")


class ValidityTests(KeyringTestCase):
    """Which key is valid when, and when keys are fetched again."""

    def test_old_key_window(self) -> None:
        """An old key verifies objects stamped before its expired_ts, not at or after."""
        expired_ts = NOW_TS - DAY_MS
        a = self.federation.add_origin("a.example", old_keys={"ed25519:old": expired_ts})
        keyring = self.keyring([self.direct()])
        self.assertIsNone(
            self.successResultOf(
                self.verify(keyring, a, valid_at_ts=expired_ts - 1, key_id="ed25519:old")
            )
        )
        f = self.failureResultOf(
            self.verify(keyring, a, valid_at_ts=expired_ts, key_id="ed25519:old"),
            SignatureVerifyError,
        )
        self.assertIn("ed25519:old", f.value.reason)

    def _store_first(self, origin: FakeOrigin, **kwargs: Any) -> Keyring:
        cap = kwargs.get("cap_key_validity_to_7_days", True)
        return self.keyring(
            [StoreKeyFetcher(self.store, cap_key_validity_to_7_days=cap), self.direct()],
            **kwargs,
        )

    def test_refetch_when_object_is_newer(self) -> None:
        """A cached key is used while valid; a newer object refetches it."""
        a = self.federation.add_origin("a.example", valid_until_ts=NOW_TS + DAY_MS)
        keyring = self._store_first(a)
        self.successResultOf(self.verify(keyring, a))
        self.successResultOf(self.verify(keyring, a, valid_at_ts=NOW_TS + DAY_MS))
        self.assertEqual(self.federation.count("GET"), 1)
        a.valid_until_ts = NOW_TS + 3 * DAY_MS
        self.successResultOf(self.verify(keyring, a, valid_at_ts=NOW_TS + 2 * DAY_MS))
        self.assertEqual(self.federation.count("GET"), 2)

    def test_refetch_asks_for_object_time(self) -> None:
        """The refetch asks notaries for minimum_valid_until_ts = the object's time."""
        a = self.federation.add_origin("a.example")
        keyring = self.keyring()
        self.successResultOf(self.verify(keyring, a, valid_at_ts=NOW_TS + 5))
        body = self.federation.requests[0][3]
        assert body is not None
        self.assertIn(b'"minimum_valid_until_ts":' + str(NOW_TS + 5).encode(), body)

    def test_still_expired_after_refetch(self) -> None:
        """An object newer than any validity the origin offers fails verification."""
        a = self.federation.add_origin("a.example", valid_until_ts=NOW_TS + DAY_MS)
        keyring = self._store_first(a)
        f = self.failureResultOf(
            self.verify(keyring, a, valid_at_ts=NOW_TS + 2 * DAY_MS), SignatureVerifyError
        )
        self.assertIn("valid until", f.value.reason)

    def test_seven_day_cap(self) -> None:
        """With the cap, a key fetched now is not trusted 8 days on: it is refetched."""
        a = self.federation.add_origin("a.example", valid_until_ts=NOW_TS + 30 * DAY_MS)
        keyring = self._store_first(a)
        self.successResultOf(self.verify(keyring, a))
        self.clock.advance(2 * 24 * 3600)
        self.successResultOf(self.verify(keyring, a, valid_at_ts=NOW_TS + 8 * DAY_MS))
        self.assertEqual(self.federation.count("GET"), 2)

    def test_old_rule_without_cap(self) -> None:
        """Without the cap, valid_until_ts alone decides: no refetch at 8 days."""
        a = self.federation.add_origin("a.example", valid_until_ts=NOW_TS + 30 * DAY_MS)
        keyring = self._store_first(a, cap_key_validity_to_7_days=False)
        self.successResultOf(self.verify(keyring, a))
        self.successResultOf(self.verify(keyring, a, valid_at_ts=NOW_TS + 8 * DAY_MS))
        self.assertEqual(self.federation.count("GET"), 1)

    def test_get_keys(self) -> None:
        """get_keys returns the keys valid long enough, by key id."""
        a = self.federation.add_origin("a.example", valid_until_ts=NOW_TS + DAY_MS)
        keyring = self.keyring([self.direct()])
        d = keyring.get_keys("a.example", ["ed25519:a", "ed25519:zz"], NOW_TS)
        self.clock.advance(0)
        keys = self.successResultOf(d)
        self.assertEqual(list(keys), ["ed25519:a"])
        self.assertEqual(keys["ed25519:a"].key, a.public("ed25519:a"))
        d = keyring.get_keys("a.example", ["ed25519:a"], NOW_TS + 2 * DAY_MS)
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d), {})


class VerifyTests(KeyringTestCase):
    """The outcomes of verify_json_for_server."""

    def test_no_signature(self) -> None:
        """An object without a signature of the server is a KeyLookupError, without fetching."""
        keyring = self.keyring()
        a = FakeOrigin("a.example")
        d = keyring.verify_json_for_server("a.example", FakeOrigin("b.example").sign(EVENT), NOW_TS)
        self.failureResultOf(d, KeyLookupError)
        d = keyring.verify_json_for_server(a.name, EVENT, NOW_TS)
        self.failureResultOf(d, KeyLookupError)
        self.clock.advance(0)
        self.assertEqual(self.federation.requests, [])

    def test_bad_signature(self) -> None:
        """A signature that does not verify with the found key is SignatureVerifyError."""
        a = self.federation.add_origin("a.example")
        keyring = self.keyring()
        signed = a.sign(EVENT)
        signed["content"] = {"body": "tampered"}
        d = keyring.verify_json_for_server(a.name, signed, NOW_TS)
        self.clock.advance(0)
        f = self.failureResultOf(d, SignatureVerifyError)
        self.assertIn("does not verify", f.value.reason)

    def test_unknown_key_id(self) -> None:
        """A key id the server does not have is a KeyLookupError."""
        self.federation.add_origin("a.example")
        impostor = FakeOrigin("a.example", key_ids=("ed25519:zz",))
        keyring = self.keyring()
        f = self.failureResultOf(self.verify(keyring, impostor), KeyLookupError)
        self.assertEqual(f.value.key_ids, frozenset({"ed25519:zz"}))

    def test_local_keys_never_fetched(self) -> None:
        """The local server's objects verify with its own keys, with no request."""
        me = FakeOrigin("me.example")
        keyring = self.keyring(
            local_server_name="me.example",
            local_verify_keys={me.key_id: me.public(me.key_id)},
        )
        self.assertIsNone(self.successResultOf(self.verify(keyring, me)))
        other = FakeOrigin("me.example", key_ids=("ed25519:b",))
        self.failureResultOf(self.verify(keyring, other), KeyLookupError)
        d = keyring.fetch_server_keys({"me.example": {}})
        self.clock.advance(0)
        self.assertIn("me.example", self.successResultOf(d).failures)
        self.assertEqual(self.federation.requests, [])

    def test_other_server_signature_ignored(self) -> None:
        """Signatures of other servers on the object neither help nor hurt."""
        a = self.federation.add_origin("a.example")
        b = FakeOrigin("b.example")
        keyring = self.keyring()
        d = keyring.verify_json_for_server(a.name, b.sign(a.sign(EVENT)), NOW_TS)
        self.clock.advance(0)
        self.assertIsNone(self.successResultOf(d))


class StoreTests(KeyringTestCase):
    """Writing to the store, and the batch entry point for the notary."""

    def test_store_written_with_source(self) -> None:
        """Keys found by a notary are stored with the notary as source."""
        a = self.federation.add_origin("a.example")
        keyring = self.keyring()
        self.successResultOf(self.verify(keyring, a))
        stored = self.successResultOf(self.store.get_server_keys({"a.example": None}))
        self.assertEqual(stored["a.example"]["ed25519:a"].source, "notary1.example")

    def test_store_conflict_not_used(self) -> None:
        """A key id the store binds to other bytes is not used."""
        a = self.federation.add_origin("a.example")
        squatter = FakeOrigin("a.example")
        squatter.signing_keys = {"ed25519:a": make_signing_key("squatter")}
        self.federation.origins["a.example"] = squatter
        self.successResultOf(self.verify(self.keyring([self.direct()]), squatter))
        self.federation.origins["a.example"] = a
        keyring = self.keyring([self.direct()])
        warnings = self.capture_warnings(keyring)
        f = self.failureResultOf(self.verify(keyring, a), KeyLookupError)
        self.assertIn("conflicts with the stored", f.value.reason)
        [warning] = warnings
        self.assertIn(encode_b64(a.public("ed25519:a")), warning)
        self.assertIn(encode_b64(squatter.public("ed25519:a")), warning)

    def test_store_outage_does_not_fail_lookups(self) -> None:
        """When the store fails, fetched keys are still used."""
        a = self.federation.add_origin("a.example")
        keyring = self.keyring()
        self.store.fail_with("database down")
        self.assertIsNone(self.successResultOf(self.verify(keyring, a)))
        self.assertEqual(len(self.flushLoggedErrors()), 1)

    def test_fetch_server_keys(self) -> None:
        """The batch entry point returns responses and failures, and fills the store."""
        self.federation.add_origin("a.example")
        keyring = self.keyring()
        d = keyring.fetch_server_keys({"a.example": {}, "gone.example": {"ed25519:x": 0}})
        self.clock.advance(0)
        result = self.successResultOf(d)
        self.assertEqual(list(result.responses), ["a.example"])
        self.assertEqual(list(result.failures), ["gone.example"])
        self.assertIn(
            "a.example", self.successResultOf(self.store.get_server_keys({"a.example": None}))
        )

    def test_fetch_server_keys_joins_verify(self) -> None:
        """A notary fetch and a verify call for the same key in one turn share one POST."""
        a = self.federation.add_origin("a.example")
        keyring = self.keyring()
        d1 = keyring.fetch_server_keys({"a.example": {"ed25519:a": 0}})
        d2 = keyring.verify_json_for_server(a.name, a.sign(EVENT), 0)
        self.clock.advance(0)
        self.assertEqual(list(self.successResultOf(d1).responses), ["a.example"])
        self.successResultOf(d2)
        self.assertEqual(self.federation.count("POST"), 1)


class SlowOriginTests(KeyringTestCase):
    """Each server of a batch is settled on its own, not when the whole batch is."""

    def setUp(self) -> None:
        super().setUp()
        self.fast = self.federation.add_origin("fast.example")
        self.slow = self.federation.add_origin("slow.example")
        self.slow_federation = SlowOrigins(self.federation, self.clock, {"slow.example"}, 30)
        self.batches: list[tuple[int, int]] = []

    def slow_direct(self) -> DirectKeyFetcher:
        """A direct fetcher to which ``slow.example`` answers after 30 s."""
        return DirectKeyFetcher(self.slow_federation, self.clock)

    def test_fast_origin_answered_while_slow_one_pending(self) -> None:
        """A fast origin's caller is answered while a slow origin of the same batch is still being fetched."""
        keyring = self.keyring(
            [self.slow_direct()], on_batch=lambda *counts: self.batches.append(counts)
        )
        slow_d = keyring.verify_json_for_server(self.slow.name, self.slow.sign(EVENT), NOW_TS)
        fast_d = keyring.verify_json_for_server(self.fast.name, self.fast.sign(EVENT), NOW_TS)
        self.clock.advance(0)
        self.assertEqual(self.batches, [(2, 2)])
        self.assertIsNone(self.successResultOf(fast_d))
        self.assertNoResult(slow_d)
        self.clock.advance(30)
        self.assertIsNone(self.successResultOf(slow_d))
        self.assertEqual(self.federation.count("GET", "slow.example"), 1)
        self.assertEqual(self.federation.count("GET", "fast.example"), 1)

    def test_slow_origin_fetched_once_while_pending(self) -> None:
        """A second caller for the slow origin while it is pending joins the fetch instead of repeating it."""
        keyring = self.keyring([self.slow_direct()])
        first = keyring.verify_json_for_server(self.slow.name, self.slow.sign(EVENT), NOW_TS)
        keyring.verify_json_for_server(self.fast.name, self.fast.sign(EVENT), NOW_TS)
        self.clock.advance(0)
        second = keyring.verify_json_for_server(self.slow.name, self.slow.sign(EVENT), NOW_TS)
        self.clock.advance(0)
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.clock.advance(30)
        self.assertIsNone(self.successResultOf(second))
        self.assertEqual(self.federation.count("GET", "slow.example"), 1)

    def test_caller_of_both_waits_for_both(self) -> None:
        """A fetch asking about the fast and the slow origin is answered once both are settled."""
        keyring = self.keyring([self.slow_direct()])
        d = keyring.fetch_server_keys({"fast.example": {}, "slow.example": {}})
        self.clock.advance(0)
        self.assertNoResult(d)
        self.clock.advance(30)
        self.assertEqual(
            sorted(self.successResultOf(d).responses), ["fast.example", "slow.example"]
        )

    def test_found_early_not_held_back_by_later_fetchers(self) -> None:
        """A server found in the store is answered while another of its batch is fetched from its origin."""
        self.successResultOf(self.verify(self.keyring([self.direct()]), self.fast))
        keyring = self.keyring([StoreKeyFetcher(self.store), self.slow_direct()])
        slow_d = keyring.verify_json_for_server(self.slow.name, self.slow.sign(EVENT), NOW_TS)
        fast_d = keyring.verify_json_for_server(self.fast.name, self.fast.sign(EVENT), NOW_TS)
        self.clock.advance(0)
        self.assertIsNone(self.successResultOf(fast_d))
        self.assertNoResult(slow_d)
        self.clock.advance(30)
        self.assertIsNone(self.successResultOf(slow_d))
        self.assertEqual(self.federation.count("GET", "fast.example"), 1)

    def test_notary_still_asked_once_before_direct(self) -> None:
        """Behind a failing notary, the batch costs one POST, then each origin's answer is used on arrival."""
        self.notary1.mode = "error"
        keyring = self.keyring([self.perspective("notary1.example"), self.slow_direct()])
        slow_d = keyring.verify_json_for_server(self.slow.name, self.slow.sign(EVENT), NOW_TS)
        fast_d = keyring.verify_json_for_server(self.fast.name, self.fast.sign(EVENT), NOW_TS)
        self.clock.advance(0)
        self.assertEqual(self.federation.count("POST", "notary1.example"), 1)
        self.assertIsNone(self.successResultOf(fast_d))
        self.assertNoResult(slow_d)
        self.clock.advance(30)
        self.assertIsNone(self.successResultOf(slow_d))
        self.assertEqual(self.federation.count("POST", "notary1.example"), 1)

    def test_per_server_fetcher_before_notary_regroups(self) -> None:
        """Servers an origin fetcher placed before a notary did not find go to the notary together, in one POST."""
        self.fast.body = self.slow.body = b"not json"
        keyring = self.keyring([self.direct(), self.perspective("notary1.example")])
        ds = [
            keyring.verify_json_for_server(o.name, o.sign(EVENT), NOW_TS)
            for o in (self.fast, self.slow)
        ]
        self.clock.advance(0)
        for d in ds:
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.federation.count("GET"), 2)
        self.assertEqual(self.federation.count("POST", "notary1.example"), 1)

    def test_slow_failure_reported_when_its_fetch_ends(self) -> None:
        """A slow server no fetcher finds fails with the reason once its own fetch ends, not before."""
        ghost = FakeOrigin("ghost.example")
        self.slow_federation.slow.add(ghost.name)
        keyring = self.keyring([self.slow_direct()])
        ghost_d = keyring.verify_json_for_server(ghost.name, ghost.sign(EVENT), NOW_TS)
        fast_d = keyring.verify_json_for_server(self.fast.name, self.fast.sign(EVENT), NOW_TS)
        self.clock.advance(0)
        self.assertIsNone(self.successResultOf(fast_d))
        self.assertNoResult(ghost_d)
        self.clock.advance(30)
        f = self.failureResultOf(ghost_d, KeyLookupError)
        self.assertIn("connection refused", f.value.reason)
