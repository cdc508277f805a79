"""
What the interoperability tests use to see what crosses the wire: an
HTTPS client of their own (treq, trusting only the test CA), a root
resource that records every request a synkeys server receives, synkeys
servers running in-process on 127.0.0.1, and a cleanup that leaves no
connection open between tests.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Dict, List, Mapping, Optional

import attr
import treq
from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.ssl import Certificate
from twisted.internet.task import deferLater
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from synkeys.app import LoadedKeys, SynkeysService, load_or_generate_keys
from synkeys.config import resolve_config
from synkeys.keyfile import SigningKey
from tests.tlsutil import TestPKI

#: The address every server in these tests listens on.
LOOPBACK = "127.0.0.1"
#: The host part of every server name in these tests. A name rather than
#: the IP literal: Synapse refuses IP-literal server names inside its
#: ``ip_range_blacklist`` even when ``ip_range_whitelist`` allows them, and
#: real deployments use names.
HOST_NAME = "localhost"


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that is free right now. Server names carry
    their port, so it must be known before a server is configured.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@attr.s(frozen=True, slots=True, auto_attribs=True)
class HTTPResult:
    """
    A response as received.

    :ivar code: The status code.
    :ivar body: The raw body bytes.
    """

    code: int
    body: bytes

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body)


class TestHTTPSClient:
    """
    HTTPS to the servers under test, trusting only the test CA and
    checking certificates for IP literals. It is independent of synkeys'
    federation client, so it sees each server as any peer would.

    :param reactor: The reactor.
    :param ca_path: The test CA certificate (PEM).
    """

    def __init__(self, reactor: Any, ca_path: str) -> None:
        with open(ca_path, "rb") as f:
            trust_root = Certificate.loadPEM(f.read())
        agent = Agent(
            reactor,
            contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust_root),
            pool=HTTPConnectionPool(reactor, persistent=False),
        )
        self._client = treq.client.HTTPClient(agent)

    async def request(
        self,
        method: str,
        server_name: str,
        path: str,
        body: Optional[bytes] = None,
        headers: Optional[Mapping[bytes, bytes]] = None,
    ) -> HTTPResult:
        """
        Send one request to ``https://{server_name}{path}`` (``server_name``
        being ``localhost:PORT``) and read the whole response.
        """
        all_headers = Headers({b"user-agent": [b"synkeys-interop-tests"]})
        if body is not None:
            all_headers.setRawHeaders(b"content-type", [b"application/json"])
        for name, value in (headers or {}).items():
            all_headers.setRawHeaders(name, [value])
        response = await self._client.request(
            method, f"https://{server_name}{path}", data=body, headers=all_headers
        )
        content = await response.content()
        return HTTPResult(response.code, content)


@attr.s(slots=True, auto_attribs=True)
class SeenRequest:
    """
    One request a server received.

    :ivar method: E.g. ``b"POST"``.
    :ivar uri: Path and query as sent.
    :ivar user_agent: The ``User-Agent`` header, ``b""`` when absent.
    :ivar body: The request body.
    :ivar code: The status answered, once the response is finished.
    """

    method: bytes
    uri: bytes
    user_agent: bytes
    body: bytes
    code: Optional[int] = None

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body)


class RecordingRoot(Resource):
    """
    A root resource that notes every request, then lets ``inner`` handle
    it exactly as it would have.

    :ivar seen: The requests, in arrival order.
    """

    def __init__(self, inner: IResource) -> None:
        super().__init__()
        self._inner = inner
        self.seen: List[SeenRequest] = []

    def _record(self, request: Request) -> None:
        content = request.content
        body = b""
        if content is not None:
            content.seek(0)
            body = content.read()
            content.seek(0)
        seen = SeenRequest(
            request.method, request.uri, request.getHeader(b"user-agent") or b"", body
        )
        self.seen.append(seen)

        def finished(result: object) -> object:
            seen.code = request.code
            return None

        request.notifyFinish().addBoth(finished)

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:  # noqa: N802
        """Record the request, then traverse ``inner``."""
        self._record(request)
        return self._inner.getChildWithDefault(path, request)

    def render(self, request: Request) -> Any:
        """Record the request (for a path with no segments), then render ``inner``."""
        self._record(request)
        return self._inner.render(request)

    def matching(self, method: bytes, path_prefix: bytes) -> List[SeenRequest]:
        """The requests with ``method`` whose URI starts with ``path_prefix``."""
        return [s for s in self.seen if s.method == method and s.uri.startswith(path_prefix)]


@attr.s(auto_attribs=True)
class SynkeysPeer:
    """
    A synkeys service (key server and notary) on 127.0.0.1 over TLS.

    :ivar server_name: ``localhost:PORT``.
    :ivar service: The running :class:`SynkeysService`.
    :ivar keys: Its signing keys.
    :ivar recorder: Every request it received.
    """

    server_name: str
    service: SynkeysService
    keys: LoadedKeys
    recorder: RecordingRoot

    @property
    def signing_key(self) -> SigningKey:
        """Its (one) signing key."""
        return self.keys.keys[0]

    @property
    def verify_keys(self) -> Dict[str, bytes]:
        """Key id to 32-byte public key."""
        return {key.key_id: key.public_key for key in self.keys.keys}


async def start_synkeys(
    reactor: Any,
    directory: str,
    pki: TestPKI,
    name: str,
    *,
    port: Optional[int] = None,
    signing_key_path: Optional[str] = None,
    trusted_key_servers: Optional[List[Any]] = None,
) -> SynkeysPeer:
    """
    Start a synkeys service named ``localhost:PORT``, listening on
    127.0.0.1 with a certificate for ``localhost`` from ``pki``, with a
    fresh SQLite cache, permission to fetch from 127.0.0.0/8 and ``pki``'s
    CA trusted for federation. Stop it with
    ``peer.service.stopService()``.

    :param name: Names its files under ``directory``.
    :param port: The port (default: a free one).
    :param signing_key_path: Its key file (default: generated under
        ``directory``).
    :param trusted_key_servers: Upstream notaries, in ``homeserver.yaml``
        form.
    """
    os.makedirs(directory, exist_ok=True)
    port = free_port() if port is None else port
    server_name = f"{HOST_NAME}:{port}"
    config = resolve_config(
        {
            "server_name": server_name,
            "listen": [pki.ssl_endpoint(name, [HOST_NAME], port)],
            "signing_key_path": signing_key_path or os.path.join(directory, f"{name}.key"),
            "database": os.path.join(directory, f"{name}.sqlite"),
            "federation_custom_ca_list": [pki.ca_path],
            "ip_range_whitelist": [f"{LOOPBACK}/8"],
            "trusted_key_servers": trusted_key_servers or [],
            "fetch_timeout": 20,
        }
    )
    keys = load_or_generate_keys(config.signing_key_path)
    service = SynkeysService(config, reactor, keys)
    recorder = RecordingRoot(service.site.resource)
    service.site.resource = recorder
    service.startService()
    await service.when_listening()
    return SynkeysPeer(server_name, service, keys, recorder)


async def close_all_connections(reactor: Any) -> None:
    """
    Abort every TCP connection the reactor still has, and let each see its
    ``connectionLost``.

    Connections between Synapse and the in-process servers, and TLS closes
    waiting for the peer's reply, can outlive a test by a few reactor
    turns; aborting what is left keeps each test's end independent of how
    fast they go. The tests run nothing else in the reactor, so every
    connection left is one of theirs.
    """
    selectables = set(reactor.getReaders()) | set(reactor.getWriters())
    connections = [s for s in selectables if isinstance(s, tcp.Connection)]
    for connection in connections:
        connection.abortConnection()
    # abortConnection delivers connectionLost on the next reactor turn.
    await deferLater(reactor, 0, lambda: None)


def later(reactor: Any, delay_s: float) -> Deferred[None]:
    """A Deferred that fires after ``delay_s`` seconds (for polling)."""
    return deferLater(reactor, delay_s, lambda: None)
