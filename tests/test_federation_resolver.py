"""Tests for :mod:`synkeys.federation.resolver`: shared host name look-ups."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHostnameResolver, IHostResolution, IResolutionReceiver
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from synkeys.federation.endpoint import resolve_host
from synkeys.federation.resolver import SharedHostResolver
from synkeys.federation.testing import StaticHostnameResolver


@implementer(IHostResolution)
class _Pending:
    def __init__(self, name: str) -> None:
        self.name = name
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@implementer(IHostnameResolver)
class ManualResolver:
    """Records look-ups and lets the test answer them."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, str, int, Any]] = []
        self.pending: list[_Pending] = []

    def resolveHostName(  # noqa: N802
        self,
        resolutionReceiver: IResolutionReceiver,  # noqa: N803
        hostName: str,  # noqa: N803
        portNumber: int = 0,  # noqa: N803
        addressTypes: Any = None,  # noqa: N803
        transportSemantics: str = "TCP",  # noqa: N803
    ) -> IHostResolution:
        resolution = _Pending(hostName)
        self.calls.append((resolutionReceiver, hostName, portNumber, addressTypes))
        self.pending.append(resolution)
        resolutionReceiver.resolutionBegan(resolution)
        return resolution

    def answer(self, index: int, *hosts: str, port: int = 0) -> None:
        receiver = self.calls[index][0]
        for host in hosts:
            kind = IPv6Address if ":" in host else IPv4Address
            receiver.addressResolved(kind("TCP", host, port))

    def complete(self, index: int) -> None:
        self.calls[index][0].resolutionComplete()


@implementer(IResolutionReceiver)
class Receiver:
    def __init__(self) -> None:
        self.resolution: IHostResolution | None = None
        self.addresses: list[Any] = []
        self.complete = False

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:  # noqa: N802, N803
        self.resolution = resolutionInProgress

    def addressResolved(self, address: Any) -> None:  # noqa: N802
        self.addresses.append(address)

    def resolutionComplete(self) -> None:  # noqa: N802
        self.complete = True


class SharedHostResolverTests(SynchronousTestCase):
    """Look-ups in flight are shared; nothing is cached."""

    def setUp(self) -> None:
        self.underlying = ManualResolver()
        self.resolver = SharedHostResolver(self.underlying)

    def test_interface(self) -> None:
        """It is an IHostnameResolver."""
        self.assertTrue(verifyObject(IHostnameResolver, self.resolver))

    def test_concurrent_lookups_share_one_call(self) -> None:
        """Two look-ups of one host while the first is in flight make one call; each gets its port."""
        first, second = Receiver(), Receiver()
        self.resolver.resolveHostName(first, "host.example", 8448)
        self.resolver.resolveHostName(second, "host.example", 443)
        self.assertEqual(len(self.underlying.calls), 1)
        self.assertEqual(self.resolver.in_flight, 1)
        self.assertIsNotNone(second.resolution)
        self.underlying.answer(0, "192.0.2.1", "2001:db8::1", port=8448)
        self.underlying.complete(0)
        self.assertEqual(
            first.addresses,
            [IPv4Address("TCP", "192.0.2.1", 8448), IPv6Address("TCP", "2001:db8::1", 8448)],
        )
        self.assertEqual(
            second.addresses,
            [IPv4Address("TCP", "192.0.2.1", 443), IPv6Address("TCP", "2001:db8::1", 443)],
        )
        self.assertTrue(first.complete and second.complete)
        self.assertEqual(self.resolver.in_flight, 0)

    def test_no_caching(self) -> None:
        """A look-up after the shared one finished asks the resolver again."""
        self.resolver.resolveHostName(Receiver(), "host.example", 1)
        self.underlying.complete(0)
        self.resolver.resolveHostName(Receiver(), "host.example", 1)
        self.assertEqual(len(self.underlying.calls), 2)

    def test_different_names_and_types(self) -> None:
        """Other host names, address types or transports are separate look-ups."""
        self.resolver.resolveHostName(Receiver(), "a.example", 1)
        self.resolver.resolveHostName(Receiver(), "b.example", 1)
        self.resolver.resolveHostName(Receiver(), "a.example", 1, addressTypes=[IPv4Address])
        self.resolver.resolveHostName(Receiver(), "a.example", 1, transportSemantics="UDP")
        self.assertEqual(len(self.underlying.calls), 4)

    def test_joining_late_replays_addresses(self) -> None:
        """A receiver joining after some addresses arrived gets those first."""
        first, late = Receiver(), Receiver()
        self.resolver.resolveHostName(first, "host.example", 1)
        self.underlying.answer(0, "192.0.2.1", port=1)
        self.resolver.resolveHostName(late, "host.example", 2)
        self.assertEqual(late.addresses, [IPv4Address("TCP", "192.0.2.1", 2)])
        self.underlying.answer(0, "192.0.2.2", port=1)
        self.underlying.complete(0)
        self.assertEqual(
            late.addresses,
            [IPv4Address("TCP", "192.0.2.1", 2), IPv4Address("TCP", "192.0.2.2", 2)],
        )

    def test_cancel_one(self) -> None:
        """Cancelling one receiver's share leaves the others and the look-up running."""
        gone, staying = Receiver(), Receiver()
        self.resolver.resolveHostName(gone, "host.example", 1)
        self.resolver.resolveHostName(staying, "host.example", 1)
        assert gone.resolution is not None
        gone.resolution.cancel()
        self.assertFalse(self.underlying.pending[0].cancelled)
        self.underlying.answer(0, "192.0.2.1", port=1)
        self.underlying.complete(0)
        self.assertEqual((gone.addresses, gone.complete), ([], False))
        self.assertEqual(len(staying.addresses), 1)
        self.assertTrue(staying.complete)

    def test_cancel_all(self) -> None:
        """When every receiver has cancelled, the look-up is cancelled and forgotten."""
        receivers = [Receiver(), Receiver()]
        for receiver in receivers:
            self.resolver.resolveHostName(receiver, "host.example", 1)
        for receiver in receivers:
            assert receiver.resolution is not None
            receiver.resolution.cancel()
        self.assertTrue(self.underlying.pending[0].cancelled)
        self.assertEqual(self.resolver.in_flight, 0)
        self.resolver.resolveHostName(Receiver(), "host.example", 1)
        self.assertEqual(len(self.underlying.calls), 2)

    def test_synchronous_resolver(self) -> None:
        """A resolver answering at once works, and leaves nothing in flight."""
        static = StaticHostnameResolver({"host.example": ["192.0.2.7"]})
        resolver = SharedHostResolver(static)
        self.assertEqual(
            self.successResultOf(resolve_host(resolver, "host.example", 8448)), ["192.0.2.7"]
        )
        self.assertEqual(self.successResultOf(resolve_host(resolver, "nowhere.example", 1)), [])
        self.assertEqual(resolver.in_flight, 0)
        self.assertEqual(static.lookups, ["host.example", "nowhere.example"])

    def test_resolve_host_cancel(self) -> None:
        """resolve_host through the shared resolver can be cancelled while others wait."""
        cancelled = resolve_host(self.resolver, "host.example", 1)
        waiting = resolve_host(self.resolver, "host.example", 1)
        cancelled.cancel()
        self.failureResultOf(cancelled)
        self.underlying.answer(0, "192.0.2.1", port=1)
        self.underlying.complete(0)
        self.assertEqual(self.successResultOf(waiting), ["192.0.2.1"])
