"""
Tests for :class:`synkeys.federation.client.FederationClient` without
sockets: a MemoryReactorClock records connection attempts.
"""

from __future__ import annotations

import trustme
from OpenSSL import SSL
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ParseError
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from zope.interface.verify import verifyObject

from synkeys.errors import ConfigError, FetchError
from synkeys.federation.body import BodyTooLarge
from synkeys.federation.client import FederationClient, to_fetch_error
from synkeys.federation.ipfilter import IPFilter
from synkeys.federation.testing import StaticHostnameResolver, StaticSrvLookup
from synkeys.federation.tls import load_ca_files
from synkeys.interfaces import IFederationClient
from tests.test_federation_resolver import ManualResolver

PUBLIC_1 = "93.184.216.34"
PUBLIC_2 = "93.184.216.35"


class ClientTests(SynchronousTestCase):
    """Address filtering, fallback, timeouts and the concurrency cap."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.resolver = StaticHostnameResolver(
            {
                "internal.test": ["10.0.0.1"],
                "loopback.test": ["127.0.0.1", "::1"],
                "mixed.test": ["10.0.0.1", PUBLIC_1],
                "two.test": [PUBLIC_1, PUBLIC_2],
                "example.com": [PUBLIC_1],
            }
        )
        self.srv = StaticSrvLookup()

    def client(self, **kwargs: object) -> FederationClient:
        options: dict = dict(
            ip_filter=IPFilter(),
            resolver=self.resolver,
            srv_lookup=self.srv,
            connect_timeout_s=7,
            request_timeout_s=30,
        )
        options.update(kwargs)
        return FederationClient(self.reactor, **options)

    def fail_connection(self, index: int) -> None:
        """Make the index-th TCP connection attempt fail with 'refused'."""
        factory = self.reactor.tcpClients[index][2]
        factory.clientConnectionFailed(
            self.reactor.connectors[index], Failure(ConnectionRefusedError())
        )

    def test_provides_interface(self) -> None:
        """FederationClient provides IFederationClient."""
        self.assertTrue(verifyObject(IFederationClient, self.client()))

    def test_name_resolving_to_private_address_blocked(self) -> None:
        """A name resolving to 10.0.0.1 is refused as "blocked" without connecting."""
        d = self.client().get("internal.test:8448", b"/_matrix/key/v2/server")
        error = self.failureResultOf(d, FetchError).value
        self.assertEqual(error.kind, "blocked")
        self.assertIn("10.0.0.1", error.reason)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_loopback_blocked(self) -> None:
        """A name resolving only to loopback addresses (v4 and v6) is refused."""
        d = self.client().get("loopback.test:8448", b"/x")
        error = self.failureResultOf(d, FetchError).value
        self.assertEqual(error.kind, "blocked")
        self.assertIn("127.0.0.1", error.reason)
        self.assertIn("::1", error.reason)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_ip_literal_blocked(self) -> None:
        """An IP-literal server name in a blocked range is refused without resolving."""
        d = self.client().get("127.0.0.1:8448", b"/x")
        self.assertEqual(self.failureResultOf(d, FetchError).value.kind, "blocked")
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.resolver.lookups, [])

    def test_ipv6_literal_blocked(self) -> None:
        """A bracketed IPv6 loopback literal is refused."""
        d = self.client().get("[::1]:8448", b"/x")
        self.assertEqual(self.failureResultOf(d, FetchError).value.kind, "blocked")
        self.assertEqual(self.reactor.tcpClients, [])

    def test_allow_range(self) -> None:
        """An allowed range lets a blocked address be connected to."""
        client = self.client(ip_filter=IPFilter(allowed=["10.0.0.0/8"]))
        d = client.get("internal.test:8448", b"/x")
        self.assertNoResult(d)
        self.assertEqual(self.reactor.tcpClients[0][:2], ("10.0.0.1", 8448))

    def test_shared_host_resolved_once(self) -> None:
        """Servers on one host fetched at once cause one look-up and a connection each."""
        resolver = ManualResolver()
        client = self.client(resolver=resolver)
        first = client.get("example.com:8448", b"/x")
        second = client.get("example.com:8449", b"/x")
        self.assertEqual([call[1] for call in resolver.calls], ["example.com"])
        resolver.answer(0, PUBLIC_1, port=8448)
        resolver.complete(0)
        self.assertEqual(
            [client[:2] for client in self.reactor.tcpClients],
            [(PUBLIC_1, 8448), (PUBLIC_1, 8449)],
        )
        self.assertNoResult(first)
        self.assertNoResult(second)

    def test_blocked_addresses_skipped(self) -> None:
        """Of several addresses only the allowed ones are tried, with the connect timeout."""
        d = self.client().get("mixed.test:8448", b"/x")
        self.assertNoResult(d)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        host, port, _, timeout, _ = self.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), (PUBLIC_1, 8448, 7))

    def test_next_address_after_failure(self) -> None:
        """When one address refuses, the next is tried; when all refuse, kind "connect"."""
        d = self.client().get("two.test:8448", b"/x")
        self.fail_connection(0)
        self.assertEqual(self.reactor.tcpClients[1][:2], (PUBLIC_2, 8448))
        self.fail_connection(1)
        error = self.failureResultOf(d, FetchError).value
        self.assertEqual(error.kind, "connect")
        self.assertIn(PUBLIC_2, error.reason)

    def test_connections_are_quiet(self) -> None:
        """A connection's factories log no "Starting factory" or "Stopping factory" events."""
        self.client().get("example.com:8448", b"/x")
        factory = self.reactor.tcpClients[0][2]
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        factory.doStart()
        factory.doStop()
        self.assertEqual([formatEvent(e) for e in events], [])

    def test_no_address(self) -> None:
        """A name without addresses fails with kind "dns"."""
        d = self.client().get("nowhere.test:8448", b"/x")
        self.assertEqual(self.failureResultOf(d, FetchError).value.kind, "dns")

    def test_invalid_server_name(self) -> None:
        """An invalid server name fails with kind "dns" and no traffic."""
        d = self.client().get("bad name", b"/x")
        self.assertEqual(self.failureResultOf(d, FetchError).value.kind, "dns")
        self.assertEqual(self.reactor.tcpClients, [])

    def test_timeout(self) -> None:
        """A connection that never completes fails with kind "timeout" and is abandoned."""
        d = self.client(request_timeout_s=30).get("example.com:8448", b"/x")
        self.reactor.advance(29)
        self.assertNoResult(d)
        self.reactor.advance(1)
        error = self.failureResultOf(d, FetchError).value
        self.assertEqual(error.kind, "timeout")
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_cancel(self) -> None:
        """Cancelling a request stops connecting and fails with CancelledError."""
        d = self.client().get("example.com:8448", b"/x")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)

    def test_concurrency_cap(self) -> None:
        """With max_concurrent=1 a second request waits until the first finishes."""
        client = self.client(max_concurrent=1)
        first = client.get("two.test:8448", b"/x")
        second = client.get("example.com:8448", b"/x")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.fail_connection(0)
        self.fail_connection(1)
        self.failureResultOf(first, FetchError)
        self.assertEqual(len(self.reactor.tcpClients), 3)
        self.assertEqual(self.reactor.tcpClients[2][:2], (PUBLIC_1, 8448))
        self.assertNoResult(second)

    def test_discovery_wiring(self) -> None:
        """A bare name first fetches well-known on 443, then falls back to the name on 8448."""
        d = self.client().get("example.com", b"/x")
        self.assertEqual(self.reactor.tcpClients[0][:2], (PUBLIC_1, 443))
        self.fail_connection(0)
        self.assertEqual(self.reactor.tcpClients[1][:2], (PUBLIC_1, 8448))
        self.assertEqual(
            self.srv.lookups, ["_matrix-fed._tcp.example.com", "_matrix._tcp.example.com"]
        )
        self.assertNoResult(d)

    def test_srv_target_connected(self) -> None:
        """An SRV target is resolved and connected to on the SRV port."""
        self.srv.records["_matrix-fed._tcp.example.com"] = [("two.test", 8443)]
        self.client().get("example.com", b"/x")
        self.fail_connection(0)  # well-known
        self.assertEqual(self.reactor.tcpClients[1][:2], (PUBLIC_1, 8443))

    def test_path_must_be_absolute(self) -> None:
        """A path not starting with '/' is a programming error."""
        self.assertRaises(ValueError, self.client().get, "example.com", b"x")

    def test_fetch_url_https_only(self) -> None:
        """fetch_url refuses a non-https URL without connecting."""
        d = self.client().fetch_url(b"http://example.com/.well-known/matrix/server")
        self.assertEqual(self.failureResultOf(d, FetchError).value.kind, "http")
        self.assertEqual(self.reactor.tcpClients, [])


class ClassifyTests(SynchronousTestCase):
    """How failures become FetchError kinds."""

    def kind(self, exc: Exception) -> str:
        try:
            raise exc
        except Exception:
            error = to_fetch_error("s.example", Failure())
        self.assertIsInstance(error, FetchError)
        return error.kind  # type: ignore[attr-defined]

    def test_tls(self) -> None:
        """TLS errors wrapped by the HTTP client are kind "tls"."""
        self.assertEqual(self.kind(ResponseNeverReceived([Failure(SSL.Error("bad"))])), "tls")

    def test_dns(self) -> None:
        """A DNS lookup error is kind "dns"."""
        self.assertEqual(self.kind(DNSLookupError("x")), "dns")

    def test_protocol_error(self) -> None:
        """An HTTP parse error is kind "http"."""
        self.assertEqual(self.kind(ResponseFailed([Failure(ParseError("bad", b"x"))])), "http")

    def test_too_large(self) -> None:
        """BodyTooLarge is kind "too_large"."""
        self.assertEqual(self.kind(BodyTooLarge(10)), "too_large")

    def test_fetch_error_kept(self) -> None:
        """A FetchError inside a wrapper keeps its own kind."""
        inner = FetchError("s.example", "no", "blocked")
        self.assertEqual(self.kind(ResponseNeverReceived([Failure(inner)])), "blocked")

    def test_cancel(self) -> None:
        """A cancellation stays a cancellation."""
        try:
            raise ResponseNeverReceived([Failure(CancelledError())])
        except Exception:
            error = to_fetch_error("s.example", Failure())
        self.assertIsInstance(error, CancelledError)


class CAFileTests(SynchronousTestCase):
    """Loading --federation-ca files."""

    def test_missing_file(self) -> None:
        """A missing CA file is a ConfigError naming it."""
        path = self.mktemp()
        with self.assertRaises(ConfigError) as cm:
            FederationClient(MemoryReactorClock(), ip_filter=IPFilter(), federation_ca_files=[path])
        self.assertIn(path, str(cm.exception))

    def test_not_pem(self) -> None:
        """A file without a PEM certificate is a ConfigError."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a certificate\n")
        self.assertRaises(ConfigError, load_ca_files, [path])

    def test_bundle(self) -> None:
        """Every certificate of a PEM bundle is loaded."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(trustme.CA().cert_pem.bytes() + trustme.CA().cert_pem.bytes())
        self.assertEqual(len(load_ca_files([path])), 2)
