"""
The keyring end to end over real TLS sockets on 127.0.0.1 with a test CA:
a synkeys origin, a synkeys notary, and a keyring that uses the notary as
its perspective — verifying a signed object, and authenticating X-Matrix
requests to a protected resource.
"""

import http.client
import os
import socket
import ssl
from typing import Dict, Tuple

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from synkeys.app import SynkeysService, load_or_generate_keys
from synkeys.auth import XMatrixProtectedResource, sign_request
from synkeys.config import resolve_config
from synkeys.errors import SignatureVerifyError
from synkeys.federation.client import FederationClient
from synkeys.federation.ipfilter import IPFilter
from synkeys.fetchers import PerspectivesKeyFetcher
from synkeys.keyfile import generate_signing_key
from synkeys.keyring import Keyring
from synkeys.signing import sign_json
from tests.tlsutil import TestPKI


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def https_get(
    port: int, ca_path: str, path: str, headers: Dict[str, str]
) -> Tuple[int, bytes]:
    """A blocking HTTPS GET to 127.0.0.1, trusting only the test CA."""
    context = ssl.create_default_context(cafile=ca_path)
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=20)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class WhoAmI(Resource):
    """Answers with the origin the X-Matrix check authenticated."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        return getattr(request, "authenticated_origin", "").encode("ascii")


class KeyringEndToEndTests(TestCase):
    """A keyring using a synkeys notary, all over real TLS."""

    async def setUp(self) -> None:  # type: ignore[override]
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        self.pki = TestPKI(os.path.join(base, "pki"))
        self.origin = await self.start_service(base, "origin", database=":memory:")
        self.notary = await self.start_service(
            base,
            "notary",
            database=os.path.join(base, "notary.sqlite"),
            ip_range_whitelist=["127.0.0.0/8"],
            federation_custom_ca_list=[self.pki.ca_path],
        )
        client = FederationClient(
            reactor,
            ip_filter=IPFilter(allowed=["127.0.0.0/8"]),
            federation_ca_files=[self.pki.ca_path],
            request_timeout_s=20,
        )
        perspective = PerspectivesKeyFetcher(
            client,
            reactor,
            self.notary.config.server_name,
            self.notary.publisher.verify_keys,
        )
        # The notary is the keyring's only way to the origin's keys.
        self.keyring = Keyring([perspective], reactor)
        self.origin_key = self.origin_service_key()

    async def start_service(self, base: str, name: str, **settings: object) -> SynkeysService:
        """A synkeys service named ``127.0.0.1:PORT`` behind an ssl: listener."""
        port = free_port()
        config = resolve_config(
            {
                "server_name": f"127.0.0.1:{port}",
                "listen": [self.pki.ssl_endpoint(name, ["127.0.0.1"], port=port)],
                "signing_key_path": os.path.join(base, f"{name}.key"),
                **settings,
            }
        )
        service = SynkeysService(config, reactor, load_or_generate_keys(config.signing_key_path))
        service.startService()
        self.addCleanup(service.stopService)
        await service.when_listening()
        return service

    def origin_service_key(self):  # type: ignore[no-untyped-def]
        """The origin's signing key (key id, nacl key)."""
        [key] = self.origin.publisher.signing_keys
        return key

    def now_ms(self) -> int:
        return int(reactor.seconds() * 1000)

    async def test_verifies_object_through_notary(self) -> None:
        """An object signed by the origin verifies with keys found through the notary; a tampered copy does not."""
        origin_name = self.origin.config.server_name
        signed = sign_json(
            {"type": "m.test", "content": {"body": "hello"}},
            origin_name,
            self.origin_key.key_id,
            self.origin_key.key,
        )
        result = await self.keyring.verify_json_for_server(origin_name, signed, self.now_ms())
        self.assertIsNone(result)
        # The notary fetched the origin once and countersigned what it relayed.
        self.assertEqual(self.notary.notary.counters.get("fetch_ok"), 1)
        tampered = dict(signed, content={"body": "goodbye"})
        with self.assertRaises(SignatureVerifyError):
            await self.keyring.verify_json_for_server(origin_name, tampered, self.now_ms())

    async def test_x_matrix_request_accepted_and_forged_refused(self) -> None:
        """A request signed by the origin reaches the protected resource; one signed by another key gets 401."""
        port = free_port()
        destination = f"127.0.0.1:{port}"
        key_path, cert_path = self.pki.issue("protected", ["127.0.0.1"])
        site = Site(XMatrixProtectedResource(WhoAmI(), self.keyring, destination, reactor))
        endpoint = serverFromString(
            reactor,
            f"ssl:{port}:privateKey={key_path}:certKey={cert_path}:interface=127.0.0.1",
        )
        listening = await endpoint.listen(site)
        self.addCleanup(listening.stopListening)

        origin_name = self.origin.config.server_name
        header = sign_request(
            origin_name, destination, "GET", "/whoami", None,
            self.origin_key.key_id, self.origin_key.key,
        )
        status, body = await deferToThread(
            https_get, port, self.pki.ca_path, "/whoami",
            {"Authorization": header.decode("ascii")},
        )
        self.assertEqual((status, body), (200, origin_name.encode("ascii")))

        forger = generate_signing_key(self.origin_key.version)
        forged = sign_request(
            origin_name, destination, "GET", "/whoami", None, forger.key_id, forger.key
        )
        status, body = await deferToThread(
            https_get, port, self.pki.ca_path, "/whoami",
            {"Authorization": forged.decode("ascii")},
        )
        self.assertEqual(status, 401)
        self.assertIn(b"M_UNAUTHORIZED", body)

        status, body = await deferToThread(https_get, port, self.pki.ca_path, "/whoami", {})
        self.assertEqual(status, 401)


