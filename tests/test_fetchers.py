"""
Tests for :mod:`synkeys.fetchers`, and the fake federation (origins and
notaries answering with really signed JSON) that ``tests.test_keyring``
uses too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from synkeys.errors import ConfigError, FetchError
from synkeys.fetchers import (
    QUERY_PATH,
    SERVER_KEYS_PATH,
    DirectKeyFetcher,
    PerspectivesKeyFetcher,
    StoreKeyFetcher,
    perspectives_from_config,
)
from synkeys.interfaces import (
    FederationResponse,
    FetchResult,
    IFederationClient,
    IKeyFetcher,
)
from synkeys.signing import canonical_json, encode_b64, sign_json
from synkeys.storage.memory import MemoryKeyStore
from tests.helpers import FAR_FUTURE_TS, make_server_keys, make_signing_key

#: The fake clock's start: 2023-11-14, in seconds.
NOW_S = 1_700_000_000
NOW_TS = NOW_S * 1000
DAY_MS = 24 * 3600 * 1000


class FakeOrigin:
    """
    A Matrix server with real ed25519 keys that serves its own
    ``/_matrix/key/v2/server`` body.

    :ivar code: Status to answer ``/server`` with (404 triggers the
        per-key-id fallback, which is answered normally).
    :ivar body: Raw bytes to answer with instead of the signed object.
    """

    def __init__(
        self,
        name: str,
        key_ids: tuple[str, ...] = ("ed25519:a",),
        valid_until_ts: int = FAR_FUTURE_TS,
        old_keys: Mapping[str, int] | None = None,
    ) -> None:
        self.name = name
        self.signing_keys = {k: make_signing_key(f"{name}/{k}") for k in key_ids}
        self.old_keys = {
            k: (make_signing_key(f"{name}/{k}"), ts) for k, ts in (old_keys or {}).items()
        }
        self.valid_until_ts = valid_until_ts
        self.code = 200
        self.body: bytes | None = None

    @property
    def key_id(self) -> str:
        """The first current key id."""
        return sorted(self.signing_keys)[0]

    def public(self, key_id: str) -> bytes:
        """The 32 public bytes of ``key_id`` (current or old)."""
        key = self.signing_keys.get(key_id) or self.old_keys[key_id][0]
        return bytes(key.verify_key)

    def keys_json(self) -> dict[str, Any]:
        """The signed ``/_matrix/key/v2/server`` object."""
        obj: dict[str, Any] = {
            "server_name": self.name,
            "valid_until_ts": self.valid_until_ts,
            "verify_keys": {
                k: {"key": encode_b64(bytes(v.verify_key))} for k, v in self.signing_keys.items()
            },
            "old_verify_keys": {
                k: {"key": encode_b64(bytes(v.verify_key)), "expired_ts": ts}
                for k, (v, ts) in self.old_keys.items()
            },
        }
        for key_id, key in sorted(self.signing_keys.items()):
            obj = sign_json(obj, self.name, key_id, key)
        return obj

    def sign(self, obj: Mapping[str, Any], key_id: str | None = None) -> dict[str, Any]:
        """``obj`` signed by this server with ``key_id`` (default: first current)."""
        key_id = key_id or self.key_id
        key = self.signing_keys.get(key_id) or self.old_keys[key_id][0]
        return sign_json(obj, self.name, key_id, key)


class FakeNotary:
    """
    A notary relaying the origins of a :class:`FakeFederation`, honestly or
    in one of several lying ways chosen by :attr:`mode`.

    Modes: ``honest``; ``bad_notary_signature`` (garbage under its key id);
    ``wrong_key`` (signs with a key it was not configured with);
    ``bad_origin_signature`` (alters the origin's object after signing);
    ``unasked`` (adds a validly signed object of a server not asked for and
    drops the real ones); ``forged`` (replaces the origin's key with one of
    its own, self-signed and countersigned); ``error`` (HTTP 500);
    ``down`` (connection fails).
    """

    def __init__(self, name: str, federation: FakeFederation) -> None:
        self.name = name
        self.federation = federation
        self.key_id = "ed25519:n"
        self.signing_key = make_signing_key(f"notary/{name}")
        self.mode = "honest"

    @property
    def verify_keys(self) -> dict[str, bytes]:
        """What a ``trusted_key_servers`` entry would configure for it."""
        return {self.key_id: bytes(self.signing_key.verify_key)}

    def _element(self, origin: FakeOrigin) -> dict[str, Any]:
        obj = origin.keys_json()
        if self.mode == "bad_origin_signature":
            obj["valid_until_ts"] = obj["valid_until_ts"] + 1
        if self.mode == "forged":
            forger = make_signing_key(f"forger/{self.name}/{origin.name}")
            obj = {
                "server_name": origin.name,
                "valid_until_ts": origin.valid_until_ts,
                "verify_keys": {origin.key_id: {"key": encode_b64(bytes(forger.verify_key))}},
                "old_verify_keys": {},
            }
            obj = sign_json(obj, origin.name, origin.key_id, forger)
        if self.mode == "wrong_key":
            return sign_json(obj, self.name, "ed25519:other", make_signing_key("other"))
        signed = sign_json(obj, self.name, self.key_id, self.signing_key)
        if self.mode == "bad_notary_signature":
            signed["signatures"][self.name][self.key_id] = encode_b64(b"\x01" * 64)
        return signed

    def answer(self, body: bytes) -> FederationResponse:
        """Answer a ``POST /_matrix/key/v2/query`` body."""
        if self.mode == "down":
            raise FetchError(self.name, "connection refused", "connect")
        if self.mode == "error":
            return FederationResponse(500, b'{"errcode":"M_UNKNOWN"}')
        asked = json.loads(body)["server_keys"]
        elements = [
            self._element(self.federation.origins[server])
            for server in asked
            if server in self.federation.origins
        ]
        if self.mode == "unasked":
            stranger = FakeOrigin("stranger.example")
            elements = [sign_json(stranger.keys_json(), self.name, self.key_id, self.signing_key)]
        return FederationResponse(200, canonical_json({"server_keys": elements}))


@implementer(IFederationClient)
class FakeFederation:
    """
    An :class:`IFederationClient` routing requests to fake origins and
    notaries, recording every request.

    :ivar requests: ``(method, server_name, path, body)`` of every request.
    :ivar held: While not ``None``, answers wait here until :meth:`release`.
    """

    def __init__(self) -> None:
        self.origins: dict[str, FakeOrigin] = {}
        self.notaries: dict[str, FakeNotary] = {}
        self.requests: list[tuple[str, str, bytes, bytes | None]] = []
        self.held: list[tuple[Deferred[FederationResponse], Callable[[], Any]]] | None = None

    def add_origin(self, name: str, **kwargs: Any) -> FakeOrigin:
        """Create and serve an origin."""
        origin = self.origins[name] = FakeOrigin(name, **kwargs)
        return origin

    def add_notary(self, name: str) -> FakeNotary:
        """Create and serve a notary."""
        notary = self.notaries[name] = FakeNotary(name, self)
        return notary

    def hold(self) -> None:
        """Keep answers back until :meth:`release`."""
        self.held = []

    def release(self) -> None:
        """Answer every held request, and stop holding."""
        held, self.held = self.held or [], None
        for d, thunk in held:
            try:
                d.callback(thunk())
            except FetchError as e:
                d.errback(e)

    def _answer(self, thunk: Callable[[], FederationResponse]) -> Deferred[FederationResponse]:
        if self.held is not None:
            d: Deferred[FederationResponse] = Deferred()
            self.held.append((d, thunk))
            return d
        try:
            return succeed(thunk())
        except FetchError as e:
            return fail(e)

    def get(self, server_name: str, path: bytes) -> Deferred[FederationResponse]:
        """Serve ``/_matrix/key/v2/server`` (and the keyId form) of an origin."""
        self.requests.append(("GET", server_name, path, None))
        return self._answer(lambda: self._get(server_name, path))

    def _get(self, server_name: str, path: bytes) -> FederationResponse:
        origin = self.origins.get(server_name)
        if origin is None:
            raise FetchError(server_name, "connection refused", "connect")
        if path == SERVER_KEYS_PATH and origin.code != 200:
            return FederationResponse(origin.code, b'{"errcode":"M_UNRECOGNIZED"}')
        if origin.body is not None:
            return FederationResponse(200, origin.body)
        return FederationResponse(200, canonical_json(origin.keys_json()))

    def post_json(self, server_name: str, path: bytes, body: bytes) -> Deferred[FederationResponse]:
        """Let a notary answer a query."""
        self.requests.append(("POST", server_name, path, body))
        assert path == QUERY_PATH, path
        return self._answer(lambda: self.notaries[server_name].answer(body))

    def count(self, method: str, server_name: str | None = None) -> int:
        """How many ``method`` requests went (to ``server_name``)."""
        return sum(
            1
            for m, s, _p, _b in self.requests
            if m == method and (server_name is None or s == server_name)
        )


def make_clock() -> Clock:
    """A fake clock at :data:`NOW_S`."""
    clock = Clock()
    clock.advance(NOW_S)
    return clock


class DirectKeyFetcherTests(SynchronousTestCase):
    """Tests for :class:`DirectKeyFetcher`."""

    def setUp(self) -> None:
        self.clock = make_clock()
        self.federation = FakeFederation()
        self.fetcher = DirectKeyFetcher(self.federation, self.clock)

    def fetch(self, requests: Mapping[str, Mapping[str, int]]) -> FetchResult:
        return self.successResultOf(self.fetcher.fetch_server_keys(requests))

    def test_interface(self) -> None:
        """The fetcher provides IKeyFetcher and is named direct."""
        self.assertTrue(verifyObject(IKeyFetcher, self.fetcher))
        self.assertEqual(self.fetcher.name, "direct")

    def test_fetches_from_origin(self) -> None:
        """A 200 answer is checked and returned with its fetch time and source."""
        origin = self.federation.add_origin("a.example")
        result = self.fetch({"a.example": {"ed25519:a": 0}})
        [keys] = result.responses["a.example"]
        self.assertEqual(keys.verify_keys, {"ed25519:a": origin.public("ed25519:a")})
        self.assertEqual(keys.fetched_ts, NOW_TS)
        self.assertEqual(keys.source, "a.example")
        self.assertEqual(result.failures, {})
        self.assertEqual(self.federation.requests, [("GET", "a.example", SERVER_KEYS_PATH, None)])

    def test_many_origins_at_once(self) -> None:
        """Every origin is asked before any has answered."""
        for name in ("a.example", "b.example", "c.example"):
            self.federation.add_origin(name)
        self.federation.hold()
        d = self.fetcher.fetch_server_keys({n: {} for n in self.federation.origins})
        self.assertEqual(self.federation.count("GET"), 3)
        self.assertNoResult(d)
        self.federation.release()
        self.assertEqual(len(self.successResultOf(d).responses), 3)

    def test_404_falls_back_to_key_id_path(self) -> None:
        """An origin answering 404 is asked per key id, with the key id quoted."""
        origin = self.federation.add_origin("old.example", key_ids=("ed25519:a", "ed25519:b"))
        origin.code = 404
        result = self.fetch({"old.example": {"ed25519:a": 0, "ed25519:b": 0}})
        paths = [p for _m, _s, p, _b in self.federation.requests]
        self.assertEqual(
            paths,
            [
                SERVER_KEYS_PATH,
                SERVER_KEYS_PATH + b"/ed25519%3Aa",
                SERVER_KEYS_PATH + b"/ed25519%3Ab",
            ],
        )
        # Both paths serve the same object: returned once.
        self.assertEqual(len(result.responses["old.example"]), 1)
        self.assertEqual(result.failures, {})

    def test_404_without_key_ids_fails(self) -> None:
        """A 404 for an all-keys request is a failure, with no further requests."""
        self.federation.add_origin("old.example").code = 404
        result = self.fetch({"old.example": {}})
        self.assertEqual(result.responses, {})
        self.assertIn("404", result.failures["old.example"])
        self.assertEqual(self.federation.count("GET"), 1)

    def test_non_200_is_failure(self) -> None:
        """A 500 answer is a failure naming the status, without fallback."""
        self.federation.add_origin("a.example").code = 500
        result = self.fetch({"a.example": {"ed25519:a": 0}})
        self.assertEqual(result.responses, {})
        self.assertIn("HTTP 500", result.failures["a.example"])
        self.assertEqual(self.federation.count("GET"), 1)

    def test_invalid_body_is_failure(self) -> None:
        """A body that fails the checks is a failure carrying the reason."""
        self.federation.add_origin("a.example").body = b'{"server_name": "a.example", "x": 1.5}'
        result = self.fetch({"a.example": {}})
        self.assertEqual(result.responses, {})
        self.assertIn("invalid", result.failures["a.example"])

    def test_other_servers_keys_are_failure(self) -> None:
        """A body naming another server is refused."""
        other = FakeOrigin("evil.example")
        self.federation.add_origin("a.example").body = canonical_json(other.keys_json())
        result = self.fetch({"a.example": {}})
        self.assertEqual(result.responses, {})
        self.assertIn("a.example", result.failures)

    def test_fetch_error_is_failure(self) -> None:
        """An unreachable origin is a failure with the FetchError's reason."""
        result = self.fetch({"gone.example": {}})
        self.assertEqual(result.failures, {"gone.example": "connection refused"})

    def test_peer_certificate_checked(self) -> None:
        """The peer certificate hash is passed on, so unlisted certificates fail."""
        origin = self.federation.add_origin("a.example")
        listed = {"tls_fingerprints": [{"sha256": encode_b64(b"\x00" * 32)}]}
        origin.body = canonical_json(origin.sign(dict(origin.keys_json(), **listed)))
        get = self.federation.get

        def with_certificate(server_name: str, path: bytes) -> Deferred[FederationResponse]:
            return get(server_name, path).addCallback(
                lambda r: FederationResponse(r.code, r.body, hashlib.sha256(b"x").digest())
            )

        self.federation.get = with_certificate  # type: ignore[method-assign]
        result = self.fetch({"a.example": {}})
        self.assertIn("tls_fingerprints", result.failures["a.example"])


class PerspectivesKeyFetcherTests(SynchronousTestCase):
    """Tests for :class:`PerspectivesKeyFetcher`."""

    def setUp(self) -> None:
        self.clock = make_clock()
        self.federation = FakeFederation()
        self.notary = self.federation.add_notary("notary.example")
        self.fetcher = PerspectivesKeyFetcher(
            self.federation, self.clock, "notary.example", self.notary.verify_keys
        )
        self.federation.add_origin("a.example")
        self.federation.add_origin("b.example")

    def fetch(self, requests: Mapping[str, Mapping[str, int]]) -> FetchResult:
        return self.successResultOf(self.fetcher.fetch_server_keys(requests))

    def test_one_post_for_all_servers(self) -> None:
        """Every server goes into one POST in today's body form."""
        result = self.fetch({"a.example": {"ed25519:a": 5}, "b.example": {}})
        self.assertEqual(self.federation.count("POST", "notary.example"), 1)
        [(_m, _s, path, body)] = self.federation.requests
        self.assertEqual(path, QUERY_PATH)
        assert body is not None
        self.assertEqual(
            json.loads(body),
            {
                "server_keys": {
                    "a.example": {"ed25519:a": {"minimum_valid_until_ts": 5}},
                    "b.example": {},
                }
            },
        )
        self.assertEqual(sorted(result.responses), ["a.example", "b.example"])
        self.assertEqual(result.responses["a.example"][0].source, "notary.example")
        self.assertEqual(result.responses["a.example"][0].fetched_ts, NOW_TS)
        self.assertEqual(result.failures, {})

    def test_chunks_above_bound(self) -> None:
        """More pairs than the bound are split over several POSTs."""
        fetcher = PerspectivesKeyFetcher(
            self.federation,
            self.clock,
            "notary.example",
            self.notary.verify_keys,
            max_pairs_per_query=2,
        )
        self.federation.add_origin("c.example")
        requests = {"a.example": {"ed25519:a": 0}, "b.example": {}, "c.example": {}}
        result = self.successResultOf(fetcher.fetch_server_keys(requests))
        self.assertEqual(self.federation.count("POST"), 2)
        self.assertEqual(len(result.responses), 3)

    def test_liars_yield_failures(self) -> None:
        """Each way of lying yields a failure and no keys."""
        for mode in ("bad_notary_signature", "wrong_key", "bad_origin_signature"):
            self.notary.mode = mode
            result = self.fetch({"a.example": {}})
            self.assertEqual(result.responses, {}, mode)
            self.assertIn("a.example", result.failures, mode)

    def test_bad_notary_signature_reason(self) -> None:
        """A bad countersignature is reported as such."""
        self.notary.mode = "bad_notary_signature"
        result = self.fetch({"a.example": {}})
        self.assertIn("notary.example", result.failures["a.example"])

    def test_unasked_server_ignored(self) -> None:
        """An object of a server that was not asked for is dropped."""
        self.notary.mode = "unasked"
        result = self.fetch({"a.example": {}})
        self.assertEqual(result.responses, {})
        self.assertIn("no keys", result.failures["a.example"])

    def test_missing_server_is_failure(self) -> None:
        """A server the notary leaves out is a failure."""
        result = self.fetch({"a.example": {}, "unknown.example": {}})
        self.assertIn("a.example", result.responses)
        self.assertIn("unknown.example", result.failures)

    def test_error_status_fails_all(self) -> None:
        """A non-200 answer fails every server of the query."""
        self.notary.mode = "error"
        result = self.fetch({"a.example": {}, "b.example": {}})
        self.assertEqual(result.responses, {})
        self.assertEqual(sorted(result.failures), ["a.example", "b.example"])
        self.assertIn("HTTP 500", result.failures["a.example"])

    def test_down_fails_all(self) -> None:
        """An unreachable notary fails every server with the reason."""
        self.notary.mode = "down"
        result = self.fetch({"a.example": {}})
        self.assertEqual(result.failures, {"a.example": "connection refused"})

    def test_malformed_bodies(self) -> None:
        """Non-strict JSON and a non-list server_keys fail every server."""
        for body in (
            b'{"server_keys": [], "server_keys": []}',
            b'{"server_keys": {}}',
            b"[]",
        ):
            self.notary.answer = lambda _b, body=body: FederationResponse(200, body)  # type: ignore[method-assign]
            result = self.fetch({"a.example": {}})
            self.assertEqual(result.responses, {}, body)
            self.assertIn("a.example", result.failures, body)

    def test_needs_verify_keys(self) -> None:
        """A notary without verify keys is a configuration error."""
        self.assertRaises(
            ConfigError, PerspectivesKeyFetcher, self.federation, self.clock, "n.example", {}
        )


class PerspectivesFromConfigTests(SynchronousTestCase):
    """Tests for :func:`perspectives_from_config`."""

    key = encode_b64(bytes(make_signing_key("cfg").verify_key))

    def test_parses(self) -> None:
        """A Synapse-shaped list parses into names and raw keys."""
        [trusted] = perspectives_from_config(
            [{"server_name": "matrix.org", "verify_keys": {"ed25519:auto": self.key}}]
        )
        self.assertEqual(trusted.server_name, "matrix.org")
        self.assertEqual(
            trusted.verify_keys, {"ed25519:auto": bytes(make_signing_key("cfg").verify_key)}
        )

    def test_bad_entries(self) -> None:
        """Each malformed entry raises ConfigError naming what is wrong."""
        good = {"server_name": "matrix.org", "verify_keys": {"ed25519:auto": self.key}}
        cases = [
            ({"server_name": "m.org"}, "list"),
            (["matrix.org"], "mapping"),
            ([{"verify_keys": good["verify_keys"]}], "server_name"),
            ([{"server_name": "a b", "verify_keys": good["verify_keys"]}], "server_name"),
            ([{"server_name": "matrix.org"}], "verify_keys"),
            ([{"server_name": "matrix.org", "verify_keys": {}}], "verify_keys"),
            ([{"server_name": "matrix.org", "verify_keys": {"rsa:x": self.key}}], "key id"),
            ([{"server_name": "matrix.org", "verify_keys": {"ed25519:x": "!!"}}], "ed25519:x"),
            ([good, good], "twice"),
            ([dict(good, extra=1)], "unknown"),
        ]
        for config, words in cases:
            e = self.assertRaises(ConfigError, perspectives_from_config, config)
            self.assertIn(words, str(e), config)


class StoreKeyFetcherTests(SynchronousTestCase):
    """Tests for :class:`StoreKeyFetcher`."""

    def setUp(self) -> None:
        self.store = MemoryKeyStore()
        self.fetcher = StoreKeyFetcher(self.store)
        self.keys = make_server_keys(
            "a.example",
            {"ed25519:a": make_signing_key("a")},
            old_keys={"ed25519:old": (make_signing_key("old"), 500)},
            valid_until_ts=NOW_TS + DAY_MS,
            fetched_ts=NOW_TS,
        )
        self.successResultOf(self.store.store_server_keys(self.keys))

    def fetch(self, requests: Mapping[str, Mapping[str, int]]) -> FetchResult:
        return self.successResultOf(self.fetcher.fetch_server_keys(requests))

    def test_valid_enough(self) -> None:
        """A stored key valid long enough is returned."""
        result = self.fetch({"a.example": {"ed25519:a": NOW_TS + DAY_MS}})
        self.assertEqual(result.responses, {"a.example": [self.keys]})

    def test_too_short_lived(self) -> None:
        """A stored key expiring before the minimum is not returned."""
        result = self.fetch({"a.example": {"ed25519:a": NOW_TS + DAY_MS + 1}})
        self.assertEqual(result.responses, {})

    def test_old_key_returned_as_is(self) -> None:
        """An old key is returned whatever the minimum."""
        result = self.fetch({"a.example": {"ed25519:old": NOW_TS * 2}})
        self.assertEqual(result.responses, {"a.example": [self.keys]})

    def test_all_keys_and_unknown(self) -> None:
        """An all-keys request finds the server; an unknown server finds nothing."""
        result = self.fetch({"a.example": {}, "b.example": {}})
        self.assertEqual(result.responses, {"a.example": [self.keys]})
