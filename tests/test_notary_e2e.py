"""
The notary end to end over real TLS sockets on 127.0.0.1 with a test CA:
an origin (a synkeys service) queried through a notary (another one, with
a SQLite cache), by GET and both POST forms; then with the origin gone,
and after the notary restarts.
"""

import http.client
import json
import os
import socket
import ssl
from typing import Any, Dict, List, Optional, Tuple

import signedjson.key
import signedjson.sign
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from synkeys.app import SynkeysService, load_or_generate_keys
from synkeys.config import Config, resolve_config
from synkeys.signing import decode_b64
from tests.tlsutil import TestPKI

NOTARY = "notary.test"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def https(
    port: int, ca_path: str, method: str, path: str, body: Optional[bytes] = None
) -> Tuple[int, bytes]:
    """A blocking HTTPS request to 127.0.0.1, trusting only the test CA."""
    context = ssl.create_default_context(cafile=ca_path)
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=20)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def verify_keys_of(published: Dict[str, Any]) -> List[Any]:
    """The signedjson verify keys a ``/server`` object lists."""
    keys = []
    for key_id, entry in published["verify_keys"].items():
        key = signedjson.key.decode_verify_key_bytes(key_id, decode_b64(entry["key"]))
        keys.append(key)
    return keys


class NotaryEndToEndTests(TestCase):
    """An origin and a notary, both synkeys services behind ssl: listeners."""

    def setUp(self) -> "Deferred[None]":
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        self.base = base
        self.pki = TestPKI(os.path.join(base, "pki"))
        origin_port = free_port()
        self.origin_name = f"127.0.0.1:{origin_port}"
        origin_config = resolve_config(
            {
                "server_name": self.origin_name,
                "listen": [self.pki.ssl_endpoint("origin", ["127.0.0.1"], port=origin_port)],
                "signing_key_path": os.path.join(base, "origin.key"),
                "database": ":memory:",
            }
        )
        self.origin = SynkeysService(
            origin_config, reactor, load_or_generate_keys(origin_config.signing_key_path)
        )
        self.notary_config = resolve_config(
            {
                "server_name": NOTARY,
                "listen": [self.pki.ssl_endpoint("notary", ["127.0.0.1"])],
                "signing_key_path": os.path.join(base, "notary.key"),
                "database": os.path.join(base, "notary.sqlite"),
                "ip_range_whitelist": ["127.0.0.0/8"],
                "federation_custom_ca_list": [self.pki.ca_path],
            }
        )
        self.origin_running = False
        self.notary: Optional[SynkeysService] = None
        return Deferred.fromCoroutine(self._start_both())

    async def _start_both(self) -> None:
        self.origin.startService()
        self.origin_running = True
        self.addCleanup(self._stop_origin)
        await self.origin.when_listening()
        await self._start_notary()

    async def _start_notary(self) -> None:
        config: Config = self.notary_config
        self.notary = SynkeysService(
            config, reactor, load_or_generate_keys(config.signing_key_path)
        )
        self.notary.startService()
        self.addCleanup(self.notary.stopService)
        [port] = await self.notary.when_listening()
        self.notary_port = port.getHost().port

    def _stop_origin(self) -> Optional["Deferred[None]"]:
        if not self.origin_running:
            return None
        self.origin_running = False
        return self.origin.stopService()

    async def ask_notary(self, method: str, path: str, body: Any = None) -> Tuple[int, Any]:
        """A request to the notary over TLS; the decoded answer."""
        raw = json.dumps(body).encode() if body is not None else None
        status, content = await deferToThread(
            https, self.notary_port, self.pki.ca_path, method, path, raw
        )
        return status, json.loads(content)

    async def assert_relayed(self, method: str, path: str, body: Any = None) -> Dict[str, Any]:
        """
        The notary answers one element for the origin, signed by the origin
        (unchanged) and exactly once by the notary, both verifying.
        """
        status, answer = await self.ask_notary(method, path, body)
        self.assertEqual(status, 200, answer)
        [element] = answer["server_keys"]
        self.assertEqual(element["server_name"], self.origin_name)
        # The origin's own signature, with the origin's real key.
        origin_published = self.origin.publisher.json()
        self.assertEqual(element["verify_keys"], origin_published["verify_keys"])
        self.assertEqual(
            element["signatures"][self.origin_name],
            origin_published["signatures"][self.origin_name],
        )
        for key in verify_keys_of(origin_published):
            signedjson.sign.verify_signed_json(element, self.origin_name, key)
        # The notary's signature, with the key the notary publishes over TLS.
        status, notary_published = await self.ask_notary("GET", "/_matrix/key/v2/server")
        self.assertEqual(status, 200)
        self.assertEqual(len(element["signatures"][NOTARY]), 1)
        for key in verify_keys_of(notary_published):
            signedjson.sign.verify_signed_json(element, NOTARY, key)
        # The origin's TLS certificate was checked against tls_fingerprints.
        self.assertEqual(element["tls_fingerprints"], origin_published["tls_fingerprints"])
        return element

    async def test_relay_cache_and_restart(self) -> None:
        """GET and both POST forms relay the origin's keys; the cache survives the origin and a restart."""
        [key_id] = self.origin.publisher.verify_keys
        query = "/_matrix/key/v2/query"
        far_future = 2**53 - 1  # clamped to now + 7 days: always forces a refetch
        await self.assert_relayed("GET", f"{query}/{self.origin_name}")
        await self.assert_relayed("GET", f"{query}/{self.origin_name}/{key_id}")
        await self.assert_relayed(
            "POST",
            query,
            {"server_keys": {self.origin_name: {key_id: {"minimum_valid_until_ts": 0}}}},
        )
        await self.assert_relayed("POST", query, {"server_keys": {self.origin_name: [key_id]}})
        await self.assert_relayed("POST", query, {"server_keys": {self.origin_name: {}}})
        assert self.notary is not None
        self.assertEqual(self.notary.notary.counters.get("fetch_ok"), 1)

        forced = {
            "server_keys": {self.origin_name: {key_id: {"minimum_valid_until_ts": far_future}}}
        }
        await self._stop_origin()
        await self.assert_relayed("GET", f"{query}/{self.origin_name}")
        await self.assert_relayed("POST", query, forced)
        self.assertEqual(self.notary.notary.counters.get("fetch_failed"), 1)

        await self.notary.stopService()
        await self._start_notary()
        assert self.notary is not None
        await self.assert_relayed("GET", f"{query}/{self.origin_name}/{key_id}")
        await self.assert_relayed("POST", query, forced)
        await self.assert_relayed("POST", query, {"server_keys": {self.origin_name: [key_id]}})
        self.assertEqual(self.notary.notary.counters.get("fetch_failed"), 1)
        self.assertNotIn("fetch_ok", self.notary.notary.counters)

    async def test_errors_over_the_wire(self) -> None:
        """Over a real socket: a body over 1 MiB is 413, a bad body 400, a wrong method 405."""
        huge = b'{"server_keys": {}, "pad": "' + b"x" * (2 * 1024 * 1024) + b'"}'
        status, content = await deferToThread(
            https, self.notary_port, self.pki.ca_path, "POST", "/_matrix/key/v2/query", huge
        )
        self.assertEqual((status, json.loads(content)["errcode"]), (413, "M_TOO_LARGE"))
        status, answer = await self.ask_notary("POST", "/_matrix/key/v2/query", {"server_keys": []})
        self.assertEqual((status, answer["errcode"]), (400, "M_BAD_JSON"))
        status, answer = await self.ask_notary("GET", "/_matrix/key/v2/query")
        self.assertEqual((status, answer["errcode"]), (405, "M_UNRECOGNIZED"))
        status, answer = await self.ask_notary("POST", "/_matrix/key/v2/query", {"server_keys": {}})
        self.assertEqual((status, answer), (200, {"server_keys": []}))
