"""
Fingerprints of the certificates a live TLS context serves.

``tls_fingerprints`` must list what clients really receive, so it is read
from the context object the listener uses, not from a path in the config.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable, List, Optional, Sequence

from OpenSSL import SSL, crypto


def certificate_sha256(der: bytes) -> bytes:
    """SHA-256 of a DER-encoded certificate."""
    return hashlib.sha256(der).digest()


def served_certificate_der(context_factory: Any) -> Optional[bytes]:
    """
    The DER of the certificate that ``context_factory`` (anything with
    ``getContext()`` returning an ``OpenSSL.SSL.Context``) serves, or
    ``None`` when it serves none.
    """
    context = context_factory.getContext()
    certificate = SSL.Connection(context, None).get_certificate()
    if certificate is None:
        return None
    return crypto.dump_certificate(crypto.FILETYPE_ASN1, certificate)


def context_factory_of(endpoint: object) -> Optional[Any]:
    """
    The TLS context factory of a server endpoint made from an ``ssl:``
    endpoint string, or ``None`` for a plain one.
    """
    for name in ("_sslContextFactory", "contextFactory"):
        factory = getattr(endpoint, name, None)
        if factory is not None and hasattr(factory, "getContext"):
            return factory
    return None


def fingerprint_source(
    context_factories: Iterable[Any],
) -> Callable[[], List[bytes]]:
    """
    A callable returning the SHA-256 of every certificate the given
    contexts serve now (sorted, without duplicates).
    """
    factories: Sequence[Any] = list(context_factories)

    def fingerprints() -> List[bytes]:
        found = set()
        for factory in factories:
            der = served_certificate_der(factory)
            if der is not None:
                found.add(certificate_sha256(der))
        return sorted(found)

    return fingerprints
