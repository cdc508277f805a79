"""Tests for :mod:`synkeys.federation.ipfilter`."""

from twisted.trial.unittest import SynchronousTestCase

from synkeys.federation.ipfilter import DEFAULT_BLOCKED_RANGES, IPFilter, parse_ranges


class IPFilterTests(SynchronousTestCase):
    """The default blocklist, IPv6 forms and the allow override."""

    def test_public_ipv4_allowed(self) -> None:
        """A public IPv4 address is allowed by default."""
        self.assertTrue(IPFilter().is_allowed("93.184.216.34"))

    def test_private_ipv4_blocked(self) -> None:
        """Loopback, RFC 1918, CGNAT, link-local and test-net IPv4 addresses are blocked."""
        ip_filter = IPFilter()
        for ip in (
            "127.0.0.1",
            "10.0.0.1",
            "172.16.5.4",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "198.18.0.1",
            "224.0.0.1",
            "0.0.0.0",
            "240.0.0.1",
            "255.255.255.255",
        ):
            self.assertFalse(ip_filter.is_allowed(ip), ip)

    def test_edges_of_ranges(self) -> None:
        """Addresses just outside blocked ranges are allowed."""
        ip_filter = IPFilter()
        for ip in ("172.15.255.255", "172.32.0.0", "100.63.255.255", "11.0.0.0"):
            self.assertTrue(ip_filter.is_allowed(ip), ip)

    def test_ipv6(self) -> None:
        """IPv6 loopback, link-local, ULA, documentation and multicast are blocked; global is not."""
        ip_filter = IPFilter()
        for ip in ("::1", "fe80::1", "fd00::1", "2001:db8::1", "ff02::1", "fec0::1", "::"):
            self.assertFalse(ip_filter.is_allowed(ip), ip)
        self.assertTrue(ip_filter.is_allowed("2a00:1450:4001:80b::200e"))

    def test_ipv6_with_scope(self) -> None:
        """A link-local address with a zone id is still blocked."""
        self.assertFalse(IPFilter().is_allowed("fe80::1%eth0"))

    def test_mapped_ipv4(self) -> None:
        """IPv4-mapped IPv6 addresses are judged by their IPv4 form."""
        ip_filter = IPFilter()
        self.assertFalse(ip_filter.is_allowed("::ffff:127.0.0.1"))
        self.assertFalse(ip_filter.is_allowed("::ffff:10.1.2.3"))
        self.assertTrue(ip_filter.is_allowed("::ffff:93.184.216.34"))

    def test_nat64_and_6to4(self) -> None:
        """NAT64 and 6to4 addresses embedding a blocked IPv4 address are blocked."""
        ip_filter = IPFilter()
        self.assertFalse(ip_filter.is_allowed("64:ff9b::7f00:1"))
        self.assertFalse(ip_filter.is_allowed("2002:0a00:0001::1"))
        self.assertTrue(ip_filter.is_allowed("64:ff9b::5db8:d822"))

    def test_allow_overrides(self) -> None:
        """An allowed range wins over the blocklist, for plain and mapped forms."""
        ip_filter = IPFilter(allowed=["127.0.0.0/8"])
        self.assertTrue(ip_filter.is_allowed("127.0.0.1"))
        self.assertTrue(ip_filter.is_allowed("::ffff:127.0.0.1"))
        self.assertFalse(ip_filter.is_allowed("10.0.0.1"))

    def test_unspecified_always_blocked(self) -> None:
        """0.0.0.0 and :: stay blocked even when allowed or with an empty blocklist."""
        ip_filter = IPFilter(blocked=[], allowed=["0.0.0.0/0", "::/0"])
        self.assertFalse(ip_filter.is_allowed("0.0.0.0"))
        self.assertFalse(ip_filter.is_allowed("::"))
        self.assertTrue(ip_filter.is_allowed("10.0.0.1"))

    def test_custom_blocklist(self) -> None:
        """A given blocklist replaces the default one."""
        ip_filter = IPFilter(blocked=["93.184.0.0/16"])
        self.assertFalse(ip_filter.is_allowed("93.184.216.34"))
        self.assertTrue(ip_filter.is_allowed("10.0.0.1"))

    def test_not_an_address(self) -> None:
        """Text that is not an IP address is refused."""
        self.assertFalse(IPFilter().is_allowed("example.com"))
        self.assertFalse(IPFilter(blocked=[]).is_allowed(""))

    def test_bad_cidr(self) -> None:
        """An unparseable range raises ValueError naming it."""
        with self.assertRaises(ValueError) as cm:
            IPFilter(allowed=["10.0.0.0/33"])
        self.assertIn("10.0.0.0/33", str(cm.exception))
        self.assertIn("allowed IP range", str(cm.exception))
        with self.assertRaises(ValueError):
            IPFilter(blocked=["not-a-range"])

    def test_host_bits_and_bare_address(self) -> None:
        """Host bits are masked and a bare address is a single host."""
        networks = parse_ranges(["10.1.2.3/8", "192.0.2.7"])
        self.assertEqual([str(n) for n in networks], ["10.0.0.0/8", "192.0.2.7/32"])

    def test_defaults_parse(self) -> None:
        """Every default range parses and the default filter exposes them."""
        self.assertEqual(len(IPFilter().blocked), len(DEFAULT_BLOCKED_RANGES))
