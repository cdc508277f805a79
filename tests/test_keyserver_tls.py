"""
End to end over a real TLS socket on 127.0.0.1: the published
tls_fingerprints are those of the certificate the client really received.
"""

import hashlib
import http.client
import json
import ssl

import signedjson.key
import signedjson.sign
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from synkeys.app import SynkeysService, load_or_generate_keys
from synkeys.config import resolve_config
from synkeys.signing import decode_b64, encode_b64
from tests.tlsutil import TestPKI


def fetch_over_tls(port: int, ca_path: str, path: str) -> "tuple[int, dict, bytes, bytes]":
    """Blocking HTTPS GET; returns status, headers, body and the peer cert DER."""
    context = ssl.create_default_context(cafile=ca_path)
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        assert connection.sock is not None
        der = connection.sock.getpeercert(binary_form=True)
        return response.status, dict(response.getheaders()), body, der
    finally:
        connection.close()


class TLSFingerprintTests(TestCase):
    """The key server behind an ssl: listener."""

    def setUp(self) -> None:
        self.pki = TestPKI(self.mktemp())
        endpoint = self.pki.ssl_endpoint("server", ["127.0.0.1"])
        config = resolve_config(
            {"server_name": "127.0.0.1", "listen": [endpoint],
             "signing_key_path": self.mktemp()}
        )
        self.service = SynkeysService(config, reactor, load_or_generate_keys(config.signing_key_path))
        self.service.startService()
        self.addCleanup(self.service.stopService)
        return self.service.when_listening().addCallback(self._listening)

    def _listening(self, ports: list) -> None:
        self.port = ports[0].getHost().port

    async def test_fingerprint_of_received_certificate(self) -> None:
        """tls_fingerprints holds the SHA-256 of the certificate this connection received."""
        status, headers, body, der = await deferToThread(
            fetch_over_tls, self.port, self.pki.ca_path, "/_matrix/key/v2/server"
        )
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "application/json")
        self.assertEqual(int(headers["Content-Length"]), len(body))
        obj = json.loads(body)
        self.assertEqual(
            obj["tls_fingerprints"], [{"sha256": encode_b64(hashlib.sha256(der).digest())}]
        )
        [(key_id, entry)] = obj["verify_keys"].items()
        verify_key = signedjson.key.decode_verify_key_bytes(key_id, decode_b64(entry["key"]))
        signedjson.sign.verify_signed_json(obj, "127.0.0.1", verify_key)
