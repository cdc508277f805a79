"""
Public fakes to test against: Matrix origins served in memory and a
federation client that reaches them without sockets.

Use them to test code built on synkeys (a keyring, a notary, your own
resources) with a :class:`twisted.internet.task.Clock` and no network.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import IResource
from zope.interface import implementer

from synkeys.errors import FetchError
from synkeys.interfaces import FederationResponse, IFederationClient
from synkeys.keyfile import OldVerifyKey, SigningKey, generate_signing_key
from synkeys.keyserver import KeyPublisher
from synkeys.resource import build_root


class FakeOrigin:
    """
    A Matrix server that publishes its keys, in memory.

    :ivar publisher: Its :class:`KeyPublisher`; change its keys to rotate.
    :ivar hits: How many requests it has received.
    :ivar online: When ``False``, requests fail as if it were unreachable.
    :ivar override: When set, ``(code, body)`` answered instead of its keys.
    """

    def __init__(
        self,
        server_name: str,
        clock: IReactorTime,
        signing_keys: Optional[Sequence[SigningKey]] = None,
        *,
        refresh_interval_ms: int = 86_400_000,
        resource: Optional[IResource] = None,
    ) -> None:
        self.server_name = server_name
        self.clock = clock
        self.signing_keys = list(signing_keys or [generate_signing_key("a")])
        self.publisher = KeyPublisher(
            server_name, self.signing_keys, clock, refresh_interval_ms=refresh_interval_ms
        )
        self.resource = resource if resource is not None else build_root(self.publisher)
        self.hits = 0
        self.paths: List[bytes] = []
        self.online = True
        self.override: Optional[Tuple[int, bytes]] = None
        #: When set, every answer waits for this Deferred to fire first.
        self.gate: Optional[Deferred[None]] = None

    @property
    def verify_keys(self) -> Dict[str, bytes]:
        """Its current public keys by key id."""
        return self.publisher.verify_keys

    def rotate(self, version: str) -> SigningKey:
        """Replace the signing key by a new one; the old one becomes an old key."""
        new = generate_signing_key(version)
        now_ms = int(self.clock.seconds() * 1000)
        old = [OldVerifyKey(k.key_id, k.public_key, now_ms) for k in self.signing_keys]
        self.signing_keys = [new]
        self.publisher = KeyPublisher(
            self.server_name,
            [new],
            self.clock,
            old_keys=list(self.publisher.old_keys) + old,
        )
        self.resource = build_root(self.publisher)
        return new


@implementer(IFederationClient)
class FakeFederationClient:
    """
    An :class:`IFederationClient` that serves requests from in-memory
    resources (such as :class:`FakeOrigin`) by server name.

    :ivar requests: Every ``(method, server_name, path, body)`` made.
    """

    def __init__(self, origins: Sequence[FakeOrigin] = ()) -> None:
        self.origins: Dict[str, FakeOrigin] = {o.server_name: o for o in origins}
        self.resources: Dict[str, IResource] = {}
        self.requests: List[Tuple[bytes, str, bytes, Optional[bytes]]] = []
        #: Called before each request; may raise FetchError.
        self.before: Optional[Callable[[str, bytes], None]] = None

    def add(self, origin: FakeOrigin) -> FakeOrigin:
        """Serve ``origin`` under its server name."""
        self.origins[origin.server_name] = origin
        return origin

    def add_resource(self, server_name: str, resource: IResource) -> None:
        """Serve any resource (a notary, a misbehaving server) as ``server_name``."""
        self.resources[server_name] = resource

    def get(self, server_name: str, path: bytes) -> Deferred[FederationResponse]:
        """GET ``path`` from the fake named ``server_name``."""
        return self._request(b"GET", server_name, path, None)

    def post_json(
        self, server_name: str, path: bytes, body: bytes
    ) -> Deferred[FederationResponse]:
        """POST ``body`` to ``path`` on the fake named ``server_name``."""
        return self._request(b"POST", server_name, path, body)

    def _request(
        self, method: bytes, server_name: str, path: bytes, body: Optional[bytes]
    ) -> Deferred[FederationResponse]:
        self.requests.append((method, server_name, path, body))
        try:
            if self.before is not None:
                self.before(server_name, path)
        except FetchError as e:
            return fail(e)
        origin = self.origins.get(server_name)
        if origin is not None:
            origin.hits += 1
            origin.paths.append(path)
            if not origin.online:
                return fail(FetchError(server_name, "connection refused", "connect"))
            if origin.override is not None:
                code, content = origin.override
                answer = succeed(FederationResponse(code, content))
            else:
                answer = _serve(origin.resource, method, path, body)
            if origin.gate is not None:
                # Each request gets a Deferred of its own that fires after the gate.
                held: Deferred[FederationResponse] = Deferred()

                def release(result: object) -> object:
                    answer.chainDeferred(held)
                    return result

                origin.gate.addBoth(release)
                return held
            return answer
        resource = self.resources.get(server_name)
        if resource is not None:
            return _serve(resource, method, path, body)
        return fail(FetchError(server_name, "no such host", "dns"))


def _serve(
    resource: IResource, method: bytes, path: bytes, body: Optional[bytes]
) -> Deferred[FederationResponse]:
    stub = StubTreq(resource)
    result: Dict[str, Any] = {}
    d = stub.request(  # type: ignore[attr-defined]
        method.decode("ascii"),
        "https://fake.invalid" + path.decode("ascii"),
        data=body,
        headers={b"Content-Type": [b"application/json"]} if body is not None else None,
    )
    d.addCallback(lambda r: result.setdefault("response", r))
    stub.flush()
    response = result["response"]
    content_d = response.content()
    stub.flush()
    content: List[bytes] = []
    content_d.addCallback(content.append)
    stub.flush()
    headers: Mapping[bytes, List[bytes]] = {
        k.lower(): list(v) for k, v in response.headers.getAllRawHeaders()
    }
    return succeed(FederationResponse(response.code, content[0], None, dict(headers)))
