"""Tests for L{synkeys.keyfile}: Synapse's key file format and old keys."""

import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from synkeys.errors import ConfigError
from synkeys.keyfile import (
    generate_signing_key,
    key_file_is_private,
    parse_old_key_flag,
    parse_old_keys_config,
    parse_signing_keys,
    read_signing_keys,
    write_signing_keys,
)
from synkeys.signing import encode_b64

SEED_B64 = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1"
PUBLIC_B64 = "XGX0JRS2Af3be3knz2fBiRbApjm2Dh61gXDJA8kcJNI"


class ParseSigningKeysTests(SynchronousTestCase):
    """Parsing the text of a signing key file."""

    def test_synapse_line(self) -> None:
        """A Synapse key line gives that key, with its id and public key."""
        [key] = parse_signing_keys(f"ed25519 a_AbCd {SEED_B64}\n")
        self.assertEqual(key.key_id, "ed25519:a_AbCd")
        self.assertEqual(key.public_key_b64, PUBLIC_B64)

    def test_several_keys_and_blank_lines(self) -> None:
        """Several keys are all read; blank and comment lines are skipped."""
        other = generate_signing_key("b")
        text = f"# keys\ned25519 a {SEED_B64}\n\n{other.to_line()}\n"
        keys = parse_signing_keys(text)
        self.assertEqual([k.key_id for k in keys], ["ed25519:a", "ed25519:b"])

    def test_padded_seed(self) -> None:
        """A seed written with base64 padding is accepted too."""
        [key] = parse_signing_keys(f"ed25519 a {SEED_B64}=\n")
        self.assertEqual(key.public_key_b64, PUBLIC_B64)

    def test_malformed(self) -> None:
        """Each malformed file is refused with a message naming the line and fault."""
        cases = {
            "": "no keys",
            "ed25519 a\n": "line 1: expected",
            f"rsa a {SEED_B64}\n": "unsupported algorithm",
            f"ed25519 a:b {SEED_B64}\n": "invalid key version",
            "ed25519 a !!!!\n": "not base64",
            "ed25519 a AAAA\n": "3 bytes, not 32",
            f"ed25519 a {SEED_B64}\ned25519 a {SEED_B64}\n": "line 2: key ed25519:a given twice",
        }
        for text, message in cases.items():
            e = self.assertRaises(ConfigError, parse_signing_keys, text)
            self.assertIn(message, str(e), text)

    def test_round_trip(self) -> None:
        """A generated key written as a line parses back to the same key."""
        key = generate_signing_key()
        [again] = parse_signing_keys(key.to_line())
        self.assertEqual(again.public_key, key.public_key)
        self.assertEqual(again.key_id, key.key_id)


class KeyFileTests(SynchronousTestCase):
    """Reading and writing key files on disk."""

    def test_write_is_private(self) -> None:
        """A written key file has mode 0600 and reads back."""
        path = self.mktemp()
        key = generate_signing_key()
        write_signing_keys(path, [key])
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertTrue(key_file_is_private(path))
        self.assertEqual(read_signing_keys(path)[0].public_key, key.public_key)

    def test_never_overwrites(self) -> None:
        """Writing over an existing key file is refused."""
        path = self.mktemp()
        write_signing_keys(path, [generate_signing_key()])
        self.assertRaises(ConfigError, write_signing_keys, path, [generate_signing_key()])

    def test_world_readable_detected(self) -> None:
        """A key file readable by others is reported as not private."""
        path = self.mktemp()
        write_signing_keys(path, [generate_signing_key()])
        os.chmod(path, 0o644)
        self.assertFalse(key_file_is_private(path))

    def test_missing_file(self) -> None:
        """A missing file is a ConfigError naming it."""
        e = self.assertRaises(ConfigError, read_signing_keys, "/nonexistent/key")
        self.assertIn("/nonexistent/key", str(e))

    def test_binary_file(self) -> None:
        """A binary file is a ConfigError, not a UnicodeDecodeError."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"\xff\xfe\x00")
        self.assertRaises(ConfigError, read_signing_keys, path)


class OldKeyTests(SynchronousTestCase):
    """Old keys from the flag and from the config file."""

    def test_flag(self) -> None:
        """KEYID:PUBLICKEY:EXPIRED_TS parses, though the key id has a colon."""
        old = parse_old_key_flag(f"ed25519:old:{PUBLIC_B64}:1577836800000")
        self.assertEqual(old.key_id, "ed25519:old")
        self.assertEqual(encode_b64(old.key), PUBLIC_B64)
        self.assertEqual(old.expired_ts, 1577836800000)

    def test_flag_malformed(self) -> None:
        """Malformed flags are refused with a clear message."""
        for value, message in [
            ("nonsense", "expected KEYID:PUBLICKEY:EXPIRED_TS"),
            (f"rsa:old:{PUBLIC_B64}:1", "invalid key id"),
            ("ed25519:old:AAAA:1", "invalid public key"),
            (f"ed25519:old:{PUBLIC_B64}:soon", "expired_ts"),
        ]:
            e = self.assertRaises(ConfigError, parse_old_key_flag, value)
            self.assertIn(message, str(e))

    def test_config_mapping(self) -> None:
        """Synapse's old_signing_keys mapping parses to old keys."""
        [old] = parse_old_keys_config(
            {"ed25519:old": {"key": PUBLIC_B64, "expired_ts": 5}}
        )
        self.assertEqual((old.key_id, old.expired_ts), ("ed25519:old", 5))

    def test_config_malformed(self) -> None:
        """A non-mapping or an entry without expired_ts is refused."""
        self.assertRaises(ConfigError, parse_old_keys_config, ["x"])
        self.assertRaises(
            ConfigError, parse_old_keys_config, {"ed25519:old": {"key": PUBLIC_B64}}
        )
