"""
Looking at the certificate a server presents, without trusting it, to
explain a TLS failure: "the certificate served at 203.0.113.5:8448 is
for other.example (issued by R3, valid until ...)".

Only ``synkeys fetch``/``check`` use this, after a request already failed
its TLS checks; nothing read here is trusted for anything. The connection
goes through :class:`~synkeys.federation.endpoint.FilteringTLSEndpoint`,
so the address filter applies as for any federation request.
"""

from __future__ import annotations

import datetime
import ipaddress
from typing import Optional, Tuple

import attr
from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHandshakeListener,
    IHostnameResolver,
    IOpenSSLClientConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from synkeys.federation.endpoint import FilteringTLSEndpoint, is_ip_literal
from synkeys.federation.ipfilter import IPFilter

__all__ = ["CertificateInfo", "certificate_info", "fetch_certificate"]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class CertificateInfo:
    """
    What a certificate says about itself.

    :ivar names: Its subject alternative names (DNS names and IP addresses);
        the subject's common name when it has none.
    :ivar issuer: The issuer's common name (or whole name).
    :ivar not_valid_before: Start of validity (UTC).
    :ivar not_valid_after: End of validity (UTC).
    :ivar self_signed: Whether issuer and subject are the same.
    """

    names: Tuple[str, ...]
    issuer: str
    not_valid_before: datetime.datetime
    not_valid_after: datetime.datetime
    self_signed: bool

    def describe(self, now: datetime.datetime) -> str:
        """One phrase: ``is for a.example, b.example (issued by R3, valid until ...)``."""
        names = ", ".join(self.names) or "no names"
        issued = "self-signed" if self.self_signed else f"issued by {self.issuer}"
        if self.not_valid_after < now:
            validity = f"expired {self.not_valid_after:%Y-%m-%d %H:%M} UTC"
        elif self.not_valid_before > now:
            validity = f"not valid before {self.not_valid_before:%Y-%m-%d %H:%M} UTC"
        else:
            validity = f"valid until {self.not_valid_after:%Y-%m-%d %H:%M} UTC"
        return f"is for {names} ({issued}, {validity})"


def _common_name(name: x509.Name) -> str:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if values:
        return str(values[0].value)
    return name.rfc4514_string()


def _utc(certificate: x509.Certificate, field: str) -> datetime.datetime:
    # cryptography 42 added the aware *_utc properties; older ones have naive UTC.
    aware = getattr(certificate, field + "_utc", None)
    if aware is not None:
        return aware  # type: ignore[no-any-return]
    naive: datetime.datetime = getattr(certificate, field)
    return naive.replace(tzinfo=datetime.timezone.utc)


def certificate_info(certificate: x509.Certificate) -> CertificateInfo:
    """Read the names, issuer and validity of ``certificate``."""
    names: list[str] = []
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        names.extend(str(n) for n in san.get_values_for_type(x509.DNSName))
        names.extend(str(n) for n in san.get_values_for_type(x509.IPAddress))
    if not names:
        common = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        names.extend(str(c.value) for c in common)
    return CertificateInfo(
        tuple(names),
        _common_name(certificate.issuer),
        _utc(certificate, "not_valid_before"),
        _utc(certificate, "not_valid_after"),
        certificate.issuer == certificate.subject,
    )


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """TLS without any verification, sending SNI for DNS names: to look only."""

    def __init__(self, server_name_indication: str) -> None:
        self._sni = server_name_indication

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:  # noqa: N803
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        connection = SSL.Connection(context, None)
        if self._sni and not is_ip_literal(self._sni):
            connection.set_tlsext_host_name(self._sni.encode("idna"))
        connection.set_connect_state()
        return connection


@implementer(IHandshakeListener)
class _Look(Protocol):
    """Takes the peer certificate once the handshake is done, then hangs up."""

    def __init__(self, done: Deferred[x509.Certificate]) -> None:
        self._done = done

    def handshakeCompleted(self) -> None:  # noqa: N802
        certificate = self.transport.getPeerCertificate()  # type: ignore[union-attr]
        if not self._done.called:
            if certificate is None:
                self._done.errback(Failure(ValueError("the server sent no certificate")))
            else:
                self._done.callback(certificate.to_cryptography())
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        if not self._done.called:
            self._done.errback(reason)


class _LookFactory(Factory):
    def __init__(self, done: Deferred[x509.Certificate]) -> None:
        self._done = done

    def buildProtocol(self, addr: object) -> _Look:  # noqa: N802
        return _Look(self._done)


def fetch_certificate(
    reactor: object,
    resolver: IHostnameResolver,
    ip_filter: IPFilter,
    host: str,
    port: int,
    tls_server_name: str,
    timeout_s: float,
) -> Deferred[CertificateInfo]:
    """
    Connect to ``host``:``port`` (through the address filter), do a TLS
    handshake without verifying anything, and read the certificate.

    :param reactor: Provides TCP and time.
    :param tls_server_name: Sent as SNI (when a DNS name).
    :returns: A Deferred firing the certificate's :class:`CertificateInfo`,
        or failing when there is none to be had within ``timeout_s``.
    """
    got: Deferred[x509.Certificate] = Deferred()
    endpoint = FilteringTLSEndpoint(
        reactor,  # type: ignore[arg-type]
        resolver,
        ip_filter,
        host,
        host,
        port,
        _Unverified(tls_server_name),
        timeout_s,
    )
    connecting = endpoint.connect(_LookFactory(got))

    def not_connected(failure: Failure) -> None:
        if not got.called:
            got.errback(failure)

    connecting.addErrback(not_connected)
    got.addTimeout(timeout_s, reactor)  # type: ignore[arg-type]
    return got.addCallback(certificate_info)


def describe_address(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 address."""
    try:
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def now_utc(seconds: float) -> datetime.datetime:
    """A clock's ``seconds()`` as an aware UTC datetime."""
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)


def covers(names: Tuple[str, ...], wanted: str) -> bool:
    """
    Whether a certificate for ``names`` is for ``wanted`` (a DNS name or
    an IP address): exact, case-insensitive, or a ``*.`` wildcard covering
    exactly one leftmost label.
    """
    if is_ip_literal(wanted):
        address = ipaddress.ip_address(wanted)
        return any(is_ip_literal(n) and ipaddress.ip_address(n) == address for n in names)
    wanted = wanted.lower().rstrip(".")
    for name in names:
        name = name.lower().rstrip(".")
        if name == wanted:
            return True
        if name.startswith("*.") and "." in wanted and wanted.split(".", 1)[1] == name[2:]:
            return True
    return False


def explain(
    info: Optional[CertificateInfo], host: str, port: int, wanted: str, now_s: float
) -> Optional[str]:
    """
    ``the certificate served at host:port is for ...``, saying whether it
    covers ``wanted`` (the name it must be valid for), or ``None``.
    """
    if info is None:
        return None
    where = describe_address(host, port)
    text = f"the certificate served at {where} {info.describe(now_utc(now_s))}"
    if not covers(info.names, wanted):
        return f"{text}, not for {wanted}"
    if info.not_valid_after < now_utc(now_s) or info.not_valid_before > now_utc(now_s):
        return text
    return f"{text}: its issuer is not trusted here (add its CA with --federation-ca)"
