"""
Fakes for testing code that uses :mod:`synkeys.federation`: a host name
resolver answering from a dict, and an SRV lookup answering from a dict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from zope.interface import implementer


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        """Nothing to cancel: answers are immediate."""


@implementer(IHostnameResolver)
class StaticHostnameResolver:
    """
    Resolves names from a mapping, synchronously; unknown names have no
    address. Records every name asked in :attr:`lookups`.

    :param hosts: ``name -> [address, ...]``.
    """

    def __init__(self, hosts: Mapping[str, Sequence[str]]) -> None:
        self.hosts: dict[str, list[str]] = {k: list(v) for k, v in hosts.items()}
        self.lookups: list[str] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,  # noqa: N803
        hostName: str,  # noqa: N803
        portNumber: int = 0,  # noqa: N803
        addressTypes: Sequence[type] | None = None,  # noqa: N803
        transportSemantics: str = "TCP",  # noqa: N803
    ) -> IHostResolution:
        """Answer from :attr:`hosts`."""
        self.lookups.append(hostName)
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        for address in self.hosts.get(hostName, []):
            kind = IPv6Address if ":" in address else IPv4Address
            resolutionReceiver.addressResolved(kind("TCP", address, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


class StaticSrvLookup:
    """
    An SRV lookup answering from a mapping of record names to
    ``[(target, port), ...]``; records every name asked in :attr:`lookups`.
    """

    def __init__(self, records: Mapping[str, Sequence[tuple[str, int]]] | None = None) -> None:
        self.records: dict[str, list[tuple[str, int]]] = {
            k: list(v) for k, v in (records or {}).items()
        }
        self.lookups: list[str] = []

    def __call__(self, name: str) -> Deferred[Sequence[tuple[str, int]]]:
        """Look ``name`` up."""
        self.lookups.append(name)
        return succeed(self.records.get(name, []))
