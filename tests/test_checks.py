"""Tests for :mod:`synkeys.checks`."""

from __future__ import annotations

import hashlib
from typing import Any

import nacl.signing
from twisted.trial.unittest import SynchronousTestCase

from synkeys.checks import (
    MAX_KEYS_PER_RESPONSE,
    check_notary_signature,
    check_server_keys_object,
    parse_server_keys,
)
from synkeys.errors import InvalidKeyResponse
from synkeys.signing import canonical_json, encode_b64, sign_json

SERVER = "origin.example"
NOTARY = "notary.example"
NOW_TS = 1_700_000_000_000
VALID_UNTIL_TS = NOW_TS + 86_400_000
CERT_SHA256 = hashlib.sha256(b"certificate DER").digest()

KEY_1 = nacl.signing.SigningKey(b"\x01" * 32)
KEY_2 = nacl.signing.SigningKey(b"\x02" * 32)
OLD_KEY = nacl.signing.SigningKey(b"\x03" * 32)
NOTARY_KEY = nacl.signing.SigningKey(b"\x04" * 32)


def public_b64(key: nacl.signing.SigningKey) -> str:
    """The unpadded base64 public key of ``key``."""
    return encode_b64(bytes(key.verify_key))


def unsigned_response(**overrides: Any) -> dict[str, Any]:
    """An unsigned server-keys object listing KEY_1 and one old key."""
    obj: dict[str, Any] = {
        "server_name": SERVER,
        "valid_until_ts": VALID_UNTIL_TS,
        "verify_keys": {"ed25519:k1": {"key": public_b64(KEY_1)}},
        "old_verify_keys": {
            "ed25519:old": {"key": public_b64(OLD_KEY), "expired_ts": NOW_TS - 1000}
        },
    }
    obj.update(overrides)
    return obj


def signed(obj: dict[str, Any], *keys: tuple[str, nacl.signing.SigningKey]) -> dict:
    """``obj`` signed by SERVER with each ``(key_id, key)`` (KEY_1 by default)."""
    for key_id, key in keys or (("ed25519:k1", KEY_1),):
        obj = sign_json(obj, SERVER, key_id, key)
    return obj


def check(obj: Any, **kwargs: Any) -> Any:
    """Run the object checks for SERVER at NOW_TS."""
    return check_server_keys_object(obj, SERVER, fetched_ts=NOW_TS, **kwargs)


class AcceptTests(SynchronousTestCase):
    """Responses that pass every check."""

    def test_valid_response(self) -> None:
        """A well-formed response signed by its verify key becomes ServerKeys with every field."""
        obj = signed(unsigned_response())
        keys = parse_server_keys(
            canonical_json(obj), SERVER, fetched_ts=NOW_TS, source="src"
        )
        self.assertEqual(keys.server_name, SERVER)
        self.assertEqual(keys.valid_until_ts, VALID_UNTIL_TS)
        self.assertEqual(keys.fetched_ts, NOW_TS)
        self.assertEqual(keys.source, "src")
        self.assertEqual(keys.verify_keys, {"ed25519:k1": bytes(KEY_1.verify_key)})
        self.assertEqual(
            keys.old_verify_keys,
            {"ed25519:old": (bytes(OLD_KEY.verify_key), NOW_TS - 1000)},
        )
        self.assertEqual(keys.raw, canonical_json(obj))
        self.assertEqual(keys.json, obj)

    def test_old_verify_keys_optional(self) -> None:
        """A response without old_verify_keys is accepted with no old keys."""
        obj = unsigned_response()
        del obj["old_verify_keys"]
        keys = check(signed(obj))
        self.assertEqual(keys.old_verify_keys, {})

    def test_signed_by_one_of_two_keys(self) -> None:
        """A response listing two keys but signed by only one of them is accepted."""
        obj = unsigned_response(
            verify_keys={
                "ed25519:k1": {"key": public_b64(KEY_1)},
                "ed25519:k2": {"key": public_b64(KEY_2)},
            }
        )
        keys = check(signed(obj, ("ed25519:k2", KEY_2)))
        self.assertEqual(set(keys.verify_keys), {"ed25519:k1", "ed25519:k2"})

    def test_unknown_fields_kept_in_raw(self) -> None:
        """Unknown top-level and per-key fields survive byte for byte in raw."""
        obj = unsigned_response(
            extra={"z": [1, "two", None]},
            verify_keys={"ed25519:k1": {"key": public_b64(KEY_1), "note": "hi"}},
        )
        keys = check(signed(obj))
        self.assertIn(b'"extra":{"z":[1,"two",null]}', keys.raw)
        self.assertIn(b'"note":"hi"', keys.raw)

    def test_notary_signature_kept(self) -> None:
        """A notary's signature beside the origin's stays in raw and json."""
        obj = sign_json(signed(unsigned_response()), NOTARY, "ed25519:n", NOTARY_KEY)
        keys = check(obj)
        self.assertIn(NOTARY, keys.json["signatures"])
        self.assertIn(NOTARY.encode(), keys.raw)
        self.assertEqual(keys.raw, canonical_json(obj))

    def test_same_key_in_both_lists(self) -> None:
        """One key id bound to the same key in both lists is accepted."""
        obj = unsigned_response(
            old_verify_keys={
                "ed25519:k1": {"key": public_b64(KEY_1), "expired_ts": NOW_TS}
            }
        )
        keys = check(signed(obj))
        self.assertEqual(keys.old_verify_keys["ed25519:k1"][0], bytes(KEY_1.verify_key))

    def test_tls_fingerprint_listed(self) -> None:
        """The peer's certificate among tls_fingerprints is accepted."""
        obj = unsigned_response(
            tls_fingerprints=[
                {"sha256": encode_b64(b"\x00" * 32)},
                {"sha256": encode_b64(CERT_SHA256)},
            ]
        )
        keys = check(signed(obj), peer_certificate_sha256=CERT_SHA256)
        self.assertEqual(keys.server_name, SERVER)

    def test_tls_fingerprints_absent(self) -> None:
        """Without tls_fingerprints the peer certificate is not checked."""
        keys = check(signed(unsigned_response()), peer_certificate_sha256=CERT_SHA256)
        self.assertEqual(keys.server_name, SERVER)

    def test_tls_fingerprints_empty(self) -> None:
        """An empty tls_fingerprints list vouches for nothing and is not checked."""
        keys = check(
            signed(unsigned_response(tls_fingerprints=[])), peer_certificate_sha256=CERT_SHA256
        )
        self.assertIn(b'"tls_fingerprints":[]', keys.raw)

    def test_tls_fingerprints_without_peer_certificate(self) -> None:
        """A fingerprint list is only checked for shape when the peer cert is unknown."""
        obj = unsigned_response(tls_fingerprints=[{"sha256": encode_b64(b"x" * 32)}])
        keys = check(signed(obj))
        self.assertIn(b"tls_fingerprints", keys.raw)

    def test_padded_base64_key(self) -> None:
        """A verify key written in padded base64 is accepted."""
        padded = public_b64(KEY_1) + "="
        obj = unsigned_response(verify_keys={"ed25519:k1": {"key": padded}})
        keys = check(signed(obj))
        self.assertEqual(keys.verify_keys["ed25519:k1"], bytes(KEY_1.verify_key))


class RejectTests(SynchronousTestCase):
    """Each check refuses with a precise reason."""

    def assertRejected(self, obj: Any, reason: str, **kwargs: Any) -> None:
        """Assert the checks refuse ``obj`` with a reason containing ``reason``."""
        exc = self.assertRaises(InvalidKeyResponse, check, obj, **kwargs)
        self.assertEqual(exc.server_name, SERVER)
        self.assertIn(reason, exc.reason)

    def test_bad_json(self) -> None:
        """Bytes that are not strict JSON are refused as invalid JSON."""
        for body in [b"{", b'{"valid_until_ts": 1.5}', b'{"a":1,"a":2}', b"\xff"]:
            exc = self.assertRaises(
                InvalidKeyResponse, parse_server_keys, body, SERVER, fetched_ts=NOW_TS
            )
            self.assertIn("invalid JSON", exc.reason)

    def test_not_an_object(self) -> None:
        """A JSON array is refused."""
        self.assertRejected([], "not a JSON object")

    def test_server_name_missing(self) -> None:
        """A missing server_name is refused."""
        obj = signed(unsigned_response())
        del obj["server_name"]
        self.assertRejected(obj, "server_name is missing")

    def test_server_name_not_string(self) -> None:
        """A non-string server_name is refused."""
        self.assertRejected(signed(unsigned_response(server_name=1)), "not a string")

    def test_server_name_other(self) -> None:
        """A response for another server is refused."""
        obj = unsigned_response(server_name="evil.example")
        self.assertRejected(obj, "is not the server asked for")

    def test_server_name_case_sensitive(self) -> None:
        """Server names compare case-sensitively."""
        obj = unsigned_response(server_name=SERVER.upper())
        self.assertRejected(obj, "is not the server asked for")

    def test_valid_until_ts_bad(self) -> None:
        """A missing, boolean, string, zero, negative or huge valid_until_ts is refused."""
        cases = [(None, "missing"), (True, "not an integer"), ("1", "not an integer")]
        cases += [(0, "out of range"), (-5, "out of range"), (2**53, "out of range")]
        for value, reason in cases:
            obj = unsigned_response(valid_until_ts=value)
            if value is None:
                del obj["valid_until_ts"]
            self.assertRejected(signed(obj), reason)

    def test_valid_until_ts_max(self) -> None:
        """valid_until_ts of 2**53-1 is still in range."""
        keys = check(signed(unsigned_response(valid_until_ts=2**53 - 1)))
        self.assertEqual(keys.valid_until_ts, 2**53 - 1)

    def test_verify_keys_missing(self) -> None:
        """A response without verify_keys is refused."""
        obj = unsigned_response()
        del obj["verify_keys"]
        self.assertRejected(obj, "verify_keys is missing")

    def test_verify_keys_not_object(self) -> None:
        """A list as verify_keys is refused."""
        self.assertRejected(unsigned_response(verify_keys=[]), "verify_keys is missing")

    def test_verify_keys_empty(self) -> None:
        """An empty verify_keys is refused."""
        self.assertRejected(unsigned_response(verify_keys={}), "verify_keys is empty")

    def test_bad_key_id(self) -> None:
        """Key ids outside ed25519:[A-Za-z0-9_]+ are refused."""
        for key_id in ["k1", "ed25519:", "ed25519:a-b", "curve25519:k", "ed25519:é"]:
            obj = unsigned_response(verify_keys={key_id: {"key": public_b64(KEY_1)}})
            self.assertRejected(obj, "invalid key id")

    def test_key_entry_not_object(self) -> None:
        """A verify key given as a bare string is refused."""
        obj = unsigned_response(verify_keys={"ed25519:k1": public_b64(KEY_1)})
        self.assertRejected(obj, "verify_keys[ed25519:k1] is not an object")

    def test_key_entry_without_key(self) -> None:
        """A verify key object without "key" is refused."""
        obj = unsigned_response(verify_keys={"ed25519:k1": {}})
        self.assertRejected(obj, "has no key")

    def test_key_not_base64(self) -> None:
        """A key that is not a base64 string is refused."""
        for key in [1, None, "é"]:
            obj = unsigned_response(verify_keys={"ed25519:k1": {"key": key}})
            self.assertRejected(obj, "verify_keys[ed25519:k1]")

    def test_key_wrong_length(self) -> None:
        """A key that is not 32 bytes is refused."""
        obj = unsigned_response(
            verify_keys={"ed25519:k1": {"key": encode_b64(b"a" * 31)}}
        )
        self.assertRejected(obj, "not 32")

    def test_key_small_order(self) -> None:
        """A small-order point as a key is refused."""
        identity = b"\x01" + b"\x00" * 31
        obj = unsigned_response(
            verify_keys={"ed25519:k1": {"key": encode_b64(identity)}}
        )
        self.assertRejected(obj, "small order")

    def test_old_verify_keys_not_object(self) -> None:
        """A list as old_verify_keys is refused."""
        obj = signed(unsigned_response(old_verify_keys=[]))
        self.assertRejected(obj, "old_verify_keys is not an object")

    def test_old_key_bad(self) -> None:
        """An old key with a bad id or key bytes is refused."""
        obj = unsigned_response(
            old_verify_keys={"bad": {"key": public_b64(OLD_KEY), "expired_ts": 1}}
        )
        self.assertRejected(signed(obj), "invalid key id 'bad' in old_verify_keys")
        obj = unsigned_response(
            old_verify_keys={
                "ed25519:o": {"key": encode_b64(b"\0" * 32), "expired_ts": 1}
            }
        )
        self.assertRejected(signed(obj), "old_verify_keys[ed25519:o]")

    def test_old_key_expired_ts_bad(self) -> None:
        """An old key whose expired_ts is missing, a bool or out of range is refused."""
        for value in [None, False, 0, 2**53]:
            entry: dict[str, Any] = {"key": public_b64(OLD_KEY)}
            if value is not None:
                entry["expired_ts"] = value
            obj = unsigned_response(old_verify_keys={"ed25519:old": entry})
            self.assertRejected(signed(obj), "old_verify_keys[ed25519:old].expired_ts")

    def test_key_id_rebound(self) -> None:
        """One key id bound to different keys in verify_keys and old_verify_keys is refused."""
        obj = unsigned_response(
            old_verify_keys={
                "ed25519:k1": {"key": public_b64(OLD_KEY), "expired_ts": NOW_TS}
            }
        )
        self.assertRejected(signed(obj), "ed25519:k1 is bound to different keys")

    def test_too_many_keys(self) -> None:
        """More keys than MAX_KEYS_PER_RESPONSE are refused."""
        old = {
            f"ed25519:o{i}": {"key": public_b64(OLD_KEY), "expired_ts": 1}
            for i in range(MAX_KEYS_PER_RESPONSE)
        }
        obj = unsigned_response(old_verify_keys=old)
        self.assertRejected(signed(obj), "more than")

    def test_signatures_missing(self) -> None:
        """An unsigned response is refused."""
        self.assertRejected(unsigned_response(), "signatures is missing")

    def test_signatures_not_object(self) -> None:
        """A list as signatures is refused."""
        self.assertRejected(unsigned_response(signatures=[]), "signatures is missing")

    def test_signed_only_by_others(self) -> None:
        """A response signed only by a notary is refused."""
        obj = sign_json(unsigned_response(), NOTARY, "ed25519:k1", KEY_1)
        self.assertRejected(obj, f"no signatures by {SERVER}")

    def test_bad_signature(self) -> None:
        """A signature that does not verify is refused."""
        obj = signed(unsigned_response())
        obj["valid_until_ts"] += 1
        self.assertRejected(obj, "no valid signature")

    def test_signature_by_unlisted_key(self) -> None:
        """A signature by a key the object does not list is refused."""
        obj = signed(unsigned_response(), ("ed25519:k2", KEY_2))
        self.assertRejected(obj, "no valid signature")

    def test_signature_by_old_key_only(self) -> None:
        """A signature by an old key alone does not count."""
        obj = signed(unsigned_response(), ("ed25519:old", OLD_KEY))
        self.assertRejected(obj, "with a key in verify_keys")

    def test_signature_garbage(self) -> None:
        """A signature that is not base64 or not 64 bytes is refused."""
        for sig in ["!!", encode_b64(b"x" * 63), 5]:
            obj = unsigned_response(signatures={SERVER: {"ed25519:k1": sig}})
            self.assertRejected(obj, "no valid signature")

    def test_tls_fingerprints_not_list(self) -> None:
        """A tls_fingerprints that is not a list is refused."""
        obj = signed(unsigned_response(tls_fingerprints={}))
        self.assertRejected(obj, "tls_fingerprints is not a list")

    def test_tls_fingerprints_bad_entry(self) -> None:
        """tls_fingerprints entries must be objects with a base64 sha256."""
        for entry in ["abc", {}, {"sha256": 1}]:
            obj = signed(unsigned_response(tls_fingerprints=[entry]))
            self.assertRejected(obj, "tls_fingerprints")

    def test_tls_certificate_not_listed(self) -> None:
        """A peer certificate missing from a present tls_fingerprints list is refused."""
        obj = signed(
            unsigned_response(tls_fingerprints=[{"sha256": encode_b64(b"\0" * 32)}])
        )
        self.assertRejected(
            obj,
            "TLS certificate not listed in tls_fingerprints",
            peer_certificate_sha256=CERT_SHA256,
        )


class NotarySignatureTests(SynchronousTestCase):
    """check_notary_signature."""

    def setUp(self) -> None:
        """Build origin keys relayed and signed by NOTARY."""
        obj = sign_json(signed(unsigned_response()), NOTARY, "ed25519:n", NOTARY_KEY)
        self.keys = check(obj, source=NOTARY)

    def test_valid(self) -> None:
        """The key id whose notary signature verifies is returned."""
        key_id = check_notary_signature(
            self.keys,
            NOTARY,
            {
                "ed25519:a": bytes(KEY_2.verify_key),
                "ed25519:n": bytes(NOTARY_KEY.verify_key),
            },
        )
        self.assertEqual(key_id, "ed25519:n")

    def test_wrong_key(self) -> None:
        """A notary signature under the right id but by another key is refused."""
        exc = self.assertRaises(
            InvalidKeyResponse,
            check_notary_signature,
            self.keys,
            NOTARY,
            {"ed25519:n": bytes(KEY_2.verify_key)},
        )
        self.assertIn(f"no valid signature by notary {NOTARY}", exc.reason)

    def test_other_notary(self) -> None:
        """A signature by a different notary does not count."""
        self.assertRaises(
            InvalidKeyResponse,
            check_notary_signature,
            self.keys,
            "other.example",
            {"ed25519:n": bytes(NOTARY_KEY.verify_key)},
        )

    def test_origin_signature_not_notary(self) -> None:
        """The origin's own signature does not pass as the notary's."""
        keys = check(signed(unsigned_response()))
        self.assertRaises(
            InvalidKeyResponse,
            check_notary_signature,
            keys,
            SERVER,
            {"ed25519:k2": bytes(KEY_1.verify_key)},
        )

    def test_no_keys(self) -> None:
        """With no notary keys configured nothing verifies."""
        exc = self.assertRaises(
            InvalidKeyResponse, check_notary_signature, self.keys, NOTARY, {}
        )
        self.assertIn("no keys", exc.reason)
