"""
The CPU cost of one request through each layer of synkeys' HTTP stack,
measured in-process without sockets: HTTP/1.1 requests are fed to a
site's protocol over an in-memory transport, so only Python work is timed
(no system calls, no load generator, little noise from other processes).

Layers, each on top of the previous one:

- ``raw``: :class:`twisted.web.server.Site` (no access log) and a leaf
  resource returning constant bytes, as ``bench/raw_server.py`` serves;
- ``request``: with synkeys' :class:`~synkeys.http.BoundedRequest`;
- ``tree``: synkeys' resource tree and JSON response helper;
- ``service``: the whole :class:`~synkeys.app.SynkeysService` site
  (request tracking for draining, metrics, ``/health``), as ``twistd
  synkeys`` serves it with ``--access-log off``;
- ``service+log``: the same with ``--access-log log`` (the twistd default
  before the option existed), with the global log going to a file.

For the notary, ``post1`` and ``post10`` time a warm ``POST /query`` for 1
and 10 origins through the whole service (answered from memory).

    python bench/layers.py [--requests 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GET = b"GET /_matrix/key/v2/server HTTP/1.1\r\nHost: bench\r\n\r\n"


def _post(body: bytes) -> bytes:
    return (
        b"POST /_matrix/key/v2/query HTTP/1.1\r\nHost: bench\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body


def time_requests(site: Any, request: bytes, count: int, check: bytes = b" 200 ") -> float:
    """Microseconds of CPU per request, ``count`` requests on one connection."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    address = IPv4Address("TCP", "127.0.0.1", 40000)
    protocol = site.buildProtocol(address)
    transport = StringTransport(
        peerAddress=address, hostAddress=IPv4Address("TCP", "127.0.0.1", 8008)
    )
    protocol.makeConnection(transport)
    protocol.dataReceived(request)
    first = transport.value()
    if check not in first.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"unexpected answer: {first[:200]!r}")
    transport.clear()
    best_s = float("inf")
    for _ in range(3):
        started_s = time.process_time()
        for _ in range(count):
            protocol.dataReceived(request)
            transport.clear()
        best_s = min(best_s, time.process_time() - started_s)
    protocol.connectionLost(None)
    return best_s / count * 1e6


def _sites(workdir: str) -> Dict[str, Callable[[], Any]]:
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Request, Site

    from synkeys.app import SynkeysService, load_or_generate_keys
    from synkeys.config import resolve_config
    from synkeys.http import BoundedRequest
    from synkeys.keyfile import generate_signing_key
    from synkeys.keyserver import KeyPublisher
    from synkeys.resource import build_root

    publisher = KeyPublisher("bench.invalid:8448", [generate_signing_key("a")], reactor)
    body = publisher.body()

    class Constant(Resource):
        isLeaf = True

        def render(self, request: Request) -> bytes:
            request.setHeader(b"Content-Type", b"application/json")
            return body

    class QuietSite(Site):
        def log(self, request: Request) -> None:
            pass

    def raw() -> Any:
        return QuietSite(Constant())

    def with_request() -> Any:
        site = QuietSite(Constant())
        site.requestFactory = BoundedRequest
        return site

    def tree() -> Any:
        site = QuietSite(build_root(publisher))
        site.requestFactory = BoundedRequest
        return site

    def service(access_log: str = "off") -> Any:
        config = resolve_config(
            {
                "server_name": "bench.invalid:8448",
                "signing_key_path": os.path.join(workdir, f"key-{access_log}"),
                "database": ":memory:",
                "listen": [],
                "access_log": access_log,
            }
        )
        svc = SynkeysService(config, reactor, load_or_generate_keys(config.signing_key_path))
        svc.site.startFactory()
        return svc

    return {
        "raw": raw,
        "request": with_request,
        "tree": tree,
        "service": lambda: service().site,
        "service+log": lambda: service("log").site,
        "_service": service,
    }


def warm_notary(svc: Any, origins: int) -> bytes:
    """Put ``origins`` fresh responses in the service's store; a POST body for them."""
    from twisted.internet import reactor

    from synkeys.checks import parse_server_keys
    from synkeys.keyfile import generate_signing_key
    from synkeys.keyserver import KeyPublisher

    names = []
    now_ms = int(reactor.seconds() * 1000)
    for i in range(origins):
        name = f"origin{i}.bench.invalid:8448"
        publisher = KeyPublisher(name, [generate_signing_key("a")], reactor)
        keys = parse_server_keys(publisher.body(), name, fetched_ts=now_ms, source=name)
        done: List[Any] = []
        svc.store.store_server_keys(keys).addBoth(done.append)
        while not done:  # SQLite in memory answers from a thread
            reactor.iterate(0.001)
        names.append(name)
    return json.dumps(
        {"server_keys": {n: {"ed25519:a": {"minimum_valid_until_ts": now_ms}} for n in names}}
    ).encode()


def measure(count: int) -> Dict[str, float]:
    """Microseconds of CPU per request, by layer."""
    from twisted.logger import globalLogBeginner, textFileLogObserver

    workdir = tempfile.mkdtemp(prefix="synkeys-layers-")
    log_file = open(os.path.join(workdir, "twistd.log"), "w", encoding="utf-8")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)], redirectStandardIO=False)
    sites = _sites(workdir)
    result = {
        name: time_requests(make(), GET, count)
        for name, make in sites.items()
        if not name.startswith("_")
    }
    svc = sites["_service"]()
    from twisted.internet import reactor

    while svc.store.store is None:
        reactor.iterate(0.001)
    for origins in (1, 10):
        body = warm_notary(svc, origins)
        # The first POST reads the store (a thread) and warms the memory.
        protocol_site = svc.site
        first: List[Any] = []
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        protocol = protocol_site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(_post(body))
        deadline_s = time.monotonic() + 10
        while b"\r\n\r\n" not in transport.value() and time.monotonic() < deadline_s:
            reactor.iterate(0.001)
        first.append(transport.value())
        result[f"post{origins}"] = time_requests(protocol_site, _post(body), count // 2)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the cost of each layer."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args(argv)
    results = measure(args.requests)
    previous: Optional[Tuple[str, float]] = None
    for name, us in results.items():
        delta = ""
        if previous is not None and not name.startswith("post"):
            delta = f"  (+{us - previous[1]:.1f})"
        print(f"{name:12s} {us:7.1f} us/request{delta}")
        if not name.startswith("post"):
            previous = (name, us)
    return 0


if __name__ == "__main__":
    sys.exit(main())
