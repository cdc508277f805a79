"""
TLS for federation: verify the peer's certificate against the name the
spec says it must be valid for, trust the platform's CAs plus any the
operator adds (``--federation-ca``), require TLS 1.2 or later, and record
the certificate each connection saw.

The recorded certificate is what lets the notary compare an origin's
certificate with the ``tls_fingerprints`` it publishes, so a recorder
belongs to exactly one connection: :meth:`FederationTLSPolicy.recorder_for`
makes a new one each time.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import OpenSSLDefaultPaths, TLSVersion, optionsForClientTLS
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from synkeys.errors import ConfigError

log = Logger()

#: How many per-name connection creators (each with its own OpenSSL
#: context, which costs a CA-bundle load) are kept.
CREATOR_CACHE_SIZE = 256


def load_ca_files(paths: Iterable[str]) -> list[x509.Certificate]:
    """
    Read every certificate from PEM files.

    :raises ConfigError: naming the file that is missing, unreadable or
        holds no PEM certificate.
    """
    certificates: list[x509.Certificate] = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read federation CA file {path!r}: {e}") from None
        try:
            found = x509.load_pem_x509_certificates(data)
        except ValueError as e:
            raise ConfigError(f"no PEM certificate in federation CA file {path!r}: {e}") from None
        certificates.extend(found)
    return certificates


class PlatformTrustPlus(OpenSSLDefaultPaths):  # type: ignore[misc]
    """
    Trust the platform's CA store (OpenSSL's default verify paths) and,
    on top of it, some extra CA certificates.

    Twisted's ``trustRootFromCertificates`` replaces the platform store
    instead of adding to it, and a trust root is the only seam
    ``optionsForClientTLS`` offers, so this extends the public
    ``OpenSSLDefaultPaths`` root (whose one hook is underscore-named).

    :param extra: Additional trusted CA certificates.
    """

    def __init__(self, extra: Sequence[x509.Certificate] = ()) -> None:
        self._extra = [crypto.X509.from_cryptography(c) for c in extra]

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        super()._addCACertsToContext(context)
        store = context.get_cert_store()
        assert store is not None
        for certificate in self._extra:
            store.add_cert(certificate)


@implementer(IOpenSSLClientConnectionCreator)
class PeerCertificateRecorder:
    """
    A connection creator for one connection that remembers the OpenSSL
    connection it made, so the peer certificate can be read afterwards.

    :param creator: The verifying creator to delegate to.
    """

    def __init__(self, creator: IOpenSSLClientConnectionCreator) -> None:
        self._creator = creator
        self._connection: SSL.Connection | None = None

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:  # noqa: N803
        """Make the connection with the wrapped creator and remember it."""
        connection = self._creator.clientConnectionForTLS(tlsProtocol)
        self._connection = connection
        return connection

    def peer_certificate_der(self) -> bytes | None:
        """The DER of the certificate the peer presented, if a handshake happened."""
        if self._connection is None:
            return None
        certificate = self._connection.get_peer_certificate(as_cryptography=True)
        if certificate is None:
            return None
        return certificate.public_bytes(Encoding.DER)

    def peer_certificate_sha256(self) -> bytes | None:
        """SHA-256 of :meth:`peer_certificate_der`, or ``None``."""
        der = self.peer_certificate_der()
        return None if der is None else hashlib.sha256(der).digest()


@implementer(IPolicyForHTTPS)
class FederationTLSPolicy:
    """
    Certificate verification for federation connections.

    The certificate must chain to a trusted CA and be valid (service
    identity: DNS name or IP address SAN) for the name given; SNI is sent
    for DNS names; TLS versions below 1.2 are refused.

    :param federation_ca_files: PEM files of extra trusted CAs, added to
        the platform's.
    :raises ConfigError: when a CA file cannot be loaded.
    """

    def __init__(self, federation_ca_files: Iterable[str] = ()) -> None:
        self._trust_root = PlatformTrustPlus(load_ca_files(federation_ca_files))
        self._creators: OrderedDict[str, IOpenSSLClientConnectionCreator] = OrderedDict()

    def creator_for(self, tls_server_name: str) -> IOpenSSLClientConnectionCreator:
        """
        A (shared, cached) connection creator verifying ``tls_server_name``,
        a DNS name or an IP address without brackets.
        """
        creator = self._creators.get(tls_server_name)
        if creator is None:
            creator = optionsForClientTLS(
                tls_server_name,
                trustRoot=self._trust_root,
                extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2},
            )
            self._creators[tls_server_name] = creator
            if len(self._creators) > CREATOR_CACHE_SIZE:
                self._creators.popitem(last=False)
        else:
            self._creators.move_to_end(tls_server_name)
        return creator

    def recorder_for(self, tls_server_name: str) -> PeerCertificateRecorder:
        """A fresh :class:`PeerCertificateRecorder` for one connection."""
        return PeerCertificateRecorder(self.creator_for(tls_server_name))

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        """:class:`IPolicyForHTTPS`: verify the certificate for ``hostname``."""
        name = hostname.decode("ascii")
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        return self.recorder_for(name)


def certificate_sha256(pem_or_der: bytes) -> bytes:
    """SHA-256 of a certificate's DER, given the certificate as PEM or DER."""
    if pem_or_der.lstrip().startswith(b"-----BEGIN"):
        certificate = x509.load_pem_x509_certificate(pem_or_der)
        pem_or_der = certificate.public_bytes(Encoding.DER)
    return hashlib.sha256(pem_or_der).digest()


__all__: tuple[str, ...] = (
    "FederationTLSPolicy",
    "PeerCertificateRecorder",
    "PlatformTrustPlus",
    "certificate_sha256",
    "load_ca_files",
)
