"""Builders of realistic, really signed test values, shared by test modules."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from nacl.signing import SigningKey, VerifyKey

from synkeys.keys import ServerKeys
from synkeys.signing import canonical_json, decode_strict_json, encode_b64, sign_json

#: A ``valid_until_ts`` far enough in the future for any test clock.
FAR_FUTURE_TS = 4_000_000_000_000


def make_signing_key(name: str) -> SigningKey:
    """A deterministic ed25519 signing key derived from ``name``."""
    return SigningKey(hashlib.sha256(name.encode("utf-8")).digest())


def _public_bytes(key: SigningKey | VerifyKey | bytes) -> bytes:
    if isinstance(key, SigningKey):
        return bytes(key.verify_key)
    return bytes(key)


def make_server_keys(
    server_name: str,
    signing_keys: Mapping[str, SigningKey],
    old_keys: Mapping[str, tuple[SigningKey | VerifyKey | bytes, int]] | None = None,
    valid_until_ts: int = FAR_FUTURE_TS,
    fetched_ts: int = 1_000_000,
    extra_fields: Mapping[str, Any] | None = None,
    source: str | None = None,
) -> ServerKeys:
    """
    A ``/_matrix/key/v2/server`` response of ``server_name``, signed by
    every key in ``signing_keys``, as the checks would hand it on.

    :param signing_keys: ``key_id`` → key, listed under ``verify_keys``
        and each signing the object.
    :param old_keys: ``key_id`` → ``(key, expired_ts)`` listed under
        ``old_verify_keys`` (the key may be a signing key, a verify key or
        32 raw bytes).
    :param extra_fields: Further top-level fields, e.g.
        ``tls_fingerprints``; they are signed too.
    :param source: Who it came from; defaults to ``server_name``.
    """
    obj: dict[str, Any] = {
        "server_name": server_name,
        "valid_until_ts": valid_until_ts,
        "verify_keys": {
            key_id: {"key": encode_b64(bytes(key.verify_key))}
            for key_id, key in signing_keys.items()
        },
        "old_verify_keys": {
            key_id: {"key": encode_b64(_public_bytes(key)), "expired_ts": expired_ts}
            for key_id, (key, expired_ts) in (old_keys or {}).items()
        },
    }
    obj.update(extra_fields or {})
    for key_id, key in sorted(signing_keys.items()):
        obj = sign_json(obj, server_name, key_id, key)
    raw = canonical_json(obj)
    return ServerKeys(
        server_name=server_name,
        raw=raw,
        json=decode_strict_json(raw),
        valid_until_ts=valid_until_ts,
        fetched_ts=fetched_ts,
        verify_keys={k: bytes(v.verify_key) for k, v in signing_keys.items()},
        old_verify_keys={
            k: (_public_bytes(v), ts) for k, (v, ts) in (old_keys or {}).items()
        },
        source=server_name if source is None else source,
    )
