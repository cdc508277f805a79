"""
Signing keys: Synapse's signing key file format, key generation, and old
(retired) verify keys.

A signing key file holds one key a line::

    ed25519 <version> <unpadded base64 of the 32-byte seed>

so an operator can point synkeys at an existing Synapse key.
"""

from __future__ import annotations

import os
import secrets
import stat
import string
from typing import Any, Iterable, List, Mapping, Sequence

import attr
import nacl.signing

from synkeys.errors import ConfigError, InvalidSignedJson
from synkeys.servername import check_key_id, is_valid_key_version
from synkeys.signing import MAX_SAFE_INTEGER, decode_b64, decode_verify_key_bytes, encode_b64

_VERSION_CHARS = string.ascii_letters + string.digits


@attr.s(frozen=True, slots=True, auto_attribs=True)
class SigningKey:
    """
    One of this server's ed25519 signing keys.

    :ivar version: The part of the key id after ``ed25519:``.
    :ivar key: The private key.
    """

    version: str
    key: nacl.signing.SigningKey = attr.ib(eq=False, repr=False)

    @property
    def key_id(self) -> str:
        """``ed25519:<version>``."""
        return f"ed25519:{self.version}"

    @property
    def public_key(self) -> bytes:
        """The 32-byte public key."""
        return bytes(self.key.verify_key)

    @property
    def public_key_b64(self) -> str:
        """The public key as unpadded base64, as published in ``verify_keys``."""
        return encode_b64(self.public_key)

    def to_line(self) -> str:
        """The key as a line of a Synapse signing key file."""
        return f"ed25519 {self.version} {encode_b64(bytes(self.key))}"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class OldVerifyKey:
    """
    A retired public key, published under ``old_verify_keys``.

    :ivar key_id: ``ed25519:<version>``.
    :ivar key: The 32-byte public key.
    :ivar expired_ts: When this server stopped using it (ms).
    """

    key_id: str
    key: bytes
    expired_ts: int


def generate_signing_key(version: str | None = None) -> SigningKey:
    """A new random key; the version defaults to ``a_`` and four random characters."""
    if version is None:
        version = "a_" + "".join(secrets.choice(_VERSION_CHARS) for _ in range(4))
    if not is_valid_key_version(version):
        raise ConfigError(f"invalid key version {version!r}: want [a-zA-Z0-9_]+")
    return SigningKey(version, nacl.signing.SigningKey.generate())


def parse_signing_keys(text: str, source: str = "signing key file") -> List[SigningKey]:
    """
    Parse the text of a signing key file.

    :raises ConfigError: naming the line that is malformed.
    """
    keys: List[SigningKey] = []
    seen = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3:
            raise ConfigError(
                f"{source}, line {number}: expected 'ed25519 <version> <base64 seed>'"
            )
        algorithm, version, seed_b64 = parts
        if algorithm != "ed25519":
            raise ConfigError(f"{source}, line {number}: unsupported algorithm {algorithm!r}")
        if not is_valid_key_version(version):
            raise ConfigError(f"{source}, line {number}: invalid key version {version!r}")
        try:
            seed = decode_b64(seed_b64)
        except InvalidSignedJson:
            raise ConfigError(f"{source}, line {number}: the seed is not base64") from None
        if len(seed) != 32:
            raise ConfigError(
                f"{source}, line {number}: the seed is {len(seed)} bytes, not 32"
            )
        if version in seen:
            raise ConfigError(f"{source}, line {number}: key ed25519:{version} given twice")
        seen.add(version)
        keys.append(SigningKey(version, nacl.signing.SigningKey(seed)))
    if not keys:
        raise ConfigError(f"{source}: no keys in it")
    return keys


def read_signing_keys(path: str) -> List[SigningKey]:
    """
    Read a signing key file.

    :raises ConfigError: when it cannot be read or is malformed.
    """
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ConfigError(f"signing key file {path}: not a text file") from None
    except OSError as e:
        raise ConfigError(f"cannot read signing key file {path}: {e.strerror}") from None
    return parse_signing_keys(text, f"signing key file {path}")


def write_signing_keys(path: str, keys: Iterable[SigningKey]) -> None:
    """
    Write keys to a new file readable only by its owner (mode 0600).

    :raises ConfigError: when the file exists or cannot be written.
    """
    data = "".join(key.to_line() + "\n" for key in keys).encode("ascii")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists already; not overwriting a signing key") from None
    except OSError as e:
        raise ConfigError(f"cannot create signing key file {path}: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def key_file_is_private(path: str) -> bool:
    """Whether the key file at ``path`` is unreadable by group and others."""
    return not (os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO))


def parse_old_key_flag(value: str) -> OldVerifyKey:
    """
    Parse ``KEYID:PUBLICKEY:EXPIRED_TS`` (the ``--old-signing-key`` flag).

    The key id itself contains a colon (``ed25519:abc``), so the value is
    split from the right.

    :raises ConfigError: when malformed.
    """
    parts = value.rsplit(":", 2)
    if len(parts) != 3:
        raise ConfigError(
            f"--old-signing-key {value!r}: expected KEYID:PUBLICKEY:EXPIRED_TS, "
            "e.g. ed25519:a_old:l8Hft5qXKn1vfHrg3p4+W8gELQVo8N13JkluMfmn2sQ:1577836800000"
        )
    key_id, key, expired_ts = parts
    return make_old_key(key_id, key, expired_ts, f"--old-signing-key {value!r}")


def make_old_key(key_id: object, key: object, expired_ts: object, where: str) -> OldVerifyKey:
    """Validate the parts of an old key; ``where`` names the source in errors."""
    try:
        check_key_id(key_id)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    try:
        key_bytes = decode_verify_key_bytes(key)
    except InvalidSignedJson as e:
        raise ConfigError(f"{where}: invalid public key: {e}") from None
    if isinstance(expired_ts, str) and expired_ts.isdigit():
        expired_ts = int(expired_ts)
    if (
        not isinstance(expired_ts, int)
        or isinstance(expired_ts, bool)
        or not 0 <= expired_ts <= MAX_SAFE_INTEGER
    ):
        raise ConfigError(f"{where}: expired_ts must be a millisecond timestamp")
    assert isinstance(key_id, str)
    return OldVerifyKey(key_id, key_bytes, expired_ts)


def parse_old_keys_config(value: Any) -> List[OldVerifyKey]:
    """
    Parse Synapse's ``old_signing_keys`` config shape:
    ``{"ed25519:id": {"key": "<base64>", "expired_ts": <ms>}}``.
    """
    if value is None:
        return []
    if not isinstance(value, Mapping):
        raise ConfigError("old_signing_keys must be a mapping of key id to {key, expired_ts}")
    result = []
    for key_id, entry in value.items():
        where = f"old_signing_keys[{key_id!r}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: must be a mapping with 'key' and 'expired_ts'")
        result.append(make_old_key(key_id, entry.get("key"), entry.get("expired_ts"), where))
    return result


def check_no_clash(
    signing_keys: Sequence[SigningKey], old_keys: Sequence[OldVerifyKey]
) -> None:
    """Refuse an old key whose id is also a current signing key's."""
    current = {key.key_id for key in signing_keys}
    for old in old_keys:
        if old.key_id in current:
            raise ConfigError(
                f"{old.key_id} is both a current signing key and an old key"
            )
