"""
The keyring: finds other servers' keys through a chain of fetchers and
verifies signed JSON with them.

Every lookup made in one reactor turn (or within ``batch_window_s``) is
merged into one batch, so each notary and the store are asked once for the
union of what is missing: a hundred events from twenty servers cost one
POST per notary. Any other fetcher (an origin fetcher such as
:class:`DirectKeyFetcher <synkeys.fetchers.DirectKeyFetcher>`, which asks
each origin on its own anyway) is asked once per server, all servers at
once, so that one origin answering only at the fetch timeout holds back
nobody else's lookup.

A batch settles server by server: the callers waiting for a server are
answered as soon as that server's keys are found, or as soon as the chain
is done with it, not when the whole batch is done. A key that is already
being fetched is not fetched again in parallel; later callers wait for the
outstanding fetch, each on its own Deferred, so cancelling one caller
leaves the others (and the fetch) alone.

The chain runs in order: what one fetcher did not find goes to the next.
Under the ``"quorum"`` policy, consecutive notary fetchers (those with a
``notary_name``) are asked in parallel and a key from them is accepted only
when ``quorum`` notaries report the same key bytes; notaries reporting
different bytes make the lookup of that key fail, and are logged and
counted. When too few notaries answer (and none disagree), the key falls
through to the fetchers after them, typically :class:`DirectKeyFetcher
<synkeys.fetchers.DirectKeyFetcher>`.

Room versions 1 to 4 ignore ``valid_until_ts``: verify their events with
``valid_at_ts=0``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import attr
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from synkeys.errors import ConfigError, KeyLookupError, SignatureVerifyError
from synkeys.fetchers import StoreKeyFetcher
from synkeys.interfaces import FetchResult, IKeyFetcher, IKeyStore, KeyRequests
from synkeys.keys import ServerKeys, VerifyKey
from synkeys.servername import is_valid_key_id, is_valid_server_name
from synkeys.signing import (
    MAX_SAFE_INTEGER,
    encode_b64,
    signable_bytes,
    verify_signature,
)

__all__ = ["BatchHook", "DisagreementHook", "Keyring"]

#: Called as ``hook(server_name, key_id, {notary_name: key_bytes})`` when
#: notaries disagree about a key.
DisagreementHook = Callable[[str, str, Mapping[str, bytes]], None]
#: Called as ``hook(servers, pairs)`` when a batch starts fetching: how many
#: servers and ``(server, key id)`` pairs it holds.
BatchHook = Callable[[int, int], None]

#: Internal key id meaning "every key of the server" (never a valid key id).
_ALL_KEYS = ""
#: Most signatures of one server looked at on one object.
MAX_SIGNATURES_PER_SERVER = 16
#: Most responses per server taken from one fetcher's answer.
MAX_RESPONSES_PER_SERVER = 16
#: How often a lookup re-joins after waiting for a fetch that asked for
#: less validity than it needs.
_MAX_ROUNDS = 3

#: How a stage of the chain asks its fetchers: several notaries in parallel
#: (quorum), one fetcher for the whole batch, or one fetcher per server.
_QUORUM = "quorum"
_BATCH = "batch"
_EACH = "each"

_Pair = tuple[str, str]


class _Busy(Exception):
    """Too many callers are already waiting for one fetch."""


def _b64(key: bytes | None) -> str:
    return encode_b64(key) if key is not None else "(none)"


@attr.s(auto_attribs=True)
class _Outcome:
    """What a batch (or the batches one lookup waited for) found."""

    cap: bool
    found: dict[str, dict[str, VerifyKey]] = attr.Factory(dict)
    responses: dict[str, list[ServerKeys]] = attr.Factory(dict)
    reasons: dict[str, list[str]] = attr.Factory(dict)
    #: Pairs that must not be looked for further, with why (disagreement).
    rejected: dict[_Pair, str] = attr.Factory(dict)

    def satisfied(self, server_name: str, key_id: str, minimum_ts: int) -> bool:
        keys = self.found.get(server_name, {})
        if key_id == _ALL_KEYS:
            return bool(keys)
        key = keys.get(key_id)
        if key is None:
            return False
        return key.is_old or key.valid_until(cap_to_7_days=self.cap) >= minimum_ts

    def add_reason(self, server_name: str, reason: str) -> None:
        reasons = self.reasons.setdefault(server_name, [])
        if reason not in reasons:
            reasons.append(reason)

    def add_response(self, keys: ServerKeys) -> None:
        responses = self.responses.setdefault(keys.server_name, [])
        if keys not in responses:
            responses.append(keys)

    def offer(self, key: VerifyKey) -> VerifyKey | None:
        """
        Keep ``key`` if it is the best so far for its id.

        :returns: A key already found with *different* bytes (then ``key``
            is not kept), else ``None``.
        """
        keys = self.found.setdefault(key.server_name, {})
        existing = keys.get(key.key_id)
        if existing is not None and existing.key != key.key:
            return existing
        if existing is None or (
            key.valid_until(cap_to_7_days=self.cap),
            key.fetched_ts,
        ) > (existing.valid_until(cap_to_7_days=self.cap), existing.fetched_ts):
            keys[key.key_id] = key
        return None

    def merge(self, other: _Outcome, servers: Iterable[str]) -> None:
        """Take over what ``other`` found for ``servers``."""
        for server_name in servers:
            for key in other.found.get(server_name, {}).values():
                self.offer(key)
            for keys in other.responses.get(server_name, []):
                self.add_response(keys)
            for reason in other.reasons.get(server_name, []):
                self.add_reason(server_name, reason)
        wanted = set(servers)
        for pair, reason in other.rejected.items():
            if pair[0] in wanted:
                self.rejected[pair] = reason


@attr.s(auto_attribs=True, eq=False)
class _Waiter:
    """One caller of a batch, and the servers of the batch it still waits for."""

    deferred: Deferred[_Outcome]
    servers: set[str]


class _Flight:
    """
    One batch of pairs: collected during a turn, then fetched once.

    Its outcome is filled in server by server; a server in ``done`` is
    settled (no fetcher will be asked about it again in this batch), so
    what the outcome says about it is final.
    """

    def __init__(self, cap: bool) -> None:
        self.requests: dict[str, dict[str, int]] = {}
        self.pairs = 0
        self.started = False
        self.outcome = _Outcome(cap)
        self.done: set[str] = set()
        self.waiters: list[_Waiter] = []

    def add(self, server_name: str, key_id: str, minimum_ts: int) -> None:
        key_ids = self.requests.setdefault(server_name, {})
        if key_id in key_ids:
            key_ids[key_id] = max(key_ids[key_id], minimum_ts)
        else:
            key_ids[key_id] = minimum_ts
            self.pairs += 1

    def covers(self, server_name: str, key_id: str, minimum_ts: int) -> bool:
        return self.requests.get(server_name, {}).get(key_id, -1) >= minimum_ts


def _is_notary(fetcher: IKeyFetcher) -> bool:
    return getattr(fetcher, "notary_name", None) is not None


def _asked_per_server(fetcher: IKeyFetcher) -> bool:
    """
    Whether the keyring asks ``fetcher`` about one server at a time.

    A notary answers a whole batch with one POST and the store with one
    query, so they get the batch; any other fetcher (an origin fetcher,
    perhaps wrapped for metrics) is asked per server, so that each server's
    answer is used the moment it arrives.
    """
    return not _is_notary(fetcher) and not isinstance(fetcher, StoreKeyFetcher)


def _fetcher_requests(
    todo: Mapping[str, Mapping[str, int]],
) -> dict[str, dict[str, int]]:
    return {
        server_name: ({} if _ALL_KEYS in key_ids else dict(key_ids))
        for server_name, key_ids in todo.items()
    }


class Keyring:
    """
    Finds and checks other servers' keys.

    :param fetchers: Asked in order; put a
        :class:`~synkeys.fetchers.StoreKeyFetcher` first to answer from the
        store without network. Notaries (fetchers with a ``notary_name``)
        and the store fetcher are asked once per batch; any other fetcher
        once per server of the batch, concurrently.
    :param clock: Schedules batches and stamps local keys.
    :param store: Every response a fetcher finds is written here; a key id
        the store already binds to different bytes is not used.
    :param local_server_name: This server's name: its keys are never fetched.
    :param local_verify_keys: This server's key ids to 32-byte public keys.
    :param cap_key_validity_to_7_days: Trust a current key at most seven days
        past its fetch (today's spec, room versions 5 and later); ``False``
        trusts it until ``valid_until_ts``.
    :param batch_window_s: How long lookups are collected into one batch;
        ``0`` is the next reactor turn.
    :param policy: ``"first"``: the first fetcher that answers validly
        wins. ``"quorum"``: notaries are asked together, and ``quorum`` of
        them must report the same key bytes.
    :param quorum: How many notaries must agree under ``"quorum"``.
    :param on_disagreement: Called (for metrics) when notaries disagree.
    :param on_batch: Called (for metrics) when a batch starts fetching.
    :param max_batch_keys: Most ``(server, key id)`` pairs in one batch;
        more are split into further batches.
    :param max_waiters: Most callers waiting for one batch; more fail at
        once with :class:`KeyLookupError`.

    :ivar disagreements: How many times notaries disagreed about a key.
    """

    log = Logger()

    def __init__(
        self,
        fetchers: Sequence[IKeyFetcher],
        clock: IReactorTime,
        *,
        store: IKeyStore | None = None,
        local_server_name: str | None = None,
        local_verify_keys: Mapping[str, bytes] = {},
        cap_key_validity_to_7_days: bool = True,
        batch_window_s: float = 0.0,
        policy: str = "first",
        quorum: int = 1,
        on_disagreement: DisagreementHook | None = None,
        on_batch: BatchHook | None = None,
        max_batch_keys: int = 1000,
        max_waiters: int = 10000,
    ) -> None:
        if policy not in ("first", "quorum"):
            raise ConfigError(f"unknown key policy {policy!r}: want 'first' or 'quorum'")
        if quorum < 1:
            raise ConfigError("quorum must be at least 1")
        notaries = [f for f in fetchers if _is_notary(f)]
        if policy == "quorum" and len(notaries) < quorum:
            raise ConfigError(
                f"quorum of {quorum} needs at least {quorum} trusted key servers, "
                f"have {len(notaries)}"
            )
        self._fetchers = list(fetchers)
        self._clock = clock
        self._store = store
        self._local_server_name = local_server_name
        self._local_verify_keys = dict(local_verify_keys)
        self._cap = cap_key_validity_to_7_days
        self._batch_window_s = batch_window_s
        self._policy = policy
        self._quorum = quorum
        self._on_disagreement = on_disagreement
        self._on_batch = on_batch
        self._max_batch_keys = max(1, max_batch_keys)
        self._max_waiters = max(1, max_waiters)
        self.disagreements = 0
        self._stages = self._build_stages()
        # From this stage on, every stage asks per server: each server of a
        # batch then goes down the rest of the chain on its own.
        self._alone_from = len(self._stages)
        while self._alone_from > 0 and self._stages[self._alone_from - 1][0] == _EACH:
            self._alone_from -= 1
        self._pending: _Flight | None = None
        self._inflight: dict[_Pair, _Flight] = {}

    def _build_stages(self) -> list[tuple[str, list[IKeyFetcher]]]:
        """Fetchers in order; under quorum, runs of notaries form one stage."""
        stages: list[tuple[str, list[IKeyFetcher]]] = []
        for fetcher in self._fetchers:
            if self._policy == "quorum" and _is_notary(fetcher):
                if stages and stages[-1][0] == _QUORUM:
                    stages[-1][1].append(fetcher)
                else:
                    stages.append((_QUORUM, [fetcher]))
            elif _asked_per_server(fetcher):
                stages.append((_EACH, [fetcher]))
            else:
                stages.append((_BATCH, [fetcher]))
        return stages

    # -- public API -----------------------------------------------------

    def verify_json_for_server(
        self, server_name: str, json_object: Mapping[str, object], valid_at_ts: int
    ) -> Deferred[None]:
        """
        Check that ``json_object`` carries a signature of ``server_name``
        made with a key valid at ``valid_at_ts`` (ms).

        A current key is valid while :meth:`VerifyKey.valid_until
        <synkeys.keys.VerifyKey.valid_until>` ≥ ``valid_at_ts`` (a cached
        key that is too short-lived is fetched again); an old key while
        ``valid_at_ts`` < its ``expired_ts``.

        :returns: A Deferred firing ``None``, or failing with
            :class:`KeyLookupError` (no key found for the object's key ids,
            or no signature of ``server_name``) or
            :class:`SignatureVerifyError` (keys found, none verifies).
        """
        return Deferred.fromCoroutine(self._verify(server_name, json_object, valid_at_ts))

    def verify_json_objects_for_server(
        self, requests: Iterable[tuple[str, Mapping[str, object], int]]
    ) -> list[Deferred[None]]:
        """
        :meth:`verify_json_for_server` for each ``(server_name, json_object,
        valid_at_ts)``, fetched together in one batch.
        """
        return [
            self.verify_json_for_server(server_name, json_object, valid_at_ts)
            for server_name, json_object, valid_at_ts in requests
        ]

    def get_keys(
        self, server_name: str, key_ids: Iterable[str], minimum_valid_until_ts: int
    ) -> Deferred[dict[str, VerifyKey]]:
        """
        Find ``server_name``'s keys ``key_ids``: current keys valid until at
        least ``minimum_valid_until_ts`` and old keys as they are.

        :returns: A Deferred firing ``{key_id: VerifyKey}`` with the keys
            found (possibly none).
        """
        return Deferred.fromCoroutine(
            self._get_keys(server_name, list(key_ids), minimum_valid_until_ts)
        )

    def fetch_server_keys(self, requests: KeyRequests) -> Deferred[FetchResult]:
        """
        Run the fetcher chain for ``requests`` (``{server: {key_id:
        minimum_valid_until_ts}}``, an empty mapping meaning every key),
        writing what is found to the store; joins fetches already under way
        instead of repeating them. The notary calls this when its cache is
        stale, then reads the store.

        :returns: A Deferred firing what was found; servers for which not
            every requested key was found are in ``failures``.
        """
        return Deferred.fromCoroutine(self._fetch_server_keys(requests))

    # -- public API, inside ---------------------------------------------

    async def _verify(
        self, server_name: str, json_object: Mapping[str, object], valid_at_ts: int
    ) -> None:
        signatures = json_object.get("signatures") if isinstance(json_object, Mapping) else None
        own = signatures.get(server_name) if isinstance(signatures, dict) else None
        key_ids = sorted(k for k in own if is_valid_key_id(k)) if isinstance(own, dict) else []
        if not key_ids:
            raise KeyLookupError(server_name, (), f"the object has no signature by {server_name}")
        key_ids = key_ids[:MAX_SIGNATURES_PER_SERVER]
        keys, reason = await self._lookup(server_name, {key_id: valid_at_ts for key_id in key_ids})
        if not keys:
            raise KeyLookupError(server_name, key_ids, reason)
        local = server_name == self._local_server_name
        signable = signable_bytes(json_object)
        problems = []
        for key_id in key_ids:
            key = keys.get(key_id)
            if key is None:
                continue
            if not local and not self._valid_at(key, valid_at_ts):
                problems.append(
                    f"{key_id} is valid until {key.valid_until(cap_to_7_days=self._cap)}, "
                    f"not at {valid_at_ts}"
                )
                continue
            if verify_signature(json_object, server_name, key_id, key.key, signable):
                return
            problems.append(f"signature by {key_id} does not verify")
        raise SignatureVerifyError(server_name, "; ".join(problems))

    def _valid_at(self, key: VerifyKey, valid_at_ts: int) -> bool:
        if key.expired_ts is not None:
            return valid_at_ts < key.expired_ts
        return key.valid_until(cap_to_7_days=self._cap) >= valid_at_ts

    async def _get_keys(
        self, server_name: str, key_ids: list[str], minimum_ts: int
    ) -> dict[str, VerifyKey]:
        wanted = {k: minimum_ts for k in key_ids[: self._max_batch_keys] if is_valid_key_id(k)}
        if not wanted:
            return {}
        keys, _reason = await self._lookup(server_name, wanted)
        if server_name == self._local_server_name:
            return keys
        return {
            key_id: key
            for key_id, key in keys.items()
            if key.is_old or key.valid_until(cap_to_7_days=self._cap) >= minimum_ts
        }

    async def _lookup(
        self, server_name: str, wanted: dict[str, int]
    ) -> tuple[dict[str, VerifyKey], str]:
        """Keys found for ``wanted`` (whatever their validity), and why not more."""
        if server_name == self._local_server_name:
            return self._local_keys(wanted), "not a key of the local server"
        if not is_valid_server_name(server_name):
            return {}, "invalid server name"
        try:
            outcome = await self._resolve({server_name: wanted})
        except _Busy:
            return {}, "too many lookups are waiting"
        found = outcome.found.get(server_name, {})
        keys = {key_id: found[key_id] for key_id in wanted if key_id in found}
        reasons = [
            outcome.rejected[(server_name, key_id)]
            for key_id in sorted(wanted)
            if (server_name, key_id) in outcome.rejected
        ]
        reasons.extend(outcome.reasons.get(server_name, []))
        return keys, "; ".join(reasons) or "no fetcher found it"

    def _local_keys(self, wanted: Iterable[str]) -> dict[str, VerifyKey]:
        now_ts = int(self._clock.seconds() * 1000)
        assert self._local_server_name is not None
        return {
            key_id: VerifyKey(
                self._local_server_name,
                key_id,
                self._local_verify_keys[key_id],
                MAX_SAFE_INTEGER,
                None,
                now_ts,
            )
            for key_id in wanted
            if key_id in self._local_verify_keys
        }

    async def _fetch_server_keys(self, requests: KeyRequests) -> FetchResult:
        result = FetchResult()
        todo: dict[str, dict[str, int]] = {}
        for server_name, key_ids in requests.items():
            if server_name == self._local_server_name:
                result.failures[server_name] = "the local server's keys are not fetched"
            elif not is_valid_server_name(server_name):
                result.failures[server_name] = "invalid server name"
            elif key_ids:
                todo[server_name] = {k: m for k, m in key_ids.items() if is_valid_key_id(k)}
                if not todo[server_name]:
                    del todo[server_name]
                    result.failures[server_name] = "no valid key id"
            else:
                todo[server_name] = {_ALL_KEYS: 0}
        if not todo:
            return result
        try:
            outcome = await self._resolve(todo)
        except _Busy:
            for server_name in todo:
                result.failures[server_name] = "too many lookups are waiting"
            return result
        for server_name, key_ids in todo.items():
            if outcome.responses.get(server_name):
                result.responses[server_name] = list(outcome.responses[server_name])
            if all(outcome.satisfied(server_name, k, m) for k, m in key_ids.items()):
                continue
            reasons = [
                reason
                for (server, _key_id), reason in sorted(outcome.rejected.items())
                if server == server_name
            ]
            reasons.extend(outcome.reasons.get(server_name, []))
            result.failures[server_name] = "; ".join(reasons) or "not found"
        return result

    # -- batching and de-duplication -------------------------------------

    async def _resolve(self, requests: Mapping[str, Mapping[str, int]]) -> _Outcome:
        """
        Find ``requests``, joining batches that are collecting or already
        fetching the same pairs.
        """
        merged = _Outcome(self._cap)
        todo = {server: dict(key_ids) for server, key_ids in requests.items()}
        for _round in range(_MAX_ROUNDS):
            # id(flight) -> (flight, the servers this lookup waits for in it)
            flights: dict[int, tuple[_Flight, set[str]]] = {}
            retry: dict[str, dict[str, int]] = {}
            for server_name, key_ids in todo.items():
                for key_id, minimum_ts in key_ids.items():
                    flight = self._inflight.get((server_name, key_id))
                    if flight is None:
                        flight = self._enqueue(server_name, key_id, minimum_ts)
                    elif not flight.started:
                        flight.add(server_name, key_id, minimum_ts)
                    elif not flight.covers(server_name, key_id, minimum_ts):
                        # Never fetch a pair twice at once: wait, then ask
                        # again for the validity that fetch did not ask for.
                        retry.setdefault(server_name, {})[key_id] = minimum_ts
                    flights.setdefault(id(flight), (flight, set()))[1].add(server_name)
            for flight, servers in flights.values():
                outcome = await self._wait(flight, servers)
                merged.merge(outcome, servers)
            todo = {
                server_name: unmet
                for server_name, key_ids in retry.items()
                if (
                    unmet := {
                        k: m
                        for k, m in key_ids.items()
                        if not merged.satisfied(server_name, k, m)
                        and (server_name, k) not in merged.rejected
                    }
                )
            }
            if not todo:
                break
        return merged

    def _enqueue(self, server_name: str, key_id: str, minimum_ts: int) -> _Flight:
        flight = self._pending
        if flight is None or flight.pairs >= self._max_batch_keys:
            flight = self._pending = _Flight(self._cap)
            self._clock.callLater(self._batch_window_s, self._start, flight)
        flight.add(server_name, key_id, minimum_ts)
        self._inflight[(server_name, key_id)] = flight
        return flight

    def _wait(self, flight: _Flight, servers: Iterable[str]) -> Deferred[_Outcome]:
        """
        A Deferred of its own for one caller of ``flight``, firing with the
        flight's outcome once every one of ``servers`` is settled.
        """
        remaining = set(servers) - flight.done
        if not remaining:
            return succeed(flight.outcome)
        if len(flight.waiters) >= self._max_waiters:
            raise _Busy()

        def forget(deferred: Deferred[_Outcome]) -> None:
            flight.waiters[:] = [w for w in flight.waiters if w.deferred is not deferred]

        waiter = _Waiter(Deferred(forget), remaining)
        flight.waiters.append(waiter)
        return waiter.deferred

    def _start(self, flight: _Flight) -> None:
        if self._pending is flight:
            self._pending = None
        flight.started = True
        if self._on_batch is not None:
            try:
                self._on_batch(len(flight.requests), flight.pairs)
            except Exception:  # a metrics hook must not fail lookups
                self.log.failure("batch hook failed")
        running = Deferred.fromCoroutine(self._run(flight))
        running.addErrback(self._crashed, flight)
        running.addCallback(self._finish_all, flight)

    def _crashed(self, failure: Failure, flight: _Flight) -> None:
        self.log.failure("key fetch crashed", failure=failure)
        for server_name in flight.requests:
            if server_name not in flight.done:
                flight.outcome.add_reason(server_name, "internal error")

    def _finish_all(self, _ignored: object, flight: _Flight) -> None:
        for server_name in list(flight.requests):
            self._finish(flight, server_name)

    def _finish(self, flight: _Flight, server_name: str) -> None:
        """
        Settle ``server_name`` in ``flight``: its pairs are no longer in
        flight, and every caller whose servers are now all settled is
        answered, whatever the rest of the batch is still doing.
        """
        if server_name in flight.done:
            return
        flight.done.add(server_name)
        key_ids = flight.requests[server_name]
        missing = self._missing({server_name: key_ids}, flight.outcome)
        if missing and not flight.outcome.reasons.get(server_name):
            described = ", ".join(sorted(k for k in missing[server_name] if k)) or "any key"
            flight.outcome.add_reason(server_name, f"no fetcher found {described}")
        for key_id in key_ids:
            if self._inflight.get((server_name, key_id)) is flight:
                del self._inflight[(server_name, key_id)]
        ready = []
        for waiter in flight.waiters:
            waiter.servers.discard(server_name)
            if not waiter.servers:
                ready.append(waiter)
        flight.waiters = [w for w in flight.waiters if w.servers]
        for waiter in ready:
            # A caller answered just before may have cancelled this one.
            if not waiter.deferred.called:
                waiter.deferred.callback(flight.outcome)

    # -- the fetcher chain -------------------------------------------------

    async def _run(self, flight: _Flight) -> None:
        """
        Run the chain for ``flight``, settling each server as soon as
        nothing is missing for it; :meth:`_finish_all` settles the rest.
        """
        outcome = flight.outcome
        for index, (mode, fetchers) in enumerate(self._stages):
            open_requests = {
                server_name: key_ids
                for server_name, key_ids in flight.requests.items()
                if server_name not in flight.done
            }
            todo = self._missing(open_requests, outcome)
            for server_name in open_requests:
                if server_name not in todo:
                    self._finish(flight, server_name)
            if not todo:
                return
            if index >= self._alone_from:
                await gatherResults(
                    [
                        Deferred.fromCoroutine(
                            self._run_server(flight, server_name, self._stages[index:], last=True)
                        )
                        for server_name in todo
                    ]
                )
                return
            if mode == _QUORUM:
                await self._run_quorum(fetchers, todo, outcome)
            elif mode == _EACH:
                # A batch-wide fetcher comes later: servers this one does not
                # find wait for each other here, so that one is asked once.
                await gatherResults(
                    [
                        Deferred.fromCoroutine(
                            self._run_server(flight, server_name, [(mode, fetchers)], last=False)
                        )
                        for server_name in todo
                    ]
                )
            else:
                await self._run_one(fetchers[0], todo, outcome)

    async def _run_server(
        self,
        flight: _Flight,
        server_name: str,
        stages: Sequence[tuple[str, list[IKeyFetcher]]],
        *,
        last: bool,
    ) -> None:
        """
        Ask the fetchers of ``stages`` about ``server_name`` alone, in order;
        settle it once nothing is missing, or after them when ``last``.
        """
        requests = {server_name: flight.requests[server_name]}
        try:
            for _mode, fetchers in stages:
                todo = self._missing(requests, flight.outcome)
                if not todo:
                    break
                await self._run_one(fetchers[0], todo, flight.outcome)
        except Exception:  # logged; only this server fails
            self.log.failure("key fetch of {server} crashed", server=server_name)
            flight.outcome.add_reason(server_name, "internal error")
            last = True
        if last or not self._missing(requests, flight.outcome):
            self._finish(flight, server_name)

    def _missing(
        self, requests: Mapping[str, Mapping[str, int]], outcome: _Outcome
    ) -> dict[str, dict[str, int]]:
        missing: dict[str, dict[str, int]] = {}
        for server_name, key_ids in requests.items():
            for key_id, minimum_ts in key_ids.items():
                if (server_name, key_id) in outcome.rejected:
                    continue
                if not outcome.satisfied(server_name, key_id, minimum_ts):
                    missing.setdefault(server_name, {})[key_id] = minimum_ts
        return missing

    async def _call(
        self, fetcher: IKeyFetcher, todo: Mapping[str, Mapping[str, int]]
    ) -> FetchResult:
        try:
            return await fetcher.fetch_server_keys(_fetcher_requests(todo))
        except Exception:  # logged; a crashing fetcher is skipped
            self.log.failure("key fetcher {fetcher} crashed", fetcher=fetcher.name)
            return FetchResult(failures={server: "internal error" for server in todo})

    def _answers(
        self,
        fetcher: IKeyFetcher,
        result: FetchResult,
        todo: Mapping[str, object],
        outcome: _Outcome,
    ) -> Iterable[ServerKeys]:
        """The responses of ``result`` worth looking at; notes its failures."""
        for server_name, reason in result.failures.items():
            if server_name in todo:
                outcome.add_reason(server_name, f"{fetcher.name}: {reason}")
        for server_name, responses in result.responses.items():
            if server_name not in todo:
                self.log.warn(
                    "{fetcher} answered for {server}, which was not asked for; ignored",
                    fetcher=fetcher.name,
                    server=server_name,
                )
                continue
            for keys in responses[:MAX_RESPONSES_PER_SERVER]:
                if keys.server_name == server_name:
                    yield keys

    async def _run_one(
        self, fetcher: IKeyFetcher, todo: dict[str, dict[str, int]], outcome: _Outcome
    ) -> None:
        result = await self._call(fetcher, todo)
        # Answers from the store are already in it.
        write = not isinstance(fetcher, StoreKeyFetcher)
        for keys in list(self._answers(fetcher, result, todo, outcome)):
            await self._accept(str(fetcher.name), keys, outcome, write=write)

    async def _run_quorum(
        self,
        fetchers: list[IKeyFetcher],
        todo: dict[str, dict[str, int]],
        outcome: _Outcome,
    ) -> None:
        results = await gatherResults(
            [Deferred.fromCoroutine(self._call(fetcher, todo)) for fetcher in fetchers]
        )
        answers: list[tuple[str, ServerKeys]] = []
        # (server, key id) -> key bytes -> notaries reporting them
        votes: dict[_Pair, dict[bytes, set[str]]] = {}
        for fetcher, result in zip(fetchers, results):
            notary = str(getattr(fetcher, "notary_name", fetcher.name))
            for keys in self._answers(fetcher, result, todo, outcome):
                answers.append((notary, keys))
                for key_id in keys.key_ids:
                    key = keys.key_bytes(key_id)
                    assert key is not None
                    votes.setdefault((keys.server_name, key_id), {}).setdefault(key, set()).add(
                        notary
                    )
        agreed: set[_Pair] = set()
        for (server_name, key_id), by_key in sorted(votes.items()):
            if len(by_key) > 1:
                self._disagreement(server_name, key_id, by_key, todo, outcome)
                continue
            ((_key, notaries),) = by_key.items()
            if len(notaries) >= self._quorum:
                agreed.add((server_name, key_id))
            elif key_id in todo[server_name] or _ALL_KEYS in todo[server_name]:
                outcome.add_reason(
                    server_name,
                    f"{key_id}: only {len(notaries)} of {self._quorum} notaries "
                    f"({', '.join(sorted(notaries))}) reported it",
                )
        for notary, keys in answers:
            allowed = {k for k in keys.key_ids if (keys.server_name, k) in agreed}
            if allowed:
                # Only a response every key of which reached quorum goes into
                # the store, since the store serves all of its keys.
                await self._accept(
                    notary,
                    keys,
                    outcome,
                    allowed=allowed,
                    write=allowed == keys.key_ids,
                )

    def _disagreement(
        self,
        server_name: str,
        key_id: str,
        by_key: Mapping[bytes, set[str]],
        todo: Mapping[str, Mapping[str, int]],
        outcome: _Outcome,
    ) -> None:
        answers = {notary: key for key, notaries in by_key.items() for notary in notaries}
        described = ", ".join(
            f"{notary} says {_b64(answers[notary])}" for notary in sorted(answers)
        )
        self.disagreements += 1
        self.log.warn(
            "notaries disagree about {server} {key_id}: {answers}",
            server=server_name,
            key_id=key_id,
            answers=described,
        )
        if self._on_disagreement is not None:
            try:
                self._on_disagreement(server_name, key_id, answers)
            except Exception:  # a metrics hook must not fail lookups
                self.log.failure("disagreement hook failed")
        if key_id in todo[server_name] or _ALL_KEYS in todo[server_name]:
            outcome.rejected[(server_name, key_id)] = (
                f"notaries disagree about {key_id}: {described}"
            )

    async def _accept(
        self,
        source: str,
        keys: ServerKeys,
        outcome: _Outcome,
        *,
        allowed: set[str] | None = None,
        write: bool = True,
    ) -> None:
        """Write ``keys`` to the store and use the keys it does not contradict."""
        conflicts: Mapping[str, bytes] = {}
        if write and self._store is not None:
            try:
                conflicts = (await self._store.store_server_keys(keys)).conflicts
            except Exception:  # logged below
                # The keys were checked; a store outage need not fail lookups.
                self.log.failure(
                    "storing keys of {server} from {source} failed",
                    server=keys.server_name,
                    source=source,
                )
        used = False
        for key_id in sorted(keys.key_ids):
            if allowed is not None and key_id not in allowed:
                continue
            key = keys.verify_key(key_id)
            assert key is not None
            if key_id in conflicts:
                self.log.warn(
                    "{source} says {server} {key_id} is {new}, but the store binds it "
                    "to {old}; not used",
                    source=source,
                    server=keys.server_name,
                    key_id=key_id,
                    new=_b64(key.key),
                    old=_b64(conflicts[key_id]),
                )
                outcome.add_reason(
                    keys.server_name,
                    f"{source}: {key_id} {_b64(key.key)} conflicts with the stored "
                    f"{_b64(conflicts[key_id])}",
                )
                continue
            earlier = outcome.offer(key)
            if earlier is not None:
                self.log.warn(
                    "{source} says {server} {key_id} is {new}, but {old} was found first; not used",
                    source=source,
                    server=keys.server_name,
                    key_id=key_id,
                    new=_b64(key.key),
                    old=_b64(earlier.key),
                )
                outcome.add_reason(
                    keys.server_name,
                    f"{source}: {key_id} contradicts a key found earlier",
                )
                continue
            used = True
        if used:
            outcome.add_response(keys)
