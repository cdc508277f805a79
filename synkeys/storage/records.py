"""
Pure rules every store shares: which stored response wins, and how a
:class:`~synkeys.keys.ServerKeys` is rebuilt from its stored bytes.
"""

from __future__ import annotations

from synkeys.errors import InvalidSignedJson
from synkeys.keys import ServerKeys
from synkeys.signing import decode_b64, decode_strict_json


def supersedes(
    new_fetched_ts: int,
    new_valid_until_ts: int,
    old_fetched_ts: int,
    old_valid_until_ts: int,
) -> bool:
    """
    Whether a response may replace a stored one for the same key id (given
    that both bind it to the same key bytes): it was fetched later or, when
    fetched at the same millisecond, it is valid for longer.
    """
    if new_fetched_ts != old_fetched_ts:
        return new_fetched_ts > old_fetched_ts
    return new_valid_until_ts > old_valid_until_ts


def rebuild_server_keys(
    server_name: str, raw: bytes, fetched_ts: int, source: str
) -> ServerKeys:
    """
    Rebuild the :class:`ServerKeys` a store holds as ``raw`` canonical JSON.

    The bytes were checked before they were stored; this repeats only the
    structural decoding needed to list the keys.

    :raises InvalidSignedJson: when the stored bytes are not a key response
        (a corrupt or hand-edited row).
    """
    body = decode_strict_json(raw)
    try:
        valid_until_ts = body["valid_until_ts"]
        verify_keys: dict[str, bytes] = {
            key_id: decode_b64(entry["key"])
            for key_id, entry in body.get("verify_keys", {}).items()
        }
        old_verify_keys: dict[str, tuple[bytes, int]] = {
            key_id: (decode_b64(entry["key"]), entry["expired_ts"])
            for key_id, entry in body.get("old_verify_keys", {}).items()
        }
    except (KeyError, TypeError, AttributeError) as e:
        raise InvalidSignedJson(f"stored response is not a key response: {e!r}") from None
    if not isinstance(valid_until_ts, int) or body.get("server_name") != server_name:
        raise InvalidSignedJson("stored response does not match its row")
    return ServerKeys(
        server_name=server_name,
        raw=bytes(raw),
        json=body,
        valid_until_ts=valid_until_ts,
        fetched_ts=fetched_ts,
        verify_keys=verify_keys,
        old_verify_keys=old_verify_keys,
        source=source,
    )
