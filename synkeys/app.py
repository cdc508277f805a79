"""
Putting the pieces together: a running synkeys service from a
:class:`synkeys.config.Config` and a reactor.

``tap.py`` (``twistd synkeys``) and the CLI call this; embedders who want
the whole service rather than the resources call it too.
"""

from __future__ import annotations

import os
from typing import Any, List, Optional, Tuple

import attr
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web.server import Site

from synkeys.config import Config
from synkeys.errors import ConfigError
from synkeys.federation.client import FederationClient
from synkeys.federation.ipfilter import IPFilter
from synkeys.fetchers import (
    DirectKeyFetcher,
    PerspectivesKeyFetcher,
    TrustedKeyServer,
    perspectives_from_config,
)
from synkeys.http import BoundedRequest
from synkeys.interfaces import IFederationClient, IKeyStore
from synkeys.keyfile import (
    SigningKey,
    generate_signing_key,
    key_file_is_private,
    read_signing_keys,
    write_signing_keys,
)
from synkeys.keyring import Keyring
from synkeys.keyserver import KeyPublisher
from synkeys.notary import Notary
from synkeys.resource import QueryResource, build_root
from synkeys.storage import open_store
from synkeys.storage.opening import OpeningStore
from synkeys.tlsinfo import context_factory_of, fingerprint_source

log = Logger()


@attr.s(frozen=True, slots=True, auto_attribs=True)
class LoadedKeys:
    """
    Signing keys read (or generated) at start.

    :ivar keys: The keys.
    :ivar path: Where they live.
    :ivar generated: Whether the file was created just now.
    :ivar private: Whether the file is unreadable by group and others.
    """

    keys: List[SigningKey]
    path: str
    generated: bool
    private: bool


def load_or_generate_keys(path: str) -> LoadedKeys:
    """
    Read the signing key file at ``path``, generating a new key there
    (mode 0600) when the file does not exist.

    :raises ConfigError: when it exists but is unreadable or malformed.
    """
    if not os.path.exists(path):
        key = generate_signing_key()
        write_signing_keys(path, [key])
        return LoadedKeys([key], path, True, True)
    keys = read_signing_keys(path)
    return LoadedKeys(keys, path, False, key_file_is_private(path))


def log_keys(loaded: LoadedKeys) -> None:
    """Log what :func:`load_or_generate_keys` found, without any secret."""
    for key in loaded.keys:
        log.info(
            "{action} signing key {key_id} (public key {public_key}) in {path}",
            action="Generated" if loaded.generated else "Loaded",
            key_id=key.key_id,
            public_key=key.public_key_b64,
            path=loaded.path,
        )
    if not loaded.private:
        log.warn(
            "Signing key file {path} is readable by other users; run chmod 600 on it",
            path=loaded.path,
        )


def parse_endpoints(reactor: Any, descriptions: List[str]) -> List[Tuple[str, Any]]:
    """
    Parse listen endpoint strings.

    :raises ConfigError: naming the endpoint that is invalid.
    """
    result = []
    for description in descriptions:
        try:
            endpoint = serverFromString(reactor, description)
        except Exception as e:  # Twisted raises many kinds here
            raise ConfigError(f"invalid --listen endpoint {description!r}: {e}") from None
        result.append((description, endpoint))
    return result


def parse_perspective_flag(value: str) -> Tuple[str, str, str]:
    """
    Parse ``--perspective NAME:KEYID:PUBLICKEY`` (the name may have a port,
    the key id has a colon of its own).

    :raises ConfigError: when malformed.
    """
    parts = value.rsplit(":", 3)
    if len(parts) != 4 or parts[1] != "ed25519":
        raise ConfigError(
            f"--perspective {value!r}: expected NAME:KEYID:PUBLICKEY, e.g. "
            "matrix.org:ed25519:auto:Noi6WqcDj0QmPxCNQqgezwTlBKrfqehY1u2FyWP9uYw"
        )
    return parts[0], f"{parts[1]}:{parts[2]}", parts[3]


def trusted_key_servers(config: Config) -> List[TrustedKeyServer]:
    """
    The upstream notaries: Synapse's ``trusted_key_servers`` entries from
    the config file, or ``--perspective`` flags.
    """
    entries: List[Any] = []
    by_name: dict = {}
    for item in config.trusted_key_servers:
        if isinstance(item, str):
            name, key_id, key = parse_perspective_flag(item)
            if name not in by_name:
                by_name[name] = {"server_name": name, "verify_keys": {}}
                entries.append(by_name[name])
            by_name[name]["verify_keys"][key_id] = key
        else:
            entries.append(item)
    return perspectives_from_config(entries)


def build_keyring(
    config: Config,
    reactor: Any,
    store: IKeyStore,
    publisher: KeyPublisher,
    client: Optional[IFederationClient] = None,
) -> Keyring:
    """
    The keyring the notary fetches through: upstream notaries (if
    configured) and then the origins themselves, writing to ``store``.
    """
    if client is None:
        client = FederationClient(
            reactor,
            ip_filter=IPFilter(allowed=config.ip_range_whitelist),
            federation_ca_files=config.federation_custom_ca_list,
            connect_timeout_s=config.connect_timeout,
            request_timeout_s=config.fetch_timeout,
            max_response_bytes=config.max_response_size,
            max_concurrent=config.max_concurrent_fetches,
        )
    fetchers: List[Any] = [
        PerspectivesKeyFetcher.from_trusted(client, reactor, trusted)
        for trusted in trusted_key_servers(config)
    ]
    fetchers.append(
        DirectKeyFetcher(client, reactor, max_concurrent=config.max_concurrent_fetches)
    )
    return Keyring(
        fetchers,
        reactor,
        store=store,
        local_server_name=config.server_name,
        local_verify_keys=publisher.verify_keys,
    )


class SynkeysService(MultiService):
    """
    The whole service: the key server and the notary on every listener.

    :ivar publisher: The :class:`KeyPublisher` serving this server's keys.
    :ivar notary: The :class:`Notary` answering ``/query``.
    :ivar store: The key store (opened in the background).
    :ivar site: The :class:`Site` every listener serves.
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        loaded_keys: LoadedKeys,
        endpoints: Optional[List[Tuple[str, Any]]] = None,
        *,
        notary_keys: Optional[LoadedKeys] = None,
        federation_client: Optional[IFederationClient] = None,
    ) -> None:
        super().__init__()
        self.config = config
        self._loaded_keys = loaded_keys
        self._notary_keys = notary_keys
        self._reactor = reactor
        if endpoints is None:
            endpoints = parse_endpoints(reactor, config.listen)
        factories = [
            f for f in (context_factory_of(e) for _, e in endpoints) if f is not None
        ]
        self.publisher = KeyPublisher(
            config.server_name,
            loaded_keys.keys,
            reactor,
            old_keys=config.old_signing_keys,
            refresh_interval_ms=config.key_refresh_interval,
            tls_fingerprints=fingerprint_source(factories) if factories else None,
        )
        self.store = OpeningStore(open_store(config.database, reactor))
        self.keyring = build_keyring(config, reactor, self.store, self.publisher, federation_client)
        self.notary = Notary(
            self.store,
            self.keyring,
            reactor,
            server_name=config.server_name,
            signing_keys=(notary_keys or loaded_keys).keys,
            local_publisher=self.publisher,
        )
        query = QueryResource(self.notary, config.max_keys_per_query)
        self.site = Site(build_root(self.publisher, query))
        self.site.requestFactory = BoundedRequest
        self.site.displayTracebacks = False
        self._listeners = []
        for _, endpoint in endpoints:
            listener = StreamServerEndpointService(endpoint, self.site)
            # A port that cannot be bound stops the process with the reason,
            # rather than serving on the other ports and logging quietly.
            listener._raiseSynchronously = True
            listener.setServiceParent(self)
            self._listeners.append(listener)

    def when_listening(self) -> Deferred[List[Any]]:
        """
        Fires with the listening ports (``IListeningPort``) once every
        listener is bound; useful with port 0.
        """
        return gatherResults(
            [listener._waitingForPort for listener in self._listeners],  # type: ignore[attr-defined]
            consumeErrors=True,
        )

    def stopService(self) -> Deferred[None]:  # noqa: N802
        d = super().stopService()
        d.addBoth(lambda _: self.store.close() if self.store.store is not None else None)
        d.addErrback(lambda f: log.failure("Closing the key store failed", f))
        return d

    def startService(self) -> None:  # noqa: N802
        log_keys(self._loaded_keys)
        if self._notary_keys is not None:
            log_keys(self._notary_keys)
        log.info(
            "synkeys serving keys of {server_name} on {listen}",
            server_name=self.config.server_name,
            listen=", ".join(self.config.listen),
        )
        super().startService()
