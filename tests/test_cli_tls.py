"""
``synkeys fetch`` and ``check`` over real TLS sockets on 127.0.0.1, against
a running :class:`synkeys.app.SynkeysService` with a trustme CA.
"""

from __future__ import annotations

import io
import socket
from typing import List, Tuple

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from synkeys.app import SynkeysService, load_or_generate_keys
from synkeys.cli import Environment, execute
from synkeys.config import resolve_config
from tests.tlsutil import TestPKI


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class FetchOverTLSTests(TestCase):
    """The CLI against a real key server and notary."""

    def start(self, identities: List[str]) -> None:
        """Serve keys as 127.0.0.1:PORT with a certificate for ``identities``."""
        self.pki = TestPKI(self.mktemp())
        self.port = free_port()
        self.server_name = f"127.0.0.1:{self.port}"
        config = resolve_config(
            {
                "server_name": self.server_name,
                "listen": [self.pki.ssl_endpoint("server", identities, self.port)],
                "signing_key_path": self.mktemp(),
                "database": ":memory:",
            }
        )
        self.keys = load_or_generate_keys(config.signing_key_path)
        service = SynkeysService(config, reactor, self.keys)
        service.startService()
        self.addCleanup(service.stopService)
        return service.when_listening()  # type: ignore[return-value]

    async def synkeys(self, *argv: str) -> Tuple[int, str, str]:
        """Run ``synkeys ARGV`` on the running reactor: (exit status, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        code = await execute(list(argv), out, err, Environment(reactor))
        return code, out.getvalue(), err.getvalue()

    async def test_fetch_verified(self) -> None:
        """fetch with the test CA and the loopback range allowed verifies the server's key."""
        await self.start(["127.0.0.1"])
        code, out, err = await self.synkeys(
            "fetch", self.server_name, "--federation-ca", self.pki.ca_path,
            "--allow-ip-range", "127.0.0.0/8", "--timeout", "5",
        )
        self.assertEqual((code, err), (0, ""), out)
        key = self.keys.keys[0]
        self.assertIn(f"{key.key_id}  {key.public_key_b64}", out)
        self.assertIn(f"note: {self.server_name} is reached at {self.server_name}", out)

    async def test_blocked_by_default(self) -> None:
        """Without --allow-ip-range, loopback is refused as federation would refuse it."""
        await self.start(["127.0.0.1"])
        code, out, err = await self.synkeys(
            "fetch", self.server_name, "--federation-ca", self.pki.ca_path, "--timeout", "5"
        )
        self.assertEqual(code, 3)
        self.assertIn("blocked address 127.0.0.1", err)
        self.assertEqual(err.count("\n"), 1)

    async def test_certificate_for_another_name(self) -> None:
        """A certificate for the wrong name is a TLS failure naming the names it is for."""
        await self.start(["wrong.example", "also-wrong.example"])
        code, out, err = await self.synkeys(
            "fetch", self.server_name, "--federation-ca", self.pki.ca_path,
            "--allow-ip-range", "127.0.0.0/8", "--timeout", "5",
        )
        self.assertEqual(code, 3)
        self.assertIn("TLS failure", err)
        self.assertIn(
            f"the certificate served at {self.server_name} is for wrong.example, "
            "also-wrong.example",
            err,
        )
        self.assertIn("not for 127.0.0.1", err)
        self.assertEqual(err.count("\n"), 1)

    async def test_certificate_from_unknown_ca(self) -> None:
        """Without --federation-ca the test CA is not trusted, and the output says so."""
        await self.start(["127.0.0.1"])
        code, out, err = await self.synkeys(
            "fetch", self.server_name, "--allow-ip-range", "127.0.0.0/8", "--timeout", "5"
        )
        self.assertEqual(code, 3)
        self.assertIn("TLS failure", err)
        self.assertIn("its issuer is not trusted here (add its CA with --federation-ca)", err)

    async def test_check_against_itself_as_notary(self) -> None:
        """check compares the server with its own notary answer, trusting its key on first use."""
        await self.start(["127.0.0.1"])
        code, out, err = await self.synkeys(
            "check", self.server_name, "--via", self.server_name,
            "--federation-ca", self.pki.ca_path, "--allow-ip-range", "127.0.0.0/8",
            "--timeout", "5",
        )
        self.assertEqual((code, err), (0, ""), out)
        self.assertIn("trust on first use", out)
        self.assertIn("agree (1 of 1 notaries)", out)
