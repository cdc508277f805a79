"""
A farm of fake Matrix origins in one process: every origin listens on a
port of its own on 127.0.0.1 over TLS (a certificate for ``localhost`` from
the benchmark's test CA), is named ``localhost:PORT``, signs its keys with a
key of its own (:class:`synkeys.testing.FakeOrigin`'s publisher), may
answer after a delay, and counts the requests it receives.

A plain-HTTP control port drives it (127.0.0.1 only):

- ``POST /spawn`` with ``{"count": N, "delay_ms": D}`` starts N new origins
  and answers ``{"origins": {"localhost:PORT": {"ed25519:a": PUBLIC_KEY}}}``;
- ``GET /hits`` answers ``{"localhost:PORT": hits}`` for every origin;
- ``GET /times`` answers ``{"localhost:PORT": [t, ...]}``: when each request
  arrived, in seconds of the system's monotonic clock (``time.monotonic()``
  in any process on the machine), to see when a notary asked each origin.

Run by ``bench/run.py``; prints ``{"control": PORT}`` on one line once it
listens::

    python bench/origin_farm.py --key key.pem --cert cert.pem
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List

from twisted.internet import reactor, ssl
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from synkeys.keyfile import generate_signing_key
from synkeys.testing import FakeOrigin

#: Most origins one farm serves (each holds a listening socket).
MAX_ORIGINS = 5000


class _QuietSite(Site):
    """A site without an access log (the farm must not be the bottleneck)."""

    def log(self, request: Request) -> None:
        """Log nothing."""


class OriginResource(Resource):
    """
    One origin's whole site: its signed keys at ``/_matrix/key/v2/server``
    (and ``/server/{keyId}``) after ``delay_ms``; 404 elsewhere.
    """

    isLeaf = True

    def __init__(self, origin: FakeOrigin, delay_ms: int) -> None:
        super().__init__()
        self.origin = origin
        self.delay_ms = delay_ms
        self.arrivals: List[float] = []

    def render(self, request: Request) -> Any:
        """Count the request and answer it, after the delay."""
        self.origin.hits += 1
        self.arrivals.append(time.monotonic())
        path = request.path or b""
        if not path.startswith(b"/_matrix/key/v2/server"):
            request.setResponseCode(404)
            return b'{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}'
        gone: List[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer() -> None:
            if gone:
                return
            body = self.origin.publisher.body()
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.write(body)
            request.finish()

        if self.delay_ms:
            reactor.callLater(self.delay_ms / 1000, answer)  # type: ignore[attr-defined]
        else:
            answer()
        return NOT_DONE_YET


class Farm:
    """
    The origins and their listeners.

    :param tls: The TLS options every origin serves.
    """

    def __init__(self, tls: ssl.CertificateOptions) -> None:
        self.tls = tls
        self.origins: Dict[str, FakeOrigin] = {}
        self.resources: Dict[str, OriginResource] = {}

    def spawn(self, count: int, delay_ms: int) -> Dict[str, Dict[str, str]]:
        """Start ``count`` origins; their names and public keys."""
        started: Dict[str, Dict[str, str]] = {}
        if len(self.origins) + count > MAX_ORIGINS:
            raise ValueError(f"at most {MAX_ORIGINS} origins")
        for _ in range(count):
            site = _QuietSite(Resource())
            port = reactor.listenSSL(  # type: ignore[attr-defined]
                0, site, self.tls, interface="127.0.0.1"
            )
            name = f"localhost:{port.getHost().port}"
            origin = FakeOrigin(name, reactor, [generate_signing_key("a")])
            resource = OriginResource(origin, delay_ms)
            # The listener was bound first, since the name carries its port.
            site.resource = resource
            self.origins[name] = origin
            self.resources[name] = resource
            started[name] = {k.key_id: k.public_key_b64 for k in origin.signing_keys}
        return started

    def hits(self) -> Dict[str, int]:
        """Requests received, by origin."""
        return {name: origin.hits for name, origin in self.origins.items()}

    def times(self) -> Dict[str, List[float]]:
        """When each request arrived (monotonic seconds), by origin."""
        return {name: resource.arrivals for name, resource in self.resources.items()}


class ControlResource(Resource):
    """The control API: ``POST /spawn``, ``GET /hits`` and ``GET /times``."""

    isLeaf = True

    def __init__(self, farm: Farm) -> None:
        super().__init__()
        self.farm = farm

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        """``GET /hits`` and ``GET /times``."""
        request.setHeader(b"Content-Type", b"application/json")
        if request.path == b"/hits":
            return json.dumps(self.farm.hits()).encode()
        if request.path == b"/times":
            return json.dumps(self.farm.times()).encode()
        request.setResponseCode(404)
        return b"{}"

    def render_POST(self, request: Request) -> bytes:  # noqa: N802
        """``POST /spawn``."""
        request.setHeader(b"Content-Type", b"application/json")
        if request.path != b"/spawn":
            request.setResponseCode(404)
            return b"{}"
        assert request.content is not None
        asked = json.loads(request.content.read() or b"{}")
        try:
            origins = self.farm.spawn(int(asked.get("count", 1)), int(asked.get("delay_ms", 0)))
        except ValueError as e:
            request.setResponseCode(400)
            return json.dumps({"error": str(e)}).encode()
        return json.dumps({"origins": origins}).encode()


def main(argv: Any = None) -> None:
    """Run the farm until killed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--key", required=True, help="TLS private key (PEM) for localhost")
    parser.add_argument("--cert", required=True, help="TLS certificate (PEM) for localhost")
    args = parser.parse_args(argv)
    with open(args.key, "rb") as f:
        key_pem = f.read()
    with open(args.cert, "rb") as f:
        cert_pem = f.read()
    farm = Farm(ssl.PrivateCertificate.loadPEM(key_pem + cert_pem).options())
    control = reactor.listenTCP(  # type: ignore[attr-defined]
        0, _QuietSite(ControlResource(farm)), interface="127.0.0.1"
    )
    sys.stdout.write(json.dumps({"control": control.getHost().port}) + "\n")
    sys.stdout.flush()
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
