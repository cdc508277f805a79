"""
The seams between synkeys' layers, as zope interfaces.

``IKeyStore`` persists checked responses; ``IFederationClient`` talks
HTTPS to other Matrix servers; ``IKeyFetcher`` finds responses for many
servers at once. The notary and the keyring are built from these, so a
test can replace any of them with a fake (see :mod:`synkeys.testing`).
"""

from __future__ import annotations

from typing import Collection, Dict, List, Mapping, Optional

import attr
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from synkeys.keys import ServerKeys

#: ``server_name -> {key_id: minimum_valid_until_ts}``; an empty inner
#: mapping asks for every key of that server.
KeyRequests = Mapping[str, Mapping[str, int]]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class StoreResult:
    """
    What :meth:`IKeyStore.store_server_keys` did.

    :ivar stored: Key ids whose row now holds the new response.
    :ivar kept: Key ids whose row kept an existing response that was newer.
    :ivar conflicts: Key ids the store already binds to *different* key
        bytes, mapped to those existing bytes; their rows were left alone.
    """

    stored: frozenset = frozenset()
    kept: frozenset = frozenset()
    conflicts: Mapping[str, bytes] = attr.Factory(dict)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class FetchResult:
    """
    What a fetcher found.

    :ivar responses: ``server_name`` → checked responses found for it.
    :ivar failures: ``server_name`` → why nothing (or not everything) was
        found, for servers that were asked for but failed.
    """

    responses: Dict[str, List[ServerKeys]] = attr.Factory(dict)
    failures: Dict[str, str] = attr.Factory(dict)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class FederationResponse:
    """
    An HTTP response from another Matrix server.

    :ivar code: HTTP status.
    :ivar body: The body, read in full (and within the size cap).
    :ivar peer_certificate_sha256: SHA-256 of the DER of the certificate
        the server presented on that connection (``None`` without TLS).
    :ivar headers: Response headers, lower-cased names to lists of values.
    """

    code: int
    body: bytes
    peer_certificate_sha256: Optional[bytes] = None
    headers: Mapping[bytes, List[bytes]] = attr.Factory(dict)


class IKeyStore(Interface):
    """
    Persistent storage of checked server-keys responses, one row per
    ``(server_name, key_id)`` holding the response that lists that key.
    Every method returns a Deferred.
    """

    def store_server_keys(keys: ServerKeys) -> Deferred[StoreResult]:
        """
        Store ``keys`` under every key id it lists.

        A row is replaced only by a response fetched later (ties: the one
        with the later ``valid_until_ts``) and only when it binds the key
        id to the same key bytes; a different binding is reported in
        :attr:`StoreResult.conflicts` and not written.
        """

    def get_server_keys(
        requests: Mapping[str, Optional[Collection[str]]],
    ) -> Deferred[Dict[str, Dict[str, ServerKeys]]]:
        """
        Look up stored responses: ``server_name -> key_ids`` (``None`` or
        empty: every key id stored for that server). Answers
        ``server_name -> {key_id: ServerKeys}`` with only what was found.
        """

    def evict_server(server_name: str) -> Deferred[int]:
        """Forget every key of ``server_name``; fires with the rows removed."""

    def ping() -> Deferred[None]:
        """Fire when the store answers; errback when it does not."""

    def close() -> Deferred[None]:
        """Release connections; the store is unusable afterwards."""


class IFederationClient(Interface):
    """HTTPS to other Matrix servers, with server discovery and limits."""

    def get(server_name: str, path: bytes) -> Deferred[FederationResponse]:
        """
        GET ``path`` (e.g. ``b"/_matrix/key/v2/server"``) from
        ``server_name``. Errbacks with :class:`synkeys.errors.FetchError`.
        """

    def post_json(
        server_name: str, path: bytes, body: bytes
    ) -> Deferred[FederationResponse]:
        """POST the JSON ``body`` bytes to ``path`` on ``server_name``."""


class IKeyFetcher(Interface):
    """Finds checked server-keys responses for many servers at once."""

    name = Attribute("A short name for logs and errors, e.g. 'direct'.")

    def fetch_server_keys(requests: KeyRequests) -> Deferred[FetchResult]:
        """
        Find responses for ``requests``. Per-server failures are reported
        in :attr:`FetchResult.failures`; the Deferred itself errbacks only
        on programming errors.
        """
