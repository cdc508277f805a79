"""
Prometheus metrics of one service, in a registry of its own.

:class:`ServiceMetrics` holds the metrics and the hooks that feed them;
the rest of synkeys does not know it exists. It is fed by decorators
around the service's seams, each an implementation of the interface it
wraps:

- :class:`ObservedFederationClient` times every request to another server;
- :class:`ObservedFetcher` counts and logs each server a fetcher was asked
  for, one line per outcome;
- :class:`TimedKeyStore` times every store call;

and by hooks: :meth:`ServiceMetrics.observe_request` (a
:class:`synkeys.health.ServiceSite` request hook), :meth:`observe_batch`
and :meth:`observe_disagreement` (keyring hooks). The notary's own counters
are read at scrape time by :class:`NotaryCollector`, and so are the
requests answered, which :class:`RequestCollector` counts in plain
integers (the per-request path is the hottest in the service).

:class:`MetricsResource` serves the registry; ``docs/metrics.md`` lists
every metric.
"""

from __future__ import annotations

from bisect import bisect_left
from itertools import accumulate
from typing import (
    Any,
    Awaitable,
    Callable,
    Collection,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Tuple,
    TypeVar,
)

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from synkeys.errors import FetchError
from synkeys.fetchers import QUERY_PATH, SERVER_KEYS_PATH
from synkeys.interfaces import (
    FederationResponse,
    FetchResult,
    IFederationClient,
    IKeyFetcher,
    IKeyStore,
    KeyRequests,
    StoreResult,
)
from synkeys.keys import ServerKeys
from synkeys.storage.errors import StoreUnavailable

__all__ = [
    "MetricsResource",
    "NotaryCollector",
    "RequestCollector",
    "ObservedFederationClient",
    "ObservedFetcher",
    "ServiceMetrics",
    "TimedKeyStore",
    "endpoint_label",
    "metrics_site",
]

log = Logger()

_T = TypeVar("_T")

#: Buckets (seconds) for requests answered by this service.
HTTP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: Buckets (seconds) for requests to other servers; they time out at 30 s by default.
FETCH_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)
#: Buckets (seconds) for store calls.
STORE_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)
#: Buckets for keyring batch sizes (servers, or key ids).
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)

_ENDPOINTS = (
    (b"/_matrix/key/v2/server", "server"),
    (b"/_matrix/key/v2/query", "query"),
    (b"/health", "health"),
)
_METHODS = frozenset({"GET", "HEAD", "POST", "OPTIONS", "PUT", "DELETE"})
#: The method label of each known method, by the bytes a request carries.
_METHOD_LABELS = {method.encode("ascii"): method for method in _METHODS}
#: The endpoint label of the exact paths most requests have (a dict lookup
#: instead of :func:`endpoint_label`'s prefix checks).
_EXACT_ENDPOINTS = {prefix: label for prefix, label in _ENDPOINTS}


def endpoint_label(path: bytes) -> str:
    """
    The ``endpoint`` label of a request path: ``server``, ``query``,
    ``health`` or ``other`` (a bounded set, whatever clients send).
    """
    path = path.split(b"?", 1)[0]
    for prefix, label in _ENDPOINTS:
        if path == prefix or path.startswith(prefix + b"/"):
            return label
    return "other"


class RequestCollector:
    """
    ``synkeys_http_requests_total`` and
    ``synkeys_http_request_duration_seconds``, counted in plain integers
    per request and turned into metric families only when scraped.

    Everything runs in the reactor thread; a scrape from another thread
    reads copies of the dicts, at worst a request behind.

    :param clock: Stamps the ``_created`` samples (when a label set was
        first seen), as ``prometheus_client`` would.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        #: Requests by (endpoint, method, code); code is an int or "aborted".
        self._counts: Dict[Tuple[str, str, Any], int] = {}
        self._counts_created_s: Dict[Tuple[str, str, Any], float] = {}
        #: Per endpoint, how many durations fell in each bucket (not cumulative;
        #: the last one is +Inf), their sum, and when it was first seen.
        self._buckets: Dict[str, List[int]] = {}
        self._sums_s: Dict[str, float] = {}
        self._buckets_created_s: Dict[str, float] = {}

    def observe(self, request: Request, duration_s: float, aborted: bool) -> None:
        """Count one answered (or, when ``aborted``, abandoned) request."""
        path = request.path or b""
        endpoint = _EXACT_ENDPOINTS.get(path) or endpoint_label(path)
        method = _METHOD_LABELS.get(request.method, "other")
        key = (endpoint, method, "aborted" if aborted else request.code)
        counts = self._counts
        count = counts.get(key)
        if count is None:
            self._counts_created_s[key] = float(self._clock.seconds())
            count = 0
        counts[key] = count + 1
        if duration_s < 0.0:
            duration_s = 0.0
        buckets = self._buckets.get(endpoint)
        if buckets is None:
            buckets = self._buckets[endpoint] = [0] * (len(HTTP_BUCKETS_S) + 1)
            self._sums_s[endpoint] = 0.0
            self._buckets_created_s[endpoint] = float(self._clock.seconds())
        # Prometheus buckets are "less than or equal": the first bound >= d.
        buckets[bisect_left(HTTP_BUCKETS_S, duration_s)] += 1
        self._sums_s[endpoint] += duration_s

    def describe(self) -> List[Metric]:
        """The families' names, for the registry's duplicate check."""
        return [self._requests_family(), self._durations_family()]

    def collect(self) -> Iterator[Metric]:
        """The request counts and durations as they stand."""
        requests = self._requests_family()
        created = dict(self._counts_created_s)
        for key, value in sorted(dict(self._counts).items(), key=lambda kv: str(kv[0])):
            endpoint, method, code = key
            requests.add_metric([endpoint, method, str(code)], value, created=created.get(key))
        yield requests
        durations = self._durations_family()
        bounds = [floatToGoString(b) for b in HTTP_BUCKETS_S] + ["+Inf"]
        sums = dict(self._sums_s)
        buckets_created = dict(self._buckets_created_s)
        for endpoint, counts in sorted(dict(self._buckets).items()):
            cumulative = list(accumulate(list(counts)))
            durations.add_metric([endpoint], list(zip(bounds, cumulative)), sums.get(endpoint, 0.0))
            created_s = buckets_created.get(endpoint)
            if created_s is not None:
                durations.add_sample(
                    "synkeys_http_request_duration_seconds_created",
                    {"endpoint": endpoint},
                    created_s,
                )
        yield durations

    @staticmethod
    def _requests_family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "synkeys_http_requests",
            "Requests answered, by endpoint, method and status code "
            "(code 'aborted': the client went away first).",
            labels=["endpoint", "method", "code"],
        )

    @staticmethod
    def _durations_family() -> HistogramMetricFamily:
        return HistogramMetricFamily(
            "synkeys_http_request_duration_seconds",
            "Time from a request's arrival to its answer.",
            labels=["endpoint"],
        )


class ServiceMetrics:
    """
    Every metric of one service.

    :param clock: Where durations are measured.
    :param registry: Where the metrics are registered; a new
        :class:`CollectorRegistry` by default, so that several services (or
        tests) in one process never share or collide.
    :param standard_collectors: Also register ``prometheus_client``'s
        process, platform and garbage collector metrics.

    :ivar registry: The registry to serve.
    """

    def __init__(
        self,
        clock: IReactorTime,
        registry: Optional[CollectorRegistry] = None,
        *,
        standard_collectors: bool = True,
    ) -> None:
        self.clock = clock
        self.registry = registry if registry is not None else CollectorRegistry()
        self._children: Dict[Tuple[int, Tuple[str, ...]], Any] = {}
        r = self.registry
        if standard_collectors:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        # Counted per request in plain dicts and read at scrape time: a
        # prometheus_client child's inc() and observe() take a lock each,
        # a measurable share of a /server request (docs/performance.md).
        self.http_requests = RequestCollector(clock)
        r.register(self.http_requests)
        self.http_requests_in_flight = Gauge(
            "synkeys_http_requests_in_flight",
            "Requests being answered now.",
            registry=r,
        )
        self.federation_requests = Counter(
            "synkeys_federation_requests",
            "Requests to other servers (origins' /server, upstream notaries' /query), "
            "by endpoint and outcome.",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.federation_request_duration = Histogram(
            "synkeys_federation_request_duration_seconds",
            "Time a request to another server took, by endpoint and outcome.",
            ["endpoint", "outcome"],
            buckets=FETCH_BUCKETS_S,
            registry=r,
        )
        self.federation_requests_in_flight = Gauge(
            "synkeys_federation_requests_in_flight",
            "Requests to other servers outstanding now.",
            registry=r,
        )
        self.key_fetches = Counter(
            "synkeys_key_fetches",
            "Servers a fetcher was asked for, by fetcher and outcome "
            "(found, partial, failed, error).",
            ["fetcher", "outcome"],
            registry=r,
        )
        self.key_fetch_duration = Histogram(
            "synkeys_key_fetch_duration_seconds",
            "Time one fetcher call took (for all the servers it was asked for).",
            ["fetcher"],
            buckets=FETCH_BUCKETS_S,
            registry=r,
        )
        self.key_fetches_in_flight = Gauge(
            "synkeys_key_fetches_in_flight",
            "Servers being fetched now, by fetcher.",
            ["fetcher"],
            registry=r,
        )
        self.keyring_batch_servers = Histogram(
            "synkeys_keyring_batch_servers",
            "Servers in each keyring batch.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.keyring_batch_keys = Histogram(
            "synkeys_keyring_batch_keys",
            "(server, key id) pairs in each keyring batch ('all keys' counts as one).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.perspective_disagreements = Counter(
            "synkeys_perspective_disagreements",
            "Times upstream notaries reported different bytes for one key.",
            registry=r,
        )
        self.store_operation_duration = Histogram(
            "synkeys_store_operation_duration_seconds",
            "Time a key store call took, by operation and outcome "
            "(ok, unavailable, error).",
            ["operation", "outcome"],
            buckets=STORE_BUCKETS_S,
            registry=r,
        )

    def seconds(self) -> float:
        """Now, on the metrics' clock."""
        return float(self.clock.seconds())

    def child(self, metric: Any, *labels: str) -> Any:
        """
        ``metric.labels(*labels)``, looked up once per label set: each
        ``labels()`` call takes a lock and checks its arguments, a few
        microseconds that every fetch would otherwise pay several times.
        Label sets here are few (fetcher names, endpoints, outcomes).
        """
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    # -- hooks -----------------------------------------------------------

    def observe_request(self, request: Request, duration_s: float, aborted: bool) -> None:
        """A :data:`synkeys.health.RequestHook`: count one answered request."""
        self.http_requests.observe(request, duration_s, aborted)

    def watch_site(self, site: Any) -> None:
        """Report ``site.open_request_count`` as the requests in flight."""
        self.http_requests_in_flight.set_function(lambda: site.open_request_count)

    def observe_batch(self, servers: int, pairs: int) -> None:
        """A :data:`synkeys.keyring.BatchHook`: record one batch's size."""
        self.keyring_batch_servers.observe(servers)
        self.keyring_batch_keys.observe(pairs)

    def observe_disagreement(
        self, server_name: str, key_id: str, answers: Mapping[str, bytes]
    ) -> None:
        """A :data:`synkeys.keyring.DisagreementHook`: count one disagreement."""
        self.perspective_disagreements.inc()

    def watch_notary(self, counters: Mapping[str, int]) -> None:
        """Serve a notary's ``counters`` (read at each scrape)."""
        self.registry.register(NotaryCollector(counters))


class NotaryCollector:
    """
    Reads :attr:`synkeys.notary.Notary.counters` at scrape time, so the
    notary needs no metrics code.

    :param counters: The notary's counters by name.
    """

    def __init__(self, counters: Mapping[str, int]) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        """Yield the notary's metric families."""
        counters = dict(self._counters)
        decisions = {
            name[len("decision_") :]: value
            for name, value in counters.items()
            if name.startswith("decision_")
        }
        hits = decisions.get("cached", 0)
        lookups = CounterMetricFamily(
            "synkeys_notary_cache_lookups",
            "Servers looked up in the notary's cache: hit when the cache answered "
            "as it stood, miss otherwise (fetched, or stale and not fetchable now).",
            labels=["result"],
        )
        lookups.add_metric(["hit"], hits)
        lookups.add_metric(["miss"], sum(decisions.values()) - hits)
        yield lookups
        by_decision = CounterMetricFamily(
            "synkeys_notary_decisions",
            "The notary's freshness decisions per server looked up "
            "(cached, due, forced, backing_off, budget_spent).",
            labels=["decision"],
        )
        for decision, value in sorted(decisions.items()):
            by_decision.add_metric([decision], value)
        yield by_decision
        fetches = CounterMetricFamily(
            "synkeys_notary_origin_fetches",
            "Servers the notary fetched: ok, failed, or joined (a fetch already under way).",
            labels=["outcome"],
        )
        for outcome in ("ok", "failed", "joined"):
            fetches.add_metric([outcome], counters.get("fetch_" + outcome, 0))
        yield fetches
        countersign = CounterMetricFamily(
            "synkeys_notary_countersign_cache",
            "Relayed responses whose countersigned bytes were cached (hit) or signed now (miss).",
            labels=["result"],
        )
        countersign.add_metric(["hit"], counters.get("countersign_cache_hit", 0))
        countersign.add_metric(["miss"], counters.get("countersigned", 0))
        yield countersign
        answered = CounterMetricFamily(
            "synkeys_notary_answered_servers",
            "Servers for which a query was answered with at least one response.",
        )
        answered.add_metric([], counters.get("answered_servers", 0))
        yield answered


def _federation_endpoint(path: bytes) -> str:
    if path == SERVER_KEYS_PATH or path.startswith(SERVER_KEYS_PATH + b"/"):
        return "server"
    if path == QUERY_PATH or path.startswith(QUERY_PATH + b"/"):
        return "query"
    return "other"


def _response_outcome(response: FederationResponse) -> str:
    if response.code == 200:
        return "ok"
    if 400 <= response.code < 600:
        return f"http_{response.code // 100}xx"
    return "http_other"


@implementer(IFederationClient)
class ObservedFederationClient:
    """
    An :class:`IFederationClient` that times and counts the requests of
    ``client``.

    Outcomes: ``ok`` (HTTP 200), ``http_4xx``, ``http_5xx``,
    ``http_other``, a :attr:`FetchError.kind <synkeys.errors.FetchError.kind>`
    (``timeout``, ``tls``, ``connect``, ...), ``cancelled`` or ``error``.

    :param client: The client doing the work.
    :param metrics: Where to count.
    """

    def __init__(self, client: IFederationClient, metrics: ServiceMetrics) -> None:
        self._client = client
        self._metrics = metrics

    def get(self, server_name: str, path: bytes) -> Deferred[FederationResponse]:
        """See :meth:`IFederationClient.get`."""
        return self._observe(path, lambda: self._client.get(server_name, path))

    def post_json(
        self, server_name: str, path: bytes, body: bytes
    ) -> Deferred[FederationResponse]:
        """See :meth:`IFederationClient.post_json`."""
        return self._observe(path, lambda: self._client.post_json(server_name, path, body))

    def _observe(
        self,
        path: bytes,
        call: Callable[[], Deferred[FederationResponse]],
    ) -> Deferred[FederationResponse]:
        metrics = self._metrics
        endpoint = _federation_endpoint(path)
        started_s = metrics.seconds()
        metrics.federation_requests_in_flight.inc()

        def done(outcome: str) -> None:
            # Not logged here: ObservedFetcher logs each fetch outcome once.
            duration_s = max(0.0, metrics.seconds() - started_s)
            metrics.federation_requests_in_flight.dec()
            metrics.child(metrics.federation_requests, endpoint, outcome).inc()
            metrics.child(metrics.federation_request_duration, endpoint, outcome).observe(
                duration_s
            )

        async def observed() -> FederationResponse:
            try:
                response = await call()
            except FetchError as e:
                done(e.kind)
                raise
            except CancelledError:
                done("cancelled")
                raise
            except BaseException:
                done("error")
                raise
            done(_response_outcome(response))
            return response

        return Deferred.fromCoroutine(observed())


def _key_ids(requested: Collection[str]) -> str:
    return ", ".join(sorted(requested)) if requested else "*"


@implementer(IKeyFetcher)
class ObservedFetcher:
    """
    An :class:`IKeyFetcher` that counts, times and logs what ``fetcher``
    found: one log line and one count per server asked for.

    Outcomes per server: ``found`` (responses and no failure), ``partial``
    (responses, and a failure for some key ids), ``failed`` (nothing), and
    ``error`` (the fetcher crashed).

    :param fetcher: The fetcher doing the work; its ``name`` and
        ``notary_name`` are kept, so the keyring treats this one the same.
        Not a :class:`~synkeys.fetchers.StoreKeyFetcher`: the keyring
        recognises that one by its type, to not write its answers back.
    :param metrics: Where to count.
    """

    log = Logger()

    def __init__(self, fetcher: IKeyFetcher, metrics: ServiceMetrics) -> None:
        self._fetcher = fetcher
        self._metrics = metrics
        self.name = str(fetcher.name)
        self.notary_name: Optional[str] = getattr(fetcher, "notary_name", None)

    def fetch_server_keys(self, requests: KeyRequests) -> Deferred[FetchResult]:
        """See :meth:`IKeyFetcher.fetch_server_keys`."""
        return Deferred.fromCoroutine(self._fetch(requests))

    async def _fetch(self, requests: KeyRequests) -> FetchResult:
        metrics = self._metrics
        servers = len(requests)
        in_flight = metrics.child(metrics.key_fetches_in_flight, self.name)
        in_flight.inc(servers)
        started_s = metrics.seconds()
        try:
            result: FetchResult = await self._fetcher.fetch_server_keys(requests)
        except BaseException as e:
            in_flight.dec(servers)
            metrics.child(metrics.key_fetches, self.name, "error").inc(servers)
            for server_name, key_ids in requests.items():
                self.log.warn(
                    "Fetching keys of {server} ({key_ids}) through {fetcher} failed: {reason}",
                    server=server_name,
                    key_ids=_key_ids(key_ids),
                    fetcher=self.name,
                    reason=repr(e),
                )
            raise
        duration_s = max(0.0, metrics.seconds() - started_s)
        in_flight.dec(servers)
        metrics.child(metrics.key_fetch_duration, self.name).observe(duration_s)
        for server_name, key_ids in requests.items():
            self._report(server_name, key_ids, result, duration_s)
        return result

    def _report(
        self, server_name: str, requested: Collection[str], result: FetchResult, duration_s: float
    ) -> None:
        responses: List[ServerKeys] = result.responses.get(server_name, [])
        reason = result.failures.get(server_name)
        found = sorted({key_id for keys in responses for key_id in keys.key_ids})
        duration_ms = int(duration_s * 1000)
        if responses and reason is None:
            outcome = "found"
            self.log.info(
                "Fetched keys of {server} through {fetcher}: {key_ids} ({duration_ms} ms)",
                server=server_name,
                fetcher=self.name,
                key_ids=", ".join(found),
                duration_ms=duration_ms,
            )
        elif responses:
            outcome = "partial"
            self.log.info(
                "Fetched some keys of {server} through {fetcher}: {key_ids}; "
                "asked for {requested}: {reason} ({duration_ms} ms)",
                server=server_name,
                fetcher=self.name,
                key_ids=", ".join(found),
                requested=_key_ids(requested),
                reason=reason,
                duration_ms=duration_ms,
            )
        else:
            outcome = "failed"
            self.log.warn(
                "Fetching keys of {server} ({key_ids}) through {fetcher} failed: "
                "{reason} ({duration_ms} ms)",
                server=server_name,
                key_ids=_key_ids(requested),
                fetcher=self.name,
                reason=reason or "no response",
                duration_ms=duration_ms,
            )
        self._metrics.child(self._metrics.key_fetches, self.name, outcome).inc()


@implementer(IKeyStore)
class TimedKeyStore:
    """
    An :class:`IKeyStore` that times every call of ``store``.

    :param store: The store doing the work.
    :param metrics: Where to record.
    """

    def __init__(self, store: IKeyStore, metrics: ServiceMetrics) -> None:
        self._store = store
        self._metrics = metrics

    def _timed(self, operation: str, call: Callable[[], Awaitable[_T]]) -> Deferred[_T]:
        metrics = self._metrics

        async def timed() -> _T:
            started_s = metrics.seconds()
            outcome = "error"
            try:
                result = await call()
                outcome = "ok"
                return result
            except StoreUnavailable:
                outcome = "unavailable"
                raise
            finally:
                metrics.child(metrics.store_operation_duration, operation, outcome).observe(
                    max(0.0, metrics.seconds() - started_s)
                )

        return Deferred.fromCoroutine(timed())

    def store_server_keys(self, keys: ServerKeys) -> Deferred[StoreResult]:
        """See :meth:`IKeyStore.store_server_keys`."""
        return self._timed("store_server_keys", lambda: self._store.store_server_keys(keys))

    def get_server_keys(
        self, requests: Mapping[str, Optional[Collection[str]]]
    ) -> Deferred[Dict[str, Dict[str, ServerKeys]]]:
        """See :meth:`IKeyStore.get_server_keys`."""
        return self._timed("get_server_keys", lambda: self._store.get_server_keys(requests))

    def evict_server(self, server_name: str) -> Deferred[int]:
        """See :meth:`IKeyStore.evict_server`."""
        return self._timed("evict_server", lambda: self._store.evict_server(server_name))

    def ping(self) -> Deferred[None]:
        """See :meth:`IKeyStore.ping`."""
        return self._timed("ping", lambda: self._store.ping())

    def close(self) -> Deferred[None]:
        """See :meth:`IKeyStore.close`."""
        return self._store.close()


class MetricsResource(Resource):
    """
    Serves a registry in the Prometheus text format (or OpenMetrics, when
    the scraper asks for it) at ``/`` and ``/metrics``; 404 elsewhere.

    :param registry: What to serve.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        """The metrics, or 404 for other paths."""
        if request.postpath not in ([b""], [b"metrics"], [b"metrics", b""]):
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"Not found: metrics are at /metrics\n"
        accept = request.getHeader(b"Accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        return bytes(encoder(self._registry))

    def render_HEAD(self, request: Request) -> bytes:  # noqa: N802
        """As GET; twisted.web drops the body."""
        return self.render_GET(request)


def metrics_site(metrics: ServiceMetrics, reactor: IReactorTime) -> Site:
    """A :class:`Site` serving ``metrics`` (for the ``--metrics`` listeners)."""
    site = Site(MetricsResource(metrics.registry), reactor=reactor)
    site.displayTracebacks = False
    return site
