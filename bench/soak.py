"""
A bounded soak of a real ``twistd synkeys`` notary under mixed traffic.

One command starts everything on 127.0.0.1 (origins in this process, the
notary as a child process with an SQLite cache), drives it for
``--duration`` seconds with ``--concurrency`` clients, stops it, and
reports::

    python bench/soak.py                 # 60 s, 16 clients
    python bench/soak.py --duration 300 --json soak.json

The traffic, by weight:

- ``cached``: GET and POST ``/query`` for origins already in the cache,
  sometimes with ``minimum_valid_until_ts`` far ahead (a forced refetch,
  which the notary budgets);
- ``uncached``: a query for an origin never asked about before (a fetch
  over TLS, a write to the cache);
- ``failing``: origins that refuse connections, answer 500, answer a bad
  signature, answer garbage, or answer after the fetch timeout;
- ``malformed``: bad JSON, invalid server names and key ids, too many
  keys, a body over the size cap, unknown paths, wrong methods;
- ``server``: ``GET /_matrix/key/v2/server``; ``health``: ``GET /health``.

Reported: request rate, answers by kind and status, unexpected answers and
transport errors by kind, latency percentiles per kind, and the notary's
resident memory sampled every ``--sample-every`` seconds. The bar is zero
5xx, zero unexpected answers, zero transport errors, and flat memory
(growth from the end of the warm-up to the end below ``--max-growth-mib``);
the exit status is 0 only when it is met.

Bounds: at most 600 s, 64 clients and 2000 origins; every socket is on
127.0.0.1; the child is stopped by its PID.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from twisted.internet import reactor  # noqa: E402
from twisted.internet.defer import Deferred, DeferredList  # noqa: E402
from twisted.internet.ssl import PrivateCertificate  # noqa: E402
from twisted.internet.task import deferLater, react  # noqa: E402
from twisted.web.client import (  # noqa: E402
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    readBody,
)
from twisted.web.http_headers import Headers  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from twisted.web.server import NOT_DONE_YET, Request, Site  # noqa: E402

from synkeys.keyfile import generate_signing_key  # noqa: E402
from synkeys.keyserver import KeyPublisher  # noqa: E402

MAX_DURATION_S = 600
MAX_CONCURRENCY = 64
MAX_ORIGINS = 2000
LOOPBACK = "127.0.0.1"
#: The notary's fetch timeout; the "slow" origins answer after it.
FETCH_TIMEOUT_S = 3
#: Bound on one request of the load generator.
CLIENT_TIMEOUT_S = 20.0

#: Request kinds and their weights.
WEIGHTS = {"cached": 40, "uncached": 8, "failing": 12, "malformed": 25, "server": 10, "health": 5}


# -- origins ---------------------------------------------------------------------


class _QuietSite(Site):
    def log(self, request: Request) -> None:
        """No access log: the origins must not be what is measured."""


class OriginResource(Resource):
    """One origin: its keys, or one way of failing, at any path."""

    isLeaf = True

    def __init__(self, publisher: KeyPublisher, behaviour: str) -> None:
        super().__init__()
        self.publisher = publisher
        self.behaviour = behaviour
        self.hits = 0

    def render(self, request: Request) -> Any:
        """Answer as :attr:`behaviour` says."""
        self.hits += 1
        request.setHeader(b"Content-Type", b"application/json")
        if self.behaviour == "error500":
            request.setResponseCode(500)
            return b'{"errcode":"M_UNKNOWN","error":"soak"}'
        if self.behaviour == "garbage":
            return b"<html>not keys</html>"
        body = self.publisher.body()
        if self.behaviour == "badsig":
            obj = json.loads(body)
            for signatures in obj["signatures"].values():
                for key_id in signatures:
                    signatures[key_id] = "A" * 86
            return json.dumps(obj).encode()
        if self.behaviour == "slow":
            def late() -> None:
                if not request.finished and request.channel is not None:
                    request.write(body)
                    request.finish()

            call = reactor.callLater(FETCH_TIMEOUT_S + 2, late)
            request.notifyFinish().addErrback(lambda _: call.cancel() if call.active() else None)
            return NOT_DONE_YET
        return body


class Origins:
    """Origins on ports of 127.0.0.1, each named ``127.0.0.1:PORT``."""

    def __init__(self, certificate: PrivateCertificate) -> None:
        self._options = certificate.options()
        self.ports: List[Any] = []
        self.resources: Dict[str, OriginResource] = {}

    def start(self, behaviour: str) -> str:
        """Start one origin behaving as ``behaviour``; its server name."""
        if behaviour == "refused":
            with socket.socket() as s:
                s.bind((LOOPBACK, 0))
                return f"{LOOPBACK}:{s.getsockname()[1]}"
        holder: List[OriginResource] = []

        class Root(Resource):
            isLeaf = True

            def render(self, request: Request) -> Any:
                return holder[0].render(request)

        port = reactor.listenSSL(0, _QuietSite(Root()), self._options, interface=LOOPBACK)
        name = f"{LOOPBACK}:{port.getHost().port}"
        publisher = KeyPublisher(name, [generate_signing_key("o")], reactor)
        resource = OriginResource(publisher, behaviour)
        holder.append(resource)
        self.ports.append(port)
        self.resources[name] = resource
        return name

    def stop(self) -> Deferred[Any]:
        """Stop listening."""
        return DeferredList([port.stopListening() for port in self.ports])


# -- the notary ------------------------------------------------------------------


def free_port() -> int:
    """A port of 127.0.0.1 free right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` (MiB), from /proc."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def start_notary(directory: str, ca_path: str) -> Tuple[subprocess.Popen, int]:
    """``twistd -n synkeys`` from this checkout; the process and its port."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT)
    command = [
        sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
        "-n", "--pidfile=", f"--logfile={os.path.join(directory, 'notary.log')}", "synkeys",
        "--server-name", "notary.soak",
        "--signing-key", os.path.join(directory, "notary.key"),
        "--database", os.path.join(directory, "notary.sqlite"),
        "--listen", f"tcp:{port}:interface={LOOPBACK}",
        "--federation-ca", ca_path,
        "--allow-ip-range", "127.0.0.0/8",
        "--fetch-timeout", str(FETCH_TIMEOUT_S),
        "--connect-timeout", "2",
    ]
    process = subprocess.Popen(command, cwd=directory, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return process, port


# -- the load ---------------------------------------------------------------------


class Stats:
    """What the load saw."""

    def __init__(self) -> None:
        self.answers: Dict[str, Dict[int, int]] = {}
        self.latencies: Dict[str, List[float]] = {}
        self.unexpected: Dict[str, int] = {}
        self.transport_errors: Dict[str, int] = {}
        self.examples: List[str] = []

    def record(self, kind: str, code: int, seconds: float, ok: bool, detail: str) -> None:
        """One answer."""
        by_code = self.answers.setdefault(kind, {})
        by_code[code] = by_code.get(code, 0) + 1
        self.latencies.setdefault(kind, []).append(seconds)
        if not ok:
            key = f"{kind} {code}"
            self.unexpected[key] = self.unexpected.get(key, 0) + 1
            if len(self.examples) < 10:
                self.examples.append(f"{key}: {detail}")

    def error(self, kind: str, error: BaseException) -> None:
        """One request that got no answer."""
        key = f"{kind} {type(error).__name__}"
        self.transport_errors[key] = self.transport_errors.get(key, 0) + 1
        if len(self.examples) < 10:
            self.examples.append(f"{key}: {error!r}"[:300])

    @property
    def total(self) -> int:
        """Answers received."""
        return sum(sum(codes.values()) for codes in self.answers.values())

    def count_5xx(self) -> int:
        """Answers with a 5xx status."""
        return sum(n for codes in self.answers.values() for code, n in codes.items() if code >= 500)


def percentile(values: List[float], fraction: float) -> float:
    """The ``fraction`` percentile (nearest rank) of ``values``."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(fraction * len(ordered) + 0.5)) - 1))]


class Load:
    """Clients sending the mix of :data:`WEIGHTS` to the notary."""

    def __init__(self, port: int, cached: List[str], uncached: List[str], failing: List[str],
                 rng: random.Random) -> None:
        self.base = f"http://{LOOPBACK}:{port}".encode()
        self.cached = cached
        self.uncached = list(uncached)
        self.failing = failing
        self.rng = rng
        self.stats = Stats()
        self._uncached_total = len(uncached)
        self.started = time.monotonic()
        self.duration_s = 60.0
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = MAX_CONCURRENCY
        self.agent = Agent(reactor, pool=self.pool, connectTimeout=5)

    async def request(
        self, method: bytes, path: bytes, body: Optional[bytes] = None
    ) -> Tuple[int, bytes]:
        """One request: status and body."""
        producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
        headers = Headers({b"Content-Type": [b"application/json"]})
        d = self.agent.request(method, self.base + path, headers, producer)
        d.addTimeout(CLIENT_TIMEOUT_S, reactor)
        response = await d
        content = await readBody(response)
        return response.code, content

    def _uncached_due(self) -> bool:
        """Whether a cold origin may be asked now: they are spread over the whole run."""
        elapsed = time.monotonic() - self.started
        used = self._uncached_total - len(self.uncached)
        return bool(self.uncached) and used < self._uncached_total * elapsed / self.duration_s

    def pick(self) -> Tuple[str, bytes, bytes, Optional[bytes], Any]:
        """A request of the mix: kind, method, path, body, and a check of the answer."""
        kind = self.rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
        if kind == "uncached" and not self._uncached_due():
            kind = "cached"
        query = b"/_matrix/key/v2/query"
        if kind == "cached":
            names = self.rng.sample(self.cached, self.rng.randint(1, min(5, len(self.cached))))
            if self.rng.random() < 0.4:
                return kind, b"GET", query + b"/" + names[0].encode(), None, _answers(names[:1])
            # One in ten asks for a validity no cached response has: a
            # forced refetch, which the notary budgets per origin.
            far = 30 * 86_400_000 if self.rng.random() < 0.1 else 0
            minimum = int(time.time() * 1000) + far
            wanted = {"ed25519:o": {"minimum_valid_until_ts": minimum}}
            body = json.dumps({"server_keys": {n: wanted for n in names}}).encode()
            return kind, b"POST", query, body, _answers(names)
        if kind == "uncached":
            name = self.uncached.pop()
            body = json.dumps({"server_keys": {name: {}}}).encode()
            return kind, b"POST", query, body, _answers([name])
        if kind == "failing":
            name = self.rng.choice(self.failing)
            return kind, b"GET", query + b"/" + name.encode(), None, _answers([])
        if kind == "server":
            return kind, b"GET", b"/_matrix/key/v2/server", None, _status(200)
        if kind == "health":
            return kind, b"GET", b"/health", None, _status(200)
        return ("malformed", *self.rng.choice(MALFORMED))

    async def worker(self, deadline: float) -> None:
        """Send requests one after another until ``deadline``."""
        while time.monotonic() < deadline:
            kind, method, path, body, check = self.pick()
            started = time.monotonic()
            try:
                code, content = await self.request(method, path, body)
            except Exception as e:  # noqa: BLE001 - counted by type
                self.stats.error(kind, e)
                await deferLater(reactor, 0.05, lambda: None)
                continue
            ok, detail = check(code, content)
            self.stats.record(kind, code, time.monotonic() - started, ok, detail)


def _status(*codes: int) -> Any:
    def check(code: int, content: bytes) -> Tuple[bool, str]:
        return code in codes, content[:200].decode("utf-8", "replace")

    return check


def _matrix_error(*codes: int) -> Any:
    def check(code: int, content: bytes) -> Tuple[bool, str]:
        try:
            body = json.loads(content)
            ok = code in codes and isinstance(body.get("errcode"), str) and "error" in body
        except ValueError:
            ok = False
        return ok, content[:200].decode("utf-8", "replace")

    return check


def _answers(names: List[str]) -> Any:
    """200 with a ``server_keys`` list that includes each of ``names``."""

    def check(code: int, content: bytes) -> Tuple[bool, str]:
        try:
            body = json.loads(content)
            found = {e.get("server_name") for e in body["server_keys"]}
        except (ValueError, KeyError, TypeError, AttributeError):
            return False, content[:200].decode("utf-8", "replace")
        return code == 200 and set(names) <= found, f"{code} missing {set(names) - found}"

    return check


_QUERY = b"/_matrix/key/v2/query"
_TOO_MANY = json.dumps({"server_keys": {f"s{i}.test": {} for i in range(3000)}}).encode()

MALFORMED: List[Tuple[bytes, bytes, Optional[bytes], Any]] = [
    (b"POST", b"/_matrix/key/v2/query", b"{not json", _matrix_error(400)),
    (b"POST", _QUERY, b'{"server_keys": []}', _matrix_error(400)),
    (b"POST", _QUERY, b'{"server_keys": {"a b": {}}}', _matrix_error(400)),
    (b"POST", _QUERY, b'{"server_keys": {"x.test": {"rsa:1": {}}}}', _matrix_error(400)),
    (b"POST", _QUERY, b'{"server_keys": {}, "server_keys": {}}', _matrix_error(400)),
    (b"POST", _QUERY, b"\xff\xfe", _matrix_error(400)),
    (b"POST", _QUERY, _TOO_MANY, _matrix_error(400)),
    (b"POST", _QUERY, b'{"pad": "' + b"x" * (2 * 1024 * 1024) + b'"}', _matrix_error(413)),
    (b"GET", b"/_matrix/key/v2/query/a%2Fb", None, _matrix_error(400)),
    (b"GET", b"/_matrix/key/v2/query/x.test?minimum_valid_until_ts=-1", None, _matrix_error(400)),
    (b"GET", b"/_matrix/key/v2/query/x.test/rsa:1", None, _matrix_error(400)),
    (b"GET", b"/_matrix/key/v2/nothing", None, _matrix_error(404)),
    (b"DELETE", b"/_matrix/key/v2/server", None, _matrix_error(405)),
    (b"PUT", b"/_matrix/key/v2/query", b"{}", _matrix_error(405)),
]


# -- the run ------------------------------------------------------------------------


async def soak(reactor_: Any, args: argparse.Namespace) -> int:
    """Run the soak; the exit status."""
    import trustme

    rng = random.Random(args.seed)
    directory = tempfile.mkdtemp(prefix="synkeys-soak-")
    ca = trustme.CA()
    ca_path = os.path.join(directory, "ca.pem")
    ca.cert_pem.write_to_path(ca_path)
    certificate = PrivateCertificate.loadPEM(
        ca.issue_cert(LOOPBACK).private_key_and_cert_chain_pem.bytes()
    )
    origins = Origins(certificate)
    cached = [origins.start("good") for _ in range(args.cached_origins)]
    uncached = [origins.start("good") for _ in range(args.uncached_origins)]
    failing = [
        origins.start(kind)
        for kind in ("refused", "error500", "badsig", "garbage", "slow")
        for _ in range(args.failing_origins // 5 or 1)
    ]
    process, port = start_notary(directory, ca_path)
    load = Load(port, cached, uncached, failing, rng)
    samples: List[Tuple[float, float]] = []
    try:
        for _ in range(300):
            try:
                code, _ = await load.request(b"GET", b"/health")
                if code == 200:
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            if process.poll() is not None:
                raise SystemExit(f"the notary exited; see {directory}/notary.log")
            await deferLater(reactor, 0.1, lambda: None)
        # Warm the cache with the cached origins.
        body = json.dumps({"server_keys": {n: {} for n in cached}}).encode()
        code, content = await load.request(b"POST", b"/_matrix/key/v2/query", body)
        warmed = len(json.loads(content)["server_keys"])
        started = time.monotonic()
        deadline = started + args.duration
        load.started, load.duration_s = started, args.duration

        async def sampler() -> None:
            while time.monotonic() < deadline:
                samples.append((time.monotonic() - started, rss_mib(process.pid)))
                await deferLater(reactor, args.sample_every, lambda: None)
            samples.append((time.monotonic() - started, rss_mib(process.pid)))

        running = [Deferred.fromCoroutine(sampler())] + [
            Deferred.fromCoroutine(load.worker(deadline)) for _ in range(args.concurrency)
        ]
        await DeferredList(running)
        elapsed = time.monotonic() - started
        await load.pool.closeCachedConnections()
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
        await origins.stop()

    fetched_cold = len(uncached) - len(load.uncached)
    report = summarise(load.stats, samples, elapsed, args, warmed, fetched_cold)
    print(render(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, sort_keys=True)
    print(f"(work directory with the notary's log: {directory})")
    return 0 if report["passed"] else 1


def summarise(stats: Stats, samples: List[Tuple[float, float]], elapsed: float,
              args: argparse.Namespace, warmed: int, uncached_used: int) -> Dict[str, Any]:
    """The numbers of a run, as a JSON-able dict."""
    everything = [s for values in stats.latencies.values() for s in values]
    latency = {
        kind: {name: round(percentile(values, q) * 1000, 1)
               for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))}
        for kind, values in sorted(list(stats.latencies.items()) + [("all", everything)])
    }
    warm = [rss for t, rss in samples if t >= args.warmup] or [rss for _, rss in samples]
    growth = (warm[-1] - warm[0]) if warm else 0.0
    count_5xx = stats.count_5xx()
    unexpected = sum(stats.unexpected.values())
    errors = sum(stats.transport_errors.values())
    return {
        "duration_s": round(elapsed, 1),
        "concurrency": args.concurrency,
        "requests": stats.total,
        "rate_per_s": round(stats.total / elapsed, 1) if elapsed else 0.0,
        "answers": {
            kind: {str(code): n for code, n in sorted(codes.items())}
            for kind, codes in sorted(stats.answers.items())
        },
        "count_5xx": count_5xx,
        "unexpected": stats.unexpected,
        "transport_errors": stats.transport_errors,
        "examples": stats.examples,
        "latency_ms": latency,
        "memory_mib": [[round(t, 1), round(rss, 1)] for t, rss in samples],
        "memory_growth_mib": round(growth, 1),
        "warmed_origins": warmed,
        "uncached_origins_fetched": uncached_used,
        "passed": (
            count_5xx == 0 and unexpected == 0 and errors == 0 and growth < args.max_growth_mib
        ),
    }


def render(report: Dict[str, Any]) -> str:
    """The report as text."""
    lines = [
        f"soak: {report['requests']} requests in {report['duration_s']} s "
        f"({report['rate_per_s']}/s) from {report['concurrency']} clients; "
        f"{report['warmed_origins']} origins warmed, "
        f"{report['uncached_origins_fetched']} fetched cold",
        "answers by kind and status:",
    ]
    for kind, codes in report["answers"].items():
        lines.append(f"  {kind:10s} " + ", ".join(f"{c}: {n}" for c, n in codes.items()))
    lines.append(f"5xx: {report['count_5xx']}; unexpected answers: {report['unexpected'] or 0}; "
                 f"transport errors: {report['transport_errors'] or 0}")
    for example in report["examples"]:
        lines.append(f"  e.g. {example}")
    lines.append("latency (ms)      p50      p90      p99      max")
    for kind, values in report["latency_ms"].items():
        columns = " ".join(f"{values[k]:8.1f}" for k in ("p50", "p90", "p99", "max"))
        lines.append(f"  {kind:10s} {columns}")
    samples = ", ".join(f"{t:.0f}:{m:.1f}" for t, m in report["memory_mib"])
    lines.append(f"notary RSS (MiB) at t (s): {samples}")
    lines.append(f"RSS growth after warm-up: {report['memory_growth_mib']} MiB")
    lines.append("PASS" if report["passed"] else "FAIL")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    """Parse the bounded options and run."""
    # Twisted warns that pooled HTTP/1.1 transports cannot be aborted.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (max 600)")
    parser.add_argument("--concurrency", type=int, default=16, help="clients (max 64)")
    parser.add_argument("--cached-origins", type=int, default=20)
    parser.add_argument("--uncached-origins", type=int, default=600)
    parser.add_argument("--failing-origins", type=int, default=20)
    parser.add_argument("--warmup", type=float, default=15.0,
                        help="seconds before memory growth is measured")
    parser.add_argument("--sample-every", type=float, default=5.0,
                        help="seconds between RSS samples")
    parser.add_argument("--max-growth-mib", type=float, default=20.0,
                        help="RSS growth after warm-up that still counts as flat")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= MAX_DURATION_S:
        parser.error(f"--duration must be in (0, {MAX_DURATION_S}]")
    if not 0 < args.concurrency <= MAX_CONCURRENCY:
        parser.error(f"--concurrency must be in (0, {MAX_CONCURRENCY}]")
    origins = args.cached_origins + args.uncached_origins + args.failing_origins
    if args.cached_origins < 1 or origins > MAX_ORIGINS:
        parser.error(f"at least one cached origin and at most {MAX_ORIGINS} origins in all")
    react(lambda r: Deferred.fromCoroutine(_exit_with(soak(r, args))))


async def _exit_with(run: Any) -> None:
    status = await run
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()
