"""
A real Synapse homeserver as a test peer.

:class:`SynapseHomeserver` writes a minimal ``homeserver.yaml`` (SQLite, one
TLS listener for federation and keys on a free 127.0.0.1 port, named
``localhost:PORT``, with a certificate from the test CA, that CA as ``federation_custom_ca_list``,
127.0.0.0/8 allowed, no stats), runs ``python -m synapse.app.homeserver``
as a subprocess, waits (bounded) until it serves its keys, and stops it by
its PID. Its output goes to ``homeserver.log`` beside the config, which is
kept; :meth:`SynapseHomeserver.log_tail` shows the end of it.

The signing key file is written by synkeys (:func:`synkeys.keyfile.write_signing_keys`),
which also checks that Synapse reads synkeys' key file format.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import yaml
from twisted.logger import Logger

from synkeys.keyfile import SigningKey, generate_signing_key, write_signing_keys
from tests.interop.wire import HOST_NAME, LOOPBACK, TestHTTPSClient, free_port, later
from tests.tlsutil import TestPKI

log = Logger()

#: How long Synapse may take to start serving.
STARTUP_TIMEOUT_S = 60.0
#: How long Synapse may take to exit after SIGTERM before it is killed.
SHUTDOWN_TIMEOUT_S = 10.0

#: When this environment variable is set (CI sets it), a missing Synapse
#: fails the interoperability tests instead of skipping them.
REQUIRE_SYNAPSE_ENV = "SYNKEYS_REQUIRE_SYNAPSE"


def synapse_installed() -> bool:
    """Whether ``matrix-synapse`` can be imported."""
    return importlib.util.find_spec("synapse") is not None


def synapse_skip_reason() -> Optional[str]:
    """
    Why the Synapse tests are skipped here, or ``None`` when they run
    (Synapse is installed, or :data:`REQUIRE_SYNAPSE_ENV` demands them).
    """
    if synapse_installed() or os.environ.get(REQUIRE_SYNAPSE_ENV):
        return None
    return (
        "matrix-synapse is not installed; install the interop extra "
        "(pip install '.[interop]') to run the Synapse interoperability tests"
    )


def synapse_version() -> str:
    """The installed ``matrix-synapse`` version."""
    from importlib.metadata import version

    return version("matrix-synapse")


class SynapseStartError(Exception):
    """Synapse exited or did not answer in time; the message has its log's tail."""


class SynapseHomeserver:
    """
    One Synapse process federating over TLS on 127.0.0.1.

    :param directory: Where its config, database, key and log live.
    :param pki: Issues its certificate; its CA is Synapse's federation CA.
    :param extra_config: YAML text appended verbatim to the generated
        ``homeserver.yaml`` (e.g. a ``trusted_key_servers`` snippet).

    :ivar port: Its federation (TLS) port.
    :ivar server_name: ``localhost:PORT``.
    :ivar signing_key: Its signing key.
    :ivar config_path: Its ``homeserver.yaml``.
    :ivar log_path: Its stdout and stderr.
    """

    def __init__(self, directory: str, pki: TestPKI, extra_config: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory = os.path.abspath(directory)
        self.pki = pki
        self.extra_config = extra_config
        self.port = free_port()
        self.server_name = f"{HOST_NAME}:{self.port}"
        self.signing_key: SigningKey = generate_signing_key()
        self.config_path = os.path.join(self.directory, "homeserver.yaml")
        self.log_path = os.path.join(self.directory, "homeserver.log")
        self._process: Optional[subprocess.Popen[bytes]] = None

    def base_config(self) -> Dict[str, Any]:
        """The settings every test needs, before :attr:`extra_config`."""
        key_path, cert_path = self.pki.issue("synapse", [HOST_NAME])
        signing_key_path = os.path.join(self.directory, "homeserver.signing.key")
        write_signing_keys(signing_key_path, [self.signing_key])
        return {
            "server_name": self.server_name,
            "pid_file": os.path.join(self.directory, "homeserver.pid"),
            "listeners": [
                {
                    "port": self.port,
                    "bind_addresses": [LOOPBACK],
                    "type": "http",
                    "tls": True,
                    "x_forwarded": False,
                    "resources": [{"names": ["federation", "keys"], "compress": False}],
                }
            ],
            "tls_certificate_path": cert_path,
            "tls_private_key_path": key_path,
            "database": {
                "name": "sqlite3",
                "args": {"database": os.path.join(self.directory, "homeserver.db")},
            },
            "media_store_path": os.path.join(self.directory, "media"),
            "signing_key_path": signing_key_path,
            "report_stats": False,
            "enable_metrics": False,
            "federation_verify_certificates": True,
        }

    def write_config(self) -> str:
        """Write ``homeserver.yaml``; returns its text."""
        text = yaml.safe_dump(self.base_config(), sort_keys=False) + "\n" + self.extra_config
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(text)
        return text

    @property
    def pid(self) -> Optional[int]:
        """The process id while it runs."""
        return self._process.pid if self._process is not None else None

    async def start(self, reactor: Any, client: TestHTTPSClient) -> None:
        """
        Start Synapse and wait until it serves ``/_matrix/key/v2/server``.

        :raises SynapseStartError: when it exits first or takes longer than
            :data:`STARTUP_TIMEOUT_S`.
        """
        self.write_config()
        with open(self.log_path, "ab") as log_file:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "synapse.app.homeserver", "-c", self.config_path],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
        log.info(
            "started Synapse {version} as {name}, PID {pid}",
            version=synapse_version(),
            name=self.server_name,
            pid=self.pid,
        )
        started_s = time.monotonic()
        while True:
            code = self._process.poll()
            if code is not None:
                raise SynapseStartError(
                    f"Synapse exited with status {code} while starting\n{self.log_tail()}"
                )
            try:
                result = await client.request("GET", self.server_name, "/_matrix/key/v2/server")
            except Exception:  # refused until it listens; anything else shows in the log
                result = None
            if result is not None and result.code == 200:
                log.info(
                    "Synapse {name} answered after {elapsed_s:.1f}s",
                    name=self.server_name,
                    elapsed_s=time.monotonic() - started_s,
                )
                return
            if time.monotonic() - started_s > STARTUP_TIMEOUT_S:
                self.stop()
                raise SynapseStartError(
                    f"Synapse did not answer within {STARTUP_TIMEOUT_S}s\n{self.log_tail()}"
                )
            await later(reactor, 0.1)

    def stop(self) -> None:
        """Stop the process by its PID: SIGTERM, then SIGKILL if it lingers."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warn("Synapse PID {pid} ignored SIGTERM; killing it", pid=process.pid)
            os.kill(process.pid, signal.SIGKILL)
            process.wait()

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of its log, headed by the log's path."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                tail: List[str] = f.readlines()[-lines:]
        except OSError as e:
            return f"(no Synapse log at {self.log_path}: {e.strerror})"
        return f"--- last {len(tail)} lines of {self.log_path} ---\n" + "".join(tail)
