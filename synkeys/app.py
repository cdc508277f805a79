"""
Putting the pieces together: a running synkeys service from a
:class:`synkeys.config.Config` and a reactor.

``tap.py`` (``twistd synkeys``) and the CLI call this; embedders who want
the whole service rather than the resources call it too.

The service also operates itself: every seam is observed by
:mod:`synkeys.metrics` (served on the ``--metrics`` listeners), ``GET
/health`` answers load balancers (:mod:`synkeys.health`), and stopping it
(SIGTERM under ``twistd``) stops accepting connections, lets the requests
in progress finish within :data:`DEFAULT_DRAIN_TIMEOUT_S`, and then closes
the store.
"""

from __future__ import annotations

import gc
import os
from typing import Any, List, Optional, Tuple

import attr
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, FirstError, gatherResults, maybeDeferred
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
from synkeys.health import HealthResource, ServiceSite
from synkeys.http import BoundedRequest, configure_access_log
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
from synkeys.metrics import (
    ObservedFederationClient,
    ObservedFetcher,
    ServiceMetrics,
    TimedKeyStore,
    metrics_site,
)
from synkeys.notary import Notary
from synkeys.resource import QueryResource, build_root
from synkeys.storage import open_store
from synkeys.storage.opening import OpeningStore
from synkeys.tlsinfo import context_factory_of, fingerprint_source

log = Logger()

#: How long stopping waits for requests in progress before closing the store.
DEFAULT_DRAIN_TIMEOUT_S = 10.0


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


def parse_endpoints(
    reactor: Any, descriptions: List[str], flag: str = "listen"
) -> List[Tuple[str, Any]]:
    """
    Parse listen endpoint strings.

    :param flag: The option they came from, for the error message.
    :raises ConfigError: naming the endpoint that is invalid.
    """
    result = []
    for description in descriptions:
        try:
            endpoint = serverFromString(reactor, description)
        except Exception as e:  # Twisted raises many kinds here
            raise ConfigError(f"invalid --{flag} endpoint {description!r}: {e}") from None
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
    *,
    metrics: Optional[ServiceMetrics] = None,
) -> Keyring:
    """
    The keyring the notary fetches through: upstream notaries (if
    configured) and then the origins themselves, writing to ``store``.

    :param metrics: When given, the client and every fetcher are observed
        (timed, counted, and each fetch outcome logged), and the keyring
        reports batch sizes and notary disagreements to it.
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
    if metrics is not None:
        client = ObservedFederationClient(client, metrics)
    fetchers: List[Any] = [
        PerspectivesKeyFetcher.from_trusted(client, reactor, trusted)
        for trusted in trusted_key_servers(config)
    ]
    fetchers.append(
        DirectKeyFetcher(client, reactor, max_concurrent=config.max_concurrent_fetches)
    )
    if metrics is not None:
        fetchers = [ObservedFetcher(fetcher, metrics) for fetcher in fetchers]
    return Keyring(
        fetchers,
        reactor,
        store=store,
        local_server_name=config.server_name,
        local_verify_keys=publisher.verify_keys,
        on_disagreement=metrics.observe_disagreement if metrics is not None else None,
        on_batch=metrics.observe_batch if metrics is not None else None,
    )


def freeze_startup_heap() -> int:
    """
    Move every object alive now (modules, classes, configuration: the
    process's startup heap) out of the garbage collector's reach, as
    :func:`gc.freeze` does, after one full collection.

    The cyclic collector's full (generation 2) collections otherwise walk
    that whole heap, about 60 000 objects for Twisted, the OpenSSL bindings
    and synkeys, 15-30 ms with the reactor stopped; under a burst of work
    they come every few seconds. Frozen, a full collection walks only what
    was allocated since (about 12 ms in a cold fan-out of 50 servers).
    Nothing frozen was garbage at the time; frozen objects freed by
    reference counting are still freed, and one that later ends up in an
    unreachable reference cycle stays: startup objects live as long as the
    process anyway.

    :returns: How many objects were frozen.
    """
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("froze {count} startup objects for the garbage collector", count=frozen)
    return frozen


class SynkeysService(MultiService):
    """
    The whole service: the key server, the notary and ``/health`` on every
    listener, and Prometheus metrics on the metrics listeners.

    :param config: The resolved settings.
    :param reactor: The reactor (or fakes providing what is used of it).
    :param loaded_keys: This server's signing keys.
    :param endpoints: ``(description, endpoint)`` to serve on; parsed from
        ``config.listen`` when ``None``.
    :param notary_keys: Separate keys the notary countersigns with.
    :param federation_client: Replaces the HTTPS client (for tests).
    :param metrics_endpoints: Where to serve metrics; parsed from
        ``config.metrics`` when ``None``.
    :param metrics: The metrics to feed; a new :class:`ServiceMetrics` (with
        a registry of its own) when ``None``.
    :param drain_timeout_s: How long stopping waits for requests in
        progress.
    :param freeze_heap: Whether starting calls :func:`freeze_startup_heap`
        (``twistd synkeys`` and its workers do; a process that embeds the
        service owns its garbage collector and decides for itself).

    :ivar publisher: The :class:`KeyPublisher` serving this server's keys.
    :ivar notary: The :class:`Notary` answering ``/query``.
    :ivar store: The key store (opened in the background).
    :ivar site: The :class:`~synkeys.health.ServiceSite` every listener
        serves.
    :ivar metrics: The service's :class:`ServiceMetrics`.
    :ivar metrics_site: The :class:`Site` the metrics listeners serve.
    :ivar freeze_heap: See the parameter.
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
        metrics_endpoints: Optional[List[Tuple[str, Any]]] = None,
        metrics: Optional[ServiceMetrics] = None,
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
        freeze_heap: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.freeze_heap = freeze_heap
        self._loaded_keys = loaded_keys
        self._notary_keys = notary_keys
        self._reactor = reactor
        self._drain_timeout_s = drain_timeout_s
        if endpoints is None:
            endpoints = parse_endpoints(reactor, config.listen)
        if metrics_endpoints is None:
            metrics_endpoints = parse_endpoints(reactor, config.metrics, "metrics")
        self.metrics = metrics if metrics is not None else ServiceMetrics(reactor)
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
        timed_store = TimedKeyStore(self.store, self.metrics)
        self.keyring = build_keyring(
            config, reactor, timed_store, self.publisher, federation_client, metrics=self.metrics
        )
        self.notary = Notary(
            timed_store,
            self.keyring,
            reactor,
            server_name=config.server_name,
            signing_keys=(notary_keys or loaded_keys).keys,
            local_publisher=self.publisher,
        )
        self.metrics.watch_notary(self.notary.counters)
        query = QueryResource(self.notary, config.max_keys_per_query)
        root = build_root(self.publisher, query)
        self.site = ServiceSite(root, reactor=reactor, on_request_done=self.metrics.observe_request)
        # Beside /_matrix, at the root, where load balancers look for it.
        root.putChild(
            b"health", HealthResource(timed_store, reactor, draining=lambda: self.site.draining)
        )
        self.site.requestFactory = BoundedRequest
        self.site.displayTracebacks = False
        configure_access_log(self.site, config.access_log)
        self.metrics.watch_site(self.site)
        self.metrics_site = metrics_site(self.metrics, reactor)
        self._listeners = self._listen(endpoints, self.site)
        self._metrics_listeners = self._listen(metrics_endpoints, self.metrics_site)

    def _listen(
        self, endpoints: List[Tuple[str, Any]], site: Site
    ) -> List[StreamServerEndpointService]:
        listeners = []
        for _, endpoint in endpoints:
            listener = StreamServerEndpointService(endpoint, site)
            # A port that cannot be bound stops the process with the reason,
            # rather than serving on the other ports and logging quietly.
            listener._raiseSynchronously = True
            listener.setServiceParent(self)
            listeners.append(listener)
        return listeners

    def when_listening(self) -> Deferred[List[Any]]:
        """
        Fires with the listening ports (``IListeningPort``) once every
        listener is bound; useful with port 0.
        """
        return _ports_of(self._listeners)

    def when_metrics_listening(self) -> Deferred[List[Any]]:
        """As :meth:`when_listening`, for the metrics listeners."""
        return _ports_of(self._metrics_listeners)

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
        if self.freeze_heap:
            freeze_startup_heap()
        for listener in self._listeners:
            _port_of(listener).addCallback(_log_port, "requests")
        for listener in self._metrics_listeners:
            _port_of(listener).addCallback(_log_port, "metrics")

    def stopService(self) -> Deferred[None]:  # noqa: N802
        """
        Stop accepting connections, wait (at most the drain timeout) for
        the requests in progress, stop the other services (the metrics
        listeners), then close the store.
        """
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        Service.stopService(self)
        # From here on /health answers 503 and responses close their
        # connections, so load balancers move to other instances.
        self.site.start_draining()
        await _stop_all([s for s in self._listeners if s.running])
        open_requests = self.site.open_request_count
        if open_requests:
            log.info(
                "Stopped accepting connections; waiting up to {timeout_s} s for "
                "{count} requests in progress",
                timeout_s=self._drain_timeout_s,
                count=open_requests,
            )
        left = await self.site.drain(self._drain_timeout_s)
        if left:
            log.warn(
                "{count} connections ({requests} requests in progress) still open after "
                "{timeout_s} s; stopping anyway",
                count=left,
                requests=self.site.open_request_count,
                timeout_s=self._drain_timeout_s,
            )
        await _stop_all([s for s in reversed(list(self)) if s.running])
        if self.store.store is not None:
            try:
                await self.store.close()
            except Exception:
                log.failure("Closing the key store failed")
            else:
                log.info("Closed the key store")


def _port_of(listener: StreamServerEndpointService) -> Deferred[Any]:
    """The Deferred port of a started listener (Twisted keeps it privately)."""
    waiting = listener._waitingForPort
    assert waiting is not None, "the service has not been started"
    return waiting


def _ports_of(listeners: List[StreamServerEndpointService]) -> Deferred[List[Any]]:
    return gatherResults([_port_of(listener) for listener in listeners], consumeErrors=True)


def _log_port(port: Any, what: str) -> Any:
    address = port.getHost()
    log.info(
        "Listening for {what} on {host}:{port}",
        what=what,
        host=getattr(address, "host", address),
        port=getattr(address, "port", ""),
    )
    return port


async def _stop_all(services: List[IService]) -> None:
    """Stop ``services`` together; a failure is logged, not raised."""
    try:
        await gatherResults([maybeDeferred(s.stopService) for s in services], consumeErrors=True)
    except FirstError as e:
        log.failure("Stopping a service failed", e.subFailure)
