"""
Talking to other Matrix servers: server discovery (well-known, SRV), an
IP blocklist, CA-verified TLS and :class:`FederationClient`, the
:class:`~synkeys.interfaces.IFederationClient` the fetchers use.
"""

from synkeys.federation.client import FederationClient
from synkeys.federation.discovery import ResolvedServer, ServerDiscovery
from synkeys.federation.ipfilter import DEFAULT_BLOCKED_RANGES, IPFilter
from synkeys.federation.tls import FederationTLSPolicy

__all__ = [
    "DEFAULT_BLOCKED_RANGES",
    "FederationClient",
    "FederationTLSPolicy",
    "IPFilter",
    "ResolvedServer",
    "ServerDiscovery",
]
