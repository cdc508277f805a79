"""
Checks that turn a received server-keys response into a
:class:`synkeys.keys.ServerKeys` (pure functions, no I/O).

Every failure raises :class:`synkeys.errors.InvalidKeyResponse` whose
``reason`` says exactly which check failed, so logs and notary answers can
explain why a server's keys were refused.

What is checked, in order: the body is strict canonical-JSON material; it
is an object; ``server_name`` is the server we asked about; ``valid_until_ts``
is a sane integer; every key id is well formed and every key is a valid,
non-small-order ed25519 point; no key id is bound to two different keys;
``tls_fingerprints``, when present, is well formed and (when we know the
peer's certificate) lists it; and the object carries a valid signature of
its own server by one of its *current* ``verify_keys``. Unknown fields and
other servers' signatures (a notary's) are kept untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from synkeys.errors import InvalidKeyId, InvalidKeyResponse, InvalidSignedJson
from synkeys.keys import ServerKeys
from synkeys.servername import check_key_id
from synkeys.signing import (
    MAX_SAFE_INTEGER,
    canonical_json,
    decode_b64,
    decode_strict_json,
    decode_verify_key_bytes,
    signable_bytes,
    verify_signature,
)

__all__ = [
    "MAX_KEYS_PER_RESPONSE",
    "check_notary_signature",
    "check_server_keys_object",
    "parse_server_keys",
]

#: Most keys (current plus old) one response may list. Real servers list a
#: handful; the cap bounds the work (and storage) one response can cause.
MAX_KEYS_PER_RESPONSE = 256

#: Raises :class:`InvalidKeyResponse` for the response being checked.
_Fail = Callable[[str], NoReturn]


def parse_server_keys(
    body: bytes,
    expected_server_name: str,
    *,
    fetched_ts: int,
    source: str = "",
    peer_certificate_sha256: bytes | None = None,
) -> ServerKeys:
    """
    Decode ``body`` strictly and check it as ``expected_server_name``'s
    ``/_matrix/key/v2/server`` object.

    :param body: The response body as received.
    :param expected_server_name: The server whose keys were asked for.
    :param fetched_ts: When the body was received (ms).
    :param source: Who answered: the origin's name or a notary's.
    :param peer_certificate_sha256: SHA-256 of the TLS certificate the
        origin presented, to match against ``tls_fingerprints``; ``None``
        when unknown (e.g. the body came through a notary).
    :raises InvalidKeyResponse: with the reason, when any check fails.
    """
    try:
        obj = decode_strict_json(body)
    except InvalidSignedJson as e:
        raise InvalidKeyResponse(expected_server_name, f"invalid JSON: {e}") from None
    return check_server_keys_object(
        obj,
        expected_server_name,
        fetched_ts=fetched_ts,
        source=source,
        peer_certificate_sha256=peer_certificate_sha256,
    )


def check_server_keys_object(
    obj: object,
    expected_server_name: str,
    *,
    fetched_ts: int,
    source: str = "",
    peer_certificate_sha256: bytes | None = None,
) -> ServerKeys:
    """
    Check an already decoded object as ``expected_server_name``'s
    ``/_matrix/key/v2/server`` object (e.g. one element of a notary's
    ``server_keys`` list, decoded strictly with the rest of the body).

    Parameters as for :func:`parse_server_keys`.

    :returns: The checked keys; ``raw`` is the canonical JSON of ``obj``
        exactly as received, every field and signature included.
    :raises InvalidKeyResponse: with the reason, when any check fails.
    """

    def fail(reason: str) -> NoReturn:
        raise InvalidKeyResponse(expected_server_name, reason)

    if not isinstance(obj, dict):
        fail("response is not a JSON object")
    server_name = obj.get("server_name")
    if not isinstance(server_name, str):
        fail("server_name is missing or not a string")
    if server_name != expected_server_name:
        fail(f"server_name {server_name[:300]!r} is not the server asked for")

    valid_until_ts = _check_ts(obj.get("valid_until_ts"), "valid_until_ts", fail)
    verify_keys = _check_verify_keys(obj.get("verify_keys"), fail)
    old_verify_keys = _check_old_verify_keys(obj.get("old_verify_keys", {}), fail)
    if len(verify_keys) + len(old_verify_keys) > MAX_KEYS_PER_RESPONSE:
        fail(f"more than {MAX_KEYS_PER_RESPONSE} keys listed")
    for key_id, (old_key, _) in sorted(old_verify_keys.items()):
        if key_id in verify_keys and verify_keys[key_id] != old_key:
            fail(
                f"{key_id} is bound to different keys in verify_keys and old_verify_keys"
            )

    _check_tls_fingerprints(obj, peer_certificate_sha256, fail)
    _check_own_signature(obj, server_name, verify_keys, fail)

    try:
        raw = canonical_json(obj)
    except (UnicodeEncodeError, ValueError, TypeError) as e:
        fail(f"not canonical JSON material: {e}")
    return ServerKeys(
        server_name=server_name,
        raw=raw,
        json=obj,
        valid_until_ts=valid_until_ts,
        fetched_ts=fetched_ts,
        verify_keys=verify_keys,
        old_verify_keys=old_verify_keys,
        source=source,
    )


def check_notary_signature(
    keys: ServerKeys, notary_name: str, notary_verify_keys: Mapping[str, bytes]
) -> str:
    """
    Check that ``keys`` carries a valid signature of ``notary_name`` made by
    one of ``notary_verify_keys`` (key id → 32-byte key; e.g. the keys
    configured for a trusted key server).

    :returns: The key id whose signature verified.
    :raises InvalidKeyResponse: when none does.
    """
    signable = signable_bytes(keys.json)
    for key_id in sorted(notary_verify_keys):
        if verify_signature(
            keys.json, notary_name, key_id, notary_verify_keys[key_id], signable
        ):
            return key_id
    raise InvalidKeyResponse(
        keys.server_name,
        f"no valid signature by notary {notary_name} with any of "
        f"{', '.join(sorted(notary_verify_keys)) or 'no keys'}",
    )


def _check_ts(value: Any, field: str, fail: _Fail) -> int:
    # bool is an int subclass: true must not pass as 1.
    if not isinstance(value, int) or isinstance(value, bool):
        fail(f"{field} is missing or not an integer")
    if not 0 < value <= MAX_SAFE_INTEGER:
        fail(f"{field} {value} is out of range")
    return value


def _check_key_entry(key_id: Any, entry: Any, field: str, fail: _Fail) -> bytes:
    try:
        check_key_id(key_id)
    except InvalidKeyId:
        fail(f"invalid key id {str(key_id)[:80]!r} in {field}")
    if not isinstance(entry, dict):
        fail(f"{field}[{key_id}] is not an object")
    if "key" not in entry:
        fail(f"{field}[{key_id}] has no key")
    try:
        return decode_verify_key_bytes(entry["key"])
    except InvalidSignedJson as e:
        fail(f"{field}[{key_id}]: {e}")


def _check_verify_keys(value: Any, fail: _Fail) -> dict[str, bytes]:
    if not isinstance(value, dict):
        fail("verify_keys is missing or not an object")
    if not value:
        fail("verify_keys is empty")
    if len(value) > MAX_KEYS_PER_RESPONSE:
        fail(f"more than {MAX_KEYS_PER_RESPONSE} keys listed")
    return {
        key_id: _check_key_entry(key_id, entry, "verify_keys", fail)
        for key_id, entry in value.items()
    }


def _check_old_verify_keys(value: Any, fail: _Fail) -> dict[str, tuple[bytes, int]]:
    if not isinstance(value, dict):
        fail("old_verify_keys is not an object")
    if len(value) > MAX_KEYS_PER_RESPONSE:
        fail(f"more than {MAX_KEYS_PER_RESPONSE} keys listed")
    result = {}
    for key_id, entry in value.items():
        key = _check_key_entry(key_id, entry, "old_verify_keys", fail)
        expired_ts = _check_ts(
            entry.get("expired_ts"), f"old_verify_keys[{key_id}].expired_ts", fail
        )
        result[key_id] = (key, expired_ts)
    return result


def _check_tls_fingerprints(
    obj: Mapping[str, Any], peer_certificate_sha256: bytes | None, fail: _Fail
) -> None:
    if "tls_fingerprints" not in obj:
        return
    fingerprints = obj["tls_fingerprints"]
    if not isinstance(fingerprints, list):
        fail("tls_fingerprints is not a list")
    listed = set()
    for item in fingerprints:
        if not isinstance(item, dict) or "sha256" not in item:
            fail("tls_fingerprints entry is not an object with sha256")
        try:
            listed.add(decode_b64(item["sha256"]))
        except InvalidSignedJson:
            fail("tls_fingerprints sha256 is not base64")
    # An empty list vouches for nothing, like an absent one (a server behind
    # a TLS-terminating proxy cannot know the proxy's certificate).
    if listed and peer_certificate_sha256 is not None and peer_certificate_sha256 not in listed:
        fail("TLS certificate not listed in tls_fingerprints")


def _check_own_signature(
    obj: Mapping[str, Any],
    server_name: str,
    verify_keys: Mapping[str, bytes],
    fail: _Fail,
) -> str:
    signatures = obj.get("signatures")
    if not isinstance(signatures, dict):
        fail("signatures is missing or not an object")
    own = signatures.get(server_name)
    if not isinstance(own, dict) or not own:
        fail(f"no signatures by {server_name}")
    signable = signable_bytes(obj)
    # Only current keys count: an old key may have leaked, and the object
    # must vouch for itself with a key it still stands behind.
    for key_id in sorted(own):
        if key_id in verify_keys and verify_signature(
            obj, server_name, key_id, verify_keys[key_id], signable
        ):
            return key_id
    fail(f"no valid signature by {server_name} with a key in verify_keys")
