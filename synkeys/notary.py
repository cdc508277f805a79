"""
The notary: answers ``/_matrix/key/v2/query`` from the cache, fetching
origins through the keyring when :mod:`synkeys.freshness` says so, and
countersigns what it relays.

One query, in order: read every cached row of the servers asked for;
decide per server whether to fetch (fresh, due, forced by
``minimum_valid_until_ts``, backing off, or out of forced-refetch budget);
fetch the servers that need it in one keyring call, joining fetches of the
same origins already under way; read the store again; answer the cached
responses for the key ids asked for, each countersigned.

What an origin sends is checked by the fetchers and written by the keyring
one row per key id, so a rejected answer never touches the cache, a key the
origin stops listing is still served, and a key id is never rebound to
other key bytes: a response that tries is logged, counted as
``rebound_key_ids``, and never countersigned, not even for the other key
ids it lists, until an operator evicts the server (:meth:`Notary.evict`).

Countersigned bytes are cached (ed25519 signatures are deterministic), so
a warm query costs no signing and no JSON encoding.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, FrozenSet, Iterable, List, Mapping, Optional, Protocol, Sequence, Set

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from synkeys.freshness import Decision, OriginState, clamp_minimum_valid_until, decide
from synkeys.interfaces import FetchResult, IKeyStore, KeyRequests
from synkeys.keyfile import SigningKey
from synkeys.keys import ServerKeys
from synkeys.keyserver import KeyPublisher
from synkeys.query import Query, ServerQuery
from synkeys.signing import JsonDict, canonical_json, encode_b64, sign_json

__all__ = ["DEFAULT_COUNTERSIGN_CACHE_SIZE", "KeySource", "Notary"]

#: How many countersigned responses are kept as bytes.
DEFAULT_COUNTERSIGN_CACHE_SIZE = 50_000
#: How many origins' fetch states are remembered.
MAX_ORIGIN_STATES = 100_000

#: ``server_name -> {key_id: ServerKeys}``, as the store answers.
_Rows = Mapping[str, Mapping[str, ServerKeys]]


class KeySource(Protocol):
    """What the notary fetches through: a :class:`synkeys.keyring.Keyring`."""

    def fetch_server_keys(self, requests: KeyRequests) -> Deferred[FetchResult]:
        """Fetch, write to the store, and fire with what was found."""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _Flight:
    """
    A fetch under way for one origin.

    :ivar key_ids: What it asks for; ``None`` for every key.
    :ivar done: Fires (never fails) when the fetch has finished and the
        store holds what it found.
    """

    key_ids: Optional[FrozenSet[str]]
    done: Deferred[None]

    def covers(self, key_ids: Optional[FrozenSet[str]]) -> bool:
        """Whether waiting for this fetch is as good as fetching ``key_ids``."""
        if self.key_ids is None:
            return True
        return key_ids is not None and key_ids <= self.key_ids


def _own_deferred(shared: Deferred[None]) -> Deferred[None]:
    """
    A Deferred of its own that fires when ``shared`` does, so that one
    waiter's cancellation cancels neither the shared fetch nor the others.
    """
    mine: Deferred[None] = Deferred()

    def relay(result: object) -> object:
        if not mine.called:
            mine.callback(None)
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
    :param countersign_cache_size: How many countersigned responses are
        kept as bytes.

    :ivar counters: Counts by name, for tests and metrics: ``decision_*``
        (one of :class:`~synkeys.freshness.Decision` per server asked for),
        ``fetch_joined`` (of those not ``cached``, the ones that waited for
        a fetch already under way), ``fetch_started``, ``fetch_ok``,
        ``fetch_failed``,
        ``countersigned``, ``countersign_cache_hit``, ``answered_servers``,
        ``rebound_key_ids``.
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
        self._countersign_cache_size = max(0, countersign_cache_size)
        self._states: OrderedDict[str, OriginState] = OrderedDict()
        self._inflight: Dict[str, _Flight] = {}
        self.counters: Dict[str, int] = {}

    # -- public --------------------------------------------------------

    def query(self, query: Query) -> Deferred[bytes]:
        """
        Answer a parsed query with the body ``{"server_keys": [...]}`` as
        bytes: every cached response that matches, fetched first where the
        freshness rules say so, each countersigned. A server with nothing
        cached and nothing fetched has no element.

        Fails with :class:`synkeys.storage.StoreUnavailable` when the store
        cannot be read; origin failures are never errors.
        """
        return Deferred.fromCoroutine(self._query(query))

    def evict(self, server_name: str) -> Deferred[int]:
        """
        Forget every cached key of ``server_name`` and what is remembered
        about fetching it (after a legitimate re-key, so that the new key
        bytes may bind the old key ids); fires with how many rows were
        removed.
        """
        return Deferred.fromCoroutine(self._evict(server_name))

    # -- inside --------------------------------------------------------

    async def _evict(self, server_name: str) -> int:
        removed = await self._store.evict_server(server_name)
        self._states.pop(server_name, None)
        self.log.info("Evicted {count} cached keys of {server}", count=removed, server=server_name)
        return removed

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def _state(self, server_name: str) -> OriginState:
        state = self._states.get(server_name)
        if state is None:
            state = OriginState(tokens_ts=self._now_ms())
        return state

    def _set_state(self, server_name: str, state: OriginState) -> None:
        self._states[server_name] = state
        self._states.move_to_end(server_name)
        while len(self._states) > MAX_ORIGIN_STATES:
            self._states.popitem(last=False)

    async def _query(self, query: Query) -> bytes:
        parts: List[bytes] = []
        if self._publisher is not None and self.server_name in query:
            parts.append(self._local_part())
        remote = {s: q for s, q in query.items() if s != self.server_name}
        if remote:
            # Every row of each server is read, not only the key ids asked
            # for: the rows of the other key ids are cheap, and a fetch
            # for all keys needs them to be planned.
            cached: _Rows = await self._store.get_server_keys({s: None for s in remote})
            waits = self._plan(remote, cached)
            if waits:
                for wait in waits.values():
                    await wait
                again = await self._store.get_server_keys({s: None for s in waits})
                cached = {**cached, **again}
            for server_name, server_query in remote.items():
                responses = _select(cached.get(server_name, {}), server_query.key_ids)
                if responses:
                    self._count("answered_servers")
                parts.extend(self._countersign(keys) for keys in responses)
        return b'{"server_keys":[' + b",".join(parts) + b"]}"

    def _plan(self, remote: Mapping[str, ServerQuery], cached: _Rows) -> Dict[str, Deferred[None]]:
        """
        Decide which servers to fetch, start (or join) those fetches, and
        return a Deferred of its own per server to wait for.
        """
        now_ms = self._now_ms()
        waits: Dict[str, Deferred[None]] = {}
        new: Dict[str, Dict[str, int]] = {}
        new_key_ids: Dict[str, Optional[FrozenSet[str]]] = {}
        for server_name, server_query in remote.items():
            key_ids = server_query.key_ids
            rows = _rows_for(cached.get(server_name, {}), key_ids)
            minimum_ts = clamp_minimum_valid_until(server_query.minimum_valid_until_ts, now_ms)
            state = self._state(server_name)
            decision = decide(state, _distinct(rows.values()), key_ids, minimum_ts, now_ms)
            self._count("decision_" + decision)
            if decision == Decision.CACHED:
                continue
            flight = self._inflight.get(server_name)
            if flight is not None and flight.covers(key_ids):
                # Whatever the decision, a fetch under way is as fresh as a
                # new one would be, and joining it costs no forced-refetch
                # budget.
                self._count("fetch_joined")
                waits[server_name] = _own_deferred(flight.done)
                continue
            if decision == Decision.FORCED:
                taken = state.take_token(now_ms)
                assert taken is not None, "decide() said a token was left"
                self._set_state(server_name, taken)
            if decision in (Decision.DUE, Decision.FORCED):
                new[server_name] = (
                    {} if key_ids is None else {key_id: minimum_ts for key_id in sorted(key_ids)}
                )
                new_key_ids[server_name] = key_ids
            else:
                self.log.debug(
                    "Not fetching {server}: {reason}", server=server_name, reason=decision
                )
        if new:
            done = Deferred.fromCoroutine(self._run_fetch(new))
            for server_name in new:
                self._inflight[server_name] = _Flight(new_key_ids[server_name], done)
            # Added after registering, since the fetch may already have
            # finished: then the flights are forgotten at once.
            done.addBoth(self._forget_flights, list(new), done)
            for server_name in new:
                waits[server_name] = _own_deferred(done)
        return waits

    def _forget_flights(self, result: object, servers: Iterable[str], done: Deferred[None]) -> None:
        for server_name in servers:
            flight = self._inflight.get(server_name)
            if flight is not None and flight.done is done:
                del self._inflight[server_name]
        return None

    async def _run_fetch(self, requests: Dict[str, Dict[str, int]]) -> None:
        """Fetch ``requests`` through the keyring and note how each origin fared."""
        self._count("fetch_started", len(requests))
        try:
            result = await self._keyring.fetch_server_keys(requests)
        except Exception as e:  # logged; the origins count as failed
            self.log.failure("Fetching keys of {servers} crashed", servers=sorted(requests))
            result = FetchResult(failures={s: f"internal error: {e!r}" for s in requests})
        now_ms = self._now_ms()
        for server_name in requests:
            state = self._state(server_name)
            if result.responses.get(server_name):
                self._set_state(server_name, state.succeeded(now_ms))
                self._count("fetch_ok")
            else:
                self._set_state(server_name, state.failed(now_ms))
                self._count("fetch_failed")
                self.log.warn(
                    "Fetching keys of {server} failed: {reason}",
                    server=server_name,
                    reason=result.failures.get(server_name, "no response"),
                )
        fetched = {s: r for s, r in result.responses.items() if s in requests and r}
        if fetched:
            await self._note_rebinds(fetched)

    async def _note_rebinds(self, fetched: Mapping[str, Sequence[ServerKeys]]) -> None:
        """Log and count key ids that fetched responses bind to other bytes than the cache."""
        try:
            rows = await self._store.get_server_keys({s: None for s in fetched})
        except Exception:  # the query's own read reports a store outage
            self.log.failure("Reading back fetched keys failed")
            return
        for server_name, responses in sorted(fetched.items()):
            stored = rows.get(server_name, {})
            for keys in responses:
                for key_id in sorted(keys.key_ids):
                    row = stored.get(key_id)
                    new = keys.key_bytes(key_id)
                    old = row.key_bytes(key_id) if row is not None else None
                    if old is not None and new is not None and old != new:
                        self._count("rebound_key_ids")
                        self.log.warn(
                            "{server} now binds {key_id} to {new}, but it was {old}; "
                            "still serving {old} (evict the server after a legitimate re-key)",
                            server=server_name,
                            key_id=key_id,
                            new=encode_b64(new),
                            old=encode_b64(old),
                        )

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
        if self._countersign_cache_size:
            self._countersigned[keys.raw] = signed
            while len(self._countersigned) > self._countersign_cache_size:
                self._countersigned.popitem(last=False)
        self._count("countersigned")
        return signed

    def _local_part(self) -> bytes:
        assert self._publisher is not None
        own_key_ids = {key.key_id for key in self._publisher.signing_keys}
        if all(key.key_id in own_key_ids for key in self._signing_keys):
            # The published body is already signed by every notary key.
            return self._publisher.body()
        obj: JsonDict = dict(self._publisher.json())
        for key in self._signing_keys:
            obj = sign_json(obj, self.server_name, key.key_id, key.key)
        return canonical_json(obj)


def _rows_for(
    rows: Mapping[str, ServerKeys], key_ids: Optional[FrozenSet[str]]
) -> Dict[str, ServerKeys]:
    """The rows of ``key_ids`` (all rows for ``None``)."""
    if key_ids is None:
        return dict(rows)
    return {key_id: rows[key_id] for key_id in sorted(key_ids) if key_id in rows}


def _distinct(responses: Iterable[ServerKeys]) -> List[ServerKeys]:
    seen: Set[ServerKeys] = set()
    result = []
    for keys in responses:
        if keys not in seen:
            seen.add(keys)
            result.append(keys)
    return result


def _consistent(keys: ServerKeys, rows: Mapping[str, ServerKeys]) -> bool:
    """Whether ``keys`` binds every key id it lists as that key id's own row does."""
    for key_id in keys.key_ids:
        row = rows.get(key_id)
        if row is not None and row is not keys and row.key_bytes(key_id) != keys.key_bytes(key_id):
            return False
    return True


def _select(rows: Mapping[str, ServerKeys], key_ids: Optional[FrozenSet[str]]) -> List[ServerKeys]:
    """
    The distinct responses answering for ``key_ids``, newest first.

    ``rows`` holds every cached row of the server. A response that binds
    some key id to other bytes than that key id's row (the store keeps the
    first binding) is left out even when asked for by another key id it
    lists: countersigning it would vouch for the rebinding.
    """
    chosen = [
        keys for keys in _distinct(_rows_for(rows, key_ids).values()) if _consistent(keys, rows)
    ]
    return sorted(chosen, key=lambda k: (-k.fetched_ts, -k.valid_until_ts))
