"""
The ceiling for one Twisted process: a minimal ``twisted.web`` resource
answering every request (any path, any method) with one constant JSON body
of about 600 bytes, on a plain and a TLS port, with no access log.

Run by ``bench/run.py``; prints ``{"plain": PORT, "tls": PORT}`` on one line
once both ports listen::

    python bench/raw_server.py --key key.pem --cert cert.pem
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

#: About the size of a signed ``/server`` body with one key.
BODY = json.dumps(
    {
        "old_verify_keys": {},
        "server_name": "raw.bench.invalid:8448",
        "signatures": {
            "raw.bench.invalid:8448": {
                "ed25519:a_AAAA": "x" * 86,
            }
        },
        "tls_fingerprints": [{"sha256": "y" * 43}],
        "valid_until_ts": 1_900_000_000_000,
        "verify_keys": {"ed25519:a_AAAA": {"key": "z" * 43}},
        "padding": "p" * 220,
    },
    separators=(",", ":"),
    sort_keys=True,
).encode()


def main(argv: Any = None) -> None:
    """Serve :data:`BODY` until killed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--key", required=True, help="TLS private key (PEM)")
    parser.add_argument("--cert", required=True, help="TLS certificate (PEM)")
    parser.add_argument("--plain-port", type=int, default=0)
    parser.add_argument("--tls-port", type=int, default=0)
    args = parser.parse_args(argv)

    from twisted.internet import reactor, ssl
    from twisted.web.resource import Resource
    from twisted.web.server import Request, Site

    class Constant(Resource):
        isLeaf = True

        def render(self, request: Request) -> bytes:
            request.setHeader(b"Content-Type", b"application/json")
            return BODY

    class QuietSite(Site):
        def log(self, request: Request) -> None:
            pass

    site = QuietSite(Constant())
    with open(args.key, "rb") as f:
        key_pem = f.read()
    with open(args.cert, "rb") as f:
        cert_pem = f.read()
    tls = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem).options()
    plain = reactor.listenTCP(args.plain_port, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    secure = reactor.listenSSL(args.tls_port, site, tls, interface="127.0.0.1")  # type: ignore[attr-defined]
    sys.stdout.write(
        json.dumps({"plain": plain.getHost().port, "tls": secure.getHost().port}) + "\n"
    )
    sys.stdout.flush()
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
