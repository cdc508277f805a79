"""
Property-based tests of what origins can send: a valid signed
``/_matrix/key/v2/server`` response is mutated (fields dropped, duplicated
or retyped; bits flipped in keys and signatures; re-signed with another
key; floats and big integers added; ``server_name`` changed; the bytes
themselves damaged) and

- :func:`synkeys.checks.parse_server_keys` accepts a mutant exactly when an
  independent oracle (:func:`oracle_server_keys`, written here from the
  spec with its own base64, curve-point and signature checks) says it is
  still valid, and then reads the same keys out of it;
- fetched through :class:`~synkeys.fetchers.DirectKeyFetcher` and a
  :class:`~synkeys.keyring.Keyring` into a
  :class:`~synkeys.storage.MemoryKeyStore`, a rejected mutant leaves the
  store exactly as it was, and an accepted one never rebinds a key id.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any, Dict, List, Optional, Tuple

import attr
import nacl.exceptions
import nacl.signing
from canonicaljson import encode_canonical_json
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from synkeys.checks import parse_server_keys
from synkeys.errors import InvalidKeyResponse
from synkeys.fetchers import DirectKeyFetcher
from synkeys.keyring import Keyring
from synkeys.signing import MAX_SAFE_INTEGER
from synkeys.storage import MemoryKeyStore
from synkeys.testing import FakeFederationClient, FakeOrigin
from tests.helpers import make_server_keys, make_signing_key
from tests.test_fuzz_requests import _Invalid, _json_values, spec_key_id, strict_json

ORIGIN = "origin.test"
#: The origin's own signing keys, by key id.
ORIGIN_KEYS = {"ed25519:a": make_signing_key("origin a"), "ed25519:b": make_signing_key("origin b")}
OLD_KEY = make_signing_key("origin old")
IMPOSTOR = make_signing_key("impostor")
NOW_S = 1_700_000_000

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# -- an independent oracle ---------------------------------------------------

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
_Point = Tuple[int, int, int, int]


def _add(a: _Point, b: _Point) -> _Point:
    x1, y1, z1, t1 = a
    x2, y2, z2, t2 = b
    k = (y1 - x1) * (y2 - x2) % _P
    m = (y1 + x1) * (y2 + x2) % _P
    c = 2 * t1 * t2 * _D % _P
    d = 2 * z1 * z2 % _P
    e, f, g, h = m - k, d - c, d + c, m + k
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _is_identity(point: _Point) -> bool:
    x, y, z, _ = point
    return x % _P == 0 and (y - z) % _P == 0


def is_prime_order_point(data: bytes) -> bool:
    """
    Whether ``data`` is the canonical encoding (RFC 8032) of an Edwards25519
    point of prime order L: on the curve, not of small order, and in the
    main subgroup. Pure Python, independent of libsodium.
    """
    if len(data) != 32:
        return False
    y = int.from_bytes(data, "little") & ((1 << 255) - 1)
    sign = data[31] >> 7
    if y >= _P:
        return False
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P:
        return False
    if x == 0 and sign:
        return False
    if x & 1 != sign:
        x = _P - x
    point = (x, y, 1, x * y % _P)
    result: _Point = (0, 1, 1, 0)
    scalar = _L
    while scalar:
        if scalar & 1:
            result = _add(result, point)
        point = _add(point, point)
        scalar >>= 1
    return not _is_identity((x, y, 1, x * y % _P)) and _is_identity(result)


_B64 = re.compile(r"[A-Za-z0-9+/]*")


def strict_b64(value: object) -> bytes:
    """
    Standard base64, unpadded or correctly padded to a multiple of four,
    as the spec allows; anything else (other alphabets, junk, wrong
    padding) raises :class:`_Invalid`.
    """
    import base64

    if not isinstance(value, str):
        raise _Invalid("not a string")
    body = value.rstrip("=")
    padding = len(value) - len(body)
    if not _B64.fullmatch(body) or len(body) % 4 == 1:
        raise _Invalid("not base64")
    if padding and (padding > 2 or len(value) % 4):
        raise _Invalid("bad padding")
    return base64.b64decode(body + "=" * (-len(body) % 4))


def _ts(value: object) -> int:
    if type(value) is not int or not 0 < value <= MAX_SAFE_INTEGER:
        raise _Invalid("timestamp")
    return value


def _key(entry: object) -> bytes:
    if not isinstance(entry, dict):
        raise _Invalid("entry")
    key = strict_b64(entry.get("key"))
    if not is_prime_order_point(key):
        raise _Invalid("not a key")
    return key


@attr.s(frozen=True, auto_attribs=True)
class Expected:
    """What the oracle reads out of a valid response."""

    valid_until_ts: int
    verify_keys: Dict[str, bytes]
    old_verify_keys: Dict[str, Tuple[bytes, int]]
    canonical: bytes


def oracle_server_keys(body: bytes, server_name: str = ORIGIN) -> Optional[Expected]:
    """
    Whether ``body`` is a valid key response of ``server_name``, by the
    spec: canonical-JSON material (no floats, no out-of-range integers, no
    duplicate keys, no lone surrogates); an object naming ``server_name``
    exactly; a positive integer ``valid_until_ts``; a non-empty
    ``verify_keys`` and an optional ``old_verify_keys`` (with positive
    ``expired_ts``) of valid key ids bound to prime-order ed25519 points,
    no key id bound to two keys, at most 256 keys; ``tls_fingerprints``,
    when present, a list of objects with base64 ``sha256``; and a signature
    of ``server_name`` by one of its current keys that verifies over the
    canonical JSON of the object without ``signatures`` and ``unsigned``.
    """
    try:
        obj = strict_json(body, floats=False)
        if not isinstance(obj, dict) or obj.get("server_name") != server_name:
            raise _Invalid("server name")
        valid_until_ts = _ts(obj.get("valid_until_ts"))
        current = obj.get("verify_keys")
        old = obj.get("old_verify_keys", {})
        if not isinstance(current, dict) or not current or not isinstance(old, dict):
            raise _Invalid("keys")
        if not all(spec_key_id(k) for k in list(current) + list(old)):
            raise _Invalid("key id")
        verify_keys = {key_id: _key(entry) for key_id, entry in current.items()}
        old_verify_keys = {
            key_id: (_key(entry), _ts(entry.get("expired_ts"))) for key_id, entry in old.items()
        }
        if len(current) + len(old) > 256:
            raise _Invalid("too many keys")
        for key_id, (key, _) in old_verify_keys.items():
            if key_id in verify_keys and verify_keys[key_id] != key:
                raise _Invalid("key id bound twice")
        if "tls_fingerprints" in obj:
            fingerprints = obj["tls_fingerprints"]
            if not isinstance(fingerprints, list):
                raise _Invalid("fingerprints")
            for item in fingerprints:
                if not isinstance(item, dict) or "sha256" not in item:
                    raise _Invalid("fingerprint")
                strict_b64(item["sha256"])
        signatures = obj.get("signatures")
        own = signatures.get(server_name) if isinstance(signatures, dict) else None
        if not isinstance(own, dict):
            raise _Invalid("no signatures")
        message = encode_canonical_json(
            {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}
        )
        for key_id, signature_b64 in own.items():
            if key_id not in verify_keys:
                continue
            try:
                signature = strict_b64(signature_b64)
                nacl.signing.VerifyKey(verify_keys[key_id]).verify(message, signature)
            except (_Invalid, nacl.exceptions.BadSignatureError, ValueError):
                continue
            return Expected(valid_until_ts, verify_keys, old_verify_keys, encode_canonical_json(obj))
        raise _Invalid("no valid signature")
    except _Invalid:
        return None


# -- mutations ---------------------------------------------------------------


def resign(obj: Any, keys: Dict[str, nacl.signing.SigningKey], name: str = ORIGIN) -> Any:
    """
    Replace ``name``'s signatures on ``obj`` by fresh ones from ``keys``
    (signed the spec's way, independently of synkeys), when ``obj`` still
    has the shape for it.
    """
    if not isinstance(obj, dict):
        return obj
    signatures = obj.get("signatures", {})
    if not isinstance(signatures, dict):
        return obj
    try:
        message = encode_canonical_json(
            {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}
        )
    except (ValueError, TypeError, UnicodeEncodeError):
        return obj
    import base64

    fresh = {
        key_id: base64.b64encode(key.sign(message).signature).decode().rstrip("=")
        for key_id, key in keys.items()
    }
    result = dict(obj)
    result["signatures"] = {**signatures, name: fresh}
    return result


def _paths(value: Any, prefix: Tuple[Any, ...] = ()) -> List[Tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found.extend(_paths(item, prefix + (key,)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.extend(_paths(item, prefix + (index,)))
    return found


def _set(obj: Any, path: Tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = obj
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    return obj


def _delete(obj: Any, path: Tuple[Any, ...]) -> Any:
    parent = obj
    for step in path[:-1]:
        parent = parent[step]
    del parent[path[-1]]
    return obj


def _flip_bit(text: str, draw: st.DrawFn) -> str:
    """``text`` (base64) with one bit of the bytes it encodes flipped."""
    import base64
    import binascii

    try:
        raw = bytearray(base64.b64decode(text + "=" * (-len(text) % 4)))
    except binascii.Error:
        raw = bytearray()
    if not raw:
        return text + "A"
    bit = draw(st.integers(0, len(raw) * 8 - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    return base64.b64encode(bytes(raw)).decode().rstrip("=")


_NUMBERS = st.sampled_from(
    [1.5, 1_700_000_000_000.0, 2**53, -(2**53), 2**64, -1, 0, True, None, "1700000000000"]
)


@attr.s(auto_attribs=True)
class Mutant:
    """A response body and the story of how it was made."""

    body: bytes
    steps: List[str]
    original: Any


@st.composite
def mutants(draw: st.DrawFn) -> Mutant:
    """A valid signed response, then up to four mutations, then serialised (perhaps badly)."""
    chosen = draw(st.sampled_from([["ed25519:a"], ["ed25519:b"], ["ed25519:a", "ed25519:b"]]))
    signing = {key_id: ORIGIN_KEYS[key_id] for key_id in chosen}
    old = draw(st.sampled_from([{}, {"ed25519:old": (OLD_KEY, 1_600_000_000_000)}]))
    extra = draw(
        st.sampled_from(
            [{}, {"tls_fingerprints": [{"sha256": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE"}]},
             {"m.extra": {"nested": [1, "x", None]}}]
        )
    )
    valid_until_ts = draw(st.sampled_from([NOW_S * 1000 + 86_400_000, MAX_SAFE_INTEGER, 1]))
    keys = make_server_keys(ORIGIN, signing, old_keys=old, valid_until_ts=valid_until_ts,
                            extra_fields=extra)
    obj: Any = copy.deepcopy(dict(keys.json))
    original = copy.deepcopy(obj)
    steps: List[str] = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(
            st.sampled_from(
                ["drop", "retype", "number", "flip_key", "flip_signature", "base64_text",
                 "resign", "resign", "impostor", "impostor_key", "server_name", "extra",
                 "unsigned", "notary_signature", "rebind_old", "small_order", "pad", "rekey", "rekey"]
            )
        )
        paths = _paths(obj)[1:] if isinstance(obj, (dict, list)) else []
        if kind == "drop" and paths:
            path = draw(st.sampled_from(paths))
            obj = _delete(obj, path)
            steps.append(f"drop {path}")
        elif kind == "retype":
            path = draw(st.sampled_from(paths or [()]))
            obj = _set(obj, path, draw(_json_values))
            steps.append(f"retype {path}")
        elif kind == "number":
            path = draw(st.sampled_from(paths or [()]))
            obj = _set(obj, path, draw(_NUMBERS))
            steps.append(f"number at {path}")
        elif kind in ("flip_key", "flip_signature", "base64_text"):
            wanted = {"flip_key": ("key",), "flip_signature": ("signatures",)}.get(kind)
            b64_paths = [
                p for p in paths
                if p and isinstance(_get(obj, p), str)
                and (wanted is None or (p[-1] == "key" if wanted == ("key",) else p[0] == "signatures"))
            ]
            if not b64_paths:
                continue
            path = draw(st.sampled_from(b64_paths))
            text = _get(obj, path)
            if kind == "base64_text" or not re.fullmatch(r"[A-Za-z0-9+/]+", text):
                at = draw(st.integers(0, len(text)))
                junk = draw(st.sampled_from(["=", "==", "-", "_", " ", "A", "!", "\u00e9", ""]))
                text = text[:at] + junk + text[at + draw(st.integers(0, 1)):]
            else:
                text = _flip_bit(text, draw)
            obj = _set(obj, path, text)
            steps.append(f"{kind} at {path}")
        elif kind == "pad":
            b64_paths = [p for p in paths if p and (p[-1] == "key" or p[0] == "signatures")
                         and isinstance(_get(obj, p), str)]
            if not b64_paths:
                continue
            path = draw(st.sampled_from(b64_paths))
            obj = _set(obj, path, _get(obj, path) + draw(st.sampled_from(["=", "==", "==="])))
            if draw(st.booleans()):
                obj = resign(obj, signing)
            steps.append(f"padding at {path}")
        elif kind == "rekey" and isinstance(obj, dict):
            # Bind a key id the origin uses (current or old) to an impostor's
            # key, signed so that the response itself is valid.
            import base64

            impostor_b64 = base64.b64encode(bytes(IMPOSTOR.verify_key)).decode().rstrip("=")
            section = draw(st.sampled_from(["verify_keys", "old_verify_keys"]))
            entries = obj.get(section)
            if not isinstance(entries, dict) or not entries:
                continue
            key_id = draw(st.sampled_from(sorted(entries)))
            if not isinstance(entries[key_id], dict):
                continue
            entries[key_id]["key"] = impostor_b64
            if section == "verify_keys":
                others = {k: v for k, v in signing.items() if k != key_id}
                obj = resign(obj, {key_id: IMPOSTOR, **others})
            else:
                obj = resign(obj, signing)
            steps.append(f"{section}[{key_id}] rebound to an impostor key")
        elif kind == "resign":
            obj = resign(obj, signing)
            steps.append("resign")
        elif kind == "impostor":
            obj = resign(obj, {draw(st.sampled_from(chosen)): IMPOSTOR})
            steps.append("signed by an impostor under the origin's key id")
        elif kind == "impostor_key" and isinstance(obj, dict) and isinstance(obj.get("verify_keys"), dict):
            import base64

            obj["verify_keys"]["ed25519:evil"] = {
                "key": base64.b64encode(bytes(IMPOSTOR.verify_key)).decode().rstrip("=")
            }
            obj = resign(obj, {"ed25519:evil": IMPOSTOR})
            steps.append("impostor key added, signed by it alone")
        elif kind == "server_name" and isinstance(obj, dict):
            obj["server_name"] = draw(
                st.sampled_from(["Origin.test", "evil.test", "origin.test:8448", "origin.test.", ""])
            )
            steps.append(f"server_name {obj['server_name']!r}")
        elif kind == "extra" and isinstance(obj, dict):
            obj[draw(st.sampled_from(["m.extra", "x", "valid_until_ts"]))] = draw(
                st.one_of(_json_values, _NUMBERS)
            )
            steps.append("extra field")
        elif kind == "unsigned" and isinstance(obj, dict):
            obj["unsigned"] = draw(st.one_of(_json_values, _NUMBERS))
            steps.append("unsigned")
        elif kind == "notary_signature" and isinstance(obj, dict) and isinstance(obj.get("signatures"), dict):
            obj["signatures"]["notary.test"] = {"ed25519:n": draw(st.sampled_from(["AAAA", "!!", ""]))}
            steps.append("another server's signature")
        elif kind == "rebind_old" and isinstance(obj, dict) and isinstance(obj.get("old_verify_keys"), dict):
            import base64

            obj["old_verify_keys"][chosen[0]] = {
                "key": base64.b64encode(bytes(IMPOSTOR.verify_key)).decode().rstrip("="),
                "expired_ts": 1,
            }
            if draw(st.booleans()):
                obj = resign(obj, signing)
            steps.append("current key id bound to other bytes in old_verify_keys")
        elif kind == "small_order" and isinstance(obj, dict) and isinstance(obj.get("verify_keys"), dict):
            # The identity point: valid-looking base64 of 32 bytes, small order.
            obj["verify_keys"]["ed25519:zero"] = {"key": "AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}
            obj = resign(obj, signing)
            steps.append("small-order key added")
    return Mutant(draw(serialised(obj)), steps, original)


def _get(obj: Any, path: Tuple[Any, ...]) -> Any:
    for step in path:
        obj = obj[step]
    return obj


@st.composite
def serialised(draw: st.DrawFn, obj: Any) -> bytes:
    """``obj`` as bytes: canonical, pretty, escaped, or damaged at the text level."""
    how = draw(
        st.sampled_from(["canonical"] * 6 + ["pretty", "ascii", "duplicate",
                         "float_literal", "byte_flip", "surrogate", "truncate"])
    )
    try:
        if how == "canonical":
            return encode_canonical_json(obj)
    except (ValueError, TypeError, UnicodeEncodeError):
        pass
    text = json.dumps(obj, ensure_ascii=how == "ascii", indent=2 if how == "pretty" else None)
    if how == "duplicate" and text.startswith("{") and len(text) > 2:
        field = draw(st.sampled_from(["server_name", "valid_until_ts", "verify_keys", "signatures"]))
        text = "{" + json.dumps(field) + ":" + json.dumps(_lookup(obj, field)) + "," + text[1:]
    elif how == "float_literal":
        text = re.sub(r'("valid_until_ts":\s*)([0-9]+)', r"\g<1>\g<2>.0", text, count=1)
    elif how == "surrogate":
        text = text.replace('"server_name"', '"server_name\\ud800"', 1)
    elif how == "truncate":
        text = text[: draw(st.integers(0, max(0, len(text) - 1)))]
    raw = text.encode("utf-8", "surrogatepass")
    if how == "byte_flip" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([raw[at] ^ (1 << draw(st.integers(0, 7)))]) + raw[at + 1 :]
    return raw


def _lookup(obj: Any, field: str) -> Any:
    return obj.get(field) if isinstance(obj, dict) else None


def over_padded_key() -> Mutant:
    """A response whose key is written ``...==`` (43 characters and two pads), properly signed."""
    keys = make_server_keys(ORIGIN, {"ed25519:a": ORIGIN_KEYS["ed25519:a"]})
    obj = copy.deepcopy(dict(keys.json))
    obj["verify_keys"]["ed25519:a"]["key"] += "=="
    obj = resign(obj, {"ed25519:a": ORIGIN_KEYS["ed25519:a"]})
    return Mutant(encode_canonical_json(obj), ["over-padded key, re-signed"], keys.json)


def rekeyed() -> Mutant:
    """A valid response binding the origin's ``ed25519:a`` to an impostor's key, signed by it."""
    import base64

    keys = make_server_keys(ORIGIN, {"ed25519:a": ORIGIN_KEYS["ed25519:a"]})
    obj = copy.deepcopy(dict(keys.json))
    obj["verify_keys"]["ed25519:a"]["key"] = base64.b64encode(bytes(IMPOSTOR.verify_key)).decode()
    obj = resign(obj, {"ed25519:a": IMPOSTOR})
    return Mutant(encode_canonical_json(obj), ["ed25519:a rebound, re-signed"], keys.json)


# -- the properties ------------------------------------------------------------


class CheckerOracleTests(SynchronousTestCase):
    """parse_server_keys agrees with the oracle on mutated responses."""

    @FUZZ
    @given(mutants())
    @example(over_padded_key())
    def test_checker_matches_oracle(self, mutant: Mutant) -> None:
        """A mutant is accepted exactly when the oracle finds it valid, with the keys the oracle reads."""
        expected = oracle_server_keys(mutant.body)
        try:
            keys = parse_server_keys(mutant.body, ORIGIN, fetched_ts=NOW_S * 1000, source=ORIGIN)
        except InvalidKeyResponse as e:
            self.assertIsNone(expected, f"refused ({e.reason}) though valid: {mutant.steps} {mutant.body[:300]!r}")
            return
        self.assertIsNotNone(expected, f"accepted though invalid: {mutant.steps} {mutant.body[:300]!r}")
        assert expected is not None
        self.assertEqual(keys.server_name, ORIGIN)
        self.assertEqual(keys.valid_until_ts, expected.valid_until_ts)
        self.assertEqual(dict(keys.verify_keys), expected.verify_keys)
        self.assertEqual(dict(keys.old_verify_keys), expected.old_verify_keys)
        self.assertEqual(keys.raw, expected.canonical)

    def test_unmutated_is_valid(self) -> None:
        """The starting point, a response as the helpers build it, is valid for checker and oracle alike."""
        keys = make_server_keys(ORIGIN, ORIGIN_KEYS, old_keys={"ed25519:old": (OLD_KEY, 5)})
        self.assertIsNotNone(oracle_server_keys(keys.raw))
        self.assertEqual(parse_server_keys(keys.raw, ORIGIN, fetched_ts=1).raw, keys.raw)

    def test_oracle_point_check(self) -> None:
        """The oracle's curve check accepts real public keys and refuses small-order and off-curve encodings."""
        self.assertTrue(is_prime_order_point(bytes(IMPOSTOR.verify_key)))
        for bad in ["01" + "00" * 31, "ec" + "ff" * 30 + "7f", "00" * 31 + "80", "ed" + "ff" * 30 + "7f",
                    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"]:
            self.assertFalse(is_prime_order_point(bytes.fromhex(bad)), bad)

    def test_oracle_base64(self) -> None:
        """The oracle's base64 takes unpadded and correctly padded text only."""
        self.assertEqual(strict_b64("AAE"), b"\x00\x01")
        self.assertEqual(strict_b64("AAE="), b"\x00\x01")
        for bad in ["AAE==", "AA-", "A", "AAE=A", "AA E"]:
            self.assertRaises(_Invalid, strict_b64, bad)


class StoreUntouchedTests(SynchronousTestCase):
    """What a mutant does to the cache when fetched through the keyring."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW_S)

    def _rows(self, store: MemoryKeyStore) -> Dict[str, Tuple[bytes, int]]:
        found = self.successResultOf(store.get_server_keys({ORIGIN: None}))
        return {key_id: (keys.raw, keys.fetched_ts) for key_id, keys in found.get(ORIGIN, {}).items()}

    @FUZZ
    @given(mutants())
    @example(Mutant(b"{}", ["empty object"], None))
    @example(rekeyed())
    def test_rejected_mutant_leaves_store(self, mutant: Mutant) -> None:
        """A refused mutant changes nothing in the store; an accepted one never rebinds a cached key id."""
        store = MemoryKeyStore()
        cached = make_server_keys(
            ORIGIN, ORIGIN_KEYS, old_keys={"ed25519:old": (OLD_KEY, 1_600_000_000_000)},
            fetched_ts=NOW_S * 1000 - 3_600_000,
        )
        self.successResultOf(store.store_server_keys(cached))
        before = self._rows(store)
        origin = FakeOrigin(ORIGIN, self.clock)
        origin.override = (200, mutant.body)
        keyring = Keyring([DirectKeyFetcher(FakeFederationClient([origin]), self.clock)],
                          self.clock, store=store)
        fetching = keyring.fetch_server_keys({ORIGIN: {}})
        self.clock.advance(0)
        result = self.successResultOf(fetching)
        after = self._rows(store)
        expected = oracle_server_keys(mutant.body)
        if expected is None:
            self.assertEqual(after, before, mutant.steps)
            self.assertNotIn(ORIGIN, result.responses)
            self.assertIn("invalid response", result.failures[ORIGIN])
            return
        for key_id, (raw, _) in after.items():
            bound = json.loads(raw)
            key = (bound["verify_keys"].get(key_id) or bound["old_verify_keys"][key_id])["key"]
            if key_id in before:
                original = cached.key_bytes(key_id)
                self.assertEqual(strict_b64(key), original, f"{key_id} rebound: {mutant.steps}")
        for key_id in set(expected.verify_keys) | set(expected.old_verify_keys):
            self.assertIn(key_id, after)
