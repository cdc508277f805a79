"""Tests for L{synkeys.tap} and L{synkeys.config}: options, config file, precedence."""

import os
import subprocess
import sys
from unittest import mock

from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from synkeys.app import freeze_startup_heap
from synkeys.config import SETTINGS, parse_duration_ms, resolve_config
from synkeys.errors import ConfigError
from synkeys.keyfile import generate_signing_key, write_signing_keys
from synkeys.tap import Options, makeService

PUBLIC_B64 = "XGX0JRS2Af3be3knz2fBiRbApjm2Dh61gXDJA8kcJNI"


class OptionsTests(SynchronousTestCase):
    """Parsing ``twistd synkeys`` flags."""

    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self) -> None:
        """With only --server-name, the documented defaults apply and a key is generated."""
        key_path = self.mktemp()
        options = self.parse("--server-name", "example.org", "--signing-key", key_path)
        config = options.config
        self.assertEqual(config.server_name, "example.org")
        self.assertEqual(config.listen, ["tcp:8008:interface=127.0.0.1"])
        self.assertEqual(config.database, "synkeys.sqlite")
        self.assertEqual(config.key_refresh_interval, 86_400_000)
        self.assertEqual(config.max_keys_per_query, 2048)
        self.assertEqual(config.max_response_size, 1024 * 1024)
        self.assertTrue(os.path.exists(key_path))
        self.assertTrue(options.loaded_keys.generated)

    def test_every_flag(self) -> None:
        """Every flag reaches the config, repeatable ones as lists."""
        key_path = self.mktemp()
        options = self.parse(
            "--server-name", "keys.example.org:8448",
            "--signing-key", key_path,
            "--listen", "tcp:0:interface=127.0.0.1",
            "--listen", "tcp:0:interface=127.0.0.1",
            "--database", ":memory:",
            "--federation-ca", "/ca1.pem", "--federation-ca", "/ca2.pem",
            "--allow-ip-range", "127.0.0.0/8", "--allow-ip-range", "::1/128",
            "--old-signing-key", f"ed25519:old:{PUBLIC_B64}:1000",
            "--key-refresh-interval", "12h",
            "--max-keys-per-query", "10",
            "--max-response-size", "64K",
            "--fetch-timeout", "5",
        )
        config = options.config
        self.assertEqual(config.server_name, "keys.example.org:8448")
        self.assertEqual(len(config.listen), 2)
        self.assertEqual(config.federation_custom_ca_list, ["/ca1.pem", "/ca2.pem"])
        self.assertEqual(config.ip_range_whitelist, ["127.0.0.0/8", "::1/128"])
        self.assertEqual([k.key_id for k in config.old_signing_keys], ["ed25519:old"])
        self.assertEqual(config.key_refresh_interval, 12 * 3_600_000)
        self.assertEqual(config.max_keys_per_query, 10)
        self.assertEqual(config.max_response_size, 65536)
        self.assertEqual(config.fetch_timeout, 5.0)

    def test_config_file_and_precedence(self) -> None:
        """The YAML file sets values with Synapse's names; flags win over it."""
        key_path = self.mktemp()
        config_path = self.mktemp()
        with open(config_path, "w") as f:
            f.write(
                "server_name: from-file.example\n"
                f"signing_key_path: {key_path}\n"
                "key_refresh_interval: 2d\n"
                "ip_range_whitelist: ['10.0.0.0/8']\n"
                "old_signing_keys:\n"
                f"  'ed25519:old': {{key: '{PUBLIC_B64}', expired_ts: 7}}\n"
            )
        options = self.parse("--config", config_path, "--server-name", "from-flag.example")
        config = options.config
        self.assertEqual(config.server_name, "from-flag.example")
        self.assertEqual(config.signing_key_path, key_path)
        self.assertEqual(config.key_refresh_interval, 2 * 86_400_000)
        self.assertEqual(config.ip_range_whitelist, ["10.0.0.0/8"])
        self.assertEqual(config.old_signing_keys[0].expired_ts, 7)

    def test_errors_are_usage_errors(self) -> None:
        """Bad input is a UsageError with a clear message, never a traceback."""
        bad_key = self.mktemp()
        with open(bad_key, "w") as f:
            f.write("not a key\n")
        cases = [
            ((), "--server-name"),
            (("--server-name", "a b"), "invalid server name"),
            (("--server-name", "example.org", "--signing-key", bad_key), "line 1"),
            (("--server-name", "example.org", "--signing-key", self.mktemp(),
              "--listen", "bogus:1"), "invalid --listen endpoint"),
            (("--server-name", "example.org", "--allow-ip-range", "300.0.0.0/8"), "invalid IP range"),
            (("--server-name", "example.org", "--key-refresh-interval", "soon"), "invalid duration"),
            (("--server-name", "example.org", "--old-signing-key", "x"), "KEYID:PUBLICKEY"),
            (("--server-name", "example.org", "--config", "/nonexistent.yaml"), "cannot read config"),
        ]
        for argv, message in cases:
            e = self.assertRaises(UsageError, self.parse, *argv)
            self.assertIn(message, str(e), argv)

    def test_unknown_config_key(self) -> None:
        """A typo in the config file is reported, not ignored."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("server_name: a.example\nsigning_key_pth: x\n")
        e = self.assertRaises(UsageError, self.parse, "--config", path)
        self.assertIn("signing_key_pth", str(e))

    def test_existing_synapse_key(self) -> None:
        """An existing Synapse key file is used as it is, not replaced."""
        path = self.mktemp()
        key = generate_signing_key("a_AbCd")
        write_signing_keys(path, [key])
        options = self.parse("--server-name", "example.org", "--signing-key", path)
        self.assertFalse(options.loaded_keys.generated)
        self.assertEqual(options.loaded_keys.keys[0].public_key, key.public_key)

    def test_make_service(self) -> None:
        """makeService builds a service publishing the configured keys on each listener."""
        options = self.parse(
            "--server-name", "example.org", "--signing-key", self.mktemp(),
            "--listen", "tcp:0:interface=127.0.0.1",
        )
        service = makeService(options)
        self.assertEqual(service.publisher.server_name, "example.org")  # type: ignore[attr-defined]
        self.assertEqual(len(list(service)), 1)  # type: ignore[call-overload]
        self.assertTrue(service.freeze_heap)  # type: ignore[attr-defined]

    def test_freeze_startup_heap(self) -> None:
        """Freezing collects first, then freezes, and reports how many objects it froze."""
        with mock.patch("synkeys.app.gc") as gc:
            gc.get_freeze_count.return_value = 1234
            self.assertEqual(freeze_startup_heap(), 1234)
        self.assertEqual(
            [c[0] for c in gc.method_calls], ["collect", "freeze", "get_freeze_count"]
        )

    def test_help_documents_every_flag(self) -> None:
        """--help lists every setting's flag."""
        text = str(Options())
        for setting in SETTINGS:
            self.assertIn("--" + setting.flag, text)


class DurationTests(SynchronousTestCase):
    """Synapse-style durations."""

    def test_units(self) -> None:
        """Units and bare milliseconds parse; nonsense is refused."""
        self.assertEqual(parse_duration_ms("1d"), 86_400_000)
        self.assertEqual(parse_duration_ms("30m"), 1_800_000)
        self.assertEqual(parse_duration_ms(500), 500)
        self.assertEqual(parse_duration_ms("500"), 500)
        self.assertRaises(ConfigError, parse_duration_ms, "-1d")
        self.assertRaises(ConfigError, parse_duration_ms, True)

    def test_resolve_requires_server_name(self) -> None:
        """Without a server name the configuration is refused."""
        self.assertRaises(ConfigError, resolve_config, {})


class PluginTests(SynchronousTestCase):
    """The installed package makes ``twistd synkeys`` available."""

    def test_twistd_finds_plugin(self) -> None:
        """From outside the source tree, twistd's plugin scan finds synkeys."""
        code = (
            "from twisted.plugin import getPlugins\n"
            "from twisted.application.service import IServiceMaker\n"
            "print(sorted({p.tapname for p in getPlugins(IServiceMaker)}))\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        d = self.mktemp()
        os.makedirs(d)
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=d,
            capture_output=True, text=True, env=env, timeout=60,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("'synkeys'", out.stdout, "is synkeys installed (pip install .)?")

    def test_twistd_help(self) -> None:
        """``twistd synkeys --help`` documents the public flags."""
        d = self.mktemp()
        os.makedirs(d)
        out = subprocess.run(
            [sys.executable, "-m", "twisted", "synkeys", "--help"],
            cwd=d, capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        for flag in ["--server-name", "--signing-key", "--listen", "--database",
                     "--federation-ca", "--allow-ip-range", "--old-signing-key"]:
            self.assertIn(flag, out.stdout)

    def test_twistd_bad_flag(self) -> None:
        """A bad flag makes twistd exit non-zero with a one-line reason, no traceback."""
        d = self.mktemp()
        os.makedirs(d)
        out = subprocess.run(
            [sys.executable, "-m", "twisted", "synkeys", "--server-name", "a b"],
            cwd=d, capture_output=True, text=True, timeout=60,
        )
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("invalid server name", out.stdout + out.stderr)
        self.assertNotIn("Traceback", out.stdout + out.stderr)


class FreezeHeapTests(TestCase):
    """twistd's service freezes its startup heap when it starts."""

    async def test_start_freezes(self) -> None:
        """Starting the service made by makeService freezes the heap once."""
        options = Options()
        options.parseOptions([
            "--server-name", "example.org", "--signing-key", self.mktemp(),
            "--listen", "tcp:0:interface=127.0.0.1", "--database", ":memory:",
        ])
        service = makeService(options)
        with mock.patch("synkeys.app.freeze_startup_heap") as freeze:
            service.startService()
            self.addCleanup(service.stopService)
        freeze.assert_called_once_with()

    def test_embedded_default(self) -> None:
        """A SynkeysService built directly leaves the garbage collector alone."""
        from twisted.internet.task import Clock

        from tests.test_health import make_service

        service = make_service(self, Clock())
        self.assertFalse(service.freeze_heap)
        with mock.patch("synkeys.app.freeze_startup_heap") as freeze:
            service.startService()
            self.addCleanup(service.stopService)
        freeze.assert_not_called()
