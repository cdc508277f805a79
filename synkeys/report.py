"""
What the operator tools (``synkeys fetch`` and ``synkeys check``) conclude
and print: verdicts on what the sources said about a server's keys, and
the tables and JSON that show it.

Pure functions on values: :mod:`synkeys.survey` asks the sources and
:mod:`synkeys.cli` prints what these functions return. Times are
milliseconds since the epoch, as on the wire.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional, Tuple

import attr

from synkeys.keys import MAX_KEY_VALIDITY_MS, ServerKeys
from synkeys.signing import encode_b64, signable_bytes, verify_signature

__all__ = [
    "EXIT_NOT_VERIFIED",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "Answer",
    "Comparison",
    "ComparisonRow",
    "KeyRow",
    "Verdict",
    "check_json",
    "check_lines",
    "compare",
    "fetch_json",
    "fetch_lines",
    "fetch_verdict",
    "format_table",
    "format_ts",
    "key_rows",
    "relative",
    "signature_status",
]

#: Exit status: every key verified and every source agrees.
EXIT_OK = 0
#: Exit status: an answer came, but it does not verify, sources disagree,
#: the keys expired, or too few notaries confirm them.
EXIT_NOT_VERIFIED = 1
#: Exit status: the command line is wrong (argparse's own).
EXIT_USAGE = 2
#: Exit status: a source could not be asked (DNS, connection, TLS,
#: timeout, blocked address, HTTP error status).
EXIT_UNREACHABLE = 3

#: Origins should not publish responses that expire within an hour; less
#: remaining validity than this gets a warning.
SHORT_VALIDITY_MS = 3_600_000

#: Shortest prefix of a public key shown where keys are compared.
_MIN_ABBREVIATION = 10


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Answer:
    """
    What one source said about one server's keys.

    :ivar source: The name of who was asked: the origin, or a notary.
    :ivar is_notary: Whether ``source`` is a notary relaying the keys.
    :ivar responses: Responses that passed every check of
        :mod:`synkeys.checks` (and, from a notary, carry its signature).
    :ivar failure: Why nothing (or not everything) was obtained.
    :ivar unreachable: Whether ``failure`` is about reaching the source
        (no HTTP answer, or an error status) rather than about what it
        answered.
    :ivar countersigned_by: For a notary, the key id of its signature
        that verified.
    """

    source: str
    is_notary: bool
    responses: Tuple[ServerKeys, ...] = ()
    failure: Optional[str] = None
    unreachable: bool = False
    countersigned_by: Optional[str] = None

    @property
    def failed(self) -> bool:
        """Whether the source gave no usable response at all."""
        return not self.responses

    @property
    def label(self) -> str:
        """The source as shown in tables: ``name (origin)`` or ``name (notary)``."""
        return f"{self.source} ({'notary' if self.is_notary else 'origin'})"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Verdict:
    """
    The conclusion of a command.

    :ivar exit_code: :data:`EXIT_OK`, :data:`EXIT_NOT_VERIFIED` or
        :data:`EXIT_UNREACHABLE`.
    :ivar summary: One line saying why.
    :ivar warnings: Things worth knowing that do not fail the verdict.
    """

    exit_code: int
    summary: str
    warnings: Tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether the keys verified."""
        return self.exit_code == EXIT_OK


@attr.s(frozen=True, slots=True, auto_attribs=True)
class KeyRow:
    """
    One key as one source reported it.

    :ivar key_id: ``ed25519:<version>``.
    :ivar key: The 32-byte public key.
    :ivar valid_until_ts: The response's ``valid_until_ts`` for a current
        key; ``expired_ts`` for an old one.
    :ivar is_old: Whether it is listed under ``old_verify_keys``.
    :ivar source: Who reported it.
    :ivar is_notary: Whether ``source`` is a notary.
    :ivar signature: For a current key: ``"valid"``, ``"invalid"`` or
        ``"absent"`` (the key's own signature on the response); ``"old"``
        for an old key.
    :ivar countersigned_by: The notary's key id that signed, for notary rows.
    """

    key_id: str
    key: bytes
    valid_until_ts: int
    is_old: bool
    source: str
    is_notary: bool
    signature: str
    countersigned_by: Optional[str] = None


def signature_status(keys: ServerKeys) -> dict[str, str]:
    """
    Check every current key's own signature on a response: key id to
    ``"valid"``, ``"invalid"`` (a signature that does not verify) or
    ``"absent"`` (the key did not sign).
    """
    signatures = keys.json.get("signatures")
    own = signatures.get(keys.server_name) if isinstance(signatures, Mapping) else None
    signable = signable_bytes(keys.json)
    status = {}
    for key_id, key in sorted(keys.verify_keys.items()):
        if not isinstance(own, Mapping) or key_id not in own:
            status[key_id] = "absent"
        elif verify_signature(keys.json, keys.server_name, key_id, key, signable):
            status[key_id] = "valid"
        else:
            status[key_id] = "invalid"
    return status


def key_rows(answer: Answer) -> list[KeyRow]:
    """Every key of every response of ``answer``: current keys first, by key id."""
    rows = []
    for keys in answer.responses:
        status = signature_status(keys)
        for key_id in sorted(keys.verify_keys):
            rows.append(
                KeyRow(
                    key_id,
                    keys.verify_keys[key_id],
                    keys.valid_until_ts,
                    False,
                    answer.source,
                    answer.is_notary,
                    status[key_id],
                    answer.countersigned_by,
                )
            )
        for key_id in sorted(keys.old_verify_keys):
            key, expired_ts = keys.old_verify_keys[key_id]
            rows.append(
                KeyRow(
                    key_id,
                    key,
                    expired_ts,
                    True,
                    answer.source,
                    answer.is_notary,
                    "old",
                    answer.countersigned_by,
                )
            )
    return rows


# -- time -----------------------------------------------------------------


def format_ts(ts: int) -> str:
    """A millisecond timestamp as ``2024-05-01 12:00:00 UTC``."""
    try:
        moment = datetime.datetime.fromtimestamp(ts / 1000, tz=datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return f"{ts} ms"
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _span(delta_ms: int) -> str:
    seconds = delta_ms // 1000
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 48 * 3600:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


def relative(ts: int, now_ts: int) -> str:
    """``ts`` relative to ``now_ts``: ``in 6 h``, ``3 d ago`` or ``now``."""
    delta_ms = ts - now_ts
    if abs(delta_ms) < 1000:
        return "now"
    if delta_ms > 0:
        return f"in {_span(delta_ms)}"
    return f"{_span(-delta_ms)} ago"


def _when(ts: int, now_ts: int) -> str:
    return f"{format_ts(ts)} ({relative(ts, now_ts)})"


# -- verdicts ---------------------------------------------------------------


def _conflicts(answers: Iterable[Answer]) -> dict[str, dict[bytes, list[str]]]:
    """Key ids that sources bind to different bytes: key id -> bytes -> sources."""
    bindings: dict[str, dict[bytes, list[str]]] = {}
    for answer in answers:
        for keys in answer.responses:
            for key_id in sorted(keys.key_ids):
                key = keys.key_bytes(key_id)
                assert key is not None
                sources = bindings.setdefault(key_id, {}).setdefault(key, [])
                if answer.source not in sources:
                    sources.append(answer.source)
    return {key_id: by_key for key_id, by_key in bindings.items() if len(by_key) > 1}


def _describe_conflict(key_id: str, by_key: Mapping[bytes, Sequence[str]]) -> str:
    claims = "; ".join(
        f"{', '.join(sources)} {'say' if len(sources) > 1 else 'says'} {encode_b64(key)}"
        for key, sources in sorted(by_key.items(), key=lambda item: sorted(item[1]))
    )
    return f"sources disagree about {key_id}: {claims}"


def _bad_signatures(answers: Iterable[Answer]) -> list[str]:
    problems = []
    for answer in answers:
        for row in key_rows(answer):
            if row.signature == "invalid":
                problems.append(
                    f"the signature by {row.key_id} in the answer from {answer.source} "
                    "does not verify"
                )
    return problems


def _failures(answers: Iterable[Answer], *, unreachable: bool) -> list[str]:
    return [
        f"{answer.source}: {answer.failure or 'no keys'}"
        for answer in answers
        if answer.failed and answer.unreachable == unreachable
    ]


def _validity_warnings(server_name: str, answers: Sequence[Answer], now_ts: int) -> list[str]:
    warnings = []
    for answer in answers:
        for keys in answer.responses:
            remaining_ms = keys.valid_until_ts - now_ts
            if 0 <= remaining_ms < SHORT_VALIDITY_MS:
                warnings.append(
                    f"the response from {answer.source} expires "
                    f"{relative(keys.valid_until_ts, now_ts)}; origins should publish "
                    "keys valid for at least an hour"
                )
            for key_id, status in signature_status(keys).items():
                if status == "absent":
                    warnings.append(
                        f"{server_name} lists {key_id} but does not sign with it "
                        f"(answer from {answer.source})"
                    )
            if keys.valid_until_ts - keys.fetched_ts > MAX_KEY_VALIDITY_MS:
                warnings.append(
                    f"valid_until_ts from {answer.source} is more than 7 days ahead; "
                    "servers trust the keys for at most 7 days after fetching them"
                )
    return sorted(set(warnings), key=warnings.index)


def _expired(server_name: str, answers: Sequence[Answer], now_ts: int) -> Optional[str]:
    latest = max(
        (keys.valid_until_ts for answer in answers for keys in answer.responses),
        default=None,
    )
    if latest is None or latest >= now_ts:
        return None
    return (
        f"{server_name}'s keys expired {relative(latest, now_ts)} "
        f"(valid_until_ts {latest}, {format_ts(latest)})"
    )


def fetch_verdict(server_name: str, answers: Sequence[Answer], now_ts: int) -> Verdict:
    """
    The verdict of ``synkeys fetch``: every source asked must answer with
    responses whose every signature verifies, no two sources may bind a
    key id to different bytes, and the keys must not have expired.

    The most serious problem wins: a disagreement, then a bad signature or
    invalid answer (:data:`EXIT_NOT_VERIFIED`), then an unreachable source
    (:data:`EXIT_UNREACHABLE`), then expiry.
    """
    warnings = tuple(_validity_warnings(server_name, answers, now_ts))
    conflicts = _conflicts(answers)
    if conflicts:
        key_id = sorted(conflicts)[0]
        return Verdict(EXIT_NOT_VERIFIED, _describe_conflict(key_id, conflicts[key_id]), warnings)
    problems = _bad_signatures(answers) + _failures(answers, unreachable=False)
    if problems:
        return Verdict(EXIT_NOT_VERIFIED, "; ".join(problems), warnings)
    unreachable = _failures(answers, unreachable=True)
    if unreachable:
        return Verdict(EXIT_UNREACHABLE, "; ".join(unreachable), warnings)
    expired = _expired(server_name, answers, now_ts)
    if expired is not None:
        return Verdict(EXIT_NOT_VERIFIED, expired, warnings)
    signed = sorted(
        {
            key_id
            for answer in answers
            for keys in answer.responses
            for key_id, status in signature_status(keys).items()
            if status == "valid"
        }
    )
    sources = [answer.source for answer in answers]
    agree = f"; {len(sources)} sources agree" if len(sources) > 1 else ""
    return Verdict(
        EXIT_OK,
        f"{server_name}'s keys verify: signed by {', '.join(signed)}, "
        f"as reported by {', '.join(sources)}{agree}",
        warnings,
    )


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ComparisonRow:
    """
    One key id across the sources of ``synkeys check``.

    :ivar key_id: The key id.
    :ivar cells: Per source, in :attr:`Comparison.sources` order: the
        :class:`KeyRow` it reported, or ``None`` when it did not list it.
    :ivar status: ``agree``, ``DIFFER``, or why the row fails.
    :ivar required: Whether the row must reach the quorum (the origin's
        current keys).
    """

    key_id: str
    cells: Tuple[Optional[KeyRow], ...]
    status: str
    required: bool


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Comparison:
    """
    What ``synkeys check`` found.

    :ivar server_name: The server checked.
    :ivar answers: Every source's answer; the origin first.
    :ivar quorum: How many notaries must confirm each current key.
    :ivar rows: One per key id.
    :ivar verdict: The conclusion.
    """

    server_name: str
    answers: Tuple[Answer, ...]
    quorum: int
    rows: Tuple[ComparisonRow, ...]
    verdict: Verdict

    @property
    def sources(self) -> Tuple[str, ...]:
        """The column labels."""
        return tuple(answer.label for answer in self.answers)


def _best_rows(answer: Answer) -> dict[str, KeyRow]:
    """One row per key id: the one valid longest."""
    best: dict[str, KeyRow] = {}
    for row in key_rows(answer):
        kept = best.get(row.key_id)
        if kept is None or (not row.is_old, row.valid_until_ts) > (
            not kept.is_old,
            kept.valid_until_ts,
        ):
            best[row.key_id] = row
    return best


def compare(
    server_name: str,
    origin: Answer,
    notaries: Sequence[Answer],
    quorum: int,
    now_ts: int,
) -> Comparison:
    """
    Compare the origin's answer with the notaries', key id by key id.

    Every current key of the origin (or, when the origin did not answer,
    every current key a notary reports) must be reported with the same
    bytes by at least ``quorum`` notaries, and no source may bind any key
    id to different bytes. The origin must answer, since the point is to
    compare with it.
    """
    answers = (origin, *notaries)
    best = [_best_rows(answer) for answer in answers]
    key_ids = sorted(
        {key_id for rows in best for key_id in rows},
        key=lambda k: (all(rows[k].is_old for rows in best if k in rows), k),
    )
    if not origin.failed:
        required = {k for k, row in best[0].items() if not row.is_old}
    else:
        required = {k for rows in best[1:] for k, row in rows.items() if not row.is_old}
    conflicts = _conflicts(answers)
    rows = []
    short: list[str] = []
    for key_id in key_ids:
        cells = tuple(rows_of.get(key_id) for rows_of in best)
        if key_id in conflicts:
            status = "DIFFER"
        elif key_id in required:
            confirmed = sum(1 for cell in cells[1:] if cell is not None)
            if confirmed >= quorum:
                status = f"agree ({confirmed} of {len(notaries)} notaries)"
            else:
                status = f"only {confirmed} of {quorum} notaries"
                short.append(
                    f"{key_id} is confirmed by {confirmed} of the {quorum} notaries required"
                )
        elif cells[0] is None and not origin.failed:
            status = "not listed by the origin"
        elif all(cell.is_old for cell in cells if cell is not None):
            status = "agree (old key)"
        else:
            status = "agree"
        rows.append(ComparisonRow(key_id, cells, status, key_id in required))

    warnings = _validity_warnings(server_name, answers, now_ts)
    for answer in notaries:
        if answer.failed and not short:
            warnings.append(f"{answer.source} did not answer: {answer.failure}")
    verdict = _check_verdict(server_name, origin, notaries, conflicts, short, answers, now_ts)
    return Comparison(
        server_name,
        answers,
        quorum,
        tuple(rows),
        attr.evolve(verdict, warnings=tuple(dict.fromkeys(warnings))),
    )


def _check_verdict(
    server_name: str,
    origin: Answer,
    notaries: Sequence[Answer],
    conflicts: Mapping[str, Mapping[bytes, Sequence[str]]],
    short: Sequence[str],
    answers: Sequence[Answer],
    now_ts: int,
) -> Verdict:
    if conflicts:
        key_id = sorted(conflicts)[0]
        return Verdict(EXIT_NOT_VERIFIED, _describe_conflict(key_id, conflicts[key_id]))
    bad = _bad_signatures(answers)
    if bad:
        return Verdict(EXIT_NOT_VERIFIED, "; ".join(bad))
    if origin.failed:
        return Verdict(
            EXIT_UNREACHABLE if origin.unreachable else EXIT_NOT_VERIFIED,
            f"{origin.source}: {origin.failure or 'no keys'}",
        )
    if short:
        missing = [f"{a.source}: {a.failure}" for a in notaries if a.failed]
        because = f" ({'; '.join(missing)})" if missing else ""
        return Verdict(EXIT_NOT_VERIFIED, "; ".join(short) + because)
    expired = _expired(server_name, [origin], now_ts)
    if expired is not None:
        return Verdict(EXIT_NOT_VERIFIED, expired)
    return Verdict(
        EXIT_OK,
        f"the origin and the notaries agree on {server_name}'s keys",
    )


# -- output -------------------------------------------------------------------


def format_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart, header first."""
    table = [list(header), *[list(row) for row in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]


def _check_column(row: KeyRow) -> str:
    if row.is_old:
        text = "old key"
    else:
        text = {
            "valid": "signature verifies",
            "invalid": "SIGNATURE DOES NOT VERIFY",
            "absent": "does not sign",
        }[row.signature]
    if row.is_notary and row.countersigned_by:
        text += f"; countersigned ({row.countersigned_by})"
    return text


def _valid_column(row: KeyRow, now_ts: int) -> str:
    if row.is_old:
        return f"expired {_when(row.valid_until_ts, now_ts)}"
    return _when(row.valid_until_ts, now_ts)


def fetch_lines(
    server_name: str,
    answers: Sequence[Answer],
    verdict: Verdict,
    now_ts: int,
    notes: Sequence[str] = (),
    *,
    with_failure: bool = True,
) -> list[str]:
    """
    The human-readable report of ``synkeys fetch``, ending with the verdict
    (a failed one only when ``with_failure``: the CLI writes it to stderr).
    """
    lines = [f"Keys of {server_name}"]
    lines.extend(f"note: {note}" for note in notes)
    rows = [row for answer in answers for row in key_rows(answer)]
    if rows:
        lines.append("")
        lines.extend(
            format_table(
                ("KEY ID", "PUBLIC KEY", "VALID UNTIL", "SOURCE", "CHECK"),
                (
                    (
                        row.key_id,
                        encode_b64(row.key),
                        _valid_column(row, now_ts),
                        f"{row.source} ({'notary' if row.is_notary else 'origin'})",
                        _check_column(row),
                    )
                    for row in rows
                ),
            )
        )
    failed = [answer for answer in answers if answer.failed]
    if failed:
        lines.append("")
        lines.extend(f"{answer.label}: {answer.failure}" for answer in failed)
    lines.append("")
    lines.extend(f"warning: {warning}" for warning in verdict.warnings)
    if verdict.ok or with_failure:
        lines.append(f"{'OK' if verdict.ok else 'FAILED'}: {verdict.summary}")
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _row_json(row: KeyRow) -> dict[str, Any]:
    result: dict[str, Any] = {
        "key_id": row.key_id,
        "key": encode_b64(row.key),
        "old": row.is_old,
        "source": row.source,
        "via_notary": row.is_notary,
        "signature": row.signature,
    }
    result["expired_ts" if row.is_old else "valid_until_ts"] = row.valid_until_ts
    if row.countersigned_by:
        result["countersigned_by"] = row.countersigned_by
    return result


def _answer_json(answer: Answer) -> dict[str, Any]:
    return {
        "source": answer.source,
        "notary": answer.is_notary,
        "ok": not answer.failed,
        "failure": answer.failure,
        "unreachable": answer.unreachable,
        "keys": [_row_json(row) for row in key_rows(answer)],
    }


def _verdict_json(verdict: Verdict) -> dict[str, Any]:
    return {
        "verified": verdict.ok,
        "exit_code": verdict.exit_code,
        "summary": verdict.summary,
        "warnings": list(verdict.warnings),
    }


def fetch_json(
    server_name: str,
    answers: Sequence[Answer],
    verdict: Verdict,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """The report of ``synkeys fetch --json``."""
    return {
        "server_name": server_name,
        **_verdict_json(verdict),
        "notes": list(notes),
        "sources": [_answer_json(answer) for answer in answers],
    }


def _abbreviations(keys: Iterable[bytes]) -> dict[bytes, str]:
    """Shortest base64 prefixes (at least 10 characters) that tell ``keys`` apart."""
    texts = {key: encode_b64(key) for key in keys}
    length = _MIN_ABBREVIATION
    while len({text[:length] for text in texts.values()}) < len(texts):
        length += 1
    return {
        key: text if len(text) <= length else text[:length] + "…" for key, text in texts.items()
    }


def check_lines(
    comparison: Comparison,
    now_ts: int,
    notes: Sequence[str] = (),
    *,
    with_failure: bool = True,
) -> list[str]:
    """
    The human-readable report of ``synkeys check``: one column per source,
    then the verdict (a failed one only when ``with_failure``).
    """
    lines = [f"Keys of {comparison.server_name}, side by side (quorum {comparison.quorum})"]
    lines.extend(f"note: {note}" for note in notes)
    table_rows = []
    for row in comparison.rows:
        names = _abbreviations({cell.key for cell in row.cells if cell is not None})
        cells = []
        for answer, cell in zip(comparison.answers, row.cells):
            if cell is not None:
                old = "old, " if cell.is_old else ""
                cells.append(f"{names[cell.key]} ({old}{relative(cell.valid_until_ts, now_ts)})")
            else:
                cells.append("(no answer)" if answer.failed else "(not listed)")
        table_rows.append((row.key_id, *cells, row.status))
    lines.append("")
    lines.extend(format_table(("KEY ID", *comparison.sources, "RESULT"), table_rows))
    failed = [answer for answer in comparison.answers if answer.failed]
    if failed:
        lines.append("")
        lines.extend(f"{answer.label}: {answer.failure}" for answer in failed)
    lines.append("")
    verdict = comparison.verdict
    lines.extend(f"warning: {warning}" for warning in verdict.warnings)
    if verdict.ok or with_failure:
        lines.append(f"{'OK' if verdict.ok else 'FAILED'}: {verdict.summary}")
    while lines and not lines[-1]:
        lines.pop()
    return lines


def check_json(comparison: Comparison, notes: Sequence[str] = ()) -> dict[str, Any]:
    """The report of ``synkeys check --json``."""
    return {
        "server_name": comparison.server_name,
        "quorum": comparison.quorum,
        **_verdict_json(comparison.verdict),
        "notes": list(notes),
        "rows": [
            {
                "key_id": row.key_id,
                "status": row.status,
                "required": row.required,
                "by_source": {
                    answer.source: (_row_json(cell) if cell is not None else None)
                    for answer, cell in zip(comparison.answers, row.cells)
                },
            }
            for row in comparison.rows
        ],
        "sources": [_answer_json(answer) for answer in comparison.answers],
    }
