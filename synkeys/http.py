"""
HTTP plumbing shared by every resource: JSON and error responses, CORS
headers, and running a coroutine behind ``NOT_DONE_YET``.

Every exception becomes ``{"errcode", "error"}`` JSON here and only here.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from synkeys.errors import MatrixError, unrecognized
from synkeys.signing import canonical_json

log = Logger()

_CORS_HEADERS = [
    (b"Access-Control-Allow-Origin", b"*"),
    (b"Access-Control-Allow-Methods", b"GET, HEAD, POST, PUT, DELETE, OPTIONS"),
    (
        b"Access-Control-Allow-Headers",
        b"X-Requested-With, Content-Type, Authorization, Date",
    ),
]


#: Every JSON response's headers but its length, each value in a list of
#: its own as ``Headers.setRawHeaders`` takes it.
_JSON_HEADERS = [(b"Content-Type", [b"application/json"])] + [
    (name, [value]) for name, value in _CORS_HEADERS
]


def write_json_bytes(request: Request, code: int, body: bytes) -> None:
    """Answer ``code`` with ``body`` (already JSON bytes) and finish."""
    request.setResponseCode(code)
    # Straight into the headers rather than through Request.setHeader: this
    # runs for every request, and the key server's answer is otherwise all
    # prepared bytes.
    headers = request.responseHeaders
    for name, values in _JSON_HEADERS:
        headers.setRawHeaders(name, values)
    headers.setRawHeaders(b"Content-Length", [b"%d" % (len(body),)])
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


def error_for(failure: Failure) -> MatrixError:
    """
    The Matrix error to answer for ``failure``: its own for a
    :class:`MatrixError`, 503 for a store outage, 500 (logged) otherwise.
    """
    exc = failure.value
    if isinstance(exc, MatrixError):
        return exc
    # Imported here: storage sits on a lower floor and http must not need it
    # to exist for the key server alone to run.
    from synkeys.storage import StoreUnavailable

    if isinstance(exc, StoreUnavailable):
        return MatrixError(503, "M_UNKNOWN", "The key store is unavailable; try again.")
    log.failure("Unexpected error answering a request", failure)
    return MatrixError(500, "M_UNKNOWN", "Internal server error")


def render_error(request: Request, error: MatrixError) -> None:
    """Answer a Matrix error as JSON and finish."""
    write_json_bytes(request, error.code, canonical_json(error.to_json()))


def method_not_allowed(request: Request, allowed: bytes, msg: str) -> object:
    """Answer 405 ``M_UNRECOGNIZED`` with an ``Allow`` header of ``allowed``."""
    request.setHeader(b"Allow", allowed)
    render_error(request, unrecognized(405, msg))
    return NOT_DONE_YET


#: ``--access-log`` values that are not a file path.
ACCESS_LOG_OFF = "off"
ACCESS_LOG_TWISTD = "log"


def _no_access_log(request: http.Request) -> None:
    """Write no access log line."""


def configure_access_log(site: Site, where: str) -> None:
    """
    Send ``site``'s access log (one combined-log-format line per request)
    to ``where``: :data:`ACCESS_LOG_OFF`, :data:`ACCESS_LOG_TWISTD` (the
    global log, Twisted's default) or a file path (opened when the site
    starts, appended to).

    Call it before the site starts listening. Off, a request costs no log
    formatting at all: through the twistd log, formatting and writing the
    line is about half of the CPU time of answering ``GET
    /_matrix/key/v2/server`` (see ``docs/performance.md``).
    """
    if where == ACCESS_LOG_OFF:
        site.log = _no_access_log  # type: ignore[method-assign]
    elif where != ACCESS_LOG_TWISTD:
        site.logPath = where


#: Largest request body read, in bytes.
MAX_BODY_BYTES = 1024 * 1024


#: Whether this Twisted lets a request skip parsing POST bodies as forms.
_CAN_SKIP_FORM_PARSING = (
    "parsePOSTFormSubmission" in inspect.signature(http.Request.__init__).parameters
)


class BoundedRequest(Request):
    """
    A request that keeps at most :data:`MAX_BODY_BYTES` of its body: more is
    discarded (and the resource answers 413), and a client that keeps
    sending far past the cap is disconnected.
    """

    max_body_bytes = MAX_BODY_BYTES
    body_too_large = False
    _body_bytes = 0

    #: Called once, with this request and whether its connection was lost
    #: before it was answered, when it is finished or lost: the cheap form
    #: of a ``notifyFinish()`` Deferred for per-request bookkeeping (see
    #: :class:`synkeys.health.ServiceSite`).
    on_done: Optional[Callable[[Request, bool], None]] = None
    #: When the request began, by its site's clock (set by the site).
    started_s = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if _CAN_SKIP_FORM_PARSING:
            # The key API reads JSON bodies only; otherwise Twisted parses
            # the Content-Type of every POST with the email package (a fifth
            # of a warm notary POST) to look for form fields nobody reads.
            kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(*args, **kwargs)

    def gotLength(self, length: Optional[int]) -> None:  # noqa: N802
        if length is not None and length > self.max_body_bytes:
            self.body_too_large = True
            length = None
        super().gotLength(length)

    def finish(self) -> None:
        """Finish the request (see :class:`~twisted.web.http.Request`), then :attr:`on_done`."""
        super().finish()
        self._done(False)

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        """Forget the connection (see :class:`~twisted.web.http.Request`), then :attr:`on_done`."""
        super().connectionLost(reason)
        self._done(True)

    def _done(self, lost: bool) -> None:
        on_done = self.on_done
        if on_done is not None:
            self.on_done = None
            on_done(self, lost)

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802
        self._body_bytes += len(data)
        if self._body_bytes > self.max_body_bytes:
            self.body_too_large = True
            if self._body_bytes > 16 * self.max_body_bytes and self.channel is not None:
                transport = self.channel.transport
                if transport is not None:
                    transport.loseConnection()
            return
        super().handleContentChunk(data)


def read_body(request: Request, max_bytes: int = MAX_BODY_BYTES) -> bytes:
    """
    The request body, at most ``max_bytes`` of it.

    :raises MatrixError: 413 ``M_TOO_LARGE`` when it is larger.
    """
    too_large = MatrixError(413, "M_TOO_LARGE", f"Request body is larger than {max_bytes} bytes")
    if getattr(request, "body_too_large", False):
        raise too_large
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    body = content.read(max_bytes + 1)
    if len(body) > max_bytes:
        raise too_large
    return body


def render_call(request: Request, handler: Callable[[], Deferred[bytes]]) -> object:
    """
    Call ``handler`` (answering 200 with JSON bytes through a Deferred) and
    answer its result or its error: what fails before the Deferred exists is
    answered the same way, and a Deferred that has fired already is
    answered at once. The work is cancelled when the client goes away.
    """
    try:
        d = handler()
    except Exception:
        render_error(request, error_for(Failure()))
        return NOT_DONE_YET
    return render_deferred(request, d)


def render_deferred(request: Request, d: Deferred[Any]) -> object:
    """
    Answer ``d``'s result (JSON bytes, 200) or its error; ``d`` is cancelled
    when the client goes away first.
    """
    if d.called:
        # Answered already (a warm notary query): nothing left to cancel.
        d.addCallbacks(
            lambda body: write_json_bytes(request, 200, body) if body is not None else None,
            lambda failure: render_error(request, error_for(failure)),
        )
        d.addErrback(lambda f: log.failure("Error while answering", f))
        return NOT_DONE_YET
    finished = [False]

    def gone(_: object) -> None:
        finished[0] = True
        d.cancel()

    request.notifyFinish().addErrback(gone)

    def ok(body: Optional[bytes]) -> None:
        if not finished[0] and body is not None:
            write_json_bytes(request, 200, body)

    def fail(failure: Failure) -> None:
        if finished[0] or failure.check(CancelledError):
            return
        render_error(request, error_for(failure))

    d.addCallbacks(ok, fail)
    d.addErrback(lambda f: log.failure("Error while answering", f))
    return NOT_DONE_YET


_RENDER_NAMES = {b"GET": "render_GET", b"HEAD": "render_HEAD", b"POST": "render_POST"}


class MatrixResource(Resource):
    """
    A resource that answers Matrix JSON errors: unknown children are 404
    ``M_UNRECOGNIZED``, methods without a ``render_*`` are 405.
    """

    def getChild(self, path: bytes, request: Request) -> Resource:  # noqa: N802
        return UnrecognizedResource()

    def render(self, request: Request) -> Any:
        if request.method == b"OPTIONS":
            write_json_bytes(request, 200, b"{}")
            return NOT_DONE_YET
        method = request.method
        handler = getattr(
            self, _RENDER_NAMES.get(method) or "render_" + method.decode("ascii", "replace"), None
        )
        if handler is None:
            allowed = [m for m in ("GET", "HEAD", "POST") if hasattr(self, "render_" + m)]
            return method_not_allowed(
                request, ", ".join(allowed + ["OPTIONS"]).encode("ascii"),
                "Unrecognized request method",
            )
        return handler(request)

    def render_GET(self, request: Request) -> Any:  # noqa: N802
        render_error(request, unrecognized(404))
        return NOT_DONE_YET

    def render_HEAD(self, request: Request) -> Any:  # noqa: N802
        return self.render_GET(request)


class UnrecognizedResource(MatrixResource):
    """Any path nobody serves: 404 ``M_UNRECOGNIZED`` for every method."""

    isLeaf = True

    def render(self, request: Request) -> Any:
        if request.method == b"OPTIONS":
            write_json_bytes(request, 200, b"{}")
        else:
            render_error(request, unrecognized(404))
        return NOT_DONE_YET
