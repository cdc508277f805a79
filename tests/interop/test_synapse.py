"""
synkeys and a real Synapse, in both roles each, over TLS on 127.0.0.1.

Every test starts its own Synapse (it starts in about two seconds, and a
fresh one per test means no key Synapse cached in one test can make
another pass) and its own in-process synkeys servers, each of which
records the requests it receives. Signatures are checked with
``signedjson``, Synapse's own library, rather than with synkeys' code.

Synapse's ``homeserver.yaml`` carries the snippets of ``docs/synapse.md``,
read from the page (:mod:`tests.interop.docsnippets`).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any, Awaitable, Callable, Dict, List, Mapping, TypeVar
from urllib.parse import quote

import yaml
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import verify_signed_json
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from synkeys.auth import sign_request
from synkeys.errors import SignatureVerifyError
from synkeys.federation.client import FederationClient
from synkeys.federation.ipfilter import IPFilter
from synkeys.fetchers import PerspectivesKeyFetcher
from synkeys.keyfile import generate_signing_key
from synkeys.keyring import Keyring
from synkeys.signing import canonical_json, decode_b64, sign_json
from tests.interop.docsnippets import private_federation_snippet, trusted_key_servers_snippet
from tests.interop.synapse import (
    REQUIRE_SYNAPSE_ENV,
    SynapseHomeserver,
    SynapseStartError,
    synapse_installed,
    synapse_skip_reason,
)
from tests.interop.wire import (
    LOOPBACK,
    HTTPResult,
    SynkeysPeer,
    TestHTTPSClient,
    close_all_connections,
    start_synkeys,
)
from tests.tlsutil import TestPKI

KEY_SERVER_PATH = b"/_matrix/key/v2/server"
QUERY_PATH = "/_matrix/key/v2/query"

_T = TypeVar("_T", bound="SynapseInteropTests")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _verify(obj: Mapping[str, Any], signer: str, verify_keys: Mapping[str, bytes]) -> None:
    """Check ``signer``'s signature on ``obj`` with signedjson; raises if it is bad."""
    for key_id, key in verify_keys.items():
        verify_signed_json(dict(obj), signer, decode_verify_key_bytes(key_id, key))


def _published_keys(obj: Mapping[str, Any]) -> Dict[str, bytes]:
    """The ``verify_keys`` of a key server response, as 32-byte keys."""
    return {key_id: decode_b64(entry["key"]) for key_id, entry in obj["verify_keys"].items()}


def _without_signature_of(obj: Mapping[str, Any], signer: str) -> Dict[str, Any]:
    """``obj`` with ``signer``'s signature block removed."""
    stripped = dict(obj)
    stripped["signatures"] = {k: v for k, v in obj["signatures"].items() if k != signer}
    return stripped


def shows_synapse_log(
    test: Callable[[_T], Awaitable[None]],
) -> Callable[[_T], Awaitable[None]]:
    """Print the tail of Synapse's log to stderr when ``test`` fails."""

    @functools.wraps(test)
    async def run(self: _T) -> None:
        try:
            await test(self)
        except SynapseStartError:
            raise  # its message holds the log's tail already
        except BaseException:
            for synapse in self.synapses:
                sys.stderr.write(f"\n{self.id()} failed; Synapse {synapse.server_name}:\n")
                sys.stderr.write(synapse.log_tail() + "\n")
            raise

    return run


class SynapseInteropTests(TestCase):
    """synkeys as notary, origin and client of a real Synapse."""

    skip = synapse_skip_reason()
    timeout = 120

    def setUp(self) -> None:
        if not synapse_installed():
            self.fail(f"{REQUIRE_SYNAPSE_ENV} is set but matrix-synapse is not installed")
        self.directory = os.path.abspath(self.mktemp())
        self.pki = TestPKI(os.path.join(self.directory, "pki"))
        self.http = TestHTTPSClient(reactor, self.pki.ca_path)
        self.synapses: List[SynapseHomeserver] = []
        self.peers: List[SynkeysPeer] = []
        self.addCleanup(self._stop_all)

    async def _stop_all(self) -> None:
        """
        Stop Synapse first, so that its connections to the synkeys servers
        close from its side, then the synkeys servers, then abort whatever
        connection is left.
        """
        for synapse in self.synapses:
            synapse.stop()
        for peer in reversed(self.peers):
            await peer.service.stopService()
        await close_all_connections(reactor)

    def _private_federation(self) -> str:
        """docs/synapse.md's private-network snippet: the test CA, 127.0.0.1."""
        return private_federation_snippet(self.pki.ca_path, f"{LOOPBACK}/32")

    async def _start_synapse(self, extra_config: str) -> SynapseHomeserver:
        synapse = SynapseHomeserver(
            os.path.join(self.directory, "synapse"), self.pki, extra_config
        )
        self.synapses.append(synapse)
        await synapse.start(reactor, self.http)
        return synapse

    async def _start_synkeys(self, name: str, **options: Any) -> SynkeysPeer:
        peer = await start_synkeys(
            reactor, os.path.join(self.directory, name), self.pki, name, **options
        )
        self.peers.append(peer)
        return peer

    async def _post_query(self, notary: str, server_keys: Mapping[str, Any]) -> HTTPResult:
        return await self.http.request(
            "POST", notary, QUERY_PATH, canonical_json({"server_keys": server_keys})
        )

    def _only_object(self, answer: HTTPResult, server_name: str, form: str) -> Dict[str, Any]:
        """The single ``server_keys`` element of a 200 notary answer, for ``server_name``."""
        self.assertEqual(answer.code, 200, f"{form}: {answer.body!r}")
        elements = answer.json()["server_keys"]
        self.assertEqual(len(elements), 1, f"{form}: {elements!r}")
        self.assertEqual(elements[0]["server_name"], server_name, form)
        return elements[0]  # type: ignore[no-any-return]

    @shows_synapse_log
    async def test_synkeys_notary_relays_synapse_keys(self) -> None:
        """synkeys' notary relays Synapse's own key object by GET and both POST forms, signed by both."""
        synapse = await self._start_synapse(
            self._private_federation() + "trusted_key_servers: []\n"
        )
        notary = await self._start_synkeys("notary")

        direct = await self.http.request("GET", synapse.server_name, KEY_SERVER_PATH.decode())
        self.assertEqual(direct.code, 200)
        own = direct.json()
        key_id = synapse.signing_key.key_id
        # Synapse serves the key synkeys wrote for it: the key file formats agree.
        self.assertEqual(_published_keys(own), {key_id: synapse.signing_key.public_key})
        _verify(own, synapse.server_name, _published_keys(own))

        answers = {
            "GET": await self.http.request(
                "GET", notary.server_name, f"{QUERY_PATH}/{synapse.server_name}"
            ),
            "POST all keys": await self._post_query(
                notary.server_name, {synapse.server_name: {}}
            ),
            "POST by key id": await self._post_query(
                notary.server_name,
                {synapse.server_name: {key_id: {"minimum_valid_until_ts": _now_ms()}}},
            ),
        }
        for form, answer in answers.items():
            relayed = self._only_object(answer, synapse.server_name, form)
            self.assertEqual(
                set(relayed["signatures"]), {synapse.server_name, notary.server_name}, form
            )
            _verify(relayed, synapse.server_name, _published_keys(own))
            _verify(relayed, notary.server_name, notary.verify_keys)
            # Apart from the countersignature, exactly what Synapse published.
            self.assertEqual(_without_signature_of(relayed, notary.server_name), own, form)

        queries = notary.recorder.matching(b"GET", QUERY_PATH.encode()) + notary.recorder.matching(
            b"POST", QUERY_PATH.encode()
        )
        self.assertEqual([q.code for q in queries], [200, 200, 200])

    @shows_synapse_log
    async def test_synapse_fetches_origin_keys_through_synkeys(self) -> None:
        """Synapse with synkeys as its trusted key server gets an origin's key from it and accepts the origin's request."""
        notary = await self._start_synkeys("notary")
        origin = await self._start_synkeys("origin")
        synapse = await self._start_synapse(
            self._private_federation()
            + trusted_key_servers_snippet(
                notary.server_name, notary.signing_key.key_id, notary.signing_key.public_key_b64
            )
        )

        alias = quote(f"#interop:{synapse.server_name}", safe="")
        path = f"/_matrix/federation/v1/query/directory?room_alias={alias}"

        def signed_by(signing_key: Any) -> Dict[bytes, bytes]:
            header = sign_request(
                origin.server_name, synapse.server_name, "GET", path, None,
                origin.signing_key.key_id, signing_key,
            )
            return {b"authorization": header}

        answer = await self.http.request(
            "GET", synapse.server_name, path, headers=signed_by(origin.signing_key.key)
        )
        # Past authentication, Synapse looks the alias up: it has no such room.
        self.assertEqual((answer.code, answer.json()["errcode"]), (404, "M_NOT_FOUND"))

        [query] = notary.recorder.matching(b"POST", QUERY_PATH.encode())
        self.assertTrue(query.user_agent.startswith(b"Synapse/"), query.user_agent)
        self.assertEqual(query.code, 200)
        asked = query.json()["server_keys"]
        self.assertEqual(list(asked), [origin.server_name])
        self.assertEqual(list(asked[origin.server_name]), [origin.signing_key.key_id])
        # The origin was fetched by the notary only, never by Synapse.
        self.assertEqual(
            [(s.method, s.uri, s.user_agent.split(b"/")[0]) for s in origin.recorder.seen],
            [(b"GET", KEY_SERVER_PATH, b"synkeys")],
        )

        # The same request signed by another key is refused: the 404 above
        # was Synapse accepting the origin's signature.
        forged = await self.http.request(
            "GET", synapse.server_name, path,
            headers=signed_by(generate_signing_key(origin.signing_key.version).key),
        )
        self.assertEqual(forged.code, 401, forged.body)

    @shows_synapse_log
    async def test_synkeys_keyring_uses_synapse_as_notary(self) -> None:
        """A synkeys keyring whose only perspective is Synapse verifies a synkeys origin's signed object."""
        synapse = await self._start_synapse(
            self._private_federation() + "trusted_key_servers: []\n"
        )
        origin = await self._start_synkeys("origin")
        client = FederationClient(
            reactor,
            ip_filter=IPFilter(allowed=[f"{LOOPBACK}/8"]),
            federation_ca_files=[self.pki.ca_path],
            request_timeout_s=20,
        )
        keyring = Keyring(
            [
                PerspectivesKeyFetcher(
                    client,
                    reactor,
                    synapse.server_name,
                    {synapse.signing_key.key_id: synapse.signing_key.public_key},
                )
            ],
            reactor,
        )
        key = origin.signing_key
        signed = sign_json({"content": "signed by a synkeys origin"}, origin.server_name,
                           key.key_id, key.key)

        await keyring.verify_json_for_server(origin.server_name, signed, _now_ms())

        # Synapse fetched the origin; the keyring's own client never did.
        self.assertEqual(
            [(s.method, s.uri, s.user_agent.split(b"/")[0]) for s in origin.recorder.seen],
            [(b"GET", KEY_SERVER_PATH, b"Synapse")],
        )
        found = await keyring.get_keys(origin.server_name, [key.key_id], _now_ms())
        self.assertEqual(found[key.key_id].key, key.public_key)
        tampered = dict(signed, content="changed after signing")
        await self.assertFailure(
            keyring.verify_json_for_server(origin.server_name, tampered, _now_ms()),
            SignatureVerifyError,
        )

    @shows_synapse_log
    async def test_synapse_notary_serves_synkeys_keys(self) -> None:
        """Synapse's notary fetches a synkeys key server and returns its object signed by both."""
        synapse = await self._start_synapse(
            self._private_federation() + "trusted_key_servers: []\n"
        )
        keyserver = await self._start_synkeys("keyserver")
        direct = await self.http.request("GET", keyserver.server_name, KEY_SERVER_PATH.decode())
        self.assertEqual(direct.code, 200)
        own = direct.json()
        self.assertEqual(_published_keys(own), keyserver.verify_keys)
        synapse_keys = {synapse.signing_key.key_id: synapse.signing_key.public_key}

        # Synapse fetches only on a query naming key ids; the GET form, for
        # all keys, then answers from what it cached.
        answers = {
            # Synapse requires minimum_valid_until_ts (it may be null),
            # though the spec makes it optional.
            "POST by key id": await self._post_query(
                synapse.server_name,
                {keyserver.server_name: {
                    keyserver.signing_key.key_id: {"minimum_valid_until_ts": _now_ms()}
                }},
            ),
            "GET": await self.http.request(
                "GET", synapse.server_name, f"{QUERY_PATH}/{keyserver.server_name}"
            ),
        }
        for form, answer in answers.items():
            relayed = self._only_object(answer, keyserver.server_name, form)
            self.assertEqual(
                set(relayed["signatures"]), {keyserver.server_name, synapse.server_name}, form
            )
            _verify(relayed, keyserver.server_name, keyserver.verify_keys)
            _verify(relayed, synapse.server_name, synapse_keys)
            self.assertEqual(_without_signature_of(relayed, synapse.server_name), own, form)

        from_synapse = [s for s in keyserver.recorder.seen if s.user_agent.startswith(b"Synapse/")]
        self.assertEqual([(s.method, s.uri, s.code) for s in from_synapse],
                         [(b"GET", KEY_SERVER_PATH, 200)])

    @shows_synapse_log
    async def test_synkeys_notary_with_synapse_upstream(self) -> None:
        """A synkeys notary configured with docs/synapse.md's snippet naming Synapse fetches key ids through it, and all-keys queries directly."""
        synapse = await self._start_synapse(
            self._private_federation() + "trusted_key_servers: []\n"
        )
        snippet = trusted_key_servers_snippet(
            synapse.server_name, synapse.signing_key.key_id, synapse.signing_key.public_key_b64
        )
        notary = await self._start_synkeys(
            "notary", trusted_key_servers=yaml.safe_load(snippet)["trusted_key_servers"]
        )
        by_key_id = await self._start_synkeys("origin-by-key-id")
        all_keys = await self._start_synkeys("origin-all-keys")

        answer = await self._post_query(
            notary.server_name,
            {by_key_id.server_name: {
                by_key_id.signing_key.key_id: {"minimum_valid_until_ts": _now_ms()}
            }},
        )
        relayed = self._only_object(answer, by_key_id.server_name, "POST by key id")
        _verify(relayed, by_key_id.server_name, by_key_id.verify_keys)
        _verify(relayed, notary.server_name, notary.verify_keys)
        # Found through Synapse: the origin saw Synapse only.
        self.assertEqual(
            [(s.method, s.uri, s.user_agent.split(b"/")[0]) for s in by_key_id.recorder.seen],
            [(b"GET", KEY_SERVER_PATH, b"Synapse")],
        )

        answer = await self.http.request(
            "GET", notary.server_name, f"{QUERY_PATH}/{all_keys.server_name}"
        )
        relayed = self._only_object(answer, all_keys.server_name, "GET all keys")
        _verify(relayed, all_keys.server_name, all_keys.verify_keys)
        _verify(relayed, notary.server_name, notary.verify_keys)
        # Synapse answers an all-keys query from its cache only, which is
        # empty, so synkeys fetched the origin itself.
        self.assertEqual(
            [(s.method, s.uri, s.user_agent.split(b"/")[0]) for s in all_keys.recorder.seen],
            [(b"GET", KEY_SERVER_PATH, b"synkeys")],
        )
