"""
Frozen values shared by every layer: a server's verify keys and a checked
server-keys response.

Nothing here does I/O; :mod:`synkeys.checks` builds :class:`ServerKeys`
from received bytes, the stores persist them, the notary relays them and
the keyring reads keys out of them.
"""

from __future__ import annotations

from typing import Any, FrozenSet, Mapping, Optional

import attr

#: Today's spec: for room versions 5 and later a verifier must treat a key
#: as valid until at most the fetch time plus seven days.
MAX_KEY_VALIDITY_MS = 7 * 24 * 3600 * 1000


@attr.s(frozen=True, slots=True, auto_attribs=True)
class VerifyKey:
    """
    One public key of a server, as a response lists it.

    :ivar server_name: Whose key this is.
    :ivar key_id: ``ed25519:<version>``.
    :ivar key: The 32 raw bytes of the ed25519 public key.
    :ivar valid_until_ts: For a key in ``verify_keys``, the response's
        ``valid_until_ts`` (ms); for an old key, its ``expired_ts``.
    :ivar expired_ts: ``None`` for a current key; for a key from
        ``old_verify_keys``, when the server stopped using it (ms).
    :ivar fetched_ts: When the response that lists it was fetched (ms).
    """

    server_name: str
    key_id: str
    key: bytes
    valid_until_ts: int
    expired_ts: Optional[int] = None
    fetched_ts: int = 0

    @property
    def is_old(self) -> bool:
        """Whether this key was listed under ``old_verify_keys``."""
        return self.expired_ts is not None

    def valid_until(self, *, cap_to_7_days: bool = True) -> int:
        """
        Until when (ms) an object signed by this key may be trusted.

        For a current key: ``valid_until_ts``, capped at ``fetched_ts`` plus
        seven days when ``cap_to_7_days`` (today's spec for room versions 5
        and later). For an old key: its ``expired_ts``.
        """
        if self.expired_ts is not None:
            return self.expired_ts
        if cap_to_7_days:
            return min(self.valid_until_ts, self.fetched_ts + MAX_KEY_VALIDITY_MS)
        return self.valid_until_ts


@attr.s(frozen=True, slots=True, auto_attribs=True, eq=False)
class ServerKeys:
    """
    A server's ``/_matrix/key/v2/server`` object that passed the checks of
    :mod:`synkeys.checks`.

    :ivar server_name: The server the object belongs to.
    :ivar raw: The object as canonical JSON bytes, exactly the fields and
        values received (signatures of notaries it came through included).
    :ivar json: The decoded object (do not mutate).
    :ivar valid_until_ts: The object's ``valid_until_ts`` (ms).
    :ivar fetched_ts: When it was fetched (ms).
    :ivar verify_keys: ``key_id`` → 32-byte key for ``verify_keys``.
    :ivar old_verify_keys: ``key_id`` → ``(32-byte key, expired_ts)``.
    :ivar source: Who we got it from: the origin's name, or the notary's.
    """

    server_name: str
    raw: bytes
    json: Mapping[str, Any]
    valid_until_ts: int
    fetched_ts: int
    verify_keys: Mapping[str, bytes]
    old_verify_keys: Mapping[str, tuple[bytes, int]]
    source: str = ""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ServerKeys):
            return NotImplemented
        return (
            self.server_name == other.server_name
            and self.raw == other.raw
            and self.fetched_ts == other.fetched_ts
        )

    def __hash__(self) -> int:
        return hash((self.server_name, self.raw, self.fetched_ts))

    @property
    def key_ids(self) -> FrozenSet[str]:
        """Every key id the object lists, current and old."""
        return frozenset(self.verify_keys) | frozenset(self.old_verify_keys)

    def key_bytes(self, key_id: str) -> Optional[bytes]:
        """The key bytes the object binds ``key_id`` to, or ``None``."""
        if key_id in self.verify_keys:
            return self.verify_keys[key_id]
        old = self.old_verify_keys.get(key_id)
        return old[0] if old is not None else None

    def verify_key(self, key_id: str) -> Optional[VerifyKey]:
        """The :class:`VerifyKey` for ``key_id``, or ``None`` if not listed."""
        if key_id in self.verify_keys:
            return VerifyKey(
                self.server_name,
                key_id,
                self.verify_keys[key_id],
                self.valid_until_ts,
                None,
                self.fetched_ts,
            )
        old = self.old_verify_keys.get(key_id)
        if old is None:
            return None
        return VerifyKey(
            self.server_name, key_id, old[0], old[1], old[1], self.fetched_ts
        )

    def all_verify_keys(self) -> dict[str, VerifyKey]:
        """Every key the object lists, by key id."""
        result = {}
        for key_id in self.key_ids:
            key = self.verify_key(key_id)
            assert key is not None
            result[key_id] = key
        return result
