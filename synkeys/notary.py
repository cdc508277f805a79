"""
The notary: answers ``/_matrix/key/v2/query`` from the cache, fetching
origins through the keyring when :mod:`synkeys.freshness` says so, and
countersigns what it relays.

Countersigned bytes are cached (ed25519 signatures are deterministic), so
a warm query costs no signing and no JSON encoding.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Set

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from synkeys.freshness import Decision, OriginState, clamp_minimum_valid_until, decide
from synkeys.interfaces import FetchResult, IKeyStore, KeyRequests
from synkeys.keyfile import SigningKey
from synkeys.keys import ServerKeys
from synkeys.keyserver import KeyPublisher
from synkeys.query import Query, ServerQuery
from synkeys.signing import JsonDict, canonical_json, sign_json

#: How many countersigned responses are kept as bytes.
DEFAULT_COUNTERSIGN_CACHE_SIZE = 50_000
#: How many origins' fetch states are remembered.
MAX_ORIGIN_STATES = 100_000


class KeySource(Protocol):
    """What the notary fetches through: a :class:`synkeys.keyring.Keyring`."""

    def fetch_server_keys(self, requests: KeyRequests) -> Deferred[FetchResult]:
        """Fetch, write to the store, and fire with what was found."""


def _fan_out(shared: Deferred[object]) -> Deferred[object]:
    """
    A Deferred of its own that fires with ``shared``'s result, so that a
    waiter's cancellation does not cancel the shared work.
    """
    mine: Deferred[object] = Deferred()

    def relay(result: object) -> object:
        if not mine.called:
            mine.callback(result)
        return result

    shared.addBoth(relay)
    return mine


class Notary:
    """
    Answers notary queries.

    :param store: The cache of origin responses.
    :param keyring: Fetches origins (directly or through upstream notaries)
        and writes what it finds to ``store``; its fetchers must not include
        a store fetcher, since this notary applies its own freshness rules.
    :param clock: Where time comes from.
    :param server_name: This notary's name, which it signs as.
    :param signing_keys: The keys it countersigns with.
    :param local_publisher: This server's own keys, answered without any
        fetch when a query names this server.
    """

    log = Logger()

    def __init__(
        self,
        store: IKeyStore,
        keyring: KeySource,
        clock: IReactorTime,
        *,
        server_name: str,
        signing_keys: Sequence[SigningKey],
        local_publisher: Optional[KeyPublisher] = None,
        countersign_cache_size: int = DEFAULT_COUNTERSIGN_CACHE_SIZE,
    ) -> None:
        self._store = store
        self._keyring = keyring
        self._clock = clock
        self.server_name = server_name
        self._signing_keys = list(signing_keys)
        self._publisher = local_publisher
        self._countersigned: OrderedDict[bytes, bytes] = OrderedDict()
        self._countersign_cache_size = countersign_cache_size
        self._states: OrderedDict[str, OriginState] = OrderedDict()
        self._inflight: Dict[str, Deferred[object]] = {}
        #: Counters by name, for tests and metrics.
        self.counters: Dict[str, int] = {}

    # -- public --------------------------------------------------------

    def query(self, query: Query) -> Deferred[bytes]:
        """
        Answer a parsed query with the body ``{"server_keys": [...]}`` as
        bytes: every cached response that matches, fetched first where the
        cache is missing or stale, each countersigned.
        """
        return Deferred.fromCoroutine(self._query(query))

    async def evict(self, server_name: str) -> int:
        """
        Forget every cached key of ``server_name`` (after a legitimate
        re-key); returns how many rows were removed.
        """
        removed = await self._store.evict_server(server_name)
        self._states.pop(server_name, None)
        self.log.info("Evicted {count} cached keys of {server}", count=removed, server=server_name)
        return removed

    # -- inside --------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def _state(self, server_name: str) -> OriginState:
        return self._states.get(server_name) or OriginState(tokens_ts=self._now_ms())

    def _set_state(self, server_name: str, state: OriginState) -> None:
        self._states[server_name] = state
        self._states.move_to_end(server_name)
        while len(self._states) > MAX_ORIGIN_STATES:
            self._states.popitem(last=False)

    async def _query(self, query: Query) -> bytes:
        parts: List[bytes] = []
        remote = {s: q for s, q in query.items() if s != self.server_name}
        if self._publisher is not None and self.server_name in query:
            parts.append(self._local_part())
        if remote:
            lookups = {s: (sorted(q.key_ids) if q.key_ids else None) for s, q in remote.items()}
            cached = await self._store.get_server_keys(lookups)
            refetch = self._plan(remote, cached)
            if refetch:
                await self._fetch(refetch)
                again = await self._store.get_server_keys(
                    {s: lookups[s] for s in refetch}
                )
                cached = {**cached, **again}
            for server_name, server_query in remote.items():
                responses = _select(cached.get(server_name, {}), server_query)
                if responses:
                    self._count("answered_servers")
                parts.extend(self._countersign(keys) for keys in responses)
        return b'{"server_keys":[' + b",".join(parts) + b"]}"

    def _plan(
        self, remote: Mapping[str, ServerQuery], cached: Mapping[str, Mapping[str, ServerKeys]]
    ) -> Dict[str, Dict[str, int]]:
        """Which servers to fetch now, as keyring requests."""
        now_ms = self._now_ms()
        refetch: Dict[str, Dict[str, int]] = {}
        for server_name, server_query in remote.items():
            rows = cached.get(server_name, {})
            responses = _distinct(rows.values())
            minimum = clamp_minimum_valid_until(server_query.minimum_valid_until_ts, now_ms)
            state = self._state(server_name)
            decision = decide(state, responses, server_query.key_ids, minimum, now_ms)
            self._count("decision_" + decision)
            if decision == Decision.FORCED:
                taken = state.take_token(now_ms)
                assert taken is not None
                self._set_state(server_name, taken)
            if decision in (Decision.DUE, Decision.FORCED):
                wanted = server_query.key_ids or (
                    frozenset(rows) if responses else frozenset()
                )
                refetch[server_name] = {key_id: minimum for key_id in sorted(wanted)}
            elif decision != Decision.CACHED:
                self.log.debug(
                    "Not fetching {server}: {reason}", server=server_name, reason=decision
                )
        return refetch

    async def _fetch(self, requests: Dict[str, Dict[str, int]]) -> None:
        """Fetch ``requests``, joining fetches of the same origins under way."""
        waits: List[Deferred[object]] = []
        new: Dict[str, Dict[str, int]] = {}
        for server_name, wanted in requests.items():
            shared = self._inflight.get(server_name)
            if shared is not None:
                self._count("fetch_joined")
                waits.append(_fan_out(shared))
            else:
                new[server_name] = wanted
        if new:
            shared = self._keyring.fetch_server_keys(new)
            shared.addCallback(self._fetched, sorted(new))
            shared.addErrback(self._fetch_crashed, sorted(new))
            for server_name in new:
                self._inflight[server_name] = shared  # type: ignore[assignment]
            waits.append(_fan_out(shared))  # type: ignore[arg-type]
        for wait in waits:
            await wait

    def _fetched(self, result: FetchResult, servers: Iterable[str]) -> FetchResult:
        now_ms = self._now_ms()
        for server_name in servers:
            self._inflight.pop(server_name, None)
            state = self._state(server_name)
            if result.responses.get(server_name):
                self._set_state(server_name, state.succeeded(now_ms))
                self._count("fetch_ok")
            else:
                reason = result.failures.get(server_name, "no response")
                self._set_state(server_name, state.failed(now_ms))
                self._count("fetch_failed")
                self.log.warn(
                    "Fetching keys of {server} failed: {reason}", server=server_name, reason=reason
                )
        return result

    def _fetch_crashed(self, failure: object, servers: Iterable[str]) -> None:
        for server_name in servers:
            self._inflight.pop(server_name, None)
            self._set_state(server_name, self._state(server_name).failed(self._now_ms()))
        self.log.failure("Fetching keys crashed", failure)  # type: ignore[arg-type]
        return None

    def _countersign(self, keys: ServerKeys) -> bytes:
        signed = self._countersigned.get(keys.raw)
        if signed is not None:
            self._countersigned.move_to_end(keys.raw)
            self._count("countersign_cache_hit")
            return signed
        obj: JsonDict = dict(keys.json)
        for key in self._signing_keys:
            obj = sign_json(obj, self.server_name, key.key_id, key.key)
        signed = canonical_json(obj)
        self._countersigned[keys.raw] = signed
        while len(self._countersigned) > self._countersign_cache_size:
            self._countersigned.popitem(last=False)
        self._count("countersigned")
        return signed

    def _local_part(self) -> bytes:
        assert self._publisher is not None
        own = self._publisher.json()
        own_key_ids = {key.key_id for key in self._publisher.signing_keys}
        if all(key.key_id in own_key_ids for key in self._signing_keys):
            return self._publisher.body()
        obj: JsonDict = dict(own)
        for key in self._signing_keys:
            obj = sign_json(obj, self.server_name, key.key_id, key.key)
        return canonical_json(obj)


def _distinct(responses: Iterable[ServerKeys]) -> List[ServerKeys]:
    seen: Set[ServerKeys] = set()
    result = []
    for keys in responses:
        if keys not in seen:
            seen.add(keys)
            result.append(keys)
    return result


def _select(rows: Mapping[str, ServerKeys], server_query: ServerQuery) -> List[ServerKeys]:
    """The distinct responses answering ``server_query``, newest first."""
    if server_query.key_ids is None:
        chosen: Iterable[ServerKeys] = rows.values()
    else:
        chosen = (rows[k] for k in sorted(server_query.key_ids) if k in rows)
    return sorted(_distinct(chosen), key=lambda k: (-k.fetched_ts, -k.valid_until_ts))
