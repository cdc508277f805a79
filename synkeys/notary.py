"""
The notary: answers ``/_matrix/key/v2/query`` from the cache, fetching
origins through the keyring when :mod:`synkeys.freshness` says so, and
countersigns what it relays.

One query, in order: read every cached row of the servers asked for;
decide per server whether to fetch (fresh, due, forced by
``minimum_valid_until_ts``, backing off, or out of forced-refetch budget);
fetch the servers that need it in one keyring call, joining fetches of the
same origins already under way; read the store again (once per fetch, for
every query waiting on it); answer the cached responses for the key ids
asked for, each countersigned. Valid keys a fetch found but the store did
not keep (a write that failed) are answered that once and the origin is
fetched again after the failure back-off, never answered as nothing.

What an origin sends is checked by the fetchers and written by the keyring
one row per key id, so a rejected answer never touches the cache, a key the
origin stops listing is still served, and a key id is never rebound to
other key bytes: a response that tries is logged, counted as
``rebound_key_ids``, and never countersigned, not even for the other key
ids it lists, until an operator evicts the server (:meth:`Notary.evict`).

Countersigned bytes are cached (ed25519 signatures are deterministic), so
a warm query costs no signing and no JSON encoding.

A warm query does not reach the store either: what the store last answered
for a server is kept in memory, with the countersigned answer for each set
of key ids asked, for at most :data:`DEFAULT_WARM_TTL_S`. A query whose
every server the freshness rules find ``cached`` in memory is answered at
once from those bytes, without a database round trip (which costs a thread
hop) and without decoding any stored response. Every other query takes the
full path above, which reads the store and refreshes the memory, so the
store stays the source of truth: a fetch, a back-off or a forced refetch is
always decided on what the store holds, and what other processes sharing
the store wrote is seen at the latest once the memory entry expires.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import (
    Dict,
    FrozenSet,
    Iterable,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Set,
    Tuple,
)

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from synkeys.freshness import (
    Decision,
    OriginState,
    clamp_minimum_valid_until,
    decide,
    fresh_until,
)
from synkeys.interfaces import FetchResult, IKeyStore, KeyRequests
from synkeys.keyfile import SigningKey
from synkeys.keys import ServerKeys
from synkeys.keyserver import KeyPublisher
from synkeys.query import Query, ServerQuery
from synkeys.signing import JsonDict, canonical_json, encode_b64, sign_json

__all__ = [
    "DEFAULT_COUNTERSIGN_CACHE_SIZE",
    "DEFAULT_WARM_CACHE_SIZE",
    "DEFAULT_WARM_TTL_S",
    "KeySource",
    "Notary",
]

#: How many countersigned responses are kept as bytes.
DEFAULT_COUNTERSIGN_CACHE_SIZE = 50_000
#: How many origins' fetch states are remembered.
MAX_ORIGIN_STATES = 100_000
#: How many servers' cached rows are kept in memory to answer warm queries.
DEFAULT_WARM_CACHE_SIZE = 10_000
#: How long (seconds) rows read from the store answer queries from memory
#: before the store is read again.
DEFAULT_WARM_TTL_S = 30.0
#: How many sets of key ids asked of one server have answers kept in memory.
MAX_WARM_VIEWS_PER_SERVER = 16

#: ``server_name -> {key_id: ServerKeys}``, as the store answers.
_Rows = Mapping[str, Mapping[str, ServerKeys]]


class KeySource(Protocol):
    """What the notary fetches through: a :class:`synkeys.keyring.Keyring`."""

    def fetch_server_keys(self, requests: KeyRequests) -> Deferred[FetchResult]:
        """Fetch, write to the store, and fire with what was found."""


@attr.s(slots=True, auto_attribs=True)
class _ReadBack:
    """
    What the store held for the servers of a fetch once it had finished.

    :ivar rows: Every row of each server fetched, plus the fetched
        responses for key ids the store did not keep (their write failed);
        ``None`` when the read failed or has not happened (then waiters
        read the store themselves).
    :ivar read_s: When it was read.
    """

    rows: Optional[_Rows] = None
    read_s: float = 0.0


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _Flight:
    """
    A fetch under way for one origin.

    :ivar key_ids: What it asks for; ``None`` for every key.
    :ivar done: Fires (never fails) when the fetch has finished, the
        store holds what it found, and that was read back.
    :ivar read_back: Filled before ``done`` fires.
    """

    key_ids: Optional[FrozenSet[str]]
    done: Deferred[None]
    read_back: _ReadBack

    def covers(self, key_ids: Optional[FrozenSet[str]]) -> bool:
        """Whether waiting for this fetch is as good as fetching ``key_ids``."""
        if self.key_ids is None:
            return True
        return key_ids is not None and key_ids <= self.key_ids


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _View:
    """
    The cached rows of one server as seen by queries for one set of key ids:
    what the freshness rules look at, and the countersigned answer.

    :ivar responses: The distinct responses for those key ids.
    :ivar complete: Whether every key id asked for (at least one key, for
        "all keys") has a row.
    :ivar newest_valid_until_ts: ``valid_until_ts`` of the newest response.
    :ivar fresh_until_ts: :func:`~synkeys.freshness.fresh_until` of it.
    :ivar parts: The countersigned elements of the answer.
    """

    responses: Tuple[ServerKeys, ...]
    complete: bool
    newest_valid_until_ts: int
    fresh_until_ts: int
    parts: Tuple[bytes, ...]


@attr.s(slots=True, auto_attribs=True)
class _Warm:
    """
    Every row the store held for one server when last read, and the views
    built from them.

    :ivar rows: Key id to response, as the store answered.
    :ivar read_s: When the store was read.
    :ivar views: By the key ids asked (``None`` for all).
    """

    rows: Mapping[str, ServerKeys]
    read_s: float
    views: Dict[Optional[FrozenSet[str]], _View] = attr.Factory(dict)


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
    :param warm_cache_size: How many servers' rows are kept in memory to
        answer warm queries without reading the store; 0 turns it off.
    :param warm_ttl_s: How long rows read from the store are used so.

    :ivar counters: Counts by name, for tests and metrics: ``decision_*``
        (one of :class:`~synkeys.freshness.Decision` per server asked for),
        ``fetch_joined`` (of those not ``cached``, the ones that waited for
        a fetch already under way), ``fetch_started``, ``fetch_ok``,
        ``fetch_failed``, ``fetch_unsaved`` (of the failed, those whose
        valid keys the store did not keep: answered once, uncached),
        ``countersigned``, ``countersign_cache_hit``, ``answered_servers``,
        ``rebound_key_ids``, and ``warm_queries`` (queries answered from
        memory without reading the store).
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
        warm_cache_size: int = DEFAULT_WARM_CACHE_SIZE,
        warm_ttl_s: float = DEFAULT_WARM_TTL_S,
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
        self._warm: OrderedDict[str, _Warm] = OrderedDict()
        self._warm_cache_size = max(0, warm_cache_size)
        self._warm_ttl_s = warm_ttl_s
        self.counters: Dict[str, int] = {}

    # -- public --------------------------------------------------------

    def query(self, query: Query) -> Deferred[bytes]:
        """
        Answer a parsed query with the body ``{"server_keys": [...]}`` as
        bytes: every cached response that matches, fetched first where the
        freshness rules say so, each countersigned. A server with nothing
        cached and nothing fetched has no element.

        Fails with :class:`synkeys.storage.StoreUnavailable` when the store
        cannot be read; origin failures are never errors. A warm query (see
        the module docstring) has fired already when this returns.
        """
        answer = self._answer_warm(query)
        if answer is not None:
            return succeed(answer)
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
        self._warm.pop(server_name, None)
        removed = await self._store.evict_server(server_name)
        self._states.pop(server_name, None)
        # Again: a query may have read the store while the rows went.
        self._warm.pop(server_name, None)
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

    def _answer_warm(self, query: Query) -> Optional[bytes]:
        """
        The answer from memory when the freshness rules find every server
        asked for ``cached`` there, else ``None`` (nothing counted).
        """
        if not self._warm_cache_size:
            return None
        now_s = self._clock.seconds()
        now_ms = int(now_s * 1000)
        parts: List[bytes] = []
        if self._publisher is not None and self.server_name in query:
            parts.append(self._local_part())
        servers = 0
        answered = 0
        reused = 0
        for server_name, server_query in query.items():
            if server_name == self.server_name:
                continue
            warm = self._warm.get(server_name)
            if warm is None or now_s - warm.read_s >= self._warm_ttl_s or now_s < warm.read_s:
                return None
            key_ids = server_query.key_ids
            view = warm.views.get(key_ids)
            built = view is None
            if view is None:
                view = self._view(warm, key_ids)
            minimum_ts = clamp_minimum_valid_until(server_query.minimum_valid_until_ts, now_ms)
            # What is complete, meets the minimum and is still fresh is
            # "cached" whatever the origin's fetch state (decide()'s rules 1
            # to 3 do not apply); anything else is for the rules to say.
            if not (
                view.complete
                and minimum_ts <= view.newest_valid_until_ts
                and now_ms < view.fresh_until_ts
            ) and (
                decide(self._state(server_name), view.responses, key_ids, minimum_ts, now_ms)
                != Decision.CACHED
            ):
                return None
            servers += 1
            if view.parts:
                answered += 1
                if not built:
                    reused += len(view.parts)
            parts.extend(view.parts)
        self._count("warm_queries")
        if servers:
            self._count("decision_" + Decision.CACHED, servers)
        if answered:
            self._count("answered_servers", answered)
        if reused:
            self._count("countersign_cache_hit", reused)
        return b'{"server_keys":[' + b",".join(parts) + b"]}"

    def _remember(self, server_name: str, rows: Mapping[str, ServerKeys], read_s: float) -> _Warm:
        """Keep what the store answered for ``server_name`` to answer from memory."""
        warm = _Warm(rows, read_s)
        if self._warm_cache_size and rows:
            self._warm[server_name] = warm
            self._warm.move_to_end(server_name)
            while len(self._warm) > self._warm_cache_size:
                self._warm.popitem(last=False)
        else:
            self._warm.pop(server_name, None)
        return warm

    def _view(self, warm: _Warm, key_ids: Optional[FrozenSet[str]]) -> _View:
        """Build (countersigning if need be) and keep the view of ``warm`` for ``key_ids``."""
        rows = _rows_for(warm.rows, key_ids)
        responses = tuple(_distinct(rows.values()))
        complete = bool(responses) and (key_ids is None or len(rows) == len(key_ids))
        newest = max(responses, key=lambda k: (k.fetched_ts, k.valid_until_ts), default=None)
        view = _View(
            responses,
            complete,
            newest.valid_until_ts if newest is not None else 0,
            fresh_until(newest) if newest is not None else 0,
            tuple(self._countersign(keys) for keys in _select(warm.rows, key_ids)),
        )
        if len(warm.views) >= MAX_WARM_VIEWS_PER_SERVER:
            warm.views.clear()
        warm.views[key_ids] = view
        return view

    async def _query(self, query: Query) -> bytes:
        parts: List[bytes] = []
        if self._publisher is not None and self.server_name in query:
            parts.append(self._local_part())
        remote = {s: q for s, q in query.items() if s != self.server_name}
        if remote:
            # Every row of each server is read, not only the key ids asked
            # for: the rows of the other key ids are cheap, and a fetch
            # for all keys needs them to be planned.
            read_s = self._clock.seconds()
            cached: _Rows = await self._store.get_server_keys({s: None for s in remote})
            flights = self._plan(remote, cached)
            read_at_s = {server_name: read_s for server_name in remote}
            if flights:
                for flight in flights.values():
                    await _own_deferred(flight.done)
                # Each fetch read the store back once it had finished; only
                # what that could not read is read again here.
                again: Dict[str, Mapping[str, ServerKeys]] = {}
                unread = []
                for server_name, flight in flights.items():
                    rows = flight.read_back.rows
                    if rows is None:
                        unread.append(server_name)
                    else:
                        again[server_name] = rows.get(server_name, {})
                        read_at_s[server_name] = flight.read_back.read_s
                if unread:
                    read_again_s = self._clock.seconds()
                    again.update(await self._store.get_server_keys({s: None for s in unread}))
                    read_at_s.update({server_name: read_again_s for server_name in unread})
                cached = {**cached, **again}
            for server_name, server_query in remote.items():
                warm = self._remember(
                    server_name, cached.get(server_name, {}), read_at_s[server_name]
                )
                view = self._view(warm, server_query.key_ids)
                if view.parts:
                    self._count("answered_servers")
                parts.extend(view.parts)
        return b'{"server_keys":[' + b",".join(parts) + b"]}"

    def _plan(self, remote: Mapping[str, ServerQuery], cached: _Rows) -> Dict[str, _Flight]:
        """
        Decide which servers to fetch, start (or join) those fetches, and
        return the fetch to wait for per server.
        """
        now_ms = self._now_ms()
        waits: Dict[str, _Flight] = {}
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
                waits[server_name] = flight
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
            read_back = _ReadBack()
            done = Deferred.fromCoroutine(self._run_fetch(new, read_back))
            for server_name in new:
                flight = _Flight(new_key_ids[server_name], done, read_back)
                self._inflight[server_name] = flight
                waits[server_name] = flight
            # Added after registering, since the fetch may already have
            # finished: then the flights are forgotten at once.
            done.addBoth(self._forget_flights, list(new), done)
        return waits

    def _forget_flights(self, result: object, servers: Iterable[str], done: Deferred[None]) -> None:
        for server_name in servers:
            flight = self._inflight.get(server_name)
            if flight is not None and flight.done is done:
                del self._inflight[server_name]
        return None

    async def _run_fetch(self, requests: Dict[str, Dict[str, int]], read_back: _ReadBack) -> None:
        """
        Fetch ``requests`` through the keyring, note how each origin fared,
        and read back (into ``read_back``) what the store holds for them now.
        """
        self._count("fetch_started", len(requests))
        try:
            result = await self._keyring.fetch_server_keys(requests)
        except Exception as e:  # logged; the origins count as failed
            self.log.failure("Fetching keys of {servers} crashed", servers=sorted(requests))
            result = FetchResult(failures={s: f"internal error: {e!r}" for s in requests})
        now_ms = self._now_ms()
        fetched = {s: r for s, r in result.responses.items() if s in requests and r}
        read_s = self._clock.seconds()
        rows: Optional[_Rows]
        try:
            rows = await self._store.get_server_keys({s: None for s in requests})
        except Exception:  # the queries read the store themselves, and report an outage
            self.log.failure("Reading back fetched keys failed")
            rows = None
        unsaved = {} if rows is None else _unsaved(fetched, rows)
        for server_name in requests:
            state = self._state(server_name)
            if server_name in fetched and server_name not in unsaved:
                self._set_state(server_name, state.succeeded(now_ms))
                self._count("fetch_ok")
            elif server_name in unsaved:
                # Valid keys the store did not keep (a write that failed):
                # answered this once, and fetched again after the back-off
                # rather than an hour later.
                self._set_state(server_name, state.failed(now_ms))
                self._count("fetch_failed")
                self._count("fetch_unsaved")
                self.log.warn(
                    "Fetched keys of {server} were not stored; answering them uncached "
                    "and fetching again after the back-off",
                    server=server_name,
                )
            else:
                self._set_state(server_name, state.failed(now_ms))
                self._count("fetch_failed")
                self.log.warn(
                    "Fetching keys of {server} failed: {reason}",
                    server=server_name,
                    reason=result.failures.get(server_name, "no response"),
                )
        if rows is None:
            return
        if fetched:
            self._note_rebinds(fetched, rows)
        merged = dict(rows)
        for server_name, extra in unsaved.items():
            merged[server_name] = {**rows.get(server_name, {}), **extra}
        read_back.rows = merged
        read_back.read_s = read_s

    def _note_rebinds(self, fetched: Mapping[str, Sequence[ServerKeys]], rows: _Rows) -> None:
        """Log and count key ids that fetched responses bind to other bytes than the cache."""
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


def _unsaved(
    fetched: Mapping[str, Sequence[ServerKeys]], rows: _Rows
) -> Dict[str, Dict[str, ServerKeys]]:
    """
    The fetched responses' key ids that the store holds no row for (their
    write failed), by server: ``server -> {key_id: response}``.
    """
    unsaved: Dict[str, Dict[str, ServerKeys]] = {}
    for server_name, responses in fetched.items():
        stored = rows.get(server_name, {})
        for keys in responses:
            for key_id in keys.key_ids:
                if key_id not in stored:
                    unsaved.setdefault(server_name, {})[key_id] = keys
    return unsaved


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
