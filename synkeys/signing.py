"""
Canonical JSON, strict decoding of received JSON, and ed25519 signing and
verification of JSON objects (pure functions, no I/O).

Signing follows the spec's "Signing JSON" appendix: remove ``signatures``
and ``unsigned``, encode as canonical JSON, sign with ed25519, store the
unpadded base64 signature under ``signatures[entity][key_id]``.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import nacl.bindings
import nacl.exceptions
import nacl.signing
from canonicaljson import encode_canonical_json
from unpaddedbase64 import encode_base64

from synkeys.errors import InvalidSignedJson

JsonDict = Dict[str, Any]

#: Largest integer magnitude canonical JSON allows: 2**53 - 1.
MAX_SAFE_INTEGER = 2**53 - 1
#: How deeply nested received JSON may be.
MAX_JSON_DEPTH = 32

__all__ = [
    "JsonDict",
    "MAX_SAFE_INTEGER",
    "canonical_json",
    "decode_strict_json",
    "decode_b64",
    "encode_b64",
    "decode_verify_key_bytes",
    "sign_json",
    "signature_bytes",
    "verify_signature",
    "encode_canonical_json",
]


def canonical_json(obj: Any) -> bytes:
    """Encode ``obj`` as canonical JSON bytes."""
    return encode_canonical_json(obj)


def encode_b64(data: bytes) -> str:
    """Unpadded standard base64."""
    return encode_base64(data)


def decode_b64(text: object) -> bytes:
    """
    Decode standard base64, padded or not.

    :raises InvalidSignedJson: for anything that is not base64 text.
    """
    if not isinstance(text, str) or not text.isascii():
        raise InvalidSignedJson("base64 value is not an ASCII string")
    unpadded = text.rstrip("=")
    # Unpadded, or padded with exactly the "=" that make a multiple of four:
    # "AAAA=", "AAE==" and "AAAA====" are neither, and accepting them would
    # give one key many spellings.
    padding = len(text) - len(unpadded)
    if len(unpadded) % 4 == 1 or (padding and padding != -len(unpadded) % 4):
        raise InvalidSignedJson(f"invalid base64 {text[:20]!r}")
    try:
        return base64.b64decode(unpadded + "=" * (-len(unpadded) % 4), validate=True)
    except binascii.Error:
        raise InvalidSignedJson(f"invalid base64 {text[:20]!r}") from None


def _no_duplicates(pairs: Iterable[Tuple[str, Any]]) -> JsonDict:
    result: JsonDict = {}
    for key, value in pairs:
        if key in result:
            raise InvalidSignedJson(f"duplicate object key {key[:40]!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise InvalidSignedJson(f"non-finite number {name} is not JSON")


def _reject_float(text: str) -> Any:
    raise InvalidSignedJson(f"floating point number {text[:30]} is not canonical JSON")


def _parse_int(text: str) -> int:
    if text.startswith("-") and text.lstrip("-0") == "":
        raise InvalidSignedJson("-0 is not canonical JSON")
    if len(text.lstrip("-")) > 16:
        raise InvalidSignedJson("integer out of canonical JSON range")
    value = int(text)
    if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
        raise InvalidSignedJson("integer out of canonical JSON range")
    return value


def _check_depth(value: Any, depth: int = 0) -> None:
    if depth > MAX_JSON_DEPTH:
        raise InvalidSignedJson("JSON nested too deeply")
    if isinstance(value, dict):
        for item in value.values():
            _check_depth(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_depth(item, depth + 1)


def decode_strict_json(data: bytes, *, allow_floats: bool = False) -> Any:
    """
    Decode JSON that must be usable as canonical-JSON material.

    Refuses invalid UTF-8, duplicate object keys (Python's ``json`` would
    silently keep the last one, so a signature could cover a different
    object than another parser sees), ``NaN``/``Infinity``, integers outside
    ±(2**53-1), lone surrogates, nesting deeper than :data:`MAX_JSON_DEPTH`
    and, unless ``allow_floats``, any number with a fraction or exponent.

    :raises InvalidSignedJson: with the reason.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        raise InvalidSignedJson("body is not valid UTF-8") from None
    try:
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
            parse_float=float if allow_floats else _reject_float,
            parse_int=_parse_int,
        )
    except InvalidSignedJson:
        raise
    except RecursionError:
        raise InvalidSignedJson("JSON nested too deeply") from None
    except ValueError as e:
        raise InvalidSignedJson(f"invalid JSON: {e}") from None
    _check_depth(value)
    try:
        # Lone surrogates decode from \\ud800 escapes but cannot be encoded
        # again as UTF-8, so no canonical form exists.
        canonical_json(value)
    except (UnicodeEncodeError, ValueError) as e:
        raise InvalidSignedJson(f"not canonical JSON material: {e}") from None
    return value


def signable_bytes(json_object: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: the object less ``signatures`` and ``unsigned``."""
    stripped = {k: v for k, v in json_object.items() if k not in ("signatures", "unsigned")}
    return canonical_json(stripped)


def signature_bytes(
    json_object: Mapping[str, Any], signing_key: nacl.signing.SigningKey
) -> bytes:
    """The raw 64-byte ed25519 signature of ``json_object``."""
    return signing_key.sign(signable_bytes(json_object)).signature


def sign_json(
    json_object: Mapping[str, Any],
    signer_name: str,
    key_id: str,
    signing_key: nacl.signing.SigningKey,
) -> JsonDict:
    """
    Return a copy of ``json_object`` with a signature by ``signer_name``
    under ``key_id`` added beside any signatures already there.
    """
    signed = dict(json_object)
    signature = encode_b64(signature_bytes(json_object, signing_key))
    signatures = {k: dict(v) for k, v in json_object.get("signatures", {}).items()}
    signatures.setdefault(signer_name, {})[key_id] = signature
    signed["signatures"] = signatures
    return signed


def decode_verify_key_bytes(key: object) -> bytes:
    """
    Decode an ed25519 public key from base64 and check it is a valid,
    non-small-order point.

    :raises InvalidSignedJson: when it is not.
    """
    raw = decode_b64(key)
    if len(raw) != 32:
        raise InvalidSignedJson(f"ed25519 key is {len(raw)} bytes, not 32")
    if not nacl.bindings.crypto_core_ed25519_is_valid_point(raw):
        raise InvalidSignedJson("ed25519 key is not a valid point or has small order")
    return raw


def verify_signature(
    json_object: Mapping[str, Any],
    signer_name: str,
    key_id: str,
    verify_key: bytes,
    signable: Optional[bytes] = None,
) -> bool:
    """
    Whether ``json_object`` carries a valid signature of ``signer_name``
    under ``key_id`` made by the 32-byte ``verify_key``.

    ``signable``, when given, is :func:`signable_bytes` of the object,
    so that several checks need encode it only once.
    """
    try:
        signature_b64 = json_object["signatures"][signer_name][key_id]
        signature = decode_b64(signature_b64)
    except (KeyError, TypeError, InvalidSignedJson):
        return False
    if len(signature) != 64:
        return False
    if signable is None:
        signable = signable_bytes(json_object)
    try:
        nacl.signing.VerifyKey(verify_key).verify(signable, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        return False
    return True
