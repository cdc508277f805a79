"""
:class:`SharedHostResolver`: concurrent look-ups of one host name share
one call to the resolver underneath.

A notary or keyring fetching many servers at once often finds several of
them on one host (hosting providers serve many server names from a few
hosts). Twisted's default resolver runs every ``getaddrinfo`` in a thread
of the reactor's pool, and each one costs the reactor thread two
hand-offs; sharing the look-ups that are in flight removes the duplicates.
Nothing is cached: a look-up started after the shared one finished
resolves afresh, so the system resolver's caching and TTLs still apply.
"""

from __future__ import annotations

from collections.abc import Sequence

import attr
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from zope.interface import implementer


@implementer(IHostResolution)
class _Share:
    """One receiver's part in a shared look-up; cancelling it leaves the others waiting."""

    def __init__(self, lookup: _Lookup, receiver: IResolutionReceiver, port: int) -> None:
        self.name = lookup.host
        self.receiver = receiver
        self.port = port
        self._lookup = lookup

    def cancel(self) -> None:
        """Stop waiting; the receiver is told nothing more."""
        self._lookup.leave(self)


@implementer(IResolutionReceiver)
class _Lookup:
    """One look-up in flight and the receivers waiting for it."""

    def __init__(self, resolver: SharedHostResolver, key: tuple[object, ...], host: str) -> None:
        self.host = host
        self._resolver = resolver
        self._key = key
        self._shares: list[_Share] = []
        self._addresses: list[IAddress] = []
        self._resolution: IHostResolution | None = None

    def join(self, receiver: IResolutionReceiver, port: int) -> _Share:
        share = _Share(self, receiver, port)
        self._shares.append(share)
        receiver.resolutionBegan(share)
        for address in self._addresses:
            receiver.addressResolved(_with_port(address, port))
        return share

    def leave(self, share: _Share) -> None:
        if share not in self._shares:
            return
        self._shares.remove(share)
        if not self._shares:
            self._resolver._forget(self._key, self)
            if self._resolution is not None:
                cancel_resolution(self._resolution)

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:  # noqa: N802, N803
        self._resolution = resolutionInProgress

    def addressResolved(self, address: IAddress) -> None:  # noqa: N802
        self._addresses.append(address)
        for share in list(self._shares):
            share.receiver.addressResolved(_with_port(address, share.port))

    def resolutionComplete(self) -> None:  # noqa: N802
        self._resolver._forget(self._key, self)
        shares, self._shares = self._shares, []
        for share in shares:
            share.receiver.resolutionComplete()


def cancel_resolution(resolution: IHostResolution) -> None:
    """
    Cancel ``resolution`` where its resolver supports that: Twisted's
    default resolutions cannot be cancelled, and their look-up then
    finishes unheard, which is harmless.
    """
    try:
        resolution.cancel()
    except NotImplementedError:
        pass


def _with_port(address: IAddress, port: int) -> IAddress:
    """``address`` for ``port``: the look-up was made for another caller's port."""
    if attr.has(type(address)) and getattr(address, "port", port) != port:
        return attr.evolve(address, port=port)  # type: ignore[misc]
    return address


@implementer(IHostnameResolver)
class SharedHostResolver:
    """
    An :class:`IHostnameResolver` that lets look-ups of the same host name
    (with the same address types and transport) made while one is in flight
    wait for that one, each receiving the addresses with its own port.

    :param resolver: Does the look-ups, e.g. ``reactor.nameResolver``.
    """

    def __init__(self, resolver: IHostnameResolver) -> None:
        self._resolver = resolver
        self._lookups: dict[tuple[object, ...], _Lookup] = {}

    @property
    def in_flight(self) -> int:
        """How many look-ups are under way."""
        return len(self._lookups)

    def resolveHostName(  # noqa: N802
        self,
        resolutionReceiver: IResolutionReceiver,  # noqa: N803
        hostName: str,  # noqa: N803
        portNumber: int = 0,  # noqa: N803
        addressTypes: Sequence[type[IAddress]] | None = None,  # noqa: N803
        transportSemantics: str = "TCP",  # noqa: N803
    ) -> IHostResolution:
        """
        See :meth:`IHostnameResolver.resolveHostName`; the resolution
        returned (and given to ``resolutionBegan``) is this receiver's share.
        """
        key = (
            hostName,
            None if addressTypes is None else tuple(addressTypes),
            transportSemantics,
        )
        lookup = self._lookups.get(key)
        if lookup is not None:
            return lookup.join(resolutionReceiver, portNumber)
        lookup = self._lookups[key] = _Lookup(self, key, hostName)
        share = lookup.join(resolutionReceiver, portNumber)
        self._resolver.resolveHostName(
            lookup, hostName, portNumber, addressTypes, transportSemantics
        )
        return share

    def _forget(self, key: tuple[object, ...], lookup: _Lookup) -> None:
        if self._lookups.get(key) is lookup:
            del self._lookups[key]


__all__ = ["SharedHostResolver", "cancel_resolution"]
