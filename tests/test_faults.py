"""
Fault injection at the notary level: what goes wrong outside synkeys ends
within its bounds, is logged and counted, and leaves the cache as it was.

- Origins that misbehave, served over real TLS sockets on 127.0.0.1 (a
  trustme CA) and fetched by a real
  :class:`~synkeys.federation.client.FederationClient` inside a whole
  :class:`~synkeys.app.SynkeysService`: a connection reset mid-body, a
  slow-loris drip, a TLS handshake that never finishes, a certificate for
  another name, a redirect, and names that resolve (through well-known or
  SRV) to blocked addresses.
- Key stores that fail during a write or a read: SQLite locked by another
  process, PostgreSQL connections killed by the server (only with
  ``SYNKEYS_TEST_POSTGRES``), and an outage of the memory store.
- The listener's TLS: clients offering only TLS 1.0 or 1.1 are refused.
- Secrets: no signing key seed and no database password reaches a log.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import ssl
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import Clock, LoopingCall, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site

from synkeys.app import SynkeysService, load_or_generate_keys, log_keys
from synkeys.config import resolve_config
from synkeys.errors import ConfigError
from synkeys.federation.client import FederationClient
from synkeys.federation.discovery import ServerDiscovery
from synkeys.federation.ipfilter import IPFilter
from synkeys.federation.testing import StaticHostnameResolver, StaticSrvLookup
from synkeys.fetchers import DirectKeyFetcher
from synkeys.http import BoundedRequest
from synkeys.interfaces import FederationResponse
from synkeys.keyfile import SigningKey, generate_signing_key, parse_signing_keys, write_signing_keys
from synkeys.keyring import Keyring
from synkeys.keyserver import KeyPublisher
from synkeys.metrics import ServiceMetrics
from synkeys.notary import Notary
from synkeys.query import ServerQuery
from synkeys.resource import QueryResource, build_root
from synkeys.signing import encode_b64, verify_signature
from synkeys.storage import MemoryKeyStore, SQLiteKeyStore, StoreUnavailable, open_store
from synkeys.testing import FakeFederationClient, FakeOrigin
from tests.helpers import make_server_keys
from tests.test_fuzz_requests import Answer
from tests.tlsutil import TestPKI

#: The request timeout of the federation client under test.
TIMEOUT_S = 1.0
#: Slack on top of a bound, for a loaded test machine.
SLACK_S = 2.0
#: Seconds between two bytes of the slow-loris origin.
DRIP_S = 0.1

POSTGRES_DSN = os.environ.get("SYNKEYS_TEST_POSTGRES", "")
NO_POSTGRES = "set SYNKEYS_TEST_POSTGRES to a PostgreSQL DSN to run PostgreSQL fault tests"


def _now_ms() -> int:
    return int(reactor.seconds() * 1000)


class LogCapture:
    """Every log event emitted while it is installed."""

    def __init__(self, case: TestCase) -> None:
        self.events: List[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def texts(self) -> List[str]:
        """Each event formatted, with its fields too (so nothing hides in a field)."""
        return [f"{formatEvent(e)} {e!r}" for e in self.events]

    def mentioning(self, *needles: str) -> List[str]:
        """The formatted events that contain every one of ``needles``."""
        return [formatEvent(e) for e in self.events if all(n in formatEvent(e) for n in needles)]


def federation_outcomes(metrics: ServiceMetrics) -> Dict[str, float]:
    """``synkeys_federation_requests`` by outcome, summed over endpoints."""
    counts: Dict[str, float] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "synkeys_federation_requests_total":
                outcome = sample.labels["outcome"]
                counts[outcome] = counts.get(outcome, 0) + sample.value
    return counts


# -- misbehaving origins -------------------------------------------------------


class _Origin(Protocol):
    """One connection to a misbehaving origin; ``factory.behaviour`` says how."""

    factory: _OriginFactory

    def connectionMade(self) -> None:  # noqa: N802
        self._buffer = b""
        self._answered = False
        self._drip: Optional[LoopingCall] = None
        self._later: Any = None
        self.factory.connections.add(self)
        self.factory.connected += 1

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self._buffer += data
        if self._answered or b"\r\n\r\n" not in self._buffer:
            return
        self._answered = True
        self.factory.requests += 1
        getattr(self, "_" + self.factory.behaviour)()

    def _headers(self, length: int, code: bytes = b"200 OK", extra: bytes = b"") -> bytes:
        return (
            b"HTTP/1.1 " + code + b"\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n" % (length,) + extra + b"\r\n"
        )

    def _good(self) -> None:
        body = self.factory.body
        self.transport.write(self._headers(len(body)) + body)

    def _reset_mid_body(self) -> None:
        body = self.factory.body
        self.transport.write(self._headers(len(body)) + body[: len(body) // 2])
        # Let the half body reach the client, then reset the connection.
        self._later = reactor.callLater(0.05, self.transport.abortConnection)

    def _drip_body(self) -> None:
        body = self.factory.body + b" " * 10_000
        self.transport.write(self._headers(len(body)))
        remaining = [body]

        def one_byte() -> None:
            self.transport.write(remaining[0][:1])
            remaining[0] = remaining[0][1:]

        self._drip = LoopingCall(one_byte)
        self._drip.start(DRIP_S)

    def _redirect(self) -> None:
        self.transport.write(
            self._headers(0, b"302 Found", b"Location: https://elsewhere.test/_matrix/key/v2/server\r\n")
        )

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        if self._drip is not None and self._drip.running:
            self._drip.stop()
        if self._later is not None and self._later.active():
            self._later.cancel()
        self.factory.connections.discard(self)
        for waiter in self.factory.lost_waiters:
            if not waiter.called and not self.factory.connections:
                waiter.callback(None)


class _OriginFactory(Factory):
    """Makes :class:`_Origin` connections behaving one way, and tracks them."""

    protocol = _Origin

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.body = b""
        self.requests = 0
        self.connected = 0
        self.connections: set = set()
        self.lost_waiters: List[Deferred[None]] = []

    def all_gone(self) -> Deferred[None]:
        """Abort what is still open; fire once every connection is gone."""
        if not self.connections:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self.lost_waiters.append(waiter)
        for connection in list(self.connections):
            connection.transport.abortConnection()
        return waiter


class OriginFaultTests(TestCase):
    """Misbehaving origins, fetched through a whole service with a real FederationClient."""

    def setUp(self) -> None:
        self.pki = TestPKI(self.mktemp())
        self.good_cert = PrivateCertificate.loadPEM(
            self.pki.ca.issue_cert("origin.test").private_key_and_cert_chain_pem.bytes()
        )
        self.other_cert = PrivateCertificate.loadPEM(
            self.pki.ca.issue_cert("other.test").private_key_and_cert_chain_pem.bytes()
        )
        self.origin_key = generate_signing_key("origin")
        self.logs = LogCapture(self)

    def listen(self, behaviour: str, tls: Optional[PrivateCertificate] = None) -> Tuple[str, _OriginFactory]:
        """Start a misbehaving origin; return its server name and factory."""
        factory = _OriginFactory(behaviour)
        if tls is None:
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        else:
            port = reactor.listenSSL(0, factory, tls.options(), interface="127.0.0.1")
        self.addCleanup(factory.all_gone)
        self.addCleanup(port.stopListening)
        name = f"origin.test:{port.getHost().port}"
        factory.body = KeyPublisher(name, [self.origin_key], reactor).body()
        return name, factory

    def service(
        self,
        *,
        allow_loopback: bool = True,
        hosts: Optional[Dict[str, List[str]]] = None,
        srv: Optional[Dict[str, List[Tuple[str, int]]]] = None,
        well_known: Optional[Dict[str, bytes]] = None,
    ) -> SynkeysService:
        """
        A notary service (memory store) whose federation client trusts the
        test CA, resolves from ``hosts`` and ``srv``, answers well-known
        lookups from ``well_known`` (host name to ``m.server``), and times
        out after :data:`TIMEOUT_S`.
        """
        resolver = StaticHostnameResolver({"origin.test": ["127.0.0.1"], **(hosts or {})})
        srv_lookup = StaticSrvLookup(srv or {})
        discovery = None
        if well_known is not None:
            delegations = well_known

            def well_known_get(url: bytes) -> Deferred[FederationResponse]:
                host = url.split(b"/")[2].decode("ascii")
                if host in delegations:
                    body = b'{"m.server": "%s"}' % (delegations[host],)
                    return succeed(FederationResponse(200, body, None, {}))
                return succeed(FederationResponse(404, b"{}", None, {}))

            discovery = ServerDiscovery(reactor, well_known_get, srv_lookup)
        client = FederationClient(
            reactor,
            ip_filter=IPFilter(allowed=["127.0.0.0/8"] if allow_loopback else []),
            federation_ca_files=[self.pki.ca_path],
            connect_timeout_s=TIMEOUT_S,
            request_timeout_s=TIMEOUT_S,
            resolver=resolver,
            srv_lookup=srv_lookup,
            discovery=discovery,
        )
        config = resolve_config(
            {"server_name": "notary.test", "signing_key_path": self.mktemp(),
             "database": ":memory:", "listen": []}
        )
        service = SynkeysService(
            config, reactor, load_or_generate_keys(config.signing_key_path), [],
            federation_client=client, metrics_endpoints=[],
            metrics=ServiceMetrics(reactor, standard_collectors=False),
        )
        service.startService()
        self.addCleanup(service.stopService)
        return service

    async def cache_stale(self, service: SynkeysService, name: str) -> Dict[str, Tuple[bytes, int]]:
        """
        Put an old response of ``name`` in the cache, one the freshness
        rules want refetched; return the store's rows for ``name``.
        """
        stale = make_server_keys(
            name, {self.origin_key.key_id: self.origin_key.key},
            valid_until_ts=_now_ms() + 3_600_000, fetched_ts=_now_ms() - 2 * 86_400_000,
        )
        await service.store.store_server_keys(stale)
        return await self.rows(service, name)

    async def rows(self, service: SynkeysService, name: str) -> Dict[str, Tuple[bytes, int]]:
        """The cached rows of ``name``: key id to (bytes, fetched_ts)."""
        found = await service.store.get_server_keys({name: None})
        return {k: (v.raw, v.fetched_ts) for k, v in found.get(name, {}).items()}

    async def assert_fault_contained(
        self,
        service: SynkeysService,
        name: str,
        outcome: str,
        reason: str,
        bound_s: float,
    ) -> None:
        """
        Query ``name`` (whose cached response is stale): the answer comes
        within ``bound_s`` and is the cached response; the cache is
        unchanged; the failure is counted with ``outcome`` and logged with
        ``reason``.
        """
        before = await self.cache_stale(service, name)
        started = time.monotonic()
        answer = await service.notary.query({name: ServerQuery()})
        elapsed = time.monotonic() - started
        self.assertLess(elapsed, bound_s + SLACK_S, f"took {elapsed:.2f}s")
        (element,) = json.loads(answer)["server_keys"]
        cached = json.loads(before[self.origin_key.key_id][0])
        self.assertEqual(element["valid_until_ts"], cached["valid_until_ts"])
        self.assertTrue(
            verify_signature(element, name, self.origin_key.key_id, self.origin_key.public_key)
        )
        self.assertEqual(await self.rows(service, name), before)
        self.assertEqual(service.notary.counters.get("fetch_failed"), 1)
        self.assertEqual(service.notary.counters.get("fetch_ok", 0), 0)
        self.assertEqual(federation_outcomes(service.metrics).get(outcome), 1, federation_outcomes(service.metrics))
        self.assertTrue(self.logs.mentioning(name, reason), f"no log says {reason!r}")

    async def test_good_origin(self) -> None:
        """The same set-up with a well-behaved origin refreshes the cache (so the faults below are the faults)."""
        name, factory = self.listen("good", self.good_cert)
        service = self.service()
        before = await self.cache_stale(service, name)
        answer = await service.notary.query({name: ServerQuery()})
        (element,) = json.loads(answer)["server_keys"]
        self.assertGreater(element["valid_until_ts"], _now_ms() + 3_600_000)
        self.assertNotEqual(await self.rows(service, name), before)
        self.assertEqual(federation_outcomes(service.metrics).get("ok"), 1)
        self.assertEqual(factory.requests, 1)

    async def test_reset_mid_body(self) -> None:
        """An origin that resets the connection halfway through its body is a contained failure."""
        name, factory = self.listen("reset_mid_body", self.good_cert)
        await self.assert_fault_contained(self.service(), name, "http", "ConnectionLost", TIMEOUT_S)
        self.assertEqual(factory.requests, 1)

    async def test_slow_loris(self) -> None:
        """An origin dripping its body a byte at a time is cut off at the request timeout."""
        name, factory = self.listen("drip_body", self.good_cert)
        await self.assert_fault_contained(self.service(), name, "timeout", "no complete response", TIMEOUT_S)
        self.assertEqual(factory.requests, 1)
        await factory.all_gone()

    async def test_handshake_never_finishes(self) -> None:
        """An origin that accepts TCP but never answers the TLS handshake times out."""
        name, factory = self.listen("good", tls=None)
        await self.assert_fault_contained(self.service(), name, "timeout", "no complete response", TIMEOUT_S)
        self.assertEqual(factory.requests, 0)

    async def test_certificate_for_another_name(self) -> None:
        """An origin presenting a certificate for another name is refused before any request is sent."""
        name, factory = self.listen("good", self.other_cert)
        await self.assert_fault_contained(self.service(), name, "tls", "TLS failure", TIMEOUT_S)
        self.assertEqual(factory.requests, 0)

    async def test_origin_offering_only_tls_1_1(self) -> None:
        """An origin that speaks nothing newer than TLS 1.1 is refused as a TLS failure."""
        from OpenSSL import SSL
        from twisted.internet.interfaces import IOpenSSLContextFactory
        from zope.interface import implementer

        certificate = self.good_cert

        @implementer(IOpenSSLContextFactory)
        class OldTLS:
            def getContext(self) -> SSL.Context:  # noqa: N802
                context = SSL.Context(SSL.TLS_METHOD)
                context.set_min_proto_version(SSL.TLS1_VERSION)
                context.set_max_proto_version(SSL.TLS1_1_VERSION)
                context.set_cipher_list(b"ALL:@SECLEVEL=0")
                context.use_certificate(certificate.original)
                context.use_privatekey(certificate.privateKey.original)
                return context

        factory = _OriginFactory("good")
        port = reactor.listenSSL(0, factory, OldTLS(), interface="127.0.0.1")
        self.addCleanup(factory.all_gone)
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        outcome = await deferToThread(_handshake, number, ssl.TLSVersion.TLSv1_1)
        if outcome != "agreed TLSv1.1":
            raise self.skipTest(f"this OpenSSL cannot serve TLS 1.1: {outcome}")
        name = f"origin.test:{number}"
        factory.body = KeyPublisher(name, [self.origin_key], reactor).body()
        requests_before = factory.requests
        await self.assert_fault_contained(self.service(), name, "tls", "TLS failure", TIMEOUT_S)
        self.assertEqual(factory.requests, requests_before)

    async def test_redirect(self) -> None:
        """An origin answering with a redirect is not followed."""
        name, factory = self.listen("redirect", self.good_cert)
        await self.assert_fault_contained(self.service(), name, "redirect", "elsewhere.test", TIMEOUT_S)
        self.assertEqual(factory.requests, 1)

    async def test_well_known_to_blocked_address(self) -> None:
        """A name delegated by well-known to a host at a private address is never connected to."""
        service = self.service(
            allow_loopback=False,
            hosts={"internal.test": ["10.1.2.3"]},
            well_known={"delegating.test": b"internal.test:8448"},
        )
        await self.assert_fault_contained(service, "delegating.test", "blocked", "blocked address 10.1.2.3", 0)

    async def test_well_known_to_blocked_literal(self) -> None:
        """A name delegated by well-known to a loopback IP literal is never connected to."""
        name, factory = self.listen("good", self.good_cert)
        port = name.split(":")[1].encode()
        service = self.service(allow_loopback=False, well_known={"delegating.test": b"127.0.0.1:" + port})
        await self.assert_fault_contained(service, "delegating.test", "blocked", "blocked address 127.0.0.1", 0)
        self.assertEqual(factory.connected, 0)

    async def test_srv_to_blocked_address(self) -> None:
        """A name whose SRV record points at a host with a private address is never connected to."""
        service = self.service(
            allow_loopback=False,
            hosts={"internal.test": ["192.168.7.7", "::ffff:127.0.0.1"]},
            srv={"_matrix-fed._tcp.srv.test": [("internal.test", 8448)]},
            well_known={},
        )
        await self.assert_fault_contained(service, "srv.test", "blocked", "blocked address 192.168.7.7", 0)


class SlowOriginIsolationTests(SynchronousTestCase):
    """One slow origin and the other queries of the same moment."""

    def test_slow_origin_does_not_hold_back_others(self) -> None:
        """A query about a fast origin is answered without waiting for a slow origin asked about in the same reactor turn."""
        clock = Clock()
        clock.advance(1_700_000_000)
        fast = FakeOrigin("fast.test", clock)
        slow = FakeOrigin("slow.test", clock)
        slow.gate = Deferred()
        store = MemoryKeyStore()
        keyring = Keyring(
            [DirectKeyFetcher(FakeFederationClient([fast, slow]), clock)], clock, store=store
        )
        notary = Notary(store, keyring, clock, server_name="notary.test",
                        signing_keys=[generate_signing_key("n")])
        slow_answer = notary.query({"slow.test": ServerQuery()})
        fast_answer = notary.query({"fast.test": ServerQuery()})
        clock.advance(0)
        self.assertNoResult(slow_answer)
        try:
            self.assertIn(b'"fast.test"', self.successResultOf(fast_answer))
        finally:
            slow.gate.callback(None)
            clock.advance(0)
            self.successResultOf(slow_answer)


# -- failing stores --------------------------------------------------------------


async def exchange(site: Site, raw: bytes, limit_s: float = 30.0) -> Answer:
    """Send raw request bytes to ``site`` on an in-memory connection; wait for the answer."""
    transport = StringTransport()
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    assert channel is not None
    channel.makeConnection(transport)
    channel.dataReceived(raw)
    deadline = time.monotonic() + limit_s
    try:
        while True:
            answer = Answer.parse(transport.value())
            if answer is not None:
                return answer
            if time.monotonic() > deadline:
                raise AssertionError(f"no answer within {limit_s}s: {transport.value()[:200]!r}")
            await deferLater(reactor, 0.005, lambda: None)
    finally:
        channel.connectionLost(Failure(ConnectionDone()))


def query_request(server_name: str) -> bytes:
    """A raw ``GET /_matrix/key/v2/query/{server_name}``."""
    return (
        b"GET /_matrix/key/v2/query/" + server_name.encode("ascii")
        + b" HTTP/1.1\r\nHost: notary.test\r\nConnection: close\r\n\r\n"
    )


class StoreFaultMixin:
    """A notary in front of one fake origin, over a store that tests make fail."""

    def wire(self, store: Any) -> Tuple[Site, Notary, FakeOrigin]:
        """The notary's resource tree over ``store``, fetching from a fake ``origin.test``."""
        origin = FakeOrigin("origin.test", reactor, [generate_signing_key("o")])
        keyring = Keyring([DirectKeyFetcher(FakeFederationClient([origin]), reactor)], reactor, store=store)
        key = generate_signing_key("n")
        publisher = KeyPublisher("notary.test", [key], reactor)
        notary = Notary(store, keyring, reactor, server_name="notary.test", signing_keys=[key])
        site = Site(build_root(publisher, QueryResource(notary)), reactor=reactor)
        site.requestFactory = BoundedRequest
        site.displayTracebacks = False
        return site, notary, origin

    def stale(self, origin: FakeOrigin, server_name: str = "origin.test") -> Any:
        """An old response of the origin's that the freshness rules want refetched."""
        key = origin.signing_keys[0]
        return make_server_keys(
            server_name, {key.key_id: key.key},
            valid_until_ts=_now_ms() + 3_600_000, fetched_ts=_now_ms() - 2 * 86_400_000,
        )


def _servers(answer: Answer) -> List[Tuple[str, int]]:
    return [(e["server_name"], e["valid_until_ts"]) for e in answer.json()["server_keys"]]


class SQLiteFaultTests(StoreFaultMixin, TestCase):
    """SQLite locked by another process while the notary writes."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.path = self.mktemp() + ".db"
        self.store = await SQLiteKeyStore.open(self.path, reactor, busy_timeout_s=0.25)
        self.addCleanup(self.store.close)
        self.site, self.notary, self.origin = self.wire(self.store)

    def lock(self) -> sqlite3.Connection:
        """Take the database's write lock from another connection, as another process would."""
        other = sqlite3.connect(self.path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        self.addCleanup(other.close)
        return other

    async def test_locked_write_serves_cache(self) -> None:
        """A write that cannot get the lock answers the cached response fast, loses nothing, and the next request succeeds."""
        stale = self.stale(self.origin)
        await self.store.store_server_keys(stale)
        other = self.lock()
        started = time.monotonic()
        answer = await exchange(self.site, query_request("origin.test"))
        self.assertLess(time.monotonic() - started, 0.25 + SLACK_S)
        self.assertEqual(answer.code, 200)
        self.assertEqual(_servers(answer), [("origin.test", stale.valid_until_ts)])
        self.assertEqual(len(self.flushLoggedErrors(StoreUnavailable)), 1)
        other.execute("ROLLBACK")
        again = await exchange(self.site, query_request("origin.test"))
        self.assertEqual(again.code, 200)
        self.assertEqual([name for name, _ in _servers(again)], ["origin.test"])
        rows = await self.store.get_server_keys({"origin.test": None})
        for key_id in stale.key_ids:
            self.assertEqual(rows["origin.test"][key_id].key_bytes(key_id), stale.key_bytes(key_id))

    async def test_locked_write_nothing_cached(self) -> None:
        """With nothing cached, a write that cannot get the lock answers the fetched keys or 503, never an empty success."""
        other = self.lock()
        answer = await exchange(self.site, query_request("origin.test"))
        self.flushLoggedErrors(StoreUnavailable)
        other.execute("ROLLBACK")
        self.assertTrue(
            answer.code == 503 or _servers(answer),
            f"{answer.code} {answer.body!r}: the notary fetched the keys but says it has none",
        )


class MemoryStoreOutageTests(StoreFaultMixin, TestCase):
    """A store that cannot be read at all."""

    async def test_outage_is_503_then_recovers(self) -> None:
        """While the store is down queries are a prompt 503 M_UNKNOWN; afterwards they succeed with nothing lost."""
        store = MemoryKeyStore()
        site, notary, origin = self.wire(store)
        stale = self.stale(origin)
        await store.store_server_keys(stale)
        store.fail_with("disk on fire")
        answer = await exchange(site, query_request("origin.test"), limit_s=5)
        self.assertEqual(answer.code, 503)
        self.assertEqual(answer.json()["errcode"], "M_UNKNOWN")
        store.fail_with(None)
        again = await exchange(site, query_request("origin.test"))
        self.assertEqual(again.code, 200)
        self.assertEqual([name for name, _ in _servers(again)], ["origin.test"])
        rows = await store.get_server_keys({"origin.test": None})
        self.assertEqual(set(rows["origin.test"]), set(stale.key_ids))


class PostgresFaultTests(StoreFaultMixin, TestCase):
    """PostgreSQL connections killed by the server, during a write and while idle."""

    skip = None if POSTGRES_DSN else NO_POSTGRES

    def setUp(self) -> None:
        import psycopg2  # type: ignore[import-untyped]

        from tests.test_storage import postgres_dsn_for_schema

        schema = f"synkeys_fault_{uuid.uuid4().hex[:12]}"
        self.application_name = f"synkeys-fault-{uuid.uuid4().hex[:8]}"
        self.admin = psycopg2.connect(POSTGRES_DSN)
        self.admin.autocommit = True
        with self.admin.cursor() as cursor:
            cursor.execute(f'CREATE SCHEMA "{schema}"')

        def drop() -> None:
            with self.admin.cursor() as cursor:
                cursor.execute(f'DROP SCHEMA "{schema}" CASCADE')
            self.admin.close()

        self.addCleanup(drop)
        dsn = postgres_dsn_for_schema(POSTGRES_DSN, schema)
        self.dsn = dsn + ("&" if "?" in dsn else "?") + f"application_name={self.application_name}"

    def store_pids(self, waiting_on_lock: bool = False) -> List[int]:
        """Backends of the store's connections (only those blocked on a lock, if asked)."""
        with self.admin.cursor() as cursor:
            cursor.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
                + (" AND wait_event_type = 'Lock'" if waiting_on_lock else ""),
                (self.application_name,),
            )
            return [row[0] for row in cursor.fetchall()]

    def terminate(self, pids: List[int]) -> None:
        """Kill those backends, as a database restart or failover would."""
        with self.admin.cursor() as cursor:
            for pid in pids:
                cursor.execute("SELECT pg_terminate_backend(%s)", (pid,))

    async def test_connection_lost_during_write(self) -> None:
        """A write whose connection dies answers the cached response at once; the next request succeeds; nothing is lost."""
        import psycopg2

        store = await open_store(self.dsn, reactor)
        self.addCleanup(store.close)
        site, notary, origin = self.wire(store)
        stale = self.stale(origin)
        other = make_server_keys("other.test", {"ed25519:x": generate_signing_key("x").key})
        await store.store_server_keys(stale)
        await store.store_server_keys(other)
        # Hold the origin's row, so that the notary's UPSERT of it waits.
        locker = psycopg2.connect(self.dsn.replace(self.application_name, "synkeys-locker"))
        self.addCleanup(locker.close)
        with locker.cursor() as cursor:
            cursor.execute("SELECT 1 FROM server_keys WHERE server_name = 'origin.test' FOR UPDATE")
        answering = Deferred.fromCoroutine(exchange(site, query_request("origin.test")))
        for _ in range(500):
            blocked = self.store_pids(waiting_on_lock=True)
            if blocked:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertTrue(blocked, "the write never started")
        started = time.monotonic()
        self.terminate(blocked)
        answer = await answering
        self.assertLess(time.monotonic() - started, SLACK_S)
        locker.rollback()
        self.assertEqual(answer.code, 200)
        self.assertEqual(_servers(answer), [("origin.test", stale.valid_until_ts)])
        self.flushLoggedErrors()
        again = await exchange(site, query_request("other.test"))
        self.assertEqual(again.code, 200)
        rows = await store.get_server_keys({"origin.test": None, "other.test": None})
        self.assertEqual(rows["origin.test"][origin.signing_keys[0].key_id].raw, stale.raw)
        self.assertEqual(rows["other.test"]["ed25519:x"].raw, other.raw)

    async def test_connection_lost_while_idle(self) -> None:
        """After the server kills idle connections the next query is a prompt 503, and the one after succeeds."""
        store = await open_store(self.dsn, reactor)
        self.addCleanup(store.close)
        site, notary, origin = self.wire(store)
        stale = self.stale(origin)
        await store.store_server_keys(stale)
        pids = self.store_pids()
        self.assertTrue(pids)
        self.terminate(pids)
        started = time.monotonic()
        answer = await exchange(site, query_request("origin.test"))
        self.assertLess(time.monotonic() - started, SLACK_S)
        self.flushLoggedErrors()
        self.assertIn(answer.code, (200, 503))
        if answer.code == 503:
            self.assertEqual(answer.json()["errcode"], "M_UNKNOWN")
            answer = await exchange(site, query_request("origin.test"))
        self.assertEqual(answer.code, 200)
        self.assertEqual([name for name, _ in _servers(answer)], ["origin.test"])
        self.flushLoggedErrors()


# -- the listener's TLS ----------------------------------------------------------------


def _handshake(port: int, version: ssl.TLSVersion) -> str:
    """Try a TLS handshake offering only ``version``; the version agreed, or why not."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        context.minimum_version = version
        context.maximum_version = version
        context.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError) as e:
        return f"client cannot offer it: {e}"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                return f"agreed {tls.version()}"
        except ssl.SSLError as e:
            return f"refused: {e.reason}"


class ListenerTLSTests(TestCase):
    """What an ``ssl:`` listener of the service accepts."""

    async def test_tls_versions(self) -> None:
        """TLS 1.2 and 1.3 are agreed; a client offering only TLS 1.0 or 1.1 is refused by the server."""
        pki = TestPKI(self.mktemp())
        config = resolve_config(
            {"server_name": "notary.test", "signing_key_path": self.mktemp(), "database": ":memory:",
             "listen": [pki.ssl_endpoint("listener", ["notary.test", "127.0.0.1"])]}
        )
        service = SynkeysService(config, reactor, load_or_generate_keys(config.signing_key_path),
                                 metrics_endpoints=[])
        service.startService()
        self.addCleanup(service.stopService)
        (port,) = await service.when_listening()
        number = port.getHost().port
        self.assertEqual(await deferToThread(_handshake, number, ssl.TLSVersion.TLSv1_2), "agreed TLSv1.2")
        self.assertEqual(await deferToThread(_handshake, number, ssl.TLSVersion.TLSv1_3), "agreed TLSv1.3")
        for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            outcome = await deferToThread(_handshake, number, old)
            if outcome.startswith("client cannot"):
                raise self.skipTest(f"this OpenSSL cannot offer {old.name}: {outcome}")
            self.assertTrue(outcome.startswith("refused"), f"{old.name}: {outcome}")
            self.assertIn("VERSION", outcome.upper())


# -- secrets -----------------------------------------------------------------------------


class SecretsNotLoggedTests(TestCase):
    """No signing key seed and no database password reaches a log or an error message."""

    def secrets_of(self, key: SigningKey) -> List[str]:
        """The ways a seed could be written down."""
        seed = bytes(key.key)
        return [encode_b64(seed), encode_b64(seed) + "=", seed.hex(), repr(seed)[2:-1]]

    async def test_service_lifecycle(self) -> None:
        """Generating, loading (world-readable too) and serving with a key, and answering queries, log no seed."""
        logs = LogCapture(self)
        path = self.mktemp()
        generated = load_or_generate_keys(path)
        log_keys(generated)
        os.chmod(path, 0o644)
        loaded = load_or_generate_keys(path)
        self.assertFalse(loaded.private)
        log_keys(loaded)
        self.assertTrue(logs.mentioning("readable by other users", path))
        config = resolve_config(
            {"server_name": "notary.test", "signing_key_path": path, "database": ":memory:",
             "listen": []}
        )
        origin = FakeOrigin("origin.test", reactor)
        service = SynkeysService(config, reactor, loaded, [], metrics_endpoints=[],
                                 federation_client=FakeFederationClient([origin]))
        service.startService()
        await service.notary.query({"origin.test": ServerQuery(), "notary.test": ServerQuery()})
        await service.stopService()
        self.assertTrue(logs.events)
        for text in logs.texts():
            for secret in self.secrets_of(loaded.keys[0]) + self.secrets_of(origin.signing_keys[0]):
                self.assertNotIn(secret, text)

    def test_bad_key_files(self) -> None:
        """Errors about a malformed key file never quote the seed."""
        seed = encode_b64(b"\x07" * 32)
        for text in [f"ed25519 a {seed} extra", f"ed25519 a-b {seed}", f"rsa a {seed}",
                     f"ed25519 a {seed}!", f"ed25519 a {seed[:-2]}", f"ed25519 a {seed}\ned25519 a {seed}"]:
            with self.assertRaises(ConfigError) as raised:
                parse_signing_keys(text)
            self.assertNotIn(seed[:20], str(raised.exception), text)

    async def test_database_password(self) -> None:
        """A PostgreSQL DSN's password appears in no error and no log line when the database is unreachable."""
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            raise self.skipTest("psycopg2 is not installed") from None
        logs = LogCapture(self)
        dsn = "postgresql://synkeys:hunter2-secret@127.0.0.1:1/keys"
        with self.assertRaises(StoreUnavailable) as raised:
            await open_store(dsn, reactor)
        self.assertNotIn("hunter2", str(raised.exception))
        for text in logs.texts():
            self.assertNotIn("hunter2", text)

    def test_written_key_file_is_private(self) -> None:
        """A key file synkeys writes is mode 0600 and its contents are the only place the seed is."""
        path = self.mktemp()
        key = generate_signing_key("w")
        write_signing_keys(path, [key])
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertNotIn(encode_b64(bytes(key.key)), repr(key))
        self.assertEqual(parse_signing_keys(open(path).read())[0].public_key, key.public_key)
