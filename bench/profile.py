"""
Where synkeys spends its time per request: start synkeys (and the origin
farm, warming the notary's cache), load one scenario with ``wrk`` while
``py-spy`` samples the server, and print the share of samples per function
(:mod:`bench.folded`) with the CPU time per request.

    python bench/profile.py get            # B1: GET /server, plain, c16
    python bench/profile.py post1          # B2: warm POST for 1 origin
    python bench/profile.py post10         # B2: warm POST for 10 origins
    python bench/profile.py get --access-log log   # as twistd did by default
    python bench/profile.py cold           # B3: POSTs for 50 cold origins each

Needs ``py-spy`` (``pip install py-spy``) and permission to sample a child
process (root, or ``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import folded  # noqa: E402
from bench.run import (  # noqa: E402
    COLD_DELAY_MS,
    QUERY,
    SERVER,
    check_answer,
    post,
    query_body,
    run_wrk,
)
from bench.targets import OriginFarm, SynkeysTarget, cpu_s  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Profile one scenario and print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=["get", "get-tls", "post1", "post10", "cold"])
    parser.add_argument("--duration", type=int, default=6, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--access-log", default="off", help="synkeys --access-log")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--output", help="also keep the folded stacks here")
    parser.add_argument("--rounds", type=int, default=15,
                        help="cold: how many POSTs for 50 new origins (at most 40)")
    args = parser.parse_args(argv)
    if shutil.which("py-spy") is None or shutil.which("wrk") is None:
        sys.stderr.write("needs py-spy (pip install py-spy) and wrk (apt-get install wrk)\n")
        return 2
    from tests.tlsutil import TestPKI

    workdir = tempfile.mkdtemp(prefix="synkeys-profile-")
    pki = TestPKI(os.path.join(workdir, "pki"))
    key_path, cert_path = pki.issue("localhost", ["localhost", "127.0.0.1"])
    started: List[object] = []
    try:
        farm = OriginFarm(workdir, key_path, cert_path)
        started.append(farm)
        synkeys = SynkeysTarget(
            os.path.join(workdir, "synkeys"), key_path, cert_path, pki.ca_path,
            extra_args=("--access-log", args.access_log),
        )
        started.append(synkeys)
        if args.scenario == "cold":
            return profile_cold(args, farm, synkeys, args.output or os.path.join(workdir, "cold"))
        body_path = None
        expect = None
        url = synkeys.url("https" if args.scenario == "get-tls" else "http", SERVER)
        if args.scenario.startswith("post"):
            origins = farm.spawn(int(args.scenario[4:]))
            body = query_body(origins, 0)
            code, answer, _ = post(synkeys, body)
            problems = check_answer(answer, origins, synkeys.server_name, synkeys.verify_keys())
            if code != 200 or problems:
                sys.stderr.write(f"warming failed: {code} {problems}\n")
                return 1
            body_path = os.path.join(workdir, "body.json")
            with open(body_path, "wb") as f:
                f.write(body)
            expect = len(answer)
            url = synkeys.url("http", QUERY)
        run_wrk(synkeys, url, args.concurrency, 1, body_path=body_path, expect_length=expect)
        # Measured without the profiler, which pauses the process at each sample.
        unprofiled = run_wrk(
            synkeys, url, args.concurrency, args.duration,
            body_path=body_path, expect_length=expect,
        )
        output = args.output or os.path.join(workdir, "profile.folded")
        spy = subprocess.Popen(
            ["py-spy", "record", "--pid", str(synkeys.process.pid), "--format", "raw",
             "--rate", "100", "--duration", str(max(1, args.duration - 2)), "--output", output,
             ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        reports = []
        load = threading.Thread(
            target=lambda: reports.append(
                run_wrk(synkeys, url, args.concurrency, args.duration,
                        body_path=body_path, expect_length=expect)
            )
        )
        load.start()
        spy.wait(args.duration + 30)
        load.join(args.duration + 60)
        print(
            f"{args.scenario}: {unprofiled['rps']:.0f} req/s, "
            f"{unprofiled['cpu_us_per_request']:.1f} us CPU per request without the profiler "
            f"({reports[0]['rps']:.0f} req/s while sampled; access log {args.access_log}, "
            f"c{args.concurrency})"
        )
        print_profile(output, args.top)
    finally:
        for process in reversed(started):
            process.stop()  # type: ignore[attr-defined]
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def print_profile(output: str, top: int) -> None:
    """Summarise the reactor thread's samples in ``output`` (py-spy raw format)."""
    with open(output, encoding="utf-8") as f:
        stacks = folded.read_folded(f)
    stacks = [(f, n) for f, n in stacks if any("mainLoop" in frame for frame in f)]
    total, inclusive, own = folded.summarise(stacks)
    print(f"{total} samples of the reactor thread")
    print("-- where the time goes --")
    for name, count in sorted(folded.buckets(stacks).items(), key=lambda kv: -kv[1]):
        print(f"{100 * count / max(total, 1):5.1f}%  {name}")
    for title, counts in (("inclusive", inclusive), ("self", own)):
        print(f"-- {title} --")
        for name, count in counts.most_common(top):
            print(f"{100 * count / max(total, 1):5.1f}%  {name}")


def profile_cold(
    args: argparse.Namespace, farm: OriginFarm, synkeys: SynkeysTarget, output: str
) -> int:
    """
    B3 under the profiler: ``--rounds`` POSTs, each for 50 new origins
    answering after 100 ms, each after a POST for one new origin; prints
    per round the wall times, the notary's CPU time and when the origins
    were asked, then the profile (which includes the reactor's idle waits
    in ``doPoll``).
    """
    rounds = max(1, min(args.rounds, 40))
    minimum_ts = int(time.time() * 1000)
    post(synkeys, query_body(farm.spawn(1, COLD_DELAY_MS), minimum_ts))
    batches = [(farm.spawn(1, COLD_DELAY_MS), farm.spawn(50, COLD_DELAY_MS)) for _ in range(rounds)]
    spy = subprocess.Popen(
        ["py-spy", "record", "--pid", str(synkeys.process.pid), "--format", "raw",
         "--rate", "250", "--duration", str(rounds + 3), "--output", output],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    pid = synkeys.process.pid
    for single, fifty in batches:
        _, _, single_s = post(synkeys, query_body(single, minimum_ts))
        cpu_before = cpu_s([pid])
        started_s = time.monotonic()
        code, _, fifty_s = post(synkeys, query_body(fifty, minimum_ts))
        cpu_ms = (cpu_s([pid]) - cpu_before) * 1000
        asked = sorted(times[0] - started_s for times in farm.times(fifty).values() if times)
        when = (
            f"origins asked from {asked[0] * 1000:3.0f} to {asked[-1] * 1000:3.0f} ms"
            if asked else "no origin was asked"
        )
        print(
            f"1 origin {single_s * 1000:4.0f} ms, 50 origins {fifty_s * 1000:4.0f} ms "
            f"(x{fifty_s / max(single_s, 1e-9):.2f}, status {code}); "
            f"notary CPU {cpu_ms:3.0f} ms; {when}"
        )
        time.sleep(0.2)
    spy.wait(rounds + 60)
    print_profile(output, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
