"""
Whether this instance can serve, for load balancers and for shutdown.

- :class:`HealthResource` answers ``GET /health``: 200 when the key store
  answers, 503 when it does not or when the instance is shutting down, so a
  load balancer sends traffic to the other instances.
- :class:`ServiceSite` is a :class:`~twisted.web.server.Site` that knows
  its connections and the requests it is answering, so a stopping service
  can stop accepting connections, let those requests finish and their
  responses go out (within a bound), and only then close the store (see
  :meth:`synkeys.app.SynkeysService.stopService`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Set

from twisted.internet import defer, error
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from synkeys.http import BoundedRequest, write_json_bytes
from synkeys.interfaces import IKeyStore
from synkeys.signing import canonical_json

__all__ = ["DEFAULT_PING_TIMEOUT_S", "HealthResource", "RequestHook", "ServiceSite"]

log = Logger()

#: How long ``GET /health`` waits for the store before answering 503.
DEFAULT_PING_TIMEOUT_S = 5.0

#: Called as ``hook(request, duration_s, aborted)`` when a request of a
#: :class:`ServiceSite` is done; ``aborted`` when the client went away first.
#: ``duration_s`` is from the arrival of the request's first line. Requests
#: whose headers never all arrived are not reported.
RequestHook = Callable[[Request, float, bool], None]


class HealthResource(Resource):
    """
    ``GET /health`` (and ``HEAD``): ``{"status": "ok"}`` with 200 when
    ``store.ping()`` succeeds within ``ping_timeout_s``; 503 with
    ``{"status": "unavailable", "error": ...}`` when it fails or is too
    slow (the store's own message is logged, not answered), and with
    ``{"status": "draining"}`` once ``draining()`` is true.

    Each request pings the store anew: a load balancer polling every few
    seconds costs one ``SELECT 1`` each time, and sees an outage (and the
    recovery) at its next poll.

    :param store: The store to ping.
    :param clock: Times the ping out.
    :param draining: Whether the instance is shutting down.
    :param ping_timeout_s: How long to wait for the store.
    """

    isLeaf = True

    def __init__(
        self,
        store: IKeyStore,
        clock: IReactorTime,
        *,
        draining: Callable[[], bool] = lambda: False,
        ping_timeout_s: float = DEFAULT_PING_TIMEOUT_S,
    ) -> None:
        super().__init__()
        self._store = store
        self._clock = clock
        self._draining = draining
        self._ping_timeout_s = ping_timeout_s

    def render(self, request: Request) -> Any:
        """Answer GET and HEAD on ``/health`` or ``/health/``; 404 or 405 otherwise."""
        request.setHeader(b"Cache-Control", b"no-store")
        if request.postpath not in ([], [b""]):
            _answer(request, 404, {"status": "not found"})
        elif request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            _answer(request, 405, {"status": "method not allowed"})
        elif self._draining():
            _answer(request, 503, {"status": "draining"})
        else:
            self._ping(request)
        return NOT_DONE_YET

    def _ping(self, request: Request) -> None:
        try:
            ping: Deferred[None] = self._store.ping()
        except Exception as e:  # a broken store must still get an answer out
            ping = Deferred()
            ping.errback(e)
        ping.addTimeout(self._ping_timeout_s, self._clock)
        gone = [False]

        def client_gone(_: object) -> None:
            gone[0] = True
            ping.cancel()

        request.notifyFinish().addErrback(client_gone)

        def healthy(_: object) -> None:
            if not gone[0]:
                _answer(request, 200, {"status": "ok"})

        def unhealthy(failure: Failure) -> None:
            if gone[0]:
                return
            if failure.check(CancelledError, defer.TimeoutError, error.TimeoutError):
                reason = f"the key store did not answer within {self._ping_timeout_s:g} s"
                detail = reason
            else:
                # The details (database host, driver message) go to the log,
                # not to whoever can reach the public listener.
                reason = "the key store is unavailable"
                detail = failure.getErrorMessage() or repr(failure.value)
            log.warn("Health check failed: {reason}", reason=detail)
            _answer(request, 503, {"status": "unavailable", "error": reason})

        ping.addCallbacks(healthy, unhealthy)
        ping.addErrback(lambda f: log.failure("Answering a health check failed", f))


def _answer(request: Request, code: int, body: dict) -> None:
    write_json_bytes(request, code, canonical_json(body))


class _Connection:
    """One connection of a :class:`ServiceSite` and its unanswered requests."""

    __slots__ = ("transport", "requests")

    def __init__(self) -> None:
        self.transport: Any = None
        #: Almost always none or one: HTTP/1.1 answers in order.
        self.requests: List[Request] = []

    def forget(self, request: Request) -> None:
        """Remove ``request`` (compared by identity: Request.__eq__ is Python code)."""
        requests = self.requests
        if requests and requests[-1] is request:
            requests.pop()
            return
        for index in range(len(requests) - 2, -1, -1):
            if requests[index] is request:
                del requests[index]
                return


class ServiceSite(Site):
    """
    A :class:`~twisted.web.server.Site` that tracks its connections and
    the requests it is answering, so that it can drain.

    Once :meth:`start_draining` is called, idle kept-alive connections are
    closed, and every other connection is closed as soon as its request is
    answered (``Connection: close``), so clients such as load balancers go
    to other instances. :meth:`drain` waits for the last connection to
    close, which also means every response has been sent.

    :param resource: The root resource.
    :param reactor: Times requests and the drain bound, and runs the
        connections' timeouts.
    :param on_request_done: Called for every finished or abandoned request.

    :ivar draining: Whether :meth:`start_draining` has been called.
    """

    def __init__(
        self,
        resource: IResource,
        *,
        reactor: IReactorTime,
        on_request_done: Optional[RequestHook] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, reactor=reactor, **kwargs)
        self.draining = False
        self._on_request_done = on_request_done
        self._connections: Dict[Any, _Connection] = {}
        self._drain_waiters: List[Deferred[int]] = []

    @property
    def open_requests(self) -> Set[Request]:
        """The requests being answered."""
        return {r for c in self._connections.values() for r in c.requests}

    @property
    def open_request_count(self) -> int:
        """How many requests are being answered."""
        return sum(len(c.requests) for c in self._connections.values())

    @property
    def open_connections(self) -> int:
        """How many connections are open."""
        return len(self._connections)

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802
        """A channel whose requests and whose end are tracked."""
        protocol = super().buildProtocol(addr)
        if protocol is None:
            return None
        connection = self._connections[protocol] = _Connection()
        make_request = protocol.requestFactory
        make_connection = protocol.makeConnection

        def connected(transport: Any) -> None:
            connection.transport = transport
            make_connection(transport)

        protocol.makeConnection = connected

        requests = connection.requests
        seconds = self.reactor.seconds
        hook = self._on_request_done

        def done(request: Any, lost: bool) -> None:
            connection.forget(request)
            # A request whose headers never all arrived (the client left,
            # or Twisted refused them with a 400) has no path: it was not
            # a request the service saw, and is not reported.
            if hook is not None and getattr(request, "path", None) is not None:
                try:
                    hook(request, seconds() - request.started_s, lost)
                except Exception:  # a metrics hook must not break requests
                    log.failure("request hook failed")

        def request_factory(*args: Any) -> Request:
            # Called when a request's first line arrives: from here until it
            # is answered (or lost), its connection is not idle and the
            # request is open. A BoundedRequest reports its end through
            # on_done; a Deferred from notifyFinish() costs about two
            # microseconds more, a measurable share of a /server request.
            request: Any = make_request(*args)
            request.started_s = seconds()
            requests.append(request)
            if isinstance(request, BoundedRequest):
                request.on_done = done
            else:
                request.notifyFinish().addBoth(
                    lambda result: done(request, isinstance(result, Failure))
                )
            return request

        protocol.requestFactory = request_factory
        connection_lost = protocol.connectionLost

        def lost(reason: Failure) -> None:
            try:
                connection_lost(reason)
            finally:
                self._connections.pop(protocol, None)
                self._maybe_drained()

        # The transport calls this when the connection has closed, after
        # everything written to it was sent.
        protocol.connectionLost = lost
        return protocol

    def getResourceFor(self, request: Request) -> IResource:  # noqa: N802
        """
        While draining, make ``request``'s connection close once it is answered.

        This is the first moment after the request's headers arrived, when
        :class:`~twisted.web.http.HTTPChannel` has decided whether the
        connection persists; deciding earlier (when the request is created)
        would be overridden.
        """
        if self.draining:
            _close_after(request)
        return super().getResourceFor(request)

    def start_draining(self) -> None:
        """
        From now on, close each connection once its request is answered;
        close idle connections now.
        """
        self.draining = True
        for request in self.open_requests:
            _close_after(request)
        for connection in list(self._connections.values()):
            if not connection.requests and connection.transport is not None:
                # A TLS transport does not close while the channel is still
                # registered as its producer (as HTTPChannel.loseConnection knows).
                connection.transport.unregisterProducer()
                connection.transport.loseConnection()

    def drain(self, timeout_s: float) -> Deferred[int]:
        """
        :meth:`start_draining`, and wait for every connection to close.

        :param timeout_s: The most to wait.
        :returns: A Deferred firing with how many connections were still
            open when it stopped waiting (0 when every one closed).
        """
        self.start_draining()
        if not self._connections:
            return succeed(0)
        waiter: Deferred[int] = Deferred()
        self._drain_waiters.append(waiter)
        timer: IDelayedCall = self.reactor.callLater(timeout_s, self._give_up, waiter)

        def stop_timer(result: int) -> int:
            if timer.active():
                timer.cancel()
            return result

        return waiter.addCallback(stop_timer)

    def _maybe_drained(self) -> None:
        if self._connections:
            return
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            waiter.callback(0)

    def _give_up(self, waiter: Deferred[int]) -> None:
        if waiter in self._drain_waiters:
            self._drain_waiters.remove(waiter)
            waiter.callback(len(self._connections))


def _close_after(request: Request) -> None:
    """Make the connection close once ``request`` is answered."""
    if not request.startedWriting:
        request.setHeader(b"Connection", b"close")
    channel = request.channel
    if channel is not None and hasattr(channel, "persistent"):
        channel.persistent = False
