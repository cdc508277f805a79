"""
Connecting to a federation peer: resolve the host ourselves, refuse
addresses the :class:`~synkeys.federation.ipfilter.IPFilter` blocks, then
TCP to an allowed address and TLS on top.

Resolving here rather than inside ``HostnameEndpoint`` is what makes the
filter sound: the address checked is the address connected to, so a DNS
answer cannot change between the check and the connection.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectError, ConnectingCancelledError
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorTCP,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from zope.interface import implementer

from synkeys.errors import FetchError
from synkeys.federation.ipfilter import IPFilter
from synkeys.federation.resolver import cancel_resolution

log = Logger()


def is_ip_literal(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address (no brackets)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@implementer(IResolutionReceiver)
class _Collector:
    def __init__(self, done: Deferred[list[str]]) -> None:
        self._done = done
        self._addresses: list[str] = []
        self.resolution: IHostResolution | None = None

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:  # noqa: N803
        self.resolution = resolutionInProgress

    def addressResolved(self, address: IAddress) -> None:
        if isinstance(address, (IPv4Address, IPv6Address)):
            self._addresses.append(address.host)

    def resolutionComplete(self) -> None:
        if not self._done.called:
            self._done.callback(self._addresses)


def resolve_host(resolver: IHostnameResolver, host: str, port: int) -> Deferred[list[str]]:
    """
    The IPv4 and IPv6 addresses of ``host`` (possibly none), in the
    resolver's order. Cancelling stops waiting (and cancels the
    resolution where the resolver supports it).
    """

    def cancel(d: Deferred[list[str]]) -> None:
        if collector.resolution is not None:
            cancel_resolution(collector.resolution)

    done: Deferred[list[str]] = Deferred(cancel)
    collector = _Collector(done)
    resolver.resolveHostName(
        collector,
        host,
        port,
        addressTypes=[IPv4Address, IPv6Address],
        transportSemantics="TCP",
    )
    return done


@implementer(IStreamClientEndpoint)
class FilteringTLSEndpoint:
    """
    A TLS client endpoint that connects only to addresses ``ip_filter``
    allows, trying each allowed address of ``host`` in turn until one
    accepts a TCP connection.

    Errbacks with :class:`FetchError` of kind ``"dns"`` (no address),
    ``"blocked"`` (every address blocked; the message names them) or
    ``"connect"`` (no allowed address accepted a connection).

    :param reactor: Provides TCP and time.
    :param resolver: Resolves host names.
    :param ip_filter: Which addresses may be reached.
    :param server_name: The server being fetched from, for errors.
    :param host: Host name or IP literal to connect to.
    :param port: TCP port.
    :param creator: Makes the TLS connection (and verifies the peer).
    :param connect_timeout_s: Bound on each TCP connection attempt.
    """

    def __init__(
        self,
        reactor: IReactorTCP,
        resolver: IHostnameResolver,
        ip_filter: IPFilter,
        server_name: str,
        host: str,
        port: int,
        creator: IOpenSSLClientConnectionCreator,
        connect_timeout_s: float,
    ) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._ip_filter = ip_filter
        self._server_name = server_name
        self._host = host
        self._port = port
        self._creator = creator
        self._connect_timeout_s = connect_timeout_s

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:  # noqa: N803
        """Connect ``protocolFactory``'s protocol over TLS to an allowed address."""
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _addresses(self) -> list[str]:
        if is_ip_literal(self._host):
            return [self._host]
        # A resolver reports failure as "no addresses", never as an error.
        addresses = await resolve_host(self._resolver, self._host, self._port)
        if not addresses:
            raise FetchError(self._server_name, f"{self._host} has no address", "dns")
        return addresses

    async def _connect(self, protocolFactory: IProtocolFactory) -> IProtocol:  # noqa: N803
        addresses = await self._addresses()
        allowed = [a for a in addresses if self._ip_filter.is_allowed(a)]
        if not allowed:
            blocked = ", ".join(addresses)
            log.info(
                "refusing to connect to {server} at blocked address {addresses}",
                server=self._server_name,
                addresses=blocked,
            )
            raise FetchError(
                self._server_name,
                f"{self._host} is at blocked address {blocked}",
                "blocked",
            )
        errors: list[str] = []
        for address in allowed:
            tcp_class = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
            tcp = tcp_class(self._reactor, address, self._port, timeout=self._connect_timeout_s)
            try:
                return await wrapClientTLS(self._creator, tcp).connect(protocolFactory)
            except (CancelledError, ConnectingCancelledError):
                raise CancelledError() from None
            except ConnectError as e:
                log.info(
                    "connecting to {server} at {address}:{port} failed: {error}",
                    server=self._server_name,
                    address=address,
                    port=self._port,
                    error=e,
                )
                errors.append(f"{address}: {e}")
        raise FetchError(
            self._server_name,
            f"cannot connect to {self._host} port {self._port} ({'; '.join(errors)})",
            "connect",
        )


__all__ = ["FilteringTLSEndpoint", "is_ip_literal", "resolve_host"]
