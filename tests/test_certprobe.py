"""The certificate description of :mod:`synkeys.certprobe` (pure parts)."""

from __future__ import annotations

import trustme
from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase

from synkeys.certprobe import certificate_info, covers, explain


class CertificateInfoTests(SynchronousTestCase):
    """Reading and judging a certificate."""

    def setUp(self) -> None:
        ca = trustme.CA()
        pem = ca.issue_cert("matrix.example.org", "*.example.net", "10.1.2.3").cert_chain_pems[0]
        self.info = certificate_info(x509.load_pem_x509_certificate(pem.bytes()))

    def test_names(self) -> None:
        """DNS and IP subject alternative names are read, in order."""
        self.assertEqual(self.info.names, ("matrix.example.org", "*.example.net", "10.1.2.3"))
        self.assertFalse(self.info.self_signed)

    def test_covers(self) -> None:
        """Exact names, one-label wildcards and IP addresses match; nothing else does."""
        self.assertTrue(covers(self.info.names, "MATRIX.example.org"))
        self.assertTrue(covers(self.info.names, "a.example.net"))
        self.assertFalse(covers(self.info.names, "a.b.example.net"))
        self.assertFalse(covers(self.info.names, "example.org"))
        self.assertTrue(covers(self.info.names, "10.1.2.3"))
        self.assertFalse(covers(self.info.names, "10.1.2.4"))

    def test_explain(self) -> None:
        """The explanation says where, which names, and whether they cover the wanted one."""
        now_s = self.info.not_valid_before.timestamp() + 60
        wrong = explain(self.info, "203.0.113.5", 8448, "example.org", now_s)
        assert wrong is not None
        self.assertTrue(wrong.startswith("the certificate served at 203.0.113.5:8448 is for matrix.example.org"))
        self.assertTrue(wrong.endswith(", not for example.org"))
        right = explain(self.info, "2001:db8::1", 443, "matrix.example.org", now_s)
        assert right is not None
        self.assertIn("served at [2001:db8::1]:443", right)
        self.assertTrue(right.endswith("its issuer is not trusted here (add its CA with --federation-ca)"))
