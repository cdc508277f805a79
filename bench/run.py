"""
The synkeys benchmark: synkeys, a real Synapse and the raw Twisted ceiling
side by side on 127.0.0.1, loaded with ``wrk``.

One command, from a checkout (with ``wrk`` and the ``interop`` and ``test``
extras installed)::

    python bench/run.py                 # about five minutes
    python bench/run.py --quick         # one repetition, shorter loads

It prints a table and writes the same results as JSON (``--json``). What it
measures and why is in ``bench/README.md``; the numbers are discussed in
``docs/performance.md``.

- B1 ``GET /_matrix/key/v2/server`` at concurrency 1, 16 and 64, plain and
  TLS;
- B2 warm notary ``POST /_matrix/key/v2/query`` for 1 and for 10 origins at
  concurrency 16: every answer checked (status and exact length, after one
  answer was verified in full: complete and signed by origin and notary),
  and no origin hit during the load;
- B3 cold fan-out: one POST for 50 origins that answer after 100 ms against
  one POST for one such origin (wall time), and 20 concurrent identical
  POSTs for 20 cold origins (total origin hits);
- B4 the cost floor (:mod:`bench.costfloor`);
- B5 resident memory idle, after each repetition of B1 and B2 (the same
  load each time), and after B3 (which adds new origins);
- workers: B1 with ``--workers 2`` against one process.

Every load is bounded in time (``wrk -d``), the order of the targets
rotates across repetitions, and ratios are taken within each repetition.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import costfloor  # noqa: E402
from bench.targets import (  # noqa: E402
    OriginFarm,
    RawTarget,
    SynapseTarget,
    SynkeysTarget,
    Target,
    cpu_s,
    http_request,
    rss_mib,
)

LUA = os.path.join(HERE, "wrk", "report.lua")
QUERY = "/_matrix/key/v2/query"
SERVER = "/_matrix/key/v2/server"
#: The delay of every origin in B3.
COLD_DELAY_MS = 100
#: How much resident memory may grow between the first and the last repetition.
RSS_GROWTH_TOLERANCE_MIB = 1.0

# -- targets (the issue's) ---------------------------------------------------

B1_MIN_RATIO = 0.8
B2_MIN_RATIO = {1: 0.5, 10: 0.25}
B3_MAX_RATIO = 1.8
B5_MAX_IDLE_MIB = 45.0
WORKERS_MIN_RATIO = 1.5


def log(message: str) -> None:
    """Progress, on stderr."""
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


# -- loads -----------------------------------------------------------------


def run_wrk(
    target: Target,
    url: str,
    concurrency: int,
    duration_s: float,
    *,
    body_path: Optional[str] = None,
    expect_length: Optional[int] = None,
) -> Dict[str, Any]:
    """
    One ``wrk`` load, bounded by ``duration_s``: requests per second, the
    target's CPU time per request, latency, errors and response checks.
    """
    env = dict(os.environ)
    env["BENCH_BODY_FILE"] = body_path or ""
    env["BENCH_EXPECT_LENGTH"] = str(expect_length) if expect_length is not None else ""
    pids = target.pids()
    cpu_before_s = cpu_s(pids)
    completed = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{int(duration_s)}s", "--timeout", "10s",
         "-s", LUA, url],
        env=env,
        capture_output=True,
        text=True,
        timeout=duration_s + 60,
        check=False,
    )
    cpu_used_s = cpu_s(pids) - cpu_before_s
    report = None
    for line in completed.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            report = json.loads(line[len("BENCH_JSON "):])
    if report is None:
        raise RuntimeError(f"wrk failed on {url}: {completed.stdout}\n{completed.stderr}")
    requests = max(1, report["requests"])
    report["rps"] = report["requests"] / (report["duration_us"] / 1e6)
    report["cpu_us_per_request"] = cpu_used_s * 1e6 / requests
    report["error_count"] = sum(report["errors"].values())
    return report


def rotate(items: Sequence[Any], by: int) -> List[Any]:
    """``items`` rotated left by ``by``."""
    if not items:
        return []
    by %= len(items)
    return list(items[by:]) + list(items[:by])


# -- notary answers --------------------------------------------------------


def query_body(origins: Mapping[str, Mapping[str, str]], minimum_ts: int) -> bytes:
    """A POST body asking for every key of ``origins`` (today's form)."""
    return json.dumps(
        {
            "server_keys": {
                name: {key_id: {"minimum_valid_until_ts": minimum_ts} for key_id in keys}
                for name, keys in origins.items()
            }
        },
        sort_keys=True,
    ).encode()


def check_answer(
    body: bytes,
    origins: Mapping[str, Mapping[str, str]],
    notary_name: str,
    notary_keys: Mapping[str, str],
) -> List[str]:
    """
    What is wrong with a notary answer (empty when nothing): every origin
    answered, each element signed by exactly the origin and the notary,
    both signatures verifying (checked with ``signedjson``, Synapse's own
    library, not with synkeys' code).
    """
    from signedjson.key import decode_verify_key_bytes
    from signedjson.sign import SignatureVerifyException, verify_signed_json
    from unpaddedbase64 import decode_base64

    problems: List[str] = []
    try:
        elements = json.loads(body)["server_keys"]
    except (ValueError, KeyError, TypeError) as e:
        return [f"not a notary answer: {e!r}"]
    seen = {e.get("server_name") for e in elements}
    missing = set(origins) - seen
    if missing:
        problems.append(f"{len(missing)} origins missing, e.g. {sorted(missing)[:3]}")
    for element in elements:
        name = element.get("server_name")
        if name not in origins:
            problems.append(f"unexpected element for {name!r}")
            continue
        signers = set(element.get("signatures", {}))
        if signers != {name, notary_name}:
            problems.append(f"{name}: signed by {sorted(signers)}")
            continue
        for signer, keys in ((name, origins[name]), (notary_name, notary_keys)):
            for key_id, key_b64 in keys.items():
                if key_id not in element["signatures"][signer]:
                    continue
                verify_key = decode_verify_key_bytes(key_id, decode_base64(key_b64))
                try:
                    verify_signed_json(dict(element), signer, verify_key)
                except SignatureVerifyException as e:
                    problems.append(f"{name}: {signer}'s signature: {e}")
    return problems


def post(target: Target, body: bytes, timeout_s: float = 30.0) -> Tuple[int, bytes, float]:
    """POST ``body`` to the target's ``/query`` (plain); status, body, wall seconds."""
    started_s = time.monotonic()
    code, answer = http_request(target.url("http", QUERY), "POST", body, timeout_s=timeout_s)
    return code, answer, time.monotonic() - started_s


# -- the benchmark -----------------------------------------------------------


class Bench:
    """One run: the processes, the results, the report."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = tempfile.mkdtemp(prefix="synkeys-bench-")
        self.results: Dict[str, Any] = {
            "meta": {
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "python": platform.python_version(),
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "reps": args.reps,
                "duration_s": args.duration,
                "wrk": "wrk -t1 -cN -dD",
            },
            "loads": {},
            "b3": {},
            "b4": {},
            "b5": {},
            "workers": {},
            "problems": [],
        }
        self.targets: List[Target] = []
        self.stoppable: List[Any] = []

    # -- setup --------------------------------------------------------------

    def start(self) -> None:
        """Start the origin farm and every target, and note idle memory."""
        from tests.tlsutil import TestPKI

        self.pki = TestPKI(os.path.join(self.workdir, "pki"))
        self.key_path, self.cert_path = self.pki.issue("localhost", ["localhost", "127.0.0.1"])
        log(f"working in {self.workdir}")
        self.farm = OriginFarm(self.workdir, self.key_path, self.cert_path)
        self.stoppable.append(self.farm)
        self.synkeys = SynkeysTarget(
            os.path.join(self.workdir, "synkeys"), self.key_path, self.cert_path,
            self.pki.ca_path,
        )
        self.stoppable.append(self.synkeys)
        self.targets.append(self.synkeys)
        self.synapse: Optional[SynapseTarget] = None
        if not self.args.no_synapse:
            log("starting Synapse")
            self.synapse = SynapseTarget(os.path.join(self.workdir, "synapse"), self.pki)
            self.stoppable.append(self.synapse)
            self.targets.append(self.synapse)
        self.raw = RawTarget(self.workdir, self.key_path, self.cert_path)
        self.stoppable.append(self.raw)
        self.targets.append(self.raw)
        time.sleep(1.0)
        self.results["b5"]["idle_rss_mib"] = {t.name: rss_mib(t.process.pid) for t in self.targets}
        self.results["b5"]["after_rep_rss_mib"] = {t.name: [] for t in self.targets}
        self.notaries = [t for t in self.targets if t.notary]
        self.notary_keys = {t.name: t.verify_keys() for t in self.notaries}

    def stop(self) -> None:
        """Stop everything started, by PID, last first."""
        for process in reversed(self.stoppable):
            try:
                process.stop()
            except Exception as e:  # keep stopping the others
                log(f"stopping {process}: {e!r}")
        if not self.args.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def problem(self, text: str) -> None:
        """Note a failed check."""
        log("PROBLEM: " + text)
        self.results["problems"].append(text)

    # -- B2 preparation -------------------------------------------------------

    def prepare_warm(self) -> None:
        """
        Start the B2 origins, make every notary fetch them (cold), and keep
        one fully verified answer of each notary as the reference.
        """
        self.warm_origins = self.farm.spawn(10)
        names = sorted(self.warm_origins)
        minimum_ts = int(time.time() * 1000)
        self.warm: Dict[int, Dict[str, Any]] = {}
        for count in (1, 10):
            origins = {name: self.warm_origins[name] for name in names[:count]}
            body = query_body(origins, minimum_ts)
            path = os.path.join(self.workdir, f"post{count}.json")
            with open(path, "wb") as f:
                f.write(body)
            self.warm[count] = {"origins": origins, "body": body, "path": path, "length": {}}
        for target in self.notaries:
            for count in (10, 1):
                self.warm[count]["length"][target.name] = self.verified_length(target, count)

    def verified_length(self, target: Target, count: int) -> Optional[int]:
        """POST the B2 query, check the whole answer; its length in bytes."""
        warm = self.warm[count]
        for _ in range(3):
            code, body, _ = post(target, warm["body"])
            problems = [f"status {code}"] if code != 200 else check_answer(
                body, warm["origins"], target.server_name, self.notary_keys[target.name]
            )
            if not problems:
                return len(body)
            time.sleep(0.5)
        self.problem(f"B2 {target.name} {count} origins: {problems[:3]}")
        return None

    # -- loads ------------------------------------------------------------------

    def record(self, scenario: str, target: Target, report: Dict[str, Any]) -> None:
        """Keep one load's report."""
        self.results["loads"].setdefault(scenario, {}).setdefault(target.name, []).append(report)
        log(
            f"{scenario:16s} {target.name:10s} {report['rps']:9.0f} req/s "
            f"{report['cpu_us_per_request']:7.1f} us CPU/req  p99 {report['latency_us']['p99']} us"
            + (f"  errors {report['error_count']}" if report["error_count"] else "")
            + (f"  bad {report['bad']}" if report.get("bad") else "")
        )

    def warm_up(self) -> None:
        """A short load on every target, not recorded."""
        for target in self.targets:
            for scheme in ("http", "https"):
                run_wrk(target, target.url(scheme, SERVER), 16, 1)

    def b1(self, rep: int) -> None:
        """GET /server, plain and TLS, at each concurrency."""
        index = 0
        for scheme in ("http", "https"):
            for concurrency in (1, 16, 64):
                scenario = f"b1_{'tls' if scheme == 'https' else 'plain'}_c{concurrency}"
                for target in rotate(self.targets, rep + index):
                    report = run_wrk(
                        target, target.url(scheme, SERVER), concurrency, self.args.duration
                    )
                    if report["error_count"]:
                        self.problem(f"{scenario} {target.name}: errors {report['errors']}")
                    self.record(scenario, target, report)
                index += 1

    def b2(self, rep: int) -> None:
        """Warm POSTs for 1 and 10 origins at c16, checked, with no origin hit."""
        for index, count in enumerate((1, 10)):
            scenario = f"b2_post_{count}"
            warm = self.warm[count]
            for target in rotate(self.targets, rep + index):
                expect = warm["length"].get(target.name) if target.notary else None
                if target.notary and expect is None:
                    continue
                if target is self.raw:
                    from bench.raw_server import BODY

                    expect = len(BODY)
                hits_before = self.farm.hits(warm["origins"])
                report = run_wrk(
                    target, target.url("http", QUERY), 16, self.args.duration,
                    body_path=warm["path"], expect_length=expect,
                )
                hits_after = self.farm.hits(warm["origins"])
                report["origin_hits"] = sum(hits_after.values()) - sum(hits_before.values())
                if report["origin_hits"]:
                    self.problem(f"{scenario} {target.name}: {report['origin_hits']} origin hits")
                if report["bad"] or report["error_count"]:
                    self.problem(
                        f"{scenario} {target.name}: {report['bad']} bad answers "
                        f"({report['bad_status']} not 200), errors {report['errors']}"
                    )
                self.record(scenario, target, report)
            for target in self.notaries:
                # The answer is still complete and verifies after the load.
                self.verified_length(target, count)

    def b3(self, rep: int) -> None:
        """Cold fan-out against one cold origin; concurrent identical cold POSTs."""
        minimum_ts = int(time.time() * 1000)
        for target in rotate(self.notaries, rep):
            result: Dict[str, Any] = {}
            single = self.farm.spawn(1, COLD_DELAY_MS)
            code, body, single_s = post(target, query_body(single, minimum_ts))
            problems = [f"status {code}"] if code != 200 else check_answer(
                body, single, target.server_name, self.notary_keys[target.name]
            )
            fifty = self.farm.spawn(50, COLD_DELAY_MS)
            code, body, fifty_s = post(target, query_body(fifty, minimum_ts))
            problems += [f"status {code}"] if code != 200 else check_answer(
                body, fifty, target.server_name, self.notary_keys[target.name]
            )
            hits = self.farm.hits(fifty)
            result["single_s"] = single_s
            result["fifty_s"] = fifty_s
            result["ratio"] = fifty_s / single_s
            result["fifty_hits_min"] = min(hits.values())
            result["fifty_hits_max"] = max(hits.values())
            twenty = self.farm.spawn(20, COLD_DELAY_MS)
            body20 = query_body(twenty, minimum_ts)
            with concurrent.futures.ThreadPoolExecutor(20) as pool:
                answers = list(pool.map(post, [target] * 20, [body20] * 20))
            for code, body, _ in answers:
                problems += [f"status {code}"] if code != 200 else check_answer(
                    body, twenty, target.server_name, self.notary_keys[target.name]
                )
            result["twenty_hits"] = sum(self.farm.hits(twenty).values())
            result["twenty_wall_s"] = max(a[2] for a in answers)
            if problems:
                self.problem(f"B3 {target.name}: {problems[:3]}")
            result["complete"] = not problems
            self.results["b3"].setdefault(target.name, []).append(result)
            log(
                f"b3 {target.name:10s} 1 origin {single_s * 1000:6.0f} ms, 50 origins "
                f"{fifty_s * 1000:6.0f} ms (x{result['ratio']:.2f}), hits/origin "
                f"{result['fifty_hits_min']}-{result['fifty_hits_max']}; 20x20: "
                f"{result['twenty_hits']} hits"
            )

    def workers(self, rep: int, pair: List[Target]) -> None:
        """B1 (c64, plain and TLS) on one process against ``--workers N``."""
        for scheme in ("http", "https"):
            scenario = f"workers_{'tls' if scheme == 'https' else 'plain'}_c64"
            for target in rotate(pair, rep):
                report = run_wrk(target, target.url(scheme, SERVER), 64, self.args.duration)
                self.results["workers"].setdefault(scenario, {}).setdefault(
                    target.name, []
                ).append(report)
                log(
                    f"{scenario:16s} {target.name:10s} {report['rps']:9.0f} req/s"
                    + (f"  errors {report['error_count']}" if report["error_count"] else "")
                )

    def run(self) -> None:
        """Everything, in order."""
        deadline_s = time.monotonic() + self.args.max_minutes * 60
        log("B4: cost floor")
        self.results["b4"] = costfloor.measure()
        self.start()
        self.prepare_warm()
        self.warm_up()
        for rep in range(self.args.reps):
            if time.monotonic() > deadline_s:
                self.problem(f"stopped after {rep} repetitions: --max-minutes reached")
                break
            log(f"repetition {rep + 1} of {self.args.reps}")
            self.b1(rep)
            self.b2(rep)
            # The same load every time: what it leaves must not grow.
            for target in self.targets:
                self.results["b5"]["after_rep_rss_mib"][target.name].append(
                    rss_mib(target.process.pid)
                )
        # B3 comes after, as each of its runs adds new origins to the caches
        # (and keeps their connections for a while): memory that grows with
        # the origins known, not with repetitions of one load.
        for rep in range(self.args.reps):
            if time.monotonic() > deadline_s:
                break
            self.b3(rep)
        self.results["b5"]["after_b3_rss_mib"] = {
            t.name: rss_mib(t.process.pid) for t in self.targets
        }
        if self.args.workers > 1 and time.monotonic() < deadline_s:
            log(f"workers: {self.args.workers} against 1")
            multi = SynkeysTarget(
                os.path.join(self.workdir, "synkeys-workers"), self.key_path, self.cert_path,
                self.pki.ca_path, workers=self.args.workers,
                label=f"synkeys_x{self.args.workers}",
            )
            self.stoppable.append(multi)
            time.sleep(1.0)
            pair: List[Target] = [self.synkeys, multi]
            for target in pair:
                run_wrk(target, target.url("http", SERVER), 64, 1)
            for rep in range(self.args.reps):
                self.workers(rep, pair)
            self.results["workers"]["processes"] = len(multi.pids())


# -- report ----------------------------------------------------------------------


def median_range(values: Sequence[float]) -> Tuple[float, float, float]:
    """Median, minimum, maximum."""
    return statistics.median(values), min(values), max(values)


def fmt(values: Sequence[float], digits: int = 0) -> str:
    """``median (min–max)``."""
    if not values:
        return "-"
    med, lo, hi = median_range(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def ratios(
    loads: Mapping[str, List[Dict[str, Any]]], a: str, b: str, key: str = "rps"
) -> List[float]:
    """Per-repetition ``a/b`` of ``key`` (inverted for CPU per request)."""
    result = []
    for x, y in zip(loads.get(a, []), loads.get(b, [])):
        if key == "rps":
            result.append(x["rps"] / y["rps"] if y["rps"] else 0.0)
        else:
            result.append(y[key] / x[key] if x[key] else 0.0)
    return result


def summarise(results: Dict[str, Any]) -> Tuple[str, List[Dict[str, Any]]]:
    """The table as text, and every target's verdict."""
    lines = []
    verdicts: List[Dict[str, Any]] = []

    def verdict(name: str, values: List[float], holds: bool, wanted: str) -> None:
        verdicts.append(
            {"target": name, "values": values, "wanted": wanted, "holds": holds}
        )

    lines.append(
        f"{'scenario':17s} {'synkeys req/s':>22s} {'synapse req/s':>22s} {'raw req/s':>22s} "
        f"{'synkeys/synapse':>18s} {'synkeys/raw':>18s} {'CPU/req s/raw':>14s}"
    )
    for scenario, loads in results["loads"].items():
        row = [f"{scenario:17s}"]
        for name in ("synkeys", "synapse", "raw"):
            row.append(f"{fmt([r['rps'] for r in loads.get(name, [])]):>22s}")
        vs_synapse = ratios(loads, "synkeys", "synapse")
        vs_raw = ratios(loads, "synkeys", "raw")
        cpu_vs_raw = ratios(loads, "synkeys", "raw", "cpu_us_per_request")
        row.append(f"{fmt(vs_synapse, 2):>18s}")
        row.append(f"{fmt(vs_raw, 2):>18s}")
        row.append(f"{fmt(cpu_vs_raw, 2):>14s}")
        lines.append(" ".join(row))
        if scenario.startswith("b1_") and not scenario.endswith("_c1") and vs_raw:
            verdict(f"{scenario} synkeys/raw", vs_raw,
                    statistics.median(vs_raw) >= B1_MIN_RATIO, f">= {B1_MIN_RATIO}")
        if scenario.startswith("b2_") and vs_raw:
            count = int(scenario.rsplit("_", 1)[1])
            verdict(f"{scenario} synkeys/raw", vs_raw,
                    statistics.median(vs_raw) >= B2_MIN_RATIO[count],
                    f">= {B2_MIN_RATIO[count]}")
            checked = loads.get("synkeys", [])
            verdict(
                f"{scenario} synkeys answers all checked, no origin hits",
                [float(sum(r["bad"] + r["error_count"] + r["origin_hits"] for r in checked))],
                all(r["bad"] == 0 and r["error_count"] == 0 and r["origin_hits"] == 0
                    and r["good"] == r["requests"] for r in checked),
                "0 bad, 0 errors, 0 hits",
            )
    lines.append("")
    lines.append(
        f"{'B3 cold':17s} {'1 origin ms':>16s} {'50 origins ms':>18s} {'50/1':>16s} "
        f"{'hits per origin':>16s} {'20x20 hits':>12s}"
    )
    for name, reps in results["b3"].items():
        lines.append(
            f"{name:17s} {fmt([r['single_s'] * 1000 for r in reps]):>16s} "
            f"{fmt([r['fifty_s'] * 1000 for r in reps]):>18s} "
            f"{fmt([r['ratio'] for r in reps], 2):>16s} "
            f"{min(r['fifty_hits_min'] for r in reps)}-"
            f"{max(r['fifty_hits_max'] for r in reps):<14} "
            f"{fmt([r['twenty_hits'] for r in reps]):>12s}"
        )
    synkeys_b3 = results["b3"].get("synkeys", [])
    if synkeys_b3:
        ratios_b3 = [r["ratio"] for r in synkeys_b3]
        verdict("B3 50 cold origins / 1 (wall time)", ratios_b3,
                statistics.median(ratios_b3) <= B3_MAX_RATIO, f"<= {B3_MAX_RATIO}")
        verdict("B3 every origin fetched exactly once", [
            float(r["fifty_hits_max"]) for r in synkeys_b3],
            all(r["fifty_hits_min"] == 1 == r["fifty_hits_max"] for r in synkeys_b3), "1")
        verdict("B3 20 concurrent POSTs for 20 origins: hits",
                [float(r["twenty_hits"]) for r in synkeys_b3],
                all(r["twenty_hits"] == 20 for r in synkeys_b3), "20")
        verdict("B3 answers complete and doubly signed", [],
                all(r["complete"] for r in synkeys_b3), "all")
    lines.append("")
    lines.append("B4 cost floor (us/op): " + ", ".join(
        f"{k[:-3]} {v:.1f}" for k, v in results["b4"].items()))
    b5 = results["b5"]
    lines.append("")
    lines.append(
        f"{'B5 RSS MiB':17s} {'idle':>8s}  after each repetition of B1+B2 | after B3"
    )
    for name, idle in b5.get("idle_rss_mib", {}).items():
        after = b5["after_rep_rss_mib"].get(name, [])
        after_b3 = b5.get("after_b3_rss_mib", {}).get(name)
        lines.append(
            f"{name:17s} {idle:8.1f}  " + " ".join(f"{v:.1f}" for v in after)
            + (f" | {after_b3:.1f}" if after_b3 is not None else "")
        )
    if "synkeys" in b5.get("idle_rss_mib", {}):
        idle = b5["idle_rss_mib"]["synkeys"]
        verdict("B5 synkeys idle RSS MiB", [idle], idle <= B5_MAX_IDLE_MIB,
                f"<= {B5_MAX_IDLE_MIB}")
        after = b5["after_rep_rss_mib"]["synkeys"]
        if len(after) > 1:
            growth = max(after[1:]) - after[0]
            verdict("B5 synkeys RSS growth after repetition 1, MiB", [growth],
                    growth <= RSS_GROWTH_TOLERANCE_MIB, f"<= {RSS_GROWTH_TOLERANCE_MIB}")
    workers = {k: v for k, v in results["workers"].items() if k != "processes"}
    if workers:
        lines.append("")
        lines.append(f"{'workers':17s} {'1 process req/s':>22s} {'N workers req/s':>22s} "
                     f"{'N/1':>18s}")
        for scenario, loads in workers.items():
            multi = [k for k in loads if k != "synkeys"][0]
            gain = ratios(loads, multi, "synkeys")
            lines.append(
                f"{scenario:17s} {fmt([r['rps'] for r in loads['synkeys']]):>22s} "
                f"{fmt([r['rps'] for r in loads[multi]]):>22s} {fmt(gain, 2):>18s}"
            )
            verdict(f"{scenario} {multi}/1", gain,
                    statistics.median(gain) >= WORKERS_MIN_RATIO, f">= {WORKERS_MIN_RATIO}")
    lines.append("")
    lines.append("targets:")
    for v in verdicts:
        shown = fmt(v["values"], 2) if v["values"] else ""
        lines.append(f"  {'HOLDS' if v['holds'] else 'MISSES':6s} {v['target']}: {shown} "
                     f"(wanted {v['wanted']})")
    for problem in results["problems"]:
        lines.append(f"  PROBLEM {problem}")
    return "\n".join(lines), verdicts


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; exit status 1 when a target misses or a check fails."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--duration", type=int, default=3,
                        help="seconds per load (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="one repetition of 2-second loads")
    parser.add_argument("--workers", type=int, default=2,
                        help="also measure B1 with this many workers (1: skip)")
    parser.add_argument("--no-synapse", action="store_true", help="leave Synapse out")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "latest.json"),
                        help="where to write the results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    parser.add_argument("--max-minutes", type=float, default=15.0,
                        help="stop starting repetitions after this long")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.duration = 1, 2
    if shutil.which("wrk") is None:
        sys.stderr.write("wrk is needed: apt-get install wrk\n")
        return 2
    if not args.no_synapse:
        import importlib.util

        if importlib.util.find_spec("synapse") is None:
            sys.stderr.write("Synapse is needed (pip install '.[interop]'), or --no-synapse\n")
            return 2
    bench = Bench(args)
    started_s = time.monotonic()
    try:
        bench.run()
    finally:
        bench.stop()
    bench.results["meta"]["elapsed_s"] = time.monotonic() - started_s
    table, verdicts = summarise(bench.results)
    bench.results["verdicts"] = verdicts
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(bench.results, f, indent=1, sort_keys=True)
    print(table)
    print(f"\n(took {bench.results['meta']['elapsed_s']:.0f} s; JSON in {args.json})")
    return 0 if all(v["holds"] for v in verdicts) and not bench.results["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
