"""
Serve synkeys' key API beside your own resources in one twisted.web Site.

Run it:  python docs/examples/embed_keyserver.py example.org 8008
Then:    curl http://127.0.0.1:8008/_matrix/key/v2/server
         curl http://127.0.0.1:8008/hello
"""

import os
import sys

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from synkeys.keyfile import generate_signing_key, read_signing_keys, write_signing_keys
from synkeys.keyserver import KeyPublisher
from synkeys.resource import mount_key_resources


def build_site(server_name: str, key_path: str, clock: IReactorTime) -> Site:
    """Your root resource, with the key API mounted at /_matrix/key/v2."""
    if not os.path.exists(key_path):
        write_signing_keys(key_path, [generate_signing_key()])
    publisher = KeyPublisher(server_name, read_signing_keys(key_path), clock)

    root = Resource()
    root.putChild(b"hello", Data(b"Hello from my own resource\n", "text/plain"))
    mount_key_resources(root, publisher)
    return Site(root)


def main(server_name: str, port: int) -> None:
    from twisted.internet import endpoints, reactor

    site = build_site(server_name, "embedded.signing.key", reactor)
    endpoint = endpoints.TCP4ServerEndpoint(reactor, port, interface="127.0.0.1")
    endpoint.listen(site)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
