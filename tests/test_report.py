"""The pure verdicts and formatting of :mod:`synkeys.report`."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from synkeys.report import (
    EXIT_NOT_VERIFIED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    Answer,
    compare,
    fetch_verdict,
    format_table,
    format_ts,
    relative,
)
from tests.helpers import make_server_keys, make_signing_key

NOW_TS = 1_700_000_000_000
HOUR_MS = 3_600_000


def answer(source: str, *, notary: bool = False, key: str = "a", **kwargs: object) -> Answer:
    """An answer from ``source`` listing ``ed25519:a`` made from the seed name ``key``."""
    keys = make_server_keys(
        "origin.example", {"ed25519:a": make_signing_key(key)},
        valid_until_ts=NOW_TS + 24 * HOUR_MS, fetched_ts=NOW_TS, source=source,
    )
    return Answer(source, notary, (keys,), **kwargs)  # type: ignore[arg-type]


def failed(source: str, reason: str, *, notary: bool = False, unreachable: bool = True) -> Answer:
    """An answer from ``source`` that has no keys."""
    return Answer(source, notary, (), reason, unreachable)


class TimeTests(SynchronousTestCase):
    """Dates and relative times."""

    def test_relative(self) -> None:
        """Relative times use the largest whole unit, up to days after 48 hours."""
        self.assertEqual(relative(NOW_TS + 6 * HOUR_MS + 59_000, NOW_TS), "in 6 h")
        self.assertEqual(relative(NOW_TS - 3 * 24 * HOUR_MS, NOW_TS), "3 d ago")
        self.assertEqual(relative(NOW_TS + 47 * HOUR_MS, NOW_TS), "in 47 h")
        self.assertEqual(relative(NOW_TS + 90_000, NOW_TS), "in 1 min")
        self.assertEqual(relative(NOW_TS + 30_000, NOW_TS), "in 30 s")
        self.assertEqual(relative(NOW_TS + 400, NOW_TS), "now")

    def test_format_ts(self) -> None:
        """Timestamps are shown in UTC; absurd ones as milliseconds."""
        self.assertEqual(format_ts(NOW_TS), "2023-11-14 22:13:20 UTC")
        self.assertEqual(format_ts(2**62), f"{2**62} ms")

    def test_table(self) -> None:
        """Columns are padded to the widest cell, two spaces apart, without trailing blanks."""
        self.assertEqual(
            format_table(("A", "BB"), [("xxx", "y"), ("z", "")]),
            ["A    BB", "xxx  y", "z"],
        )


class FetchVerdictTests(SynchronousTestCase):
    """:func:`fetch_verdict`."""

    def test_agreeing_sources(self) -> None:
        """Sources reporting the same key verify, naming the signing key."""
        verdict = fetch_verdict("origin.example", [answer("n1", notary=True), answer("n2", notary=True)], NOW_TS)
        self.assertEqual(verdict.exit_code, EXIT_OK)
        self.assertIn("signed by ed25519:a", verdict.summary)
        self.assertIn("2 sources agree", verdict.summary)

    def test_disagreement_wins_over_unreachable(self) -> None:
        """A disagreement is reported before an unreachable source."""
        verdict = fetch_verdict(
            "origin.example",
            [answer("n1", notary=True), answer("n2", notary=True, key="b"), failed("n3", "down")],
            NOW_TS,
        )
        self.assertEqual(verdict.exit_code, EXIT_NOT_VERIFIED)
        self.assertTrue(verdict.summary.startswith("sources disagree about ed25519:a: n1 says "))

    def test_unreachable(self) -> None:
        """A source that could not be asked gives the unreachable status."""
        verdict = fetch_verdict("origin.example", [failed("origin.example", "timed out")], NOW_TS)
        self.assertEqual((verdict.exit_code, verdict.summary), (EXIT_UNREACHABLE, "origin.example: timed out"))

    def test_invalid_answer(self) -> None:
        """An answer that arrived but failed its checks is not verified."""
        verdict = fetch_verdict(
            "origin.example", [failed("origin.example", "invalid response: x", unreachable=False)], NOW_TS
        )
        self.assertEqual(verdict.exit_code, EXIT_NOT_VERIFIED)


class CompareTests(SynchronousTestCase):
    """:func:`compare`."""

    def test_quorum_counts_notaries(self) -> None:
        """A key confirmed by fewer notaries than the quorum fails; enough passes."""
        origin = answer("origin.example")
        notaries = [answer("n1", notary=True), failed("n2", "down", notary=True)]
        short = compare("origin.example", origin, notaries, 2, NOW_TS)
        self.assertEqual(short.verdict.exit_code, EXIT_NOT_VERIFIED)
        self.assertEqual(short.rows[0].status, "only 1 of 2 notaries")
        enough = compare("origin.example", origin, notaries, 1, NOW_TS)
        self.assertEqual(enough.verdict.exit_code, EXIT_OK)
        self.assertEqual(enough.rows[0].status, "agree (1 of 2 notaries)")
        self.assertEqual(enough.verdict.warnings, ("n2 did not answer: down",))

    def test_columns(self) -> None:
        """Each source is one column, the origin first."""
        comparison = compare("origin.example", answer("origin.example"), [answer("n1", notary=True)], 1, NOW_TS)
        self.assertEqual(comparison.sources, ("origin.example (origin)", "n1 (notary)"))
        self.assertEqual(len(comparison.rows[0].cells), 2)
