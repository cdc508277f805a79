"""
Tests for L{synkeys.http}: answering Deferreds (fired or not), the access
log setting, and requests that do not parse POST bodies as forms.
"""

from __future__ import annotations

import os
from typing import Any, List

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from synkeys.errors import MatrixError
from synkeys.http import (
    ACCESS_LOG_OFF,
    BoundedRequest,
    configure_access_log,
    render_call,
)
from tests.stubhttp import request


class Calls(Resource):
    """Answers GET with whatever ``handler`` gives, through render_call."""

    isLeaf = True

    def __init__(self, handler: Any) -> None:
        super().__init__()
        self.handler = handler

    def render_GET(self, request: Request) -> Any:  # noqa: N802
        return render_call(request, self.handler)


class RenderCallTests(SynchronousTestCase):
    """L{render_call} answers a Deferred's result or error as JSON."""

    def test_fired(self) -> None:
        """A Deferred that has fired already is answered with its bytes, 200, as JSON."""
        answer = request(self, Calls(lambda: succeed(b'{"a":1}')), "GET", "/")
        self.assertEqual((answer.code, answer.body), (200, b'{"a":1}'))
        self.assertEqual(answer.header("Content-Type"), "application/json")
        self.assertEqual(answer.header("Access-Control-Allow-Origin"), "*")

    def test_pending(self) -> None:
        """A Deferred that fires later is answered when it fires."""
        later: Deferred[bytes] = Deferred()
        resource = Calls(lambda: later)
        from tests.stubhttp import request_pending

        stub, d = request_pending(resource, "GET", "/")
        stub.flush()
        self.assertNoResult(d)
        later.callback(b"{}")
        stub.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)

    def test_raises_before_deferred(self) -> None:
        """A Matrix error raised by the handler itself is answered as that error."""

        def handler() -> Deferred[bytes]:
            raise MatrixError(400, "M_BAD_JSON", "nope")

        answer = request(self, Calls(handler), "GET", "/")
        self.assertEqual(answer.code, 400)
        self.assertEqual(answer.json(), {"errcode": "M_BAD_JSON", "error": "nope"})

    def test_fired_failure(self) -> None:
        """A Deferred that has failed already with an unexpected error is a logged 500."""
        answer = request(self, Calls(lambda: fail(RuntimeError("boom"))), "GET", "/")
        self.assertEqual(answer.code, 500)
        self.assertEqual(answer.json()["errcode"], "M_UNKNOWN")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_head(self) -> None:
        """HEAD gets the headers (with the length) and no body."""

        class Head(Calls):
            def render_HEAD(self, request: Request) -> Any:  # noqa: N802
                return render_call(request, self.handler)

        answer = request(self, Head(lambda: succeed(b'{"a":1}')), "HEAD", "/")
        self.assertEqual((answer.code, answer.body), (200, b""))
        self.assertEqual(answer.header("Content-Length"), "7")


class Args(Resource):
    """Answers POST with the request's parsed ``args``."""

    isLeaf = True

    def render_POST(self, request: Request) -> bytes:  # noqa: N802
        return repr(sorted(request.args or {})).encode()


def _one_request(site: Site, data: bytes) -> bytes:
    """Feed one raw HTTP request to ``site`` in memory; the raw response."""
    address = IPv4Address("TCP", "127.0.0.1", 1)
    protocol = site.buildProtocol(address)
    transport = StringTransport(peerAddress=address, hostAddress=address)
    protocol.makeConnection(transport)
    protocol.dataReceived(data)
    answer: bytes = transport.value()
    protocol.connectionLost(None)
    return answer


FORM_POST = (
    b"POST / HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    b"Content-Length: 3\r\n\r\na=b"
)


class BoundedRequestTests(SynchronousTestCase):
    """L{BoundedRequest} does not parse POST bodies as forms."""

    def test_no_form_parsing(self) -> None:
        """A form-encoded POST body does not become request.args (plain Twisted parses it)."""
        site = Site(Args())
        self.assertIn(b"[b'a']", _one_request(site, FORM_POST))
        site.requestFactory = BoundedRequest
        self.assertIn(b"\r\n\r\n[]", _one_request(site, FORM_POST))


class Held(Resource):
    """Answers nothing until told: C{held} has the pending requests."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: List[Request] = []

    def render_GET(self, request: Request) -> object:  # noqa: N802
        self.held.append(request)
        return NOT_DONE_YET


class OnDoneTests(SynchronousTestCase):
    """L{BoundedRequest.on_done} reports each request's end exactly once."""

    def setUp(self) -> None:
        self.resource = Held()
        site = Site(self.resource)
        site.requestFactory = BoundedRequest
        address = IPv4Address("TCP", "127.0.0.1", 1)
        self.protocol = site.buildProtocol(address)
        self.transport = StringTransport(peerAddress=address, hostAddress=address)
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        [self.request] = self.resource.held
        self.ends: List[Any] = []
        self.request.on_done = lambda request, lost: self.ends.append((request, lost))

    def test_finished(self) -> None:
        """Finishing reports (request, False) once, also when the connection closes later."""
        self.assertEqual(self.ends, [])
        self.request.finish()
        self.assertEqual(self.ends, [(self.request, False)])
        self.protocol.connectionLost(None)
        self.assertEqual(self.ends, [(self.request, False)])

    def test_lost(self) -> None:
        """A connection lost before the answer reports (request, True) once."""
        self.protocol.connectionLost(None)
        self.assertEqual(self.ends, [(self.request, True)])
        self.assertRaises(RuntimeError, self.request.finish)
        self.assertEqual(self.ends, [(self.request, True)])


class Hello(Resource):
    """Answers ``hello``."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        return b"hello"


GET = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"


class AccessLogTests(SynchronousTestCase):
    """L{configure_access_log}."""

    def test_off(self) -> None:
        """Off, a request writes no access log line at all."""
        site = Site(Hello())
        lines: List[str] = []

        class Capture:
            def write(self, line: str) -> None:
                lines.append(line)

            def close(self) -> None:
                pass

        site._openLogFile = lambda path: Capture()  # type: ignore[method-assign]
        site.logPath = "captured"
        configure_access_log(site, ACCESS_LOG_OFF)
        site.startFactory()
        self.addCleanup(site.stopFactory)
        self.assertIn(b"hello", _one_request(site, GET))
        self.assertEqual(lines, [])

    def test_file(self) -> None:
        """A path gets one combined-log-format line per request."""
        path = os.path.abspath(self.mktemp())
        site = Site(Hello())
        configure_access_log(site, path)
        site.startFactory()
        self.assertIn(b"hello", _one_request(site, GET))
        site.stopFactory()
        with open(path, encoding="utf-8") as f:
            text = f.read()
        self.assertEqual(text.count("\n"), 1)
        self.assertIn('"GET /x HTTP/1.1" 200', text)

    def test_twistd_log(self) -> None:
        """``log`` keeps Twisted's default: no file of its own."""
        site = Site(Hello())
        configure_access_log(site, "log")
        self.assertIsNone(site.logPath)
