"""Driving a resource tree in memory with treq's StubTreq."""

from typing import Any, List, Optional, Tuple

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import IResource


class Answer:
    """A response, read in full: code, headers and body."""

    def __init__(self, code: int, headers: Any, body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body

    def header(self, name: str) -> Optional[str]:
        values: List[str] = self.headers.getRawHeaders(name) or []
        return values[0] if values else None

    def json(self) -> Any:
        import json

        return json.loads(self.body)


def request(
    case: SynchronousTestCase,
    resource: IResource,
    method: str,
    url: str,
    body: Optional[bytes] = None,
    headers: Optional[dict] = None,
) -> Answer:
    """Make one request against ``resource`` and return the whole answer."""
    stub = StubTreq(resource)
    d = stub.request(method, "http://keys.test" + url, data=body, headers=headers)
    stub.flush()
    response = case.successResultOf(d)
    content_d = response.content()
    stub.flush()
    content = case.successResultOf(content_d)
    return Answer(response.code, response.headers, content)


def request_pending(
    resource: IResource, method: str, url: str, body: Optional[bytes] = None
) -> Tuple[StubTreq, Any]:
    """Start a request and return the stub and the response Deferred, unflushed."""
    stub = StubTreq(resource)
    return stub, stub.request(method, "http://keys.test" + url, data=body)
