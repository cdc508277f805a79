"""
Reading a response body with a size cap, and sending one from bytes.

The cap is enforced while reading: as soon as more than ``max_bytes``
arrive the connection is dropped, so a hostile peer cannot make us buffer
an unbounded body. A ``Content-Length`` above the cap is refused before
reading anything.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

_RESPONSE_DONE = Failure(ResponseDone())


class BodyTooLarge(Exception):
    """
    A response body exceeded the cap.

    :ivar max_bytes: The cap.
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"response body exceeds {max_bytes} bytes")
        self.max_bytes = max_bytes


def _drop(transport: object) -> None:
    # The body transport is a producer proxy; stopProducing drops the
    # underlying connection rather than waiting for a graceful close.
    abort = getattr(transport, "abortConnection", None)
    if abort is not None:
        abort()
    else:
        transport.stopProducing()  # type: ignore[attr-defined]


class _CappedBodyProtocol(Protocol):
    def __init__(self, done: Deferred[bytes], max_bytes: int) -> None:
        self._done = done
        self._max_bytes = max_bytes
        self._chunks: list[bytes] = []
        self._length = 0

    def dataReceived(self, data: bytes) -> None:
        if self._done.called:
            return
        self._length += len(data)
        if self._length > self._max_bytes:
            self._chunks = []
            _drop(self.transport)
            self._done.errback(BodyTooLarge(self._max_bytes))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = _RESPONSE_DONE) -> None:
        if self._done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._done.callback(b"".join(self._chunks))
        else:
            self._done.errback(reason)


class _Discard(Protocol):
    def connectionMade(self) -> None:
        _drop(self.transport)


def read_capped_body(response: IResponse, max_bytes: int) -> Deferred[bytes]:
    """
    Read ``response``'s body; errback with :class:`BodyTooLarge` (having
    dropped the connection) when it is, or announces it will be, longer
    than ``max_bytes``. Cancelling drops the connection.
    """
    if response.length is not UNKNOWN_LENGTH and response.length > max_bytes:
        response.deliverBody(_Discard())
        d: Deferred[bytes] = Deferred()
        d.errback(BodyTooLarge(max_bytes))
        return d

    def cancel(d: Deferred[bytes]) -> None:
        if protocol.transport is not None:
            _drop(protocol.transport)

    done: Deferred[bytes] = Deferred(cancel)
    protocol = _CappedBodyProtocol(done, max_bytes)
    response.deliverBody(protocol)
    return done


@implementer(IBodyProducer)
class BytesProducer:
    """
    Sends a request body held in memory in one write (``FileBodyProducer``
    would need a cooperator and so the global reactor).
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        """Write the whole body."""
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        """Nothing to pause: everything was written at once."""

    def resumeProducing(self) -> None:
        """Nothing to resume."""

    def stopProducing(self) -> None:
        """Nothing to stop."""
