"""
Tests for :mod:`synkeys.health`: ``GET /health`` and the draining site, in
memory; and, with PostgreSQL, a database outage seen through a running
service (503 quickly, then recovery with nothing lost).

:class:`SiteClient` (one HTTP connection to a Site, in memory) is shared
with the other operations tests.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from synkeys.app import SynkeysService, load_or_generate_keys
from synkeys.config import resolve_config
from synkeys.health import HealthResource, ServiceSite
from synkeys.storage import MemoryKeyStore
from synkeys.testing import FakeFederationClient, FakeOrigin

POSTGRES_DSN = os.environ.get("SYNKEYS_TEST_POSTGRES", "")
NO_POSTGRES = "set SYNKEYS_TEST_POSTGRES to a PostgreSQL DSN to run PostgreSQL tests"


class Response:
    """A parsed HTTP/1.1 response."""

    def __init__(self, code: int, headers: Dict[str, str], body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


class _Transport(StringTransport):
    """A transport whose ``loseConnection`` closes at once, as if all was sent."""

    def loseConnection(self) -> None:  # noqa: N802
        if not self.disconnecting:
            super().loseConnection()
            self.protocol.connectionLost(Failure(ConnectionDone()))


class SiteClient:
    """One HTTP/1.1 connection to ``site``, over a :class:`StringTransport`."""

    def __init__(self, site: Site) -> None:
        client = IPv4Address("TCP", "127.0.0.1", 40000)
        self.transport = _Transport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8008), peerAddress=client
        )
        self.channel = site.buildProtocol(client)
        self.transport.protocol = self.channel
        self.channel.makeConnection(self.transport)
        self._read = 0

    def send(
        self, method: str, path: str, body: bytes = b"", headers: Optional[Dict[str, str]] = None
    ) -> None:
        """Send one request."""
        lines = [f"{method} {path} HTTP/1.1", "Host: keys.test", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body)

    def unread(self) -> bytes:
        """What the server sent that :meth:`response` has not returned yet."""
        return self.transport.value()[self._read :]

    def response(self) -> Optional[Response]:
        """The next complete response, or ``None`` if none has arrived."""
        data = self.transport.value()[self._read :]
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return None
        status, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        if len(rest) < length:
            return None
        self._read += len(head) + len(sep) + length
        return Response(int(status.split()[1]), headers, rest[:length])

    def request(self, method: str, path: str, body: bytes = b"", **kw: Any) -> Response:
        """Send one request and return its response, which must be there already."""
        self.send(method, path, body, **kw)
        response = self.response()
        assert response is not None, f"no response to {method} {path}"
        return response

    def disconnect(self) -> None:
        """The client goes away."""
        self.transport.disconnecting = True
        self.channel.connectionLost(Failure(ConnectionDone()))


class ControlledStore(MemoryKeyStore):
    """A memory store whose ``ping`` answers only when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.pings: List[Deferred[None]] = []
        self.cancelled = 0

    def ping(self) -> Deferred[None]:
        def cancel(d: Deferred[None]) -> None:
            self.cancelled += 1

        d: Deferred[None] = Deferred(cancel)
        self.pings.append(d)
        return d


class HealthResourceTests(SynchronousTestCase):
    """``GET /health`` on its own."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryKeyStore()
        self.draining = False
        root = Resource()
        root.putChild(
            b"health",
            HealthResource(
                self.store, self.clock, draining=lambda: self.draining, ping_timeout_s=2
            ),
        )
        self.root = root
        self.client = SiteClient(Site(root, reactor=self.clock))

    def test_ok(self) -> None:
        """A store that answers gives 200 {"status": "ok"}, not cacheable."""
        response = self.client.request("GET", "/health")
        self.assertEqual((response.code, response.json()), (200, {"status": "ok"}))
        self.assertEqual(response.headers["cache-control"], "no-store")
        self.assertEqual(response.headers["content-type"], "application/json")

    def test_trailing_slash_and_head(self) -> None:
        """/health/ answers too, and HEAD answers 200 without a body."""
        self.assertEqual(self.client.request("GET", "/health/").code, 200)
        self.client.send("HEAD", "/health")
        head = self.client.unread()
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
        self.assertTrue(head.endswith(b"\r\n\r\n"), head)

    def test_store_unavailable(self) -> None:
        """A failing store gives 503; its message is logged, not answered."""
        events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.store.fail_with("db.internal:5432 is down")
        response = self.client.request("GET", "/health")
        self.assertEqual(response.code, 503)
        self.assertEqual(
            response.json(), {"status": "unavailable", "error": "the key store is unavailable"}
        )
        logged = [formatEvent(e) for e in events if e.get("log_namespace") == "synkeys.health"]
        self.assertTrue(any("db.internal:5432 is down" in line for line in logged), logged)

    def test_store_too_slow(self) -> None:
        """A store that does not answer within the ping timeout gives 503, and no sooner."""
        store = ControlledStore()
        root = Resource()
        root.putChild(b"health", HealthResource(store, self.clock, ping_timeout_s=2))
        client = SiteClient(Site(root, reactor=self.clock))
        client.send("GET", "/health")
        self.clock.advance(1.9)
        self.assertIsNone(client.response())
        self.clock.advance(0.2)
        response = client.response()
        assert response is not None
        self.assertEqual(response.code, 503)
        self.assertIn("did not answer within 2 s", response.json()["error"])

    def test_draining(self) -> None:
        """While the service drains, /health answers 503 draining without asking the store."""
        self.draining = True
        self.store.fail_with("must not be asked")
        response = self.client.request("GET", "/health")
        self.assertEqual((response.code, response.json()), (503, {"status": "draining"}))

    def test_other_methods_and_paths(self) -> None:
        """POST is 405 with Allow; a path below /health is 404."""
        post = self.client.request("POST", "/health")
        self.assertEqual(post.code, 405)
        self.assertEqual(post.headers["allow"], "GET, HEAD")
        self.assertEqual(self.client.request("GET", "/health/deeper").code, 404)

    def test_client_gone(self) -> None:
        """A client that leaves while the store is pinged cancels the ping; nothing is written."""
        store = ControlledStore()
        root = Resource()
        root.putChild(b"health", HealthResource(store, self.clock))
        client = SiteClient(Site(root, reactor=self.clock))
        client.send("GET", "/health")
        self.assertEqual(len(store.pings), 1)
        client.disconnect()
        self.assertEqual(store.cancelled, 1)
        self.assertEqual(client.transport.value(), b"")


class Gate(Resource):
    """A leaf answering ``b"done"`` only when :meth:`open` is called."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: List[Request] = []

    def render_GET(self, request: Request) -> object:  # noqa: N802
        self.waiting.append(request)
        return NOT_DONE_YET

    def open(self) -> None:
        waiting, self.waiting = self.waiting, []
        for request in waiting:
            if not request.finished and not request._disconnected:
                request.setHeader(b"Content-Length", b"4")
                request.write(b"done")
                request.finish()


class ServiceSiteTests(SynchronousTestCase):
    """:class:`ServiceSite` tracks requests and drains."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.gate = Gate()
        root = Resource()
        root.putChild(b"slow", self.gate)
        root.putChild(b"fast", _Static(b"fast"))
        self.done: List[Tuple[str, float, bool]] = []
        self.site = ServiceSite(
            root,
            reactor=self.clock,
            on_request_done=lambda r, duration_s, aborted: self.done.append(
                (r.path.decode(), duration_s, aborted)
            ),
        )

    def test_tracks_open_requests(self) -> None:
        """A request is open from arrival to answer, and the hook gets its duration."""
        client = SiteClient(self.site)
        client.send("GET", "/slow")
        self.assertEqual(len(self.site.open_requests), 1)
        self.clock.advance(1.5)
        self.gate.open()
        self.assertEqual(len(self.site.open_requests), 0)
        self.assertEqual(self.done, [("/slow", 1.5, False)])

    def test_aborted(self) -> None:
        """A request whose client leaves is no longer open and is reported aborted."""
        client = SiteClient(self.site)
        client.send("GET", "/slow")
        client.disconnect()
        self.assertEqual(self.site.open_requests, set())
        self.assertEqual(self.done, [("/slow", 0.0, True)])

    def test_drain_idle(self) -> None:
        """Draining an idle site fires at once with 0 left."""
        self.assertEqual(self.successResultOf(self.site.drain(10)), 0)
        self.assertTrue(self.site.draining)

    def test_drain_waits_for_requests(self) -> None:
        """Drain fires once the open requests finish, whose connections then close."""
        client = SiteClient(self.site)
        client.send("GET", "/slow")
        drained = self.site.drain(10)
        self.assertNoResult(drained)
        self.clock.advance(5)
        self.assertNoResult(drained)
        self.gate.open()
        self.assertEqual(self.successResultOf(drained), 0)
        response = client.response()
        assert response is not None
        self.assertEqual((response.code, response.body), (200, b"done"))
        self.assertEqual(response.headers["connection"], "close")
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_drain_is_bounded(self) -> None:
        """Drain gives up after its timeout, reporting how many requests are still open."""
        client = SiteClient(self.site)
        client.send("GET", "/slow")
        SiteClient(self.site).send("GET", "/slow")
        drained = self.site.drain(10)
        self.clock.advance(9.9)
        self.assertNoResult(drained)
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(drained), 2)

    def test_idle_connections_close(self) -> None:
        """Draining closes idle kept-alive connections at once, and is done when they are closed."""
        client = SiteClient(self.site)
        self.assertEqual(client.request("GET", "/fast").code, 200)
        self.assertFalse(client.transport.disconnecting)
        self.assertEqual(self.site.open_connections, 1)
        self.assertEqual(self.successResultOf(self.site.drain(10)), 0)
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(self.site.open_connections, 0)

    def test_new_requests_while_draining_close(self) -> None:
        """A request on a connection accepted while draining is answered, then its connection closed."""
        self.site.start_draining()
        client = SiteClient(self.site)
        response = client.request("GET", "/fast")
        self.assertEqual((response.code, response.headers["connection"]), (200, "close"))
        self.assertTrue(client.transport.disconnecting)


class _Static(Resource):
    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self._body = body

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        return self._body


def make_service(
    case: SynchronousTestCase,
    clock: Any,
    database: str = ":memory:",
    origins: Tuple[FakeOrigin, ...] = (),
    listen: Tuple[str, ...] = (),
    **kwargs: Any,
) -> SynkeysService:
    """A :class:`SynkeysService` named ``notary.test`` fetching from fake ``origins``."""
    config = resolve_config(
        {
            "server_name": "notary.test",
            "signing_key_path": case.mktemp(),
            "database": database,
            "listen": list(listen),
        }
    )
    return SynkeysService(
        config,
        clock,
        load_or_generate_keys(config.signing_key_path),
        None if listen else [],
        federation_client=FakeFederationClient(list(origins)),
        **kwargs,
    )


class ServiceHealthTests(SynchronousTestCase):
    """``/health`` as the service mounts it."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.service = make_service(self, self.clock)
        self.client = SiteClient(self.service.site)

    def test_mounted_at_root(self) -> None:
        """The service answers /health at the root of its site, beside /_matrix."""
        self.assertEqual(self.client.request("GET", "/health").json(), {"status": "ok"})
        self.assertEqual(self.client.request("GET", "/_matrix/key/v2/server").code, 200)

    def test_store_outage(self) -> None:
        """When the service's store fails, /health is 503, and 200 again once it works."""
        store = self.service.store.store
        assert isinstance(store, MemoryKeyStore)
        store.fail_with("connection refused")
        self.assertEqual(self.client.request("GET", "/health").code, 503)
        store.fail_with(None)
        self.assertEqual(self.client.request("GET", "/health").code, 200)

    def test_query_during_outage(self) -> None:
        """A query while the store is down is 503 M_UNKNOWN at once."""
        store = self.service.store.store
        assert isinstance(store, MemoryKeyStore)
        store.fail_with("connection refused")
        response = self.client.request("GET", "/_matrix/key/v2/query/origin.test")
        self.assertEqual(response.code, 503)
        self.assertEqual(response.json()["errcode"], "M_UNKNOWN")


def postgres_dsn_for_database(dsn: str, database: str, application_name: str) -> str:
    """``dsn`` naming another database and an application name."""
    parts = urlsplit(dsn)
    query = parse_qsl(parts.query) + [("application_name", application_name)]
    return urlunsplit(parts._replace(path="/" + database, query=urlencode(query)))


class PostgresOutageTests(TestCase):
    """
    A running service on a PostgreSQL database of its own, whose
    connections are killed and refused.
    """

    skip = None if POSTGRES_DSN else NO_POSTGRES

    def admin(self, sql: str, *args: Any, database: Optional[str] = None) -> None:
        """Run ``sql`` with autocommit, on the test database or ``database``."""
        import psycopg2  # type: ignore[import-untyped]

        dsn = POSTGRES_DSN
        if database is not None:
            dsn = postgres_dsn_for_database(POSTGRES_DSN, database, "synkeys_test_admin")
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql, args)
        finally:
            conn.close()

    async def setUp(self) -> None:  # type: ignore[override]
        suffix = uuid.uuid4().hex[:12]
        self.database = f"synkeys_test_{suffix}"
        self.app_name = f"synkeys_test_{suffix}"
        self.admin(f'CREATE DATABASE "{self.database}"')
        self.addCleanup(self.admin, f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        dsn = postgres_dsn_for_database(POSTGRES_DSN, self.database, self.app_name)
        self.origin = FakeOrigin("origin.test", reactor)
        # Never queried before an outage, so no warm answer can hide the store.
        self.other = FakeOrigin("other.test", reactor)
        self.service = make_service(
            self, reactor, database=dsn, origins=(self.origin, self.other),
            listen=("tcp:0:interface=127.0.0.1",),
        )
        self.service.startService()
        self.addCleanup(self.service.stopService)
        [port] = await self.service.when_listening()
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=pool)

    async def get(self, path: str) -> Tuple[int, Any, float]:
        """GET ``path`` from the service: status, JSON body and seconds taken."""
        started = time.monotonic()
        response = await self.agent.request(b"GET", (self.base + path).encode("ascii"))
        body = await readBody(response)
        return response.code, json.loads(body), time.monotonic() - started

    def kill_connections(self) -> None:
        """Terminate every database connection of the service."""
        self.admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            self.app_name,
        )

    async def until_ok(self, path: str, attempts: int = 20) -> Tuple[List[int], Any]:
        """GET ``path`` until it answers 200: the codes seen, and the body."""
        codes: List[int] = []
        for _ in range(attempts):
            code, body, _taken = await self.get(path)
            codes.append(code)
            if code == 200:
                return codes, body
            await deferLater(reactor, 0.05, lambda: None)
        self.fail(f"{path} never answered 200: {codes}")

    async def test_killed_mid_request(self) -> None:
        """A query whose connection is killed mid-request gets 503 M_UNKNOWN quickly; the next ones recover with the key still cached."""
        query = "/_matrix/key/v2/query/origin.test"
        cold = "/_matrix/key/v2/query/other.test"
        code, body, _ = await self.get(query)
        self.assertEqual(code, 200)
        self.assertEqual(body["server_keys"][0]["server_name"], "origin.test")
        self.assertEqual(self.origin.hits, 1)
        # The table is locked, so the query waits in the database, killed there.
        import psycopg2  # type: ignore[import-untyped]

        locker = psycopg2.connect(
            postgres_dsn_for_database(POSTGRES_DSN, self.database, "synkeys_test_locker")
        )
        self.addCleanup(locker.close)
        with locker.cursor() as cursor:
            cursor.execute("LOCK TABLE server_keys IN ACCESS EXCLUSIVE MODE")
        # A warm answer needs no database; a server not seen before does.
        code, body, _ = await self.get(query)
        self.assertEqual((code, self.origin.hits), (200, 1))
        pending = Deferred.fromCoroutine(self.get(cold))
        await self.waiting_on_lock()
        self.kill_connections()
        code, body, taken_s = await pending
        locker.rollback()
        self.assertEqual((code, body["errcode"]), (503, "M_UNKNOWN"))
        # Well under the 10 s statement timeout: the kill, not a timeout, ended it.
        self.assertLess(taken_s, 5)
        self.assertEqual(self.other.hits, 0)
        codes, body = await self.until_ok(cold)
        self.assertTrue(all(c == 503 for c in codes[:-1]), codes)
        self.assertEqual(body["server_keys"][0]["server_name"], "other.test")
        code, body, _ = await self.get(query)
        self.assertEqual(body["server_keys"][0]["server_name"], "origin.test")
        # Answered from the cache: nothing stored was lost, no new fetch.
        self.assertEqual(self.origin.hits, 1)
        self.flushLoggedErrors()

    async def waiting_on_lock(self) -> None:
        """Wait (bounded) until one of the service's queries waits for a lock."""
        import psycopg2  # type: ignore[import-untyped]

        for _ in range(200):
            conn = psycopg2.connect(POSTGRES_DSN)
            try:
                with conn.cursor() as cursor:
                    cursor.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                        "AND wait_event_type = 'Lock'",
                        (self.app_name,),
                    )
                    if cursor.fetchone()[0]:
                        return
            finally:
                conn.close()
            await deferLater(reactor, 0.02, lambda: None)
        self.fail("the service's query never waited for the lock")

    async def test_database_refuses_connections(self) -> None:
        """While the database refuses connections, queries it must answer and /health get 503 quickly (warm answers still 200); afterwards both recover and the cache is intact."""
        query = "/_matrix/key/v2/query/origin.test"
        self.assertEqual((await self.get(query))[0], 200)
        self.admin(f'ALTER DATABASE "{self.database}" WITH ALLOW_CONNECTIONS false')
        self.kill_connections()
        code, body, taken_s = await self.get("/_matrix/key/v2/query/other.test")
        self.assertEqual((code, body["errcode"]), (503, "M_UNKNOWN"))
        self.assertLess(taken_s, 5)
        self.assertEqual(self.other.hits, 0)
        code, body, taken_s = await self.get(query)
        self.assertEqual((code, body["server_keys"][0]["server_name"]), (200, "origin.test"))
        code, body, taken_s = await self.get("/health")
        self.assertEqual((code, body["status"]), (503, "unavailable"))
        self.assertLess(taken_s, 5)
        self.admin(f'ALTER DATABASE "{self.database}" WITH ALLOW_CONNECTIONS true')
        codes, health = await self.until_ok("/health")
        self.assertEqual(health, {"status": "ok"})
        codes, body = await self.until_ok(query)
        self.assertEqual(codes, [200])
        self.assertEqual(body["server_keys"][0]["server_name"], "origin.test")
        self.assertEqual(self.origin.hits, 1)
        self.flushLoggedErrors()

