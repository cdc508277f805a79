"""
:class:`FederationClient`: HTTPS requests to other Matrix servers with
server discovery, an address filter, CA-verified TLS, a response size
cap, a total timeout and a concurrency cap.

One request, in order: discover where the server lives
(:mod:`~synkeys.federation.discovery`), wait for a concurrency slot,
resolve the host and refuse blocked addresses
(:mod:`~synkeys.federation.endpoint`), connect with TLS verified for the
name the spec requires (:mod:`~synkeys.federation.tls`), send, and read
the body within the cap (:mod:`~synkeys.federation.body`). The request
timeout bounds all of it, including the wait for a slot, so a caller
always hears back in time.

Connections are not reused: each request makes its own, so the peer
certificate recorded for a response is the one that connection saw.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore
from twisted.internet.interfaces import IHostnameResolver
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    ResponseFailed,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from synkeys.errors import FetchError, InvalidServerName
from synkeys.federation.body import BodyTooLarge, BytesProducer, read_capped_body
from synkeys.federation.discovery import (
    WELL_KNOWN_MAX_BYTES,
    ResolvedServer,
    ServerDiscovery,
    SrvLookup,
    make_srv_lookup,
)
from synkeys.federation.endpoint import FilteringTLSEndpoint
from synkeys.federation.ipfilter import IPFilter
from synkeys.federation.resolver import SharedHostResolver
from synkeys.federation.tls import FederationTLSPolicy
from synkeys.interfaces import FederationResponse, IFederationClient
from synkeys.servername import parse_server_name

log = Logger()

#: Default cap on concurrent requests.
DEFAULT_MAX_CONCURRENT = 50


class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    """
    The pool's per-connection factory, without Twisted's "Starting
    factory" and "Stopping factory" log lines: two events per outgoing
    connection, each formatted and written by twistd's log observer, for
    every origin of a cold fan-out.
    """

    noisy = False


class _QuietConnectionPool(HTTPConnectionPool):
    """An :class:`HTTPConnectionPool` whose connections' factories are quiet."""

    # Twisted offers no public way to choose this factory; the attribute has
    # been the pool's seam for it since Twisted 12.1.
    _factory = _QuietHTTP11ClientFactory


@implementer(IAgentEndpointFactory)
class _OneEndpoint:
    """Answers every URI with the endpoint built for this one request."""

    def __init__(self, endpoint: FilteringTLSEndpoint) -> None:
        self._endpoint = endpoint

    def endpointForURI(self, uri: Any) -> FilteringTLSEndpoint:
        return self._endpoint


@implementer(IFederationClient)
class FederationClient:
    """
    HTTPS to other Matrix servers.

    :param reactor: Provides TCP, time and (unless ``resolver`` is given)
        ``nameResolver``.
    :param ip_filter: Which addresses may be connected to.
    :param federation_ca_files: PEM files of CAs trusted besides the
        platform's.
    :param connect_timeout_s: Bound on each TCP connection attempt.
    :param request_timeout_s: Bound on a whole request: discovery, waiting
        for a slot, connecting, sending and reading the body.
    :param max_response_bytes: Largest body read; more is ``"too_large"``.
    :param max_concurrent: Requests in flight at once; more wait.
    :param resolver: Host name resolver; default ``reactor.nameResolver``.
        Concurrent look-ups of one host share one call to it.
    :param srv_lookup: SRV lookup; default uses ``twisted.names``.
    :param user_agent: ``User-Agent`` header value.
    :param discovery: Replaces server discovery (for tests); by default a
        :class:`ServerDiscovery` fetching well-known with :meth:`fetch_url`.
    :raises ConfigError: when a CA file cannot be loaded.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        ip_filter: IPFilter,
        federation_ca_files: Iterable[str] = (),
        connect_timeout_s: float = 10,
        request_timeout_s: float = 30,
        max_response_bytes: int = 1024 * 1024,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        resolver: IHostnameResolver | None = None,
        srv_lookup: SrvLookup | None = None,
        user_agent: bytes = b"synkeys/0.1",
        discovery: ServerDiscovery | None = None,
    ) -> None:
        self._reactor = reactor
        self._ip_filter = ip_filter
        self._tls_policy = FederationTLSPolicy(federation_ca_files)
        self._connect_timeout_s = connect_timeout_s
        self._request_timeout_s = request_timeout_s
        self._max_response_bytes = max_response_bytes
        self._semaphore = DeferredSemaphore(max_concurrent)
        # Concurrent look-ups of one host (a fan-out to servers sharing a
        # host) share one call to the resolver.
        self._resolver = SharedHostResolver(
            resolver if resolver is not None else reactor.nameResolver
        )
        self._user_agent = user_agent
        self._pool = _QuietConnectionPool(reactor, persistent=False)
        if discovery is None:
            discovery = ServerDiscovery(
                reactor,
                self.fetch_url,
                srv_lookup if srv_lookup is not None else make_srv_lookup(reactor),
            )
        self._discovery = discovery

    def get(self, server_name: str, path: bytes) -> Deferred[FederationResponse]:
        """
        GET ``path`` from ``server_name``. Fires with the response whatever
        its status, except 3xx (``FetchError`` kind ``"redirect"``: key
        requests are never redirected); errbacks with :class:`FetchError`.
        """
        return self._federation_request(b"GET", server_name, path, None)

    def post_json(self, server_name: str, path: bytes, body: bytes) -> Deferred[FederationResponse]:
        """POST the JSON ``body`` bytes to ``path`` on ``server_name``; as :meth:`get`."""
        return self._federation_request(b"POST", server_name, path, body)

    def fetch_url(
        self, url: bytes, max_bytes: int = WELL_KNOWN_MAX_BYTES
    ) -> Deferred[FederationResponse]:
        """
        GET one ``https`` URL, such as a well-known file, without
        discovery and without following redirects (a 3xx is returned, not
        raised). The certificate must be valid for the URL's host, and the
        address filter applies.
        """
        try:
            target = _target_for_url(url)
        except ValueError as e:
            failed: Deferred[FederationResponse] = Deferred()
            failed.errback(FetchError(url.decode("ascii", "replace"), str(e), "http"))
            return failed
        path = urlsplit(url).path or b"/"
        query = urlsplit(url).query
        if query:
            path += b"?" + query
        d = Deferred.fromCoroutine(
            self._exchange(target.host_header, target, b"GET", path, None, max_bytes)
        )
        return self._with_timeout(d, target.host_header)

    def _federation_request(
        self, method: bytes, server_name: str, path: bytes, body: bytes | None
    ) -> Deferred[FederationResponse]:
        if not path.startswith(b"/"):
            raise ValueError(f"path must start with '/': {path!r}")
        d = Deferred.fromCoroutine(self._request(method, server_name, path, body))
        return self._with_timeout(d, server_name)

    def _with_timeout(
        self, d: Deferred[FederationResponse], server_name: str
    ) -> Deferred[FederationResponse]:
        def timed_out(
            result: FederationResponse | Failure, timeout_s: float
        ) -> FederationResponse | Failure:
            if isinstance(result, Failure):
                log.info("request to {server} timed out", server=server_name)
                return Failure(
                    FetchError(
                        server_name,
                        f"no complete response within {timeout_s}s",
                        "timeout",
                    )
                )
            return result

        return d.addTimeout(self._request_timeout_s, self._reactor, onTimeoutCancel=timed_out)

    async def _request(
        self, method: bytes, server_name: str, path: bytes, body: bytes | None
    ) -> FederationResponse:
        target = await self._discovery.resolve(server_name)
        response = await self._exchange(
            server_name, target, method, path, body, self._max_response_bytes
        )
        if 300 <= response.code < 400:
            location = b", ".join(response.headers.get(b"location", []))
            raise FetchError(
                server_name,
                f"refusing to follow HTTP {response.code} redirect to "
                f"{location.decode('ascii', 'replace')!r}",
                "redirect",
            )
        return response

    async def _exchange(
        self,
        server_name: str,
        target: ResolvedServer,
        method: bytes,
        path: bytes,
        body: bytes | None,
        max_bytes: int,
    ) -> FederationResponse:
        await self._semaphore.acquire()
        try:
            return await self._exchange_now(server_name, target, method, path, body, max_bytes)
        except CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the one place failures become FetchError
            raise to_fetch_error(server_name, Failure()) from None
        finally:
            self._semaphore.release()

    async def _exchange_now(
        self,
        server_name: str,
        target: ResolvedServer,
        method: bytes,
        path: bytes,
        body: bytes | None,
        max_bytes: int,
    ) -> FederationResponse:
        recorder = self._tls_policy.recorder_for(target.tls_server_name)
        endpoint = FilteringTLSEndpoint(
            self._reactor,
            self._resolver,
            self._ip_filter,
            server_name,
            target.host,
            target.port,
            recorder,
            self._connect_timeout_s,
        )
        agent = Agent.usingEndpointFactory(self._reactor, _OneEndpoint(endpoint), self._pool)
        host_header = target.host_header.encode("ascii")
        headers = Headers(
            {
                b"host": [host_header],
                b"user-agent": [self._user_agent],
                b"accept": [b"application/json"],
            }
        )
        producer: IBodyProducer | None = None
        if body is not None:
            headers.addRawHeader(b"content-type", b"application/json")
            producer = BytesProducer(body)
        response = await agent.request(method, b"https://" + host_header + path, headers, producer)
        peer_sha256 = recorder.peer_certificate_sha256()
        content = await read_capped_body(response, max_bytes)
        response_headers: dict[bytes, list[bytes]] = {}
        for name, values in response.headers.getAllRawHeaders():
            response_headers.setdefault(name.lower(), []).extend(values)
        # No per-request log line: twistd formats and writes every event,
        # debug included, and a cold fan-out makes one request per origin.
        # Each fetch's outcome is logged once by synkeys.metrics.ObservedFetcher
        # and counted in synkeys_federation_requests_total.
        return FederationResponse(response.code, content, peer_sha256, response_headers)


def _target_for_url(url: bytes) -> ResolvedServer:
    parts = urlsplit(url)
    if parts.scheme != b"https":
        raise ValueError(f"not an https URL: {url!r}")
    netloc = parts.netloc.decode("ascii")
    if "@" in netloc:
        raise ValueError(f"credentials in URL: {url!r}")
    try:
        parsed = parse_server_name(netloc)
    except InvalidServerName as e:
        raise ValueError(f"bad host in URL {url!r}: {e}") from None
    port = parsed.port if parsed.port is not None else 443
    return ResolvedServer(parsed.host, port, parsed.host, netloc)


def _reasons(failure: Failure) -> list[Failure]:
    value = failure.value
    if isinstance(value, ResponseFailed):
        return [r for reason in value.reasons for r in _reasons(reason)]
    wrapped = getattr(value, "reasons", None)
    if isinstance(wrapped, list) and wrapped and all(isinstance(r, Failure) for r in wrapped):
        return [r for reason in wrapped for r in _reasons(reason)]
    return [failure]


def to_fetch_error(server_name: str, failure: Failure) -> Exception:
    """
    Translate a failed request into a :class:`FetchError` with a ``kind``
    (or, for a cancellation, a :class:`CancelledError` to re-raise).
    """
    reasons = _reasons(failure)
    for reason in reasons:
        if isinstance(reason.value, FetchError):
            return reason.value
        if reason.check(CancelledError, ierror.ConnectingCancelledError):
            return CancelledError()
    for reason in reasons:
        if reason.check(SSL.Error, VerificationError):
            return FetchError(server_name, f"TLS failure: {reason.getErrorMessage()}", "tls")
    reason = reasons[0]
    kind_name = type(reason.value).__name__
    message = reason.getErrorMessage() or kind_name
    if reason.check(BodyTooLarge):
        return FetchError(server_name, message, "too_large")
    if reason.check(ierror.DNSLookupError):
        return FetchError(server_name, message, "dns")
    if reason.check(ierror.ConnectError):
        return FetchError(server_name, message, "connect")
    if failure.check(ResponseNeverReceived) and reason.check(
        ierror.ConnectionDone, ierror.ConnectionLost
    ):
        return FetchError(server_name, "connection closed before a response", "connect")
    log.info("request to {server} failed: {error!r}", server=server_name, error=reason.value)
    return FetchError(server_name, f"{kind_name}: {message}", "http")
