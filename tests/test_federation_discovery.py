"""Tests for :mod:`synkeys.federation.discovery` (server name resolution)."""

from __future__ import annotations

import json
from typing import Dict, List, Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns, error
from twisted.trial.unittest import SynchronousTestCase

from synkeys.errors import FetchError
from synkeys.federation.discovery import (
    WELL_KNOWN_DEFAULT_TTL_S,
    WELL_KNOWN_MAX_TTL_S,
    WELL_KNOWN_MIN_TTL_S,
    ResolvedServer,
    ServerDiscovery,
    cache_ttl_s,
    make_srv_lookup,
    parse_well_known,
)
from synkeys.federation.testing import StaticSrvLookup
from synkeys.interfaces import FederationResponse

WK = b"https://example.com/.well-known/matrix/server"


def _json(value: object, **headers: str) -> FederationResponse:
    return FederationResponse(
        200,
        json.dumps(value).encode(),
        None,
        {k.replace("_", "-").encode(): [v.encode()] for k, v in headers.items()},
    )


class FakeWellKnown:
    """Answers well-known URLs from a dict; counts requests per URL."""

    def __init__(self) -> None:
        self.answers: Dict[bytes, object] = {}
        self.requests: List[bytes] = []
        self.pending: Optional[Deferred] = None

    def __call__(self, url: bytes) -> Deferred:
        self.requests.append(url)
        answer = self.answers.get(url)
        if answer == "pending":
            self.pending = Deferred()
            return self.pending
        if answer is None:
            return fail(FetchError("example.com", "connection refused", "connect"))
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)


class DiscoveryTests(SynchronousTestCase):
    """The spec's steps, in order."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.well_known = FakeWellKnown()
        self.srv = StaticSrvLookup()
        self.discovery = ServerDiscovery(self.clock, self.well_known, self.srv)

    def resolve(self, name: str) -> ResolvedServer:
        return self.successResultOf(self.discovery.resolve(name))

    def test_ipv4_literal(self) -> None:
        """An IPv4 literal is used as is, on 8448, with the certificate for the IP."""
        self.assertEqual(
            self.resolve("1.2.3.4"), ResolvedServer("1.2.3.4", 8448, "1.2.3.4", "1.2.3.4")
        )
        self.assertEqual(self.well_known.requests, [])
        self.assertEqual(self.srv.lookups, [])

    def test_ipv6_literal_with_port(self) -> None:
        """An IPv6 literal with a port keeps the brackets only in the Host header."""
        self.assertEqual(
            self.resolve("[2001:db8::1]:8000"),
            ResolvedServer("2001:db8::1", 8000, "2001:db8::1", "[2001:db8::1]:8000"),
        )

    def test_explicit_port(self) -> None:
        """A name with a port is used directly, without well-known or SRV."""
        self.assertEqual(
            self.resolve("example.com:8000"),
            ResolvedServer("example.com", 8000, "example.com", "example.com:8000"),
        )
        self.assertEqual(self.well_known.requests, [])
        self.assertEqual(self.srv.lookups, [])

    def test_delegation_to_name(self) -> None:
        """Delegation to a bare name uses its SRV record, certificate and Host for that name."""
        self.well_known.answers[WK] = _json({"m.server": "matrix.example.net"})
        self.srv.records["_matrix-fed._tcp.matrix.example.net"] = [("srv.example.net", 9000)]
        self.assertEqual(
            self.resolve("example.com"),
            ResolvedServer("srv.example.net", 9000, "matrix.example.net", "matrix.example.net"),
        )
        self.assertEqual(self.well_known.requests, [WK])

    def test_delegation_to_name_without_srv(self) -> None:
        """Delegation to a name with no SRV records goes to that name on 8448."""
        self.well_known.answers[WK] = _json({"m.server": "matrix.example.net"})
        self.assertEqual(
            self.resolve("example.com"),
            ResolvedServer("matrix.example.net", 8448, "matrix.example.net", "matrix.example.net"),
        )
        self.assertEqual(
            self.srv.lookups,
            ["_matrix-fed._tcp.matrix.example.net", "_matrix._tcp.matrix.example.net"],
        )

    def test_delegation_to_name_and_port(self) -> None:
        """Delegation to name:port uses that port without SRV; Host carries the port."""
        self.well_known.answers[WK] = _json({"m.server": "matrix.example.net:443"})
        self.assertEqual(
            self.resolve("example.com"),
            ResolvedServer(
                "matrix.example.net", 443, "matrix.example.net", "matrix.example.net:443"
            ),
        )
        self.assertEqual(self.srv.lookups, [])

    def test_delegation_to_ip(self) -> None:
        """Delegation to an IP literal connects to it with the certificate for the IP."""
        self.well_known.answers[WK] = _json({"m.server": "203.0.113.5"})
        self.assertEqual(
            self.resolve("example.com"),
            ResolvedServer("203.0.113.5", 8448, "203.0.113.5", "203.0.113.5"),
        )

    def test_no_well_known_srv_fed(self) -> None:
        """Without well-known, _matrix-fed._tcp is used with the certificate for the server name."""
        self.srv.records["_matrix-fed._tcp.example.com"] = [("fed.example.com", 8443)]
        self.srv.records["_matrix._tcp.example.com"] = [("old.example.com", 8444)]
        self.assertEqual(
            self.resolve("example.com"),
            ResolvedServer("fed.example.com", 8443, "example.com", "example.com"),
        )

    def test_no_well_known_legacy_srv(self) -> None:
        """Without well-known or _matrix-fed._tcp, the legacy _matrix._tcp record is used."""
        self.srv.records["_matrix._tcp.example.com"] = [("old.example.com.", 8444)]
        self.assertEqual(
            self.resolve("example.com"),
            ResolvedServer("old.example.com", 8444, "example.com", "example.com"),
        )
        self.assertEqual(
            self.srv.lookups, ["_matrix-fed._tcp.example.com", "_matrix._tcp.example.com"]
        )

    def test_no_well_known_no_srv(self) -> None:
        """With nothing published, the name itself on 8448 is used."""
        self.assertEqual(
            self.resolve("example.com"),
            ResolvedServer("example.com", 8448, "example.com", "example.com"),
        )

    def test_srv_dot_target_ignored(self) -> None:
        """An SRV target of "." (service not offered) counts as no record."""
        self.srv.records["_matrix-fed._tcp.example.com"] = [(".", 0)]
        self.assertEqual(self.resolve("example.com").port, 8448)

    def test_srv_failure_falls_through(self) -> None:
        """A failing SRV lookup is treated as no records."""

        def broken(name: str) -> Deferred:
            return fail(OSError("SERVFAIL"))

        discovery = ServerDiscovery(self.clock, self.well_known, broken)
        self.assertEqual(
            self.successResultOf(discovery.resolve("example.com")),
            ResolvedServer("example.com", 8448, "example.com", "example.com"),
        )

    def test_malformed_well_known(self) -> None:
        """Bad JSON, a non-object, a missing or invalid m.server all fall back to SRV."""
        for body in (
            b"{not json",
            b"[]",
            b"{}",
            b'{"m.server": 5}',
            b'{"m.server": "a b"}',
            b'{"m.server": "x:99999"}',
        ):
            self.well_known.answers[WK] = FederationResponse(200, body)
            discovery = ServerDiscovery(self.clock, self.well_known, self.srv)
            result = self.successResultOf(discovery.resolve("example.com"))
            self.assertEqual(result.host, "example.com", body)

    def test_well_known_non_200(self) -> None:
        """A 404 well-known means no delegation."""
        self.well_known.answers[WK] = FederationResponse(404, b'{"m.server": "x.example"}')
        self.assertEqual(self.resolve("example.com").host, "example.com")

    def test_invalid_server_name(self) -> None:
        """An invalid server name fails with FetchError kind "dns"."""
        failure = self.failureResultOf(self.discovery.resolve("a/b"), FetchError)
        self.assertEqual(failure.value.kind, "dns")


class WellKnownCacheTests(SynchronousTestCase):
    """Caching of well-known answers and failures."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.well_known = FakeWellKnown()
        self.discovery = ServerDiscovery(self.clock, self.well_known, StaticSrvLookup())

    def lookup(self) -> Optional[str]:
        return self.successResultOf(self.discovery.well_known("example.com"))

    def test_cached_per_max_age(self) -> None:
        """An answer is reused until its max-age passes, then fetched again."""
        self.well_known.answers[WK] = _json({"m.server": "a.example"}, cache_control="max-age=3600")
        self.assertEqual(self.lookup(), "a.example")
        self.well_known.answers[WK] = _json({"m.server": "b.example"})
        self.clock.advance(3599)
        self.assertEqual(self.lookup(), "a.example")
        self.assertEqual(len(self.well_known.requests), 1)
        self.clock.advance(2)
        self.assertEqual(self.lookup(), "b.example")
        self.assertEqual(len(self.well_known.requests), 2)

    def test_default_ttl(self) -> None:
        """Without caching headers an answer is kept for 24 hours."""
        self.well_known.answers[WK] = _json({"m.server": "a.example"})
        self.lookup()
        self.clock.advance(WELL_KNOWN_DEFAULT_TTL_S - 1)
        self.lookup()
        self.assertEqual(len(self.well_known.requests), 1)
        self.clock.advance(2)
        self.lookup()
        self.assertEqual(len(self.well_known.requests), 2)

    def test_failure_backoff(self) -> None:
        """Failures are cached 5 minutes, then twice as long per repeat, up to an hour."""
        self.assertIsNone(self.lookup())
        expected_ttls = [300, 600, 1200, 2400, 3600, 3600]
        for i, ttl in enumerate(expected_ttls, start=1):
            self.assertEqual(len(self.well_known.requests), i)
            self.clock.advance(ttl - 1)
            self.assertIsNone(self.lookup())
            self.assertEqual(len(self.well_known.requests), i, f"refetched early at {i}")
            self.clock.advance(1)
            self.assertIsNone(self.lookup())

    def test_success_resets_backoff(self) -> None:
        """After a success, the next failure is cached for the initial 5 minutes again."""
        self.lookup()
        self.clock.advance(300)
        self.lookup()  # second failure: 600 s
        self.well_known.answers[WK] = _json({"m.server": "a.example"}, cache_control="max-age=600")
        self.clock.advance(600)
        self.assertEqual(self.lookup(), "a.example")
        del self.well_known.answers[WK]
        self.clock.advance(600)
        self.assertIsNone(self.lookup())
        count = len(self.well_known.requests)
        self.clock.advance(300)
        self.lookup()
        self.assertEqual(len(self.well_known.requests), count + 1)

    def test_redirect_followed(self) -> None:
        """A redirect to another https URL is followed."""
        other = b"https://www.example.com/.well-known/matrix/server"
        self.well_known.answers[WK] = FederationResponse(301, b"", None, {b"location": [other]})
        self.well_known.answers[other] = _json({"m.server": "a.example"})
        self.assertEqual(self.lookup(), "a.example")
        self.assertEqual(self.well_known.requests, [WK, other])

    def test_relative_redirect(self) -> None:
        """A relative Location is resolved against the URL that answered."""
        self.well_known.answers[WK] = FederationResponse(
            302, b"", None, {b"location": [b"/mx.json"]}
        )
        self.well_known.answers[b"https://example.com/mx.json"] = _json({"m.server": "a.example"})
        self.assertEqual(self.lookup(), "a.example")

    def test_redirect_loop_bounded(self) -> None:
        """A redirect loop stops after a few hops and counts as a failure."""
        self.well_known.answers[WK] = FederationResponse(302, b"", None, {b"location": [WK]})
        self.assertIsNone(self.lookup())
        self.assertEqual(len(self.well_known.requests), 4)

    def test_redirect_to_http_refused(self) -> None:
        """A redirect to plain http is not followed."""
        self.well_known.answers[WK] = FederationResponse(
            302, b"", None, {b"location": [b"http://example.com/x"]}
        )
        self.assertIsNone(self.lookup())
        self.assertEqual(self.well_known.requests, [WK])

    def test_concurrent_lookups_share_fetch(self) -> None:
        """Concurrent lookups of one name make one request, and cancelling one leaves the other."""
        self.well_known.answers[WK] = "pending"
        first = self.discovery.well_known("example.com")
        second = self.discovery.well_known("example.com")
        self.assertEqual(len(self.well_known.requests), 1)
        first.cancel()
        self.failureResultOf(first)
        self.well_known.pending.callback(_json({"m.server": "a.example"}))
        self.assertEqual(self.successResultOf(second), "a.example")


class CacheTTLTests(SynchronousTestCase):
    """The header rules of :func:`cache_ttl_s`."""

    def test_max_age(self) -> None:
        """max-age gives the lifetime."""
        self.assertEqual(cache_ttl_s({b"cache-control": [b"public, max-age=7200"]}, 0), 7200)

    def test_clamped(self) -> None:
        """Lifetimes are clamped to [5 minutes, 48 hours]."""
        self.assertEqual(cache_ttl_s({b"cache-control": [b"max-age=0"]}, 0), WELL_KNOWN_MIN_TTL_S)
        self.assertEqual(
            cache_ttl_s({b"cache-control": [b"max-age=999999999"]}, 0), WELL_KNOWN_MAX_TTL_S
        )

    def test_no_store(self) -> None:
        """no-store gives the minimum lifetime."""
        self.assertEqual(cache_ttl_s({b"cache-control": [b"no-store"]}, 0), WELL_KNOWN_MIN_TTL_S)

    def test_expires(self) -> None:
        """Expires is used when there is no max-age; max-age wins when both are present."""
        now_s = 1_700_000_000.0
        expires = b"Wed, 15 Nov 2023 00:13:20 GMT"  # now + 2 h
        self.assertEqual(cache_ttl_s({b"expires": [expires]}, now_s), 7200)
        self.assertEqual(
            cache_ttl_s({b"expires": [expires], b"cache-control": [b"max-age=600"]}, now_s), 600
        )
        self.assertEqual(cache_ttl_s({b"expires": [b"garbage"]}, now_s), WELL_KNOWN_MIN_TTL_S)

    def test_default(self) -> None:
        """No caching headers give 24 hours."""
        self.assertEqual(cache_ttl_s({}, 0), WELL_KNOWN_DEFAULT_TTL_S)

    def test_parse_well_known_too_large(self) -> None:
        """A body over 50 KiB is refused."""
        body = json.dumps({"m.server": "a.example", "pad": "x" * 60000}).encode()
        self.assertRaises(ValueError, parse_well_known, body)


class FakeDNS:
    """An IResolver answering lookupService from a dict of SRV records."""

    def __init__(self, records: dict) -> None:
        self.records = records

    def lookupService(self, name: str) -> Deferred:  # noqa: N802
        if name not in self.records:
            return fail(error.DNSNameError(name))
        answers = [
            dns.RRHeader(name=name, type=dns.SRV, payload=dns.Record_SRV(*record))
            for record in self.records[name]
        ]
        return succeed((answers, [], []))


class DefaultSrvLookupTests(SynchronousTestCase):
    """The twisted.names-based SRV lookup."""

    def test_ordered_by_priority_then_weight(self) -> None:
        """Records come back by ascending priority, then descending weight."""
        dns_records = {
            "_matrix-fed._tcp.example.com": [
                (20, 0, 8448, "backup.example.com"),
                (10, 5, 8449, "light.example.com"),
                (10, 50, 8450, "heavy.example.com"),
            ]
        }
        lookup = make_srv_lookup(MemoryReactorClock(), FakeDNS(dns_records))
        self.assertEqual(
            self.successResultOf(lookup("_matrix-fed._tcp.example.com")),
            [
                ("heavy.example.com", 8450),
                ("light.example.com", 8449),
                ("backup.example.com", 8448),
            ],
        )

    def test_nxdomain_is_empty(self) -> None:
        """NXDOMAIN gives no records rather than an error."""
        lookup = make_srv_lookup(MemoryReactorClock(), FakeDNS({}))
        self.assertEqual(self.successResultOf(lookup("_matrix._tcp.example.com")), [])

    def test_resolver_created_lazily(self) -> None:
        """Making the default lookup schedules nothing on the reactor."""
        reactor = MemoryReactorClock()
        make_srv_lookup(reactor)
        self.assertEqual(reactor.getDelayedCalls(), [])
