"""
Graceful shutdown of :class:`synkeys.app.SynkeysService`: stop accepting,
let the requests in progress finish (within a bound), then close the store
— in process with a fake clock and with real sockets, and as a real
``twistd synkeys`` process receiving SIGTERM.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Dict, List

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectError, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from synkeys.storage import StoreUnavailable
from synkeys.testing import FakeOrigin
from tests.test_health import SiteClient, make_service
from tests.test_multi_instance import TLSOrigin, TwistdProcess, http_get, sleep
from tests.tlsutil import TestPKI

QUERY = "/_matrix/key/v2/query/origin.test"


class DrainBoundTests(SynchronousTestCase):
    """Stopping with a fake clock: the drain bound and the order of things."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.origin = FakeOrigin("origin.test", self.clock)
        self.origin.gate = Deferred()
        self.service = make_service(
            self, self.clock, origins=(self.origin,), drain_timeout_s=10
        )
        self.service.startService()
        self.client = SiteClient(self.service.site)
        self.events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def start_slow_query(self) -> None:
        self.client.send("GET", QUERY)
        self.clock.advance(0)
        self.assertEqual(len(self.service.site.open_requests), 1)

    def test_waits_for_request_then_closes_store(self) -> None:
        """The store stays open until the request in progress is answered, then closes."""
        self.start_slow_query()
        stopped = self.service.stopService()
        self.clock.advance(5)
        self.assertNoResult(stopped)
        self.assertTrue(self.service.site.draining)
        self.assertEqual(SiteClient(self.service.site).request("GET", "/health").code, 503)
        self.successResultOf(self.service.store.ping())
        assert self.origin.gate is not None
        self.origin.gate.callback(None)
        response = self.client.response()
        assert response is not None
        self.assertEqual(response.code, 200)
        self.assertEqual(response.json()["server_keys"][0]["server_name"], "origin.test")
        self.successResultOf(stopped)
        self.failureResultOf(self.service.store.ping(), StoreUnavailable)

    def test_gives_up_after_bound(self) -> None:
        """A request still open after the drain timeout does not hold the stop; it is logged."""
        self.start_slow_query()
        stopped = self.service.stopService()
        self.clock.advance(9.9)
        self.assertNoResult(stopped)
        self.clock.advance(0.1)
        self.successResultOf(stopped)
        self.failureResultOf(self.service.store.ping(), StoreUnavailable)
        lines = [formatEvent(e) for e in self.events]
        self.assertIn(
            "1 connections (1 requests in progress) still open after 10 s; stopping anyway", lines
        )

    def test_idle_stops_at_once(self) -> None:
        """With nothing in progress, stopping closes the store without waiting."""
        self.successResultOf(self.service.stopService())
        self.assertFalse(self.service.running)
        self.failureResultOf(self.service.store.ping(), StoreUnavailable)


class _Nothing(Protocol):
    pass


async def wait_refused(case: TestCase, port: int) -> None:
    """Wait (bounded) until connecting to ``port`` on 127.0.0.1 is refused."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    for _ in range(1000):
        try:
            connection = await endpoint.connect(Factory.forProtocol(_Nothing))
        except ConnectionRefusedError:
            return
        except ConnectError:
            # Reset: queued just as the listening socket closed; ask again.
            await sleep(0.01)
            continue
        connection.transport.loseConnection()
        await sleep(0.01)
    case.fail(f"port {port} kept accepting connections")


class InProcessShutdownTests(TestCase):
    """Stopping a service on a real port while a request is in progress."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.origin = FakeOrigin("origin.test", reactor)
        self.origin.gate = Deferred()
        self.service = make_service(
            self,
            reactor,
            database=os.path.abspath(self.mktemp()),
            origins=(self.origin,),
            listen=("tcp:0:interface=127.0.0.1",),
        )
        self.service.startService()
        self.addCleanup(lambda: self.service.stopService() if self.service.running else None)
        [port] = await self.service.when_listening()
        self.port = port.getHost().port

    async def test_in_flight_request_completes(self) -> None:
        """After stopService the port refuses connections, the slow request still completes, and then the store closes."""
        pending = Deferred.fromCoroutine(http_get(f"http://127.0.0.1:{self.port}{QUERY}"))
        for _ in range(400):
            if self.service.site.open_requests:
                break
            await sleep(0.01)
        self.assertEqual(len(self.service.site.open_requests), 1)
        stopped = self.service.stopService()
        await wait_refused(self, self.port)
        self.assertFalse(stopped.called)
        await self.service.store.ping()
        assert self.origin.gate is not None
        self.origin.gate.callback(None)
        code, body = await pending
        self.assertEqual(code, 200)
        self.assertEqual(body["server_keys"][0]["server_name"], "origin.test")
        await stopped
        self.assertEqual(self.service.site.open_connections, 0)
        with self.assertRaises(StoreUnavailable):
            await self.service.store.ping()


class SigtermTests(TestCase):
    """A real ``twistd synkeys`` process receiving SIGTERM mid-request."""

    async def test_sigterm_drains(self) -> None:
        """On SIGTERM the process stops accepting, answers the request in progress, closes the store and exits."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        pki = TestPKI(os.path.join(directory, "pki"))
        origin = TLSOrigin(pki)
        await origin.start()
        self.addCleanup(origin.stop)
        origin.holding = True
        process = TwistdProcess(
            self, directory, "notary",
            [
                "--server-name", "notary.test",
                "--signing-key", os.path.join(directory, "notary.key"),
                "--database", ":memory:",
                "--listen", "tcp:0:interface=127.0.0.1",
                "--metrics", "tcp:0:interface=127.0.0.1",
                "--allow-ip-range", "127.0.0.0/8",
                "--federation-ca", pki.ca_path,
            ],
        )
        try:
            await self._sigterm_drains(process, origin)
        except BaseException:
            print(process.logs())
            raise

    async def _sigterm_drains(self, process: TwistdProcess, origin: TLSOrigin) -> None:
        await process.start()
        pending = Deferred.fromCoroutine(
            http_get(process.url(f"/_matrix/key/v2/query/{origin.server_name}"))
        )
        for _ in range(1000):
            if origin.held:
                break
            await sleep(0.01)
        self.assertEqual(len(origin.held), 1, "the notary never reached the origin")
        self.assertEqual(await process.metric("synkeys_http_requests_in_flight"), 1)
        self.assertEqual(await process.metric("synkeys_federation_requests_in_flight"), 1)
        process.signal(signal.SIGTERM)
        await wait_refused(self, process.port)
        self.assertIsNone(process.process.poll() if process.process else None)
        origin.release()
        code, body = await pending
        self.assertEqual(code, 200, body)
        self.assertEqual(body["server_keys"][0]["server_name"], origin.server_name)
        self.assertIn(await process.wait_exit(), (0, -signal.SIGTERM))
        log = process.log()
        self.assertIn("waiting up to 10.0 s for 1 requests in progress", log)
        self.assertIn("Closed the key store", log)
        self.assertLess(log.index("Fetched keys of"), log.index("Closed the key store"))
