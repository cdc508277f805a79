"""
The key server: this server's signed ``/_matrix/key/v2/server`` object.

The body is built and signed once and served as bytes; it is rebuilt when
less than half of the refresh interval remains before ``valid_until_ts``
(Synapse's rule for ``key_refresh_interval``) and when the certificates the
TLS listeners serve change, never per request.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from synkeys.errors import ConfigError
from synkeys.keyfile import OldVerifyKey, SigningKey, check_no_clash
from synkeys.servername import parse_server_name
from synkeys.signing import JsonDict, canonical_json, encode_b64, sign_json

#: Synapse's default ``key_refresh_interval``: one day.
DEFAULT_REFRESH_INTERVAL_MS = 24 * 3600 * 1000
#: How often, at most, the served certificates are looked at again.
FINGERPRINT_CHECK_INTERVAL_S = 10.0


def build_server_keys(
    server_name: str,
    signing_keys: Sequence[SigningKey],
    old_keys: Sequence[OldVerifyKey],
    valid_until_ts: int,
    tls_fingerprints: Sequence[bytes] = (),
) -> JsonDict:
    """
    The signed server-keys object (pure): every current key in
    ``verify_keys``, retired ones in ``old_verify_keys``, the SHA-256 of
    each served certificate in ``tls_fingerprints`` (omitted when there are
    none), signed by every current key.
    """
    obj: JsonDict = {
        "server_name": server_name,
        "valid_until_ts": valid_until_ts,
        "verify_keys": {k.key_id: {"key": k.public_key_b64} for k in signing_keys},
        "old_verify_keys": {
            k.key_id: {"key": encode_b64(k.key), "expired_ts": k.expired_ts}
            for k in old_keys
        },
    }
    if tls_fingerprints:
        # Omitted rather than empty behind a plain listener (e.g. a TLS
        # proxy in front): an empty list would vouch for no certificate.
        obj["tls_fingerprints"] = [{"sha256": encode_b64(fp)} for fp in tls_fingerprints]
    for key in signing_keys:
        obj = sign_json(obj, server_name, key.key_id, key.key)
    return obj


class KeyPublisher:
    """
    Keeps this server's signed keys body ready as canonical JSON bytes.

    :param server_name: This server's name.
    :param signing_keys: Current signing keys (at least one).
    :param old_keys: Retired keys to list under ``old_verify_keys``.
    :param clock: Where time comes from.
    :param refresh_interval_ms: ``valid_until_ts`` is now plus this.
    :param tls_fingerprints: Returns the SHA-256 of each certificate the
        listeners serve now; see :func:`synkeys.tlsinfo.fingerprint_source`.
    """

    log = Logger()

    def __init__(
        self,
        server_name: str,
        signing_keys: Sequence[SigningKey],
        clock: IReactorTime,
        *,
        old_keys: Sequence[OldVerifyKey] = (),
        refresh_interval_ms: int = DEFAULT_REFRESH_INTERVAL_MS,
        tls_fingerprints: Optional[Callable[[], List[bytes]]] = None,
    ) -> None:
        parse_server_name(server_name)
        if not signing_keys:
            raise ConfigError("at least one signing key is needed")
        if refresh_interval_ms < 60_000:
            raise ConfigError("key_refresh_interval must be at least one minute")
        check_no_clash(signing_keys, old_keys)
        self.server_name = server_name
        self.signing_keys = list(signing_keys)
        self.old_keys = list(old_keys)
        self._clock = clock
        self._refresh_interval_ms = refresh_interval_ms
        self._fingerprint_source = tls_fingerprints
        self._fingerprints: List[bytes] = []
        self._fingerprints_checked_s = float("-inf")
        self._body = b""
        self._json: JsonDict = {}
        self._rebuild_at_ms = 0
        #: Before this time (seconds) body() needs neither a re-sign nor a
        #: look at the TLS certificate.
        self._look_again_s = float("-inf")
        #: How many times the body was signed; tests and metrics read it.
        self.builds = 0

    @property
    def verify_keys(self) -> Dict[str, bytes]:
        """This server's current public keys by key id."""
        return {key.key_id: key.public_key for key in self.signing_keys}

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def _fingerprints_changed(self, now_s: float) -> bool:
        if self._fingerprint_source is None:
            return False
        if now_s - self._fingerprints_checked_s < FINGERPRINT_CHECK_INTERVAL_S:
            return False
        self._fingerprints_checked_s = now_s
        current = self._fingerprint_source()
        if current == self._fingerprints:
            return False
        self._fingerprints = current
        return True

    def body(self) -> bytes:
        """The signed object as canonical JSON, rebuilt only when due."""
        now_s = self._clock.seconds()
        if now_s < self._look_again_s:
            # Every request until then: one comparison.
            return self._body
        changed = self._fingerprints_changed(now_s)
        now_ms = int(now_s * 1000)
        if changed or now_ms >= self._rebuild_at_ms or not self._body:
            self._build(now_ms)
        look_again_s = self._rebuild_at_ms / 1000
        if self._fingerprint_source is not None:
            look_again_s = min(
                look_again_s, self._fingerprints_checked_s + FINGERPRINT_CHECK_INTERVAL_S
            )
        self._look_again_s = look_again_s
        return self._body

    def json(self) -> JsonDict:
        """The signed object (do not mutate)."""
        self.body()
        return self._json

    def _build(self, now_ms: int) -> None:
        valid_until_ts = now_ms + self._refresh_interval_ms
        self._json = build_server_keys(
            self.server_name,
            self.signing_keys,
            self.old_keys,
            valid_until_ts,
            self._fingerprints,
        )
        self._body = canonical_json(self._json)
        self._rebuild_at_ms = now_ms + self._refresh_interval_ms // 2
        self.builds += 1
        self.log.debug(
            "signed server keys, valid until {valid_until_ts}",
            valid_until_ts=valid_until_ts,
        )
