"""
Server discovery: from a server name to where to connect, which name the
certificate must be valid for, and what to send as ``Host``.

This follows "Resolving server names" in the server-server API:

1. IP literal: that address, the given port or 8448; certificate for the
   IP; ``Host`` is the server name.
2. Host name with an explicit port: that name and port; certificate and
   ``Host`` for the name (``Host`` with the port).
3. ``GET https://<name>/.well-known/matrix/server``. If it names a
   delegated server, apply to it: IP literal (as 1), explicit port (as 2),
   SRV ``_matrix-fed._tcp.<delegated>``, SRV ``_matrix._tcp.<delegated>``,
   then ``<delegated>:8448``; the certificate and ``Host`` are for the
   delegated name.
4. Otherwise SRV ``_matrix-fed._tcp.<name>``, then ``_matrix._tcp.<name>``,
   then ``<name>:8448``; the certificate and ``Host`` are for the name.

Well-known answers are cached per ``Cache-Control: max-age`` or
``Expires`` (default 24 h, clamped to [5 min, 48 h]). Failures (no answer,
non-200, bad JSON, bad ``m.server``) are cached too, for 5 minutes at
first and twice as long after each further failure, up to an hour.
Redirects are followed, at most :data:`MAX_WELL_KNOWN_REDIRECTS` of them
and only to ``https`` URLs; each hop goes through the same address
filter and certificate checks as any federation request.

SRV targets are ordered by priority, then by weight (heaviest first); the
first is used. RFC 2782's weighted random choice is left out on purpose:
determinism makes failures reproducible, and Matrix deployments rarely
publish more than one target.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import re
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import urljoin

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from synkeys.errors import FetchError, InvalidServerName
from synkeys.interfaces import FederationResponse
from synkeys.servername import parse_server_name

log = Logger()

#: The port used when nothing names one.
DEFAULT_FEDERATION_PORT = 8448
#: Well-known cache lifetime when the response says nothing.
WELL_KNOWN_DEFAULT_TTL_S = 24 * 3600.0
#: Longest well-known cache lifetime, whatever the response says.
WELL_KNOWN_MAX_TTL_S = 48 * 3600.0
#: Shortest well-known cache lifetime, so ``max-age=0`` cannot make every
#: request refetch it.
WELL_KNOWN_MIN_TTL_S = 300.0
#: How long a first well-known failure is cached; doubled per repeat.
WELL_KNOWN_FAILURE_TTL_S = 300.0
#: Longest a well-known failure is cached.
WELL_KNOWN_MAX_FAILURE_TTL_S = 3600.0
#: Largest well-known body accepted.
WELL_KNOWN_MAX_BYTES = 50 * 1024
#: Redirects followed when fetching a well-known file.
MAX_WELL_KNOWN_REDIRECTS = 3
#: Well-known cache entries kept; the oldest are dropped beyond this.
WELL_KNOWN_CACHE_SIZE = 10000

#: ``srv_lookup(name)``: the ``(target, port)`` pairs of the SRV records of
#: ``name`` (e.g. ``_matrix-fed._tcp.example.com``) in the order to try
#: them; empty when there are none.
SrvLookup = Callable[[str], "Deferred[Sequence[tuple[str, int]]]"]
#: ``well_known_get(url)``: GET one ``https`` URL without following
#: redirects; errbacks (e.g. with :class:`FetchError`) when no response.
WellKnownGet = Callable[[bytes], "Deferred[FederationResponse]"]

_MAX_AGE = re.compile(r"^\s*max-age\s*=\s*\"?([0-9]{1,12})\"?\s*$", re.IGNORECASE)


class InvalidWellKnown(ValueError):
    """A well-known response does not delegate validly."""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ResolvedServer:
    """
    Where and how to reach a server.

    :ivar host: Host name or IP address (no brackets) to connect to.
    :ivar port: TCP port.
    :ivar tls_server_name: Name (or IP) the certificate must be valid for.
    :ivar host_header: Value of the ``Host`` header.
    """

    host: str
    port: int
    tls_server_name: str
    host_header: str


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _WellKnownEntry:
    delegated: str | None
    expires_s: float
    failures: int = 0


def cache_ttl_s(headers: Mapping[bytes, Sequence[bytes]], now_s: float) -> float:
    """
    How long to cache a well-known answer with these (lower-cased)
    headers: ``max-age`` wins over ``Expires``; ``no-store``/``no-cache``
    and past dates give the minimum; the result is clamped to
    [:data:`WELL_KNOWN_MIN_TTL_S`, :data:`WELL_KNOWN_MAX_TTL_S`].
    """
    ttl_s: float | None = None
    for value in headers.get(b"cache-control", ()):
        for directive in value.decode("latin-1").split(","):
            token = directive.strip().lower()
            if token in ("no-store", "no-cache"):
                return WELL_KNOWN_MIN_TTL_S
            match = _MAX_AGE.match(directive)
            if match:
                ttl_s = float(match.group(1))
    if ttl_s is None:
        for value in headers.get(b"expires", ()):
            try:
                expires = email.utils.parsedate_to_datetime(value.decode("latin-1"))
            except (TypeError, ValueError, IndexError):
                ttl_s = 0.0
                continue
            if expires.tzinfo is None:
                expires = expires.replace(tzinfo=datetime.timezone.utc)
            ttl_s = expires.timestamp() - now_s
    if ttl_s is None:
        ttl_s = WELL_KNOWN_DEFAULT_TTL_S
    return min(max(ttl_s, WELL_KNOWN_MIN_TTL_S), WELL_KNOWN_MAX_TTL_S)


def parse_well_known(body: bytes) -> str:
    """
    The delegated server name from a well-known body.

    :raises ValueError: when the body is not a JSON object whose
        ``m.server`` is a valid server name.
    """
    if len(body) > WELL_KNOWN_MAX_BYTES:
        raise ValueError("well-known response is too large")
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"well-known response is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise InvalidWellKnown("well-known response is not a JSON object")
    delegated = value.get("m.server")
    if not isinstance(delegated, str):
        raise InvalidWellKnown("well-known response has no string m.server")
    try:
        parse_server_name(delegated)
    except InvalidServerName as e:
        raise ValueError(f"well-known m.server is invalid: {e}") from None
    return delegated


class ServerDiscovery:
    """
    Resolves server names as the spec says, caching well-known answers.

    :param clock: Time source for the cache.
    :param well_known_get: Fetches one ``https`` URL (see
        :data:`WellKnownGet`); in production
        :meth:`synkeys.federation.client.FederationClient.fetch_url`.
    :param srv_lookup: Looks up SRV records (see :data:`SrvLookup`).
    """

    def __init__(
        self,
        clock: IReactorTime,
        well_known_get: WellKnownGet,
        srv_lookup: SrvLookup,
    ) -> None:
        self._clock = clock
        self._well_known_get = well_known_get
        self._srv_lookup = srv_lookup
        self._cache: dict[str, _WellKnownEntry] = {}
        self._waiters: dict[str, list[Deferred[str | None]]] = {}

    def resolve(self, server_name: str) -> Deferred[ResolvedServer]:
        """
        Where to reach ``server_name``.

        :raises FetchError: (as the Deferred's failure) with kind ``"dns"``
            when ``server_name`` is not a valid server name.
        """
        return Deferred.fromCoroutine(self._resolve(server_name))

    async def _resolve(self, server_name: str) -> ResolvedServer:
        try:
            parsed = parse_server_name(server_name)
        except InvalidServerName as e:
            raise FetchError(server_name, f"invalid server name: {e}", "dns") from None
        if parsed.is_ip or parsed.port is not None:
            return _direct(server_name)
        delegated = await self.well_known(parsed.host)
        if delegated is not None:
            log.debug(
                "{server} delegates to {delegated}",
                server=server_name,
                delegated=delegated,
            )
            parsed_delegated = parse_server_name(delegated)
            if parsed_delegated.is_ip or parsed_delegated.port is not None:
                return _direct(delegated)
            return await self._srv_or_default(parsed_delegated.host)
        return await self._srv_or_default(parsed.host)

    async def _srv_or_default(self, hostname: str) -> ResolvedServer:
        for service in ("_matrix-fed._tcp", "_matrix._tcp"):
            targets = await self._lookup_srv(f"{service}.{hostname}")
            if targets:
                target, port = targets[0]
                return ResolvedServer(target, port, hostname, hostname)
        return ResolvedServer(hostname, DEFAULT_FEDERATION_PORT, hostname, hostname)

    async def _lookup_srv(self, name: str) -> Sequence[tuple[str, int]]:
        try:
            targets = await self._srv_lookup(name)
        except Exception as e:  # noqa: BLE001
            # Any failed lookup (timeout, SERVFAIL) is treated as "no records";
            # the fallback to port 8448 still has to pass certificate checks.
            log.info("SRV lookup of {name} failed: {error}", name=name, error=e)
            return ()
        return [(t.rstrip("."), p) for t, p in targets if t not in ("", ".") and 0 < p < 65536]

    def well_known(self, hostname: str) -> Deferred[str | None]:
        """
        The server name ``hostname`` delegates to by well-known, or
        ``None`` (no or invalid delegation). Never errbacks except when
        cancelled; concurrent callers share one fetch, and cancelling one
        caller's Deferred does not cancel the fetch.
        """
        now_s = self._clock.seconds()
        entry = self._cache.get(hostname)
        if entry is not None and entry.expires_s > now_s:
            return succeed(entry.delegated)
        waiter: Deferred[str | None] = Deferred()
        waiters = self._waiters.get(hostname)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._waiters[hostname] = [waiter]
        fetch = Deferred.fromCoroutine(self._fetch_well_known(hostname, entry))
        fetch.addBoth(self._deliver, hostname)
        return waiter

    def _deliver(self, result: object, hostname: str) -> None:
        delegated: str | None = None
        if isinstance(result, Failure):
            log.failure("well-known lookup of {hostname} failed", result, hostname=hostname)
        else:
            delegated = result  # type: ignore[assignment]
        for waiter in self._waiters.pop(hostname, []):
            if not waiter.called:
                waiter.callback(delegated)

    async def _fetch_well_known(
        self, hostname: str, previous: _WellKnownEntry | None
    ) -> str | None:
        url = b"https://" + hostname.encode("ascii") + b"/.well-known/matrix/server"
        try:
            delegated, ttl_s = await self._get_following_redirects(url)
        except (FetchError, ValueError) as e:
            failures = min(previous.failures + 1, 32) if previous is not None else 1
            ttl_s = min(
                WELL_KNOWN_FAILURE_TTL_S * 2 ** (failures - 1),
                WELL_KNOWN_MAX_FAILURE_TTL_S,
            )
            log.info(
                "no well-known delegation for {hostname} ({error}); retry in {ttl_s}s",
                hostname=hostname,
                error=e,
                ttl_s=ttl_s,
            )
            self._store(hostname, _WellKnownEntry(None, self._clock.seconds() + ttl_s, failures))
            return None
        self._store(hostname, _WellKnownEntry(delegated, self._clock.seconds() + ttl_s))
        return delegated

    async def _get_following_redirects(self, url: bytes) -> tuple[str, float]:
        for _ in range(MAX_WELL_KNOWN_REDIRECTS + 1):
            response = await self._well_known_get(url)
            if 300 <= response.code < 400:
                locations = response.headers.get(b"location", [])
                if not locations:
                    raise ValueError(f"redirect {response.code} without Location")
                url = urljoin(url.decode("ascii"), locations[0].decode("ascii")).encode("ascii")
                if not url.startswith(b"https://"):
                    raise ValueError(f"refusing to follow a redirect to {url!r}")
                continue
            if response.code != 200:
                raise ValueError(f"well-known answered HTTP {response.code}")
            delegated = parse_well_known(response.body)
            return delegated, cache_ttl_s(response.headers, self._clock.seconds())
        raise ValueError(f"more than {MAX_WELL_KNOWN_REDIRECTS} redirects")

    def _store(self, hostname: str, entry: _WellKnownEntry) -> None:
        self._cache.pop(hostname, None)
        self._cache[hostname] = entry
        while len(self._cache) > WELL_KNOWN_CACHE_SIZE:
            del self._cache[next(iter(self._cache))]


def _direct(server_name: str) -> ResolvedServer:
    """Steps 1 and 2 (and 3.1, 3.2): an IP literal or a name with a port."""
    parsed = parse_server_name(server_name)
    port = parsed.port if parsed.port is not None else DEFAULT_FEDERATION_PORT
    return ResolvedServer(parsed.host, port, parsed.host, server_name)


def make_srv_lookup(reactor: object, resolver: object = None) -> SrvLookup:
    """
    An :data:`SrvLookup` using ``twisted.names``; its caching resolver
    (reading ``/etc/resolv.conf``) is created on first use, with
    ``reactor`` (``client.createResolver`` would use the global one).
    NXDOMAIN and "no records" give an empty list.

    :param resolver: An ``IResolver`` to use instead (for tests).
    """
    resolvers: list[object] = [] if resolver is None else [resolver]

    async def lookup(name: str) -> Sequence[tuple[str, int]]:
        from twisted.names import cache, client, dns, error, resolve

        if not resolvers:
            resolvers.append(
                resolve.ResolverChain(
                    [
                        cache.CacheResolver(reactor=reactor),
                        client.Resolver(resolv="/etc/resolv.conf", reactor=reactor),
                    ]
                )
            )
        try:
            answers, _, _ = await resolvers[0].lookupService(name)  # type: ignore[attr-defined]
        except (error.DNSNameError, error.DomainError):
            return []
        records = [a.payload for a in answers if a.type == dns.SRV]
        records.sort(key=lambda r: (r.priority, -r.weight))
        return [(str(r.target), r.port) for r in records]

    def srv_lookup(name: str) -> Deferred[Sequence[tuple[str, int]]]:
        return Deferred.fromCoroutine(lookup(name))

    return srv_lookup
