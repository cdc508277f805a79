"""Tests for L{synkeys.freshness}: when the notary fetches an origin again."""

from twisted.trial.unittest import SynchronousTestCase

from synkeys.freshness import (
    FORCED_REFETCH_BURST,
    FORCED_REFETCH_REFILL_MS,
    HOUR_MS,
    MAX_BACKOFF_MS,
    MIN_BACKOFF_MS,
    Decision,
    OriginState,
    clamp_minimum_valid_until,
    decide,
    fresh_until,
)
from synkeys.keys import MAX_KEY_VALIDITY_MS, ServerKeys
from tests.helpers import make_server_keys, make_signing_key

NOW_MS = 1_700_000_000_000
DAY_MS = 86_400_000


def keys(
    valid_until_ts: int, fetched_ts: int = NOW_MS, key_ids: "tuple[str, ...]" = ("ed25519:a",)
) -> ServerKeys:
    """A checked response of origin.test listing ``key_ids``, fetched at ``fetched_ts``."""
    signing = {key_id: make_signing_key(key_id) for key_id in key_ids}
    return make_server_keys(
        "origin.test", signing, valid_until_ts=valid_until_ts, fetched_ts=fetched_ts
    )


class FreshUntilTests(SynchronousTestCase):
    """fresh_until: half the remaining lifetime at fetch time."""

    def test_half_of_lifetime(self) -> None:
        """A response valid for a day is fresh for twelve hours after its fetch."""
        self.assertEqual(fresh_until(keys(NOW_MS + DAY_MS)), NOW_MS + DAY_MS // 2)

    def test_expired_at_fetch(self) -> None:
        """A response already expired when fetched is never fresh after its fetch."""
        self.assertEqual(fresh_until(keys(NOW_MS - DAY_MS)), NOW_MS)

    def test_lifetime_counts_at_most_seven_days(self) -> None:
        """A year's validity counts as seven days, so it is fresh for 3.5 days."""
        self.assertEqual(
            fresh_until(keys(NOW_MS + 365 * DAY_MS)), NOW_MS + MAX_KEY_VALIDITY_MS // 2
        )


class ClampTests(SynchronousTestCase):
    """clamp_minimum_valid_until: what a request may demand."""

    def test_absent_means_now(self) -> None:
        """No minimum means now."""
        self.assertEqual(clamp_minimum_valid_until(None, NOW_MS), NOW_MS)

    def test_past_kept(self) -> None:
        """A minimum in the past is kept as it is."""
        self.assertEqual(clamp_minimum_valid_until(5, NOW_MS), 5)

    def test_beyond_seven_days_clamped(self) -> None:
        """A minimum further than seven days ahead becomes now plus seven days."""
        self.assertEqual(
            clamp_minimum_valid_until(NOW_MS + 30 * DAY_MS, NOW_MS), NOW_MS + MAX_KEY_VALIDITY_MS
        )


class OriginStateTests(SynchronousTestCase):
    """OriginState: back-off and the forced-refetch token bucket."""

    def test_success_waits_an_hour(self) -> None:
        """After a success the next unforced fetch is an hour away, and failures reset."""
        state = OriginState(failures=3).succeeded(NOW_MS)
        self.assertEqual((state.failures, state.retry_after_ts), (0, NOW_MS + HOUR_MS))

    def test_backoff_doubles(self) -> None:
        """Each further failure doubles the back-off."""
        state = OriginState().failed(NOW_MS)
        self.assertEqual(state.retry_after_ts, NOW_MS + MIN_BACKOFF_MS)
        state = state.failed(NOW_MS)
        self.assertEqual(state.retry_after_ts, NOW_MS + 2 * MIN_BACKOFF_MS)
        state = state.failed(NOW_MS)
        self.assertEqual(state.retry_after_ts, NOW_MS + 4 * MIN_BACKOFF_MS)

    def test_backoff_bounded(self) -> None:
        """However many failures, the back-off never exceeds its maximum."""
        state = OriginState()
        for _ in range(100):
            state = state.failed(NOW_MS)
        self.assertEqual(state.retry_after_ts, NOW_MS + MAX_BACKOFF_MS)
        self.assertEqual(state.failures, 100)

    def test_token_burst_then_empty(self) -> None:
        """A burst of tokens can be spent at once, then none is left."""
        state = OriginState(tokens_ts=NOW_MS)
        for _ in range(FORCED_REFETCH_BURST):
            taken = state.take_token(NOW_MS)
            assert taken is not None
            state = taken
        self.assertIsNone(state.take_token(NOW_MS))

    def test_token_refill(self) -> None:
        """One token comes back per refill period, and never more than the burst."""
        state = OriginState(tokens=0.0, tokens_ts=NOW_MS)
        self.assertIsNone(state.take_token(NOW_MS + FORCED_REFETCH_REFILL_MS - 1))
        self.assertIsNotNone(state.take_token(NOW_MS + FORCED_REFETCH_REFILL_MS))
        self.assertEqual(
            state.refilled(NOW_MS + 100 * FORCED_REFETCH_REFILL_MS).tokens,
            float(FORCED_REFETCH_BURST),
        )


class DecideTests(SynchronousTestCase):
    """decide(): each rule of the issue."""

    def test_nothing_cached_is_due(self) -> None:
        """With nothing cached and no history, the origin is fetched."""
        self.assertEqual(decide(OriginState(), [], None, NOW_MS, NOW_MS), Decision.DUE)

    def test_nothing_cached_backing_off(self) -> None:
        """With nothing cached and a recent failure, the origin is left alone."""
        state = OriginState().failed(NOW_MS)
        self.assertEqual(decide(state, [], None, NOW_MS, NOW_MS + 1), Decision.BACKING_OFF)

    def test_nothing_cached_after_backoff(self) -> None:
        """Once the back-off has passed, the origin is fetched again."""
        state = OriginState().failed(NOW_MS)
        self.assertEqual(decide(state, [], None, NOW_MS, NOW_MS + MIN_BACKOFF_MS), Decision.DUE)

    def test_fresh_is_cached(self) -> None:
        """A response inside its half-life serves the request."""
        cached = [keys(NOW_MS + DAY_MS)]
        self.assertEqual(
            decide(OriginState(), cached, None, NOW_MS, NOW_MS + DAY_MS // 2 - 1),
            Decision.CACHED,
        )

    def test_stale_is_due(self) -> None:
        """A response past its half-life, fetched over an hour ago, is fetched again."""
        cached = [keys(NOW_MS + DAY_MS)]
        state = OriginState().succeeded(NOW_MS)
        self.assertEqual(decide(state, cached, None, NOW_MS, NOW_MS + DAY_MS // 2), Decision.DUE)

    def test_one_hour_rule(self) -> None:
        """A stale response fetched less than an hour ago still serves the request."""
        cached = [keys(NOW_MS + 20 * 60_000)]
        state = OriginState().succeeded(NOW_MS)
        minimum = NOW_MS
        self.assertEqual(
            decide(state, cached, None, minimum, NOW_MS + HOUR_MS - 1), Decision.CACHED
        )
        self.assertEqual(decide(state, cached, None, minimum, NOW_MS + HOUR_MS), Decision.DUE)

    def test_minimum_forces(self) -> None:
        """A minimum the cache cannot meet forces a fetch within the hour."""
        cached = [keys(NOW_MS + DAY_MS)]
        state = OriginState(tokens_ts=NOW_MS).succeeded(NOW_MS)
        self.assertEqual(
            decide(state, cached, None, NOW_MS + 2 * DAY_MS, NOW_MS + 1), Decision.FORCED
        )

    def test_minimum_forces_through_backoff(self) -> None:
        """A minimum the cache cannot meet forces a fetch even while backing off."""
        cached = [keys(NOW_MS + DAY_MS)]
        state = OriginState(tokens_ts=NOW_MS).failed(NOW_MS)
        self.assertEqual(
            decide(state, cached, None, NOW_MS + 2 * DAY_MS, NOW_MS + 1), Decision.FORCED
        )

    def test_stale_backing_off_is_cached(self) -> None:
        """A stale response is served, without a fetch, while the origin backs off."""
        cached = [keys(NOW_MS + DAY_MS)]
        state = OriginState().failed(NOW_MS + DAY_MS // 2)
        self.assertEqual(
            decide(state, cached, None, NOW_MS, NOW_MS + DAY_MS // 2 + 1), Decision.CACHED
        )

    def test_budget_spent(self) -> None:
        """Without tokens, a forcing request is answered from cache."""
        cached = [keys(NOW_MS + DAY_MS)]
        state = OriginState(tokens=0.0, tokens_ts=NOW_MS)
        self.assertEqual(
            decide(state, cached, None, NOW_MS + 2 * DAY_MS, NOW_MS), Decision.BUDGET_SPENT
        )

    def test_unknown_key_id_within_hour_spends_budget(self) -> None:
        """Asking for a key id the last fetch did not list, within the hour, is forced."""
        cached = [keys(NOW_MS + DAY_MS)]
        state = OriginState(tokens_ts=NOW_MS).succeeded(NOW_MS)
        self.assertEqual(
            decide(state, cached, ["ed25519:new"], NOW_MS, NOW_MS + 1), Decision.FORCED
        )
        empty = OriginState(tokens=0.0, tokens_ts=NOW_MS).succeeded(NOW_MS)
        self.assertEqual(
            decide(empty, cached, ["ed25519:new"], NOW_MS, NOW_MS + 1), Decision.BUDGET_SPENT
        )

    def test_newest_response_decides(self) -> None:
        """The newest cached response, not an older one, is compared with the minimum."""
        old = keys(NOW_MS + DAY_MS, fetched_ts=NOW_MS - DAY_MS)
        new = keys(NOW_MS + 3 * DAY_MS, key_ids=("ed25519:a", "ed25519:b"))
        state = OriginState().succeeded(NOW_MS)
        self.assertEqual(
            decide(state, [old, new], None, NOW_MS + 2 * DAY_MS, NOW_MS + 1), Decision.CACHED
        )
