"""
When the notary fetches an origin again: pure rules on values.

- A cached response is fresh for half of its remaining lifetime at fetch
  time (the seed design's rule), that lifetime counting at most 7 days.
- An origin is fetched at most once an hour, unless a request's
  ``minimum_valid_until_ts`` is not met by what is cached.
- Failures back off exponentially (bounded); while backing off, requests
  are answered from cache.
- Refetches forced by ``minimum_valid_until_ts`` bypass the back-off but are
  budgeted per origin by a token bucket, so a client repeating an
  unsatisfiable minimum cannot turn the notary into a request cannon.
"""

from __future__ import annotations

from typing import Iterable, Optional, Set

import attr

from synkeys.keys import MAX_KEY_VALIDITY_MS, ServerKeys

HOUR_MS = 3_600_000
#: First back-off after a failure, doubled per further failure.
MIN_BACKOFF_MS = 60_000
#: Longest back-off.
MAX_BACKOFF_MS = 6 * HOUR_MS
#: Forced refetches an origin may get in a burst.
FORCED_REFETCH_BURST = 3
#: One more forced refetch token per this many milliseconds.
FORCED_REFETCH_REFILL_MS = 60_000


def fresh_until(keys: ServerKeys) -> int:
    """
    Until when (ms) a cached response is fresh: half its remaining
    lifetime at fetch time.

    The lifetime counts at most seven days, as verifiers do today (room
    versions 5 and later): an origin publishing a year's validity is still
    looked at again within 3.5 days, so a key it retires or adds does not
    go unnoticed for half a year.
    """
    lifetime = min(max(0, keys.valid_until_ts - keys.fetched_ts), MAX_KEY_VALIDITY_MS)
    return keys.fetched_ts + lifetime // 2


def clamp_minimum_valid_until(minimum_valid_until_ts: Optional[int], now_ms: int) -> int:
    """
    The minimum validity a request may demand: now when absent, and never
    more than seven days ahead (so no client can force endless refetches).
    """
    if minimum_valid_until_ts is None:
        return now_ms
    return max(0, min(minimum_valid_until_ts, now_ms + MAX_KEY_VALIDITY_MS))


@attr.s(frozen=True, slots=True, auto_attribs=True)
class OriginState:
    """
    What the notary remembers about fetching one origin.

    :ivar last_attempt_ts: When it was last fetched, successfully or not.
    :ivar failures: Consecutive failed fetches.
    :ivar retry_after_ts: No unforced fetch before this.
    :ivar tokens: Forced-refetch budget left (fractional while refilling).
    :ivar tokens_ts: When ``tokens`` was last brought up to date.
    """

    last_attempt_ts: int = 0
    failures: int = 0
    retry_after_ts: int = 0
    tokens: float = FORCED_REFETCH_BURST
    tokens_ts: int = 0

    def succeeded(self, now_ms: int) -> OriginState:
        """The state after a successful fetch."""
        return attr.evolve(
            self, last_attempt_ts=now_ms, failures=0, retry_after_ts=now_ms + HOUR_MS
        )

    def failed(self, now_ms: int) -> OriginState:
        """The state after a failed fetch: back off exponentially."""
        failures = self.failures + 1
        backoff = min(MAX_BACKOFF_MS, MIN_BACKOFF_MS * 2 ** min(failures - 1, 20))
        return attr.evolve(
            self, last_attempt_ts=now_ms, failures=failures, retry_after_ts=now_ms + backoff
        )

    def refilled(self, now_ms: int) -> OriginState:
        """The state with forced-refetch tokens refilled up to now."""
        if now_ms <= self.tokens_ts:
            return self
        tokens = min(
            float(FORCED_REFETCH_BURST),
            self.tokens + (now_ms - self.tokens_ts) / FORCED_REFETCH_REFILL_MS,
        )
        return attr.evolve(self, tokens=tokens, tokens_ts=now_ms)

    def take_token(self, now_ms: int) -> Optional[OriginState]:
        """The state after spending a forced-refetch token, or ``None`` if none is left."""
        state = self.refilled(now_ms)
        if state.tokens < 1:
            return None
        return attr.evolve(state, tokens=state.tokens - 1)


class Decision:
    """Why the notary will or will not fetch an origin now."""

    CACHED = "cached"  # what is cached serves the request
    DUE = "due"  # missing or stale, and the origin may be fetched
    FORCED = "forced"  # the cache cannot meet minimum_valid_until_ts
    BACKING_OFF = "backing_off"  # would fetch, but the origin is backing off
    BUDGET_SPENT = "budget_spent"  # forced, but the forced-refetch budget is spent


def decide(
    state: OriginState,
    cached: Iterable[ServerKeys],
    wanted_key_ids: Optional[Iterable[str]],
    minimum_valid_until_ts: int,
    now_ms: int,
) -> str:
    """
    Whether to fetch an origin now (one of :class:`Decision`'s values).

    The rules, in order:

    1. Nothing cached for a key id asked for (or nothing at all): fetch
       (``DUE``), unless the origin is backing off after failures
       (``BACKING_OFF``: a dead origin is not hammered by requests for keys
       it never gave us) or was fetched successfully within the hour (then
       the request spends the forced-refetch budget: ``FORCED`` or
       ``BUDGET_SPENT``).
    2. The newest cached response is valid until before
       ``minimum_valid_until_ts``: ``FORCED`` (past any back-off and the
       one-hour rule) while the budget lasts, else ``BUDGET_SPENT``.
    3. Past its freshness (:func:`fresh_until`) and not fetched within the
       hour nor backing off: ``DUE``.
    4. Otherwise ``CACHED``.

    :param state: What is remembered about fetching this origin.
    :param cached: The cached responses for the key ids asked for (for all
        of the origin's keys when ``wanted_key_ids`` is ``None``).
    :param wanted_key_ids: The key ids asked for, ``None`` for all.
    :param minimum_valid_until_ts: Already clamped with
        :func:`clamp_minimum_valid_until`.
    :param now_ms: The time now.
    """
    cached = list(cached)
    covered: Set[str] = set()
    for keys in cached:
        covered |= keys.key_ids
    missing = not cached or (wanted_key_ids is not None and not set(wanted_key_ids) <= covered)
    # retry_after_ts is the one-hour rule after a success and the back-off
    # after a failure.
    waiting = now_ms < state.retry_after_ts
    if missing:
        if waiting and state.failures:
            return Decision.BACKING_OFF
        if waiting:
            return _forced(state, now_ms)
        return Decision.DUE
    newest = max(cached, key=lambda k: (k.fetched_ts, k.valid_until_ts))
    if newest.valid_until_ts < minimum_valid_until_ts:
        return _forced(state, now_ms)
    if now_ms >= fresh_until(newest) and not waiting:
        return Decision.DUE
    return Decision.CACHED


def _forced(state: OriginState, now_ms: int) -> str:
    if state.take_token(now_ms) is None:
        return Decision.BUDGET_SPENT
    return Decision.FORCED
