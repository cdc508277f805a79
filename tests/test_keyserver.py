"""Tests for L{synkeys.keyserver}: the signed body and when it is rebuilt."""

import json

import signedjson.key
import signedjson.sign
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from synkeys.errors import ConfigError
from synkeys.keyfile import OldVerifyKey, generate_signing_key, parse_signing_keys
from synkeys.keyserver import KeyPublisher, build_server_keys
from synkeys.signing import canonical_json, decode_b64

SEED_B64 = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1"
DAY_MS = 86_400_000


def verify_with_signedjson(obj: dict, server_name: str, key_id: str, key_b64: str) -> None:
    """Verify with the reference library, as peers do."""
    verify_key = signedjson.key.decode_verify_key_bytes(key_id, decode_b64(key_b64))
    signedjson.sign.verify_signed_json(obj, server_name, verify_key)


class BuildServerKeysTests(SynchronousTestCase):
    """The pure builder."""

    def test_golden_body(self) -> None:
        """The spec seed gives the golden body and signature of FACTS.md."""
        [key] = parse_signing_keys(f"ed25519 1 {SEED_B64}")
        obj = build_server_keys("domain", [key], [], 1000000)
        self.assertEqual(
            canonical_json({k: v for k, v in obj.items() if k != "signatures"}),
            b'{"old_verify_keys":{},"server_name":"domain","valid_until_ts":1000000,'
            b'"verify_keys":{"ed25519:1":{"key":"XGX0JRS2Af3be3knz2fBiRbApjm2Dh61gXDJA8kcJNI"}}}',
        )
        self.assertEqual(
            obj["signatures"]["domain"]["ed25519:1"],
            "qxmX1M4DgP1DD+bMK8fjWRWf5sQX7GT7AV+rpuFRMVdsbaIH2DD2ChErsV+VmleN7/MqIv4Zzy/0764Le/AZBA",
        )

    def test_every_key_signs(self) -> None:
        """With two active keys both sign, and each signature verifies."""
        keys = [generate_signing_key("a"), generate_signing_key("b")]
        obj = build_server_keys("example.org", keys, [], 5)
        self.assertEqual(set(obj["signatures"]["example.org"]), {"ed25519:a", "ed25519:b"})
        for key in keys:
            verify_with_signedjson(obj, "example.org", key.key_id, key.public_key_b64)

    def test_old_keys(self) -> None:
        """Old keys are listed under old_verify_keys with expired_ts, and do not sign."""
        old_key = generate_signing_key("old")
        old = OldVerifyKey("ed25519:old", old_key.public_key, 1234)
        obj = build_server_keys("example.org", [generate_signing_key("new")], [old], 5)
        self.assertEqual(
            obj["old_verify_keys"],
            {"ed25519:old": {"key": old_key.public_key_b64, "expired_ts": 1234}},
        )
        self.assertNotIn("ed25519:old", obj["signatures"]["example.org"])
        self.assertNotIn("ed25519:old", obj["verify_keys"])


class KeyPublisherTests(SynchronousTestCase):
    """The cached body and its rebuild rules."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.key = generate_signing_key("k")

    def publisher(self, **kwargs: object) -> KeyPublisher:
        return KeyPublisher("example.org", [self.key], self.clock, **kwargs)  # type: ignore[arg-type]

    def test_body_is_canonical_and_signed(self) -> None:
        """The body is canonical JSON whose signature verifies with signedjson."""
        body = self.publisher().body()
        obj = json.loads(body)
        self.assertEqual(canonical_json(obj), body)
        verify_with_signedjson(obj, "example.org", self.key.key_id, self.key.public_key_b64)
        self.assertEqual(obj["valid_until_ts"], 1_700_000_000_000 + DAY_MS)
        self.assertEqual(obj["old_verify_keys"], {})

    def test_cached_until_half_interval(self) -> None:
        """The same bytes are served, unsigned again, until half the interval passed."""
        publisher = self.publisher()
        first = publisher.body()
        self.clock.advance(DAY_MS / 1000 / 2 - 1)
        self.assertIs(publisher.body(), first)
        self.assertEqual(publisher.builds, 1)
        self.clock.advance(1)
        second = publisher.body()
        self.assertEqual(publisher.builds, 2)
        self.assertGreater(json.loads(second)["valid_until_ts"], json.loads(first)["valid_until_ts"])

    def test_refresh_interval(self) -> None:
        """valid_until_ts follows the configured refresh interval."""
        publisher = self.publisher(refresh_interval_ms=3_600_000)
        self.assertEqual(
            json.loads(publisher.body())["valid_until_ts"], 1_700_000_000_000 + 3_600_000
        )

    def test_fingerprint_change_rebuilds(self) -> None:
        """A new served certificate rebuilds the body with its fingerprint."""
        served = [[b"\x01" * 32]]
        publisher = self.publisher(tls_fingerprints=lambda: list(served[0]))
        first = json.loads(publisher.body())
        self.assertEqual(first["tls_fingerprints"], [{"sha256": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE"}])
        served[0] = [b"\x02" * 32]
        self.clock.advance(60)
        second = json.loads(publisher.body())
        self.assertEqual(second["tls_fingerprints"], [{"sha256": "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI"}])
        self.assertEqual(publisher.builds, 2)

    def test_fingerprints_not_read_per_request(self) -> None:
        """The TLS context is looked at no more than once per check interval."""
        calls = []
        publisher = self.publisher(tls_fingerprints=lambda: calls.append(1) or [])
        for _ in range(100):
            publisher.body()
        self.assertEqual(len(calls), 1)

    def test_rotation(self) -> None:
        """After rotation, the old key is in old_verify_keys and the new one signs."""
        new = generate_signing_key("k2")
        old = OldVerifyKey(self.key.key_id, self.key.public_key, 1_700_000_000_000)
        publisher = KeyPublisher("example.org", [new], self.clock, old_keys=[old])
        obj = json.loads(publisher.body())
        self.assertEqual(list(obj["verify_keys"]), ["ed25519:k2"])
        self.assertEqual(obj["old_verify_keys"]["ed25519:k"]["expired_ts"], 1_700_000_000_000)
        verify_with_signedjson(obj, "example.org", new.key_id, new.public_key_b64)

    def test_bad_configuration(self) -> None:
        """No keys, a bad server name, a tiny interval or a clashing old key are refused."""
        self.assertRaises(ConfigError, KeyPublisher, "example.org", [], self.clock)
        self.assertRaises(ValueError, KeyPublisher, "a b", [self.key], self.clock)
        self.assertRaises(ConfigError, self.publisher, refresh_interval_ms=5)
        clash = OldVerifyKey(self.key.key_id, self.key.public_key, 1)
        self.assertRaises(ConfigError, self.publisher, old_keys=[clash])
