"""
Which IP addresses outgoing federation traffic may reach.

The notary fetches from any server name a client gives it, so without a
filter it could be aimed at the operator's own network (SSRF). The default
blocklist is Synapse's ``ip_range_blacklist`` default plus a few ranges
that are never public; operators open holes with ``--allow-ip-range``
(Synapse's ``ip_range_whitelist``), which wins over the blocklist.

Addresses that embed an IPv4 address (IPv4-mapped ``::ffff:0:0/96``,
NAT64 ``64:ff9b::/96`` and 6to4 ``2002::/16``) are checked in their IPv4
form as well, so ``::ffff:127.0.0.1`` is as blocked as ``127.0.0.1``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Ranges blocked unless ``blocked`` is given: Synapse's defaults plus
#: "this network", the reserved class E range and the limited broadcast.
DEFAULT_BLOCKED_RANGES: tuple[str, ...] = (
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "192.0.0.0/24",
    "169.254.0.0/16",
    "192.88.99.0/24",
    "198.18.0.0/15",
    "192.0.2.0/24",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "0.0.0.0/8",
    "240.0.0.0/4",
    "255.255.255.255/32",
    "::1/128",
    "fe80::/10",
    "fc00::/7",
    "2001:db8::/32",
    "ff00::/8",
    "fec0::/10",
    "::/128",
)

#: Ranges blocked whatever ``blocked`` and ``allowed`` say: nothing
#: legitimate lives at the unspecified addresses, and connecting to them
#: reaches the local host on most systems.
ALWAYS_BLOCKED_RANGES: tuple[str, ...] = ("0.0.0.0/8", "::/128")

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def parse_ranges(ranges: Iterable[str], what: str = "IP range") -> list[IPNetwork]:
    """
    Parse CIDR strings (a bare address means a single host).

    Host bits are allowed (``10.1.2.3/8`` means ``10.0.0.0/8``).

    :param what: Names the setting in error messages.
    :raises ValueError: naming the first string that is not a range.
    """
    networks: list[IPNetwork] = []
    for text in ranges:
        if not isinstance(text, str):
            raise TypeError(f"invalid {what} {text!r}: expected a CIDR string")
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError as e:
            raise ValueError(
                f"invalid {what} {text!r}: expected CIDR such as 10.0.0.0/8 or fc00::/7 ({e})"
            ) from None
    return networks


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


class IPFilter:
    """
    Decides whether an IP address may be connected to.

    An address is allowed when it is in an ``allowed`` range, or else when
    it is in no ``blocked`` range; :data:`ALWAYS_BLOCKED_RANGES` are refused
    in any case.

    :param blocked: CIDR ranges to refuse; defaults to
        :data:`DEFAULT_BLOCKED_RANGES`.
    :param allowed: CIDR ranges to permit even when blocked.
    :raises ValueError: when a range does not parse.
    """

    def __init__(
        self,
        blocked: Iterable[str] | None = None,
        allowed: Iterable[str] = (),
    ) -> None:
        self._blocked = parse_ranges(
            DEFAULT_BLOCKED_RANGES if blocked is None else blocked, "blocked IP range"
        )
        self._allowed = parse_ranges(allowed, "allowed IP range")
        self._always = parse_ranges(ALWAYS_BLOCKED_RANGES)

    @property
    def blocked(self) -> Sequence[IPNetwork]:
        """The blocked ranges."""
        return tuple(self._blocked)

    @property
    def allowed(self) -> Sequence[IPNetwork]:
        """The allowed ranges that override the blocklist."""
        return tuple(self._allowed)

    def is_allowed(self, ip: str) -> bool:
        """
        Whether ``ip`` (an IPv4 or IPv6 address, optionally with a
        ``%zone``) may be connected to. Text that is not an address is
        refused.
        """
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        forms: list[IPAddress] = [address]
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            forms.append(embedded)
        if any(_in(form, self._always) for form in forms):
            return False
        if any(_in(form, self._allowed) for form in forms):
            return True
        return not any(_in(form, self._blocked) for form in forms)


def _in(address: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    # Drop an IPv6 scope id: fe80::1%eth0 is still in fe80::/10.
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        address = ipaddress.IPv6Address(int(address))
    return any(address.version == network.version and address in network for network in networks)
