"""
End-to-end tests of :class:`synkeys.federation.FederationClient` over real
TLS sockets on 127.0.0.1, with a trustme CA.
"""

from __future__ import annotations

import hashlib
import json

import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Factory
from twisted.internet.ssl import PrivateCertificate
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from synkeys.errors import FetchError
from synkeys.federation.client import FederationClient
from synkeys.federation.ipfilter import IPFilter
from synkeys.federation.testing import StaticHostnameResolver, StaticSrvLookup

KEYS_BODY = json.dumps({"server_name": "origin.test"}).encode()


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, render):
        super().__init__()
        self._render = render

    def render_GET(self, request):  # noqa: N802
        return self._render(request)

    def render_POST(self, request):  # noqa: N802
        return self._render(request)


def _echo(request):
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(
        {
            "host": request.getHeader(b"host").decode(),
            "method": request.method.decode(),
            "body": request.content.read().decode(),
            "user_agent": request.getHeader(b"user-agent").decode(),
        }
    ).encode()


def _redirect(request):
    request.setResponseCode(302)
    request.setHeader(b"location", b"https://elsewhere.test/")
    return b""


def _hang(request):
    return NOT_DONE_YET


def _not_found(request):
    request.setResponseCode(404)
    return b'{"errcode":"M_UNRECOGNIZED"}'


def _big_chunked(request):
    # No Content-Length: the cap must be enforced while reading. The
    # response never finishes, so only the client can close the connection.
    for _ in range(64):
        request.write(b"x" * 1024)
    return NOT_DONE_YET


def _big_announced(request):
    # Announces a body over the cap, sends a little and never finishes.
    request.setHeader(b"content-length", b"1000000")
    request.write(b"z" * 100)
    return NOT_DONE_YET


def _site() -> Site:
    root = Resource()
    root.putChild(b"keys", _Leaf(lambda r: KEYS_BODY))
    root.putChild(b"echo", _Leaf(_echo))
    root.putChild(b"redirect", _Leaf(_redirect))
    root.putChild(b"hang", _Leaf(_hang))
    root.putChild(b"missing", _Leaf(_not_found))
    root.putChild(b"big", _Leaf(_big_announced))
    root.putChild(b"bigchunked", _Leaf(_big_chunked))
    return Site(root)


class _TrackingWrapper(ProtocolWrapper):
    def connectionLost(self, reason):  # noqa: N802
        super().connectionLost(reason)
        self.factory.lost(self)


class _TrackingFactory(WrappingFactory):
    """Wraps a factory and can wait until every connection it made is gone."""

    protocol = _TrackingWrapper

    def __init__(self, wrapped: Factory) -> None:
        super().__init__(wrapped)
        self._waiting: dict = {}

    def registerProtocol(self, p):  # noqa: N802
        super().registerProtocol(p)
        self._waiting[p] = Deferred()

    def lost(self, p) -> None:
        d = self._waiting.pop(p, None)
        if d is not None:
            d.callback(None)

    def dropped(self) -> Deferred:
        """Fire when every connection so far has been closed (by the client)."""
        return gatherResults(list(self._waiting.values())).addTimeout(5, reactor)

    def all_lost(self) -> Deferred:
        for p in list(self._waiting):
            p.transport.abortConnection()
        return gatherResults(list(self._waiting.values()))


class FederationTLSTests(TestCase):
    """FederationClient against a real TLS server on 127.0.0.1."""

    def setUp(self) -> None:
        self.factories: list = []
        self.ca = trustme.CA()
        ca_path = self.mktemp()
        self.ca.cert_pem.write_to_path(ca_path)
        self.ca_path = ca_path
        self.good = self._listen(self.ca.issue_cert("origin.test", "127.0.0.1"))
        self.wrong = self._listen(self.ca.issue_cert("other.test"))
        self.resolver = StaticHostnameResolver({"origin.test": ["127.0.0.1"]})

    def _listen(self, leaf: trustme.LeafCert):
        private = PrivateCertificate.loadPEM(leaf.private_key_and_cert_chain_pem.bytes())
        factory = _TrackingFactory(_site())
        self.factories.append(factory)
        port = reactor.listenSSL(0, factory, private.options(), interface="127.0.0.1")

        async def cleanup() -> None:
            await port.stopListening()
            await factory.all_lost()

        self.addCleanup(lambda: Deferred.fromCoroutine(cleanup()))
        der = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).public_bytes(
            Encoding.DER
        )
        return port.getHost().port, hashlib.sha256(der).digest()

    def _client(self, allow: bool = True, **kwargs) -> FederationClient:
        options = dict(
            ip_filter=IPFilter(allowed=["127.0.0.0/8"] if allow else []),
            federation_ca_files=[self.ca_path],
            resolver=self.resolver,
            srv_lookup=StaticSrvLookup(),
            request_timeout_s=5,
        )
        options.update(kwargs)
        return FederationClient(reactor, **options)

    async def _fetch_error(self, d: Deferred) -> FetchError:
        try:
            response = await d
        except FetchError as e:
            return e
        self.fail(f"expected FetchError, got {response!r}")  # pragma: no cover

    async def test_fetch_by_ip_literal(self) -> None:
        """A GET to an IP-literal server name returns the body and the peer certificate's SHA-256."""
        port, sha256 = self.good
        response = await self._client().get(f"127.0.0.1:{port}", b"/keys")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.body, KEYS_BODY)
        self.assertEqual(response.peer_certificate_sha256, sha256)

    async def test_fetch_by_name_sends_headers(self) -> None:
        """A GET by host name verifies the name and sends Host, User-Agent and no body."""
        port, sha256 = self.good
        response = await self._client().get(f"origin.test:{port}", b"/echo")
        sent = json.loads(response.body)
        self.assertEqual(sent["host"], f"origin.test:{port}")
        self.assertEqual(sent["user_agent"], "synkeys/0.1")
        self.assertEqual(sent["method"], "GET")
        self.assertEqual(response.peer_certificate_sha256, sha256)
        self.assertEqual(response.headers[b"content-type"], [b"application/json"])

    async def test_post_json(self) -> None:
        """post_json sends the body bytes with method POST."""
        port, _ = self.good
        body = b'{"server_keys":{}}'
        response = await self._client().post_json(f"origin.test:{port}", b"/echo", body)
        sent = json.loads(response.body)
        self.assertEqual((sent["method"], sent["body"]), ("POST", body.decode()))

    async def test_non_2xx_is_a_response(self) -> None:
        """A 404 is returned as a response with its code, not raised."""
        port, _ = self.good
        response = await self._client().get(f"origin.test:{port}", b"/missing")
        self.assertEqual(response.code, 404)
        self.assertIn(b"M_UNRECOGNIZED", response.body)

    async def test_wrong_certificate(self) -> None:
        """A certificate for another name fails with kind "tls"."""
        port, _ = self.wrong
        error = await self._fetch_error(self._client().get(f"origin.test:{port}", b"/keys"))
        self.assertEqual(error.kind, "tls")

    async def test_untrusted_ca(self) -> None:
        """Without the test CA the certificate does not verify: kind "tls"."""
        port, _ = self.good
        client = self._client(federation_ca_files=[])
        error = await self._fetch_error(client.get(f"origin.test:{port}", b"/keys"))
        self.assertEqual(error.kind, "tls")

    async def test_blocked_without_allow_range(self) -> None:
        """Without --allow-ip-range 127.0.0.0/8 the loopback server is refused as "blocked"."""
        port, _ = self.good
        error = await self._fetch_error(
            self._client(allow=False).get(f"origin.test:{port}", b"/keys")
        )
        self.assertEqual(error.kind, "blocked")
        self.assertIn("127.0.0.1", error.reason)

    async def test_too_large_with_length(self) -> None:
        """A body whose Content-Length exceeds the cap fails with kind "too_large"."""
        port, _ = self.good
        client = self._client(max_response_bytes=1000)
        error = await self._fetch_error(client.get(f"origin.test:{port}", b"/big"))
        self.assertEqual(error.kind, "too_large")
        await self.factories[0].dropped()

    async def test_too_large_chunked(self) -> None:
        """A chunked body is cut off with kind "too_large" once it passes the cap."""
        port, _ = self.good
        client = self._client(max_response_bytes=10000)
        error = await self._fetch_error(client.get(f"origin.test:{port}", b"/bigchunked"))
        self.assertEqual(error.kind, "too_large")
        await self.factories[0].dropped()

    async def test_timeout(self) -> None:
        """A server that never answers fails with kind "timeout" after the request timeout."""
        port, _ = self.good
        client = self._client(request_timeout_s=0.5)
        error = await self._fetch_error(client.get(f"origin.test:{port}", b"/hang"))
        self.assertEqual(error.kind, "timeout")
        await self.factories[0].dropped()

    async def test_redirect_refused(self) -> None:
        """A 302 is not followed: kind "redirect"."""
        port, _ = self.good
        error = await self._fetch_error(self._client().get(f"origin.test:{port}", b"/redirect"))
        self.assertEqual(error.kind, "redirect")
        self.assertIn("elsewhere.test", error.reason)

    async def test_fetch_url_returns_redirects(self) -> None:
        """fetch_url (used for well-known) returns a 3xx for discovery to follow."""
        port, _ = self.good
        response = await self._client().fetch_url(f"https://origin.test:{port}/redirect".encode())
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers[b"location"], [b"https://elsewhere.test/"])

    async def test_connection_refused(self) -> None:
        """Nothing listening fails with kind "connect"."""
        port, _ = self.good
        # The wrong-certificate server's port is closed after this test's
        # cleanup; use a fresh closed port instead.
        probe = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        closed_port = probe.getHost().port
        await probe.stopListening()
        error = await self._fetch_error(self._client().get(f"origin.test:{closed_port}", b"/keys"))
        self.assertEqual(error.kind, "connect")
