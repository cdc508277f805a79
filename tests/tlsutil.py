"""A test CA (trustme) and certificates written to files, for real-TLS tests."""

import os
from typing import Sequence

import trustme


class TestPKI:
    """
    A CA and certificates on disk under ``directory``.

    :ivar ca_path: The CA certificate (PEM), for clients to trust.
    """

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.ca = trustme.CA()
        self.ca_path = os.path.join(directory, "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_path)

    def issue(self, name: str, identities: Sequence[str]) -> "tuple[str, str]":
        """Issue a certificate; returns (key path, certificate path)."""
        cert = self.ca.issue_cert(*identities)
        key_path = os.path.join(self.directory, f"{name}.key.pem")
        cert_path = os.path.join(self.directory, f"{name}.cert.pem")
        cert.private_key_pem.write_to_path(key_path)
        cert.cert_chain_pems[0].write_to_path(cert_path)
        return key_path, cert_path

    def ssl_endpoint(self, name: str, identities: Sequence[str], port: int = 0) -> str:
        """An ``ssl:`` endpoint string on 127.0.0.1 serving a new certificate."""
        key_path, cert_path = self.issue(name, identities)
        return f"ssl:{port}:privateKey={key_path}:certKey={cert_path}:interface=127.0.0.1"
