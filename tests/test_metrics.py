"""
Tests for :mod:`synkeys.metrics`: each decorator and hook on its own, with
fake clocks and fake federations, then a whole service in memory scraped
through its metrics site.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from synkeys.errors import KeyLookupError
from synkeys.fetchers import DirectKeyFetcher, PerspectivesKeyFetcher
from synkeys.interfaces import FetchResult, IFederationClient, IKeyFetcher, IKeyStore
from synkeys.keyring import Keyring
from synkeys.metrics import (
    MetricsResource,
    NotaryCollector,
    ObservedFederationClient,
    ObservedFetcher,
    ServiceMetrics,
    TimedKeyStore,
    endpoint_label,
)
from synkeys.storage import MemoryKeyStore
from synkeys.tap import Options, makeService
from synkeys.testing import FakeOrigin
from tests.helpers import make_server_keys, make_signing_key
from tests.test_fetchers import FakeFederation, make_clock
from tests.test_health import SiteClient, make_service


def sample(metrics: ServiceMetrics, name: str, **labels: str) -> float:
    """A sample's value, 0 when it does not exist (yet)."""
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


class LabelTests(SynchronousTestCase):
    """Bounded label values."""

    def test_endpoint_label(self) -> None:
        """Request paths map to a fixed set of endpoint labels, whatever the client sends."""
        cases = {
            b"/_matrix/key/v2/server": "server",
            b"/_matrix/key/v2/server/ed25519:a": "server",
            b"/_matrix/key/v2/query": "query",
            b"/_matrix/key/v2/query/example.org?minimum_valid_until_ts=1": "query",
            b"/health": "health",
            b"/health/": "health",
            b"/healthz": "other",
            b"/_matrix/key/v2/serverx": "other",
            b"/" + b"x" * 500: "other",
        }
        for path, label in cases.items():
            self.assertEqual(endpoint_label(path), label, path)


class RegistryTests(SynchronousTestCase):
    """Every service has a registry of its own."""

    def test_registries_are_separate(self) -> None:
        """Two ServiceMetrics count apart and leave the global registry alone."""
        clock = make_clock()
        one, two = ServiceMetrics(clock), ServiceMetrics(clock)
        one.observe_batch(3, 7)
        self.assertEqual(sample(one, "synkeys_keyring_batch_servers_count"), 1)
        self.assertEqual(sample(two, "synkeys_keyring_batch_servers_count"), 0)
        self.assertIsNone(REGISTRY.get_sample_value("synkeys_keyring_batch_servers_count"))

    def test_given_registry(self) -> None:
        """A registry passed in is the one filled, without the standard collectors when asked."""
        registry = CollectorRegistry()
        metrics = ServiceMetrics(make_clock(), registry, standard_collectors=False)
        self.assertIs(metrics.registry, registry)
        names = {family.name for family in registry.collect()}
        self.assertIn("synkeys_http_requests", names)
        self.assertNotIn("process_cpu_seconds", names)


    def test_child_per_label_set(self) -> None:
        """child() answers one labelled child per label set, counting into the registry."""
        metrics = ServiceMetrics(make_clock(), standard_collectors=False)
        ok = metrics.child(metrics.key_fetches, "direct", "found")
        self.assertIs(metrics.child(metrics.key_fetches, "direct", "found"), ok)
        failed = metrics.child(metrics.key_fetches, "direct", "failed")
        self.assertIsNot(failed, ok)
        ok.inc(2)
        self.assertEqual(
            sample(metrics, "synkeys_key_fetches_total", fetcher="direct", outcome="found"), 2
        )
        self.assertEqual(
            sample(metrics, "synkeys_key_fetches_total", fetcher="direct", outcome="failed"), 0
        )


class FederationClientTests(SynchronousTestCase):
    """:class:`ObservedFederationClient` over a fake federation."""

    def setUp(self) -> None:
        self.clock = make_clock()
        self.federation = FakeFederation()
        self.origin = self.federation.add_origin("a.example")
        self.metrics = ServiceMetrics(self.clock, standard_collectors=False)
        self.client = ObservedFederationClient(self.federation, self.metrics)

    def test_interface(self) -> None:
        """It is an IFederationClient."""
        self.assertTrue(verifyObject(IFederationClient, self.client))

    def test_latency_and_in_flight(self) -> None:
        """A request is in flight until answered, and its latency is recorded under its outcome."""
        self.federation.hold()
        d = self.client.get("a.example", b"/_matrix/key/v2/server")
        self.assertEqual(sample(self.metrics, "synkeys_federation_requests_in_flight"), 1)
        self.clock.advance(0.75)
        self.federation.release()
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(sample(self.metrics, "synkeys_federation_requests_in_flight"), 0)
        labels = {"endpoint": "server", "outcome": "ok"}
        self.assertEqual(sample(self.metrics, "synkeys_federation_requests_total", **labels), 1)
        self.assertEqual(
            sample(self.metrics, "synkeys_federation_request_duration_seconds_sum", **labels), 0.75
        )

    def test_outcomes(self) -> None:
        """HTTP errors count by class and fetch errors by their kind, and errors pass through."""
        self.origin.code = 404
        self.assertEqual(
            self.successResultOf(self.client.get("a.example", b"/_matrix/key/v2/server")).code, 404
        )
        self.failureResultOf(self.client.get("nobody.example", b"/_matrix/key/v2/server"))
        self.assertEqual(
            sample(
                self.metrics, "synkeys_federation_requests_total",
                endpoint="server", outcome="http_4xx",
            ),
            1,
        )
        self.assertEqual(
            sample(
                self.metrics, "synkeys_federation_requests_total",
                endpoint="server", outcome="connect",
            ),
            1,
        )
        self.assertEqual(sample(self.metrics, "synkeys_federation_requests_in_flight"), 0)

    def test_notary_queries(self) -> None:
        """POSTs to an upstream notary count under endpoint="query"."""
        self.federation.add_notary("n.example")
        d = self.client.post_json("n.example", b"/_matrix/key/v2/query", b'{"server_keys":{}}')
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(
            sample(
                self.metrics, "synkeys_federation_requests_total", endpoint="query", outcome="ok"
            ),
            1,
        )

    def test_cancelled(self) -> None:
        """A cancelled request counts as cancelled and leaves flight."""
        self.federation.hold()
        d = self.client.get("a.example", b"/_matrix/key/v2/server")
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(sample(self.metrics, "synkeys_federation_requests_in_flight"), 0)
        self.assertEqual(
            sample(
                self.metrics, "synkeys_federation_requests_total",
                endpoint="server", outcome="cancelled",
            ),
            1,
        )


class FetcherTests(SynchronousTestCase):
    """:class:`ObservedFetcher`: counts, latency and one log line per server."""

    def setUp(self) -> None:
        self.clock = make_clock()
        self.federation = FakeFederation()
        self.federation.add_origin("a.example")
        self.metrics = ServiceMetrics(self.clock, standard_collectors=False)
        self.fetcher = ObservedFetcher(DirectKeyFetcher(self.federation, self.clock), self.metrics)
        self.events: List[Dict[str, Any]] = []
        self.fetcher.log = Logger(observer=self.events.append)  # type: ignore[misc]

    def lines(self, level: LogLevel) -> List[str]:
        return [formatEvent(e) for e in self.events if e["log_level"] == level]

    def test_interface_and_names(self) -> None:
        """It is an IKeyFetcher named like the fetcher it wraps, notary name included."""
        self.assertTrue(verifyObject(IKeyFetcher, self.fetcher))
        self.assertEqual((self.fetcher.name, self.fetcher.notary_name), ("direct", None))
        perspective = ObservedFetcher(
            PerspectivesKeyFetcher(
                self.federation, self.clock, "n.example", {"ed25519:n": b"\x01" * 32}
            ),
            self.metrics,
        )
        self.assertEqual(perspective.name, "perspectives:n.example")
        self.assertEqual(perspective.notary_name, "n.example")

    def test_found_and_failed(self) -> None:
        """Each server asked for is one count and one log line: found with key ids, failed with reason."""
        self.federation.hold()
        d = self.fetcher.fetch_server_keys({"a.example": {}, "b.example": {"ed25519:x": 0}})
        self.assertEqual(
            sample(self.metrics, "synkeys_key_fetches_in_flight", fetcher="direct"), 2
        )
        self.clock.advance(2)
        self.federation.release()
        result = self.successResultOf(d)
        self.assertEqual(list(result.responses), ["a.example"])
        self.assertEqual(sample(self.metrics, "synkeys_key_fetches_in_flight", fetcher="direct"), 0)
        self.assertEqual(
            sample(self.metrics, "synkeys_key_fetches_total", fetcher="direct", outcome="found"), 1
        )
        self.assertEqual(
            sample(self.metrics, "synkeys_key_fetches_total", fetcher="direct", outcome="failed"), 1
        )
        self.assertEqual(
            sample(self.metrics, "synkeys_key_fetch_duration_seconds_sum", fetcher="direct"), 2
        )
        [found] = self.lines(LogLevel.info)
        self.assertEqual(found, "Fetched keys of a.example through direct: ed25519:a (2000 ms)")
        [failed] = self.lines(LogLevel.warn)
        self.assertIn("Fetching keys of b.example (ed25519:x) through direct failed:", failed)
        self.assertIn("connection refused", failed)
        fields = [e for e in self.events if e["log_level"] == LogLevel.warn][0]
        self.assertEqual((fields["server"], fields["key_ids"]), ("b.example", "ed25519:x"))

    def test_partial(self) -> None:
        """Responses with a failure for some key ids count as partial."""

        class Partial:
            name = "partial"

            def fetch_server_keys(self, requests: Any) -> Deferred[FetchResult]:
                keys = make_server_keys("a.example", {"ed25519:1": make_signing_key("1")})
                result = FetchResult({"a.example": [keys]}, {"a.example": "no ed25519:2"})
                d: Deferred[FetchResult] = Deferred()
                d.callback(result)
                return d

        fetcher = ObservedFetcher(Partial(), self.metrics)  # type: ignore[arg-type]
        fetcher.log = Logger(observer=self.events.append)  # type: ignore[misc]
        self.successResultOf(fetcher.fetch_server_keys({"a.example": {"ed25519:1": 0, "ed25519:2": 0}}))
        self.assertEqual(
            sample(self.metrics, "synkeys_key_fetches_total", fetcher="partial", outcome="partial"),
            1,
        )
        [line] = self.lines(LogLevel.info)
        self.assertIn("ed25519:1; asked for ed25519:1, ed25519:2: no ed25519:2", line)

    def test_crash(self) -> None:
        """A crashing fetcher counts as error for each server, and the error passes through."""

        class Crashing:
            name = "crashing"

            def fetch_server_keys(self, requests: Any) -> Deferred[FetchResult]:
                return fail(RuntimeError("boom"))

        fetcher = ObservedFetcher(Crashing(), self.metrics)  # type: ignore[arg-type]
        fetcher.log = Logger(observer=self.events.append)  # type: ignore[misc]
        self.failureResultOf(fetcher.fetch_server_keys({"a.example": {}, "b.example": {}}), RuntimeError)
        self.assertEqual(
            sample(self.metrics, "synkeys_key_fetches_total", fetcher="crashing", outcome="error"), 2
        )
        self.assertEqual(sample(self.metrics, "synkeys_key_fetches_in_flight", fetcher="crashing"), 0)
        self.assertEqual(len(self.lines(LogLevel.warn)), 2)


class KeyringHookTests(SynchronousTestCase):
    """Batch sizes and disagreements, reported by a real keyring."""

    def setUp(self) -> None:
        self.clock = make_clock()
        self.federation = FakeFederation()
        self.metrics = ServiceMetrics(self.clock, standard_collectors=False)

    def test_batch_sizes(self) -> None:
        """Lookups of one turn form one batch, recorded by servers and key ids."""
        for name in ("a.example", "b.example"):
            self.federation.add_origin(name)
        keyring = Keyring(
            [DirectKeyFetcher(self.federation, self.clock)],
            self.clock,
            on_batch=self.metrics.observe_batch,
        )
        keyring.get_keys("a.example", ["ed25519:a", "ed25519:b"], 0)
        keyring.get_keys("b.example", ["ed25519:a"], 0)
        self.clock.advance(0)
        self.assertEqual(sample(self.metrics, "synkeys_keyring_batch_servers_count"), 1)
        self.assertEqual(sample(self.metrics, "synkeys_keyring_batch_servers_sum"), 2)
        self.assertEqual(sample(self.metrics, "synkeys_keyring_batch_keys_sum"), 3)

    def test_broken_batch_hook(self) -> None:
        """A batch hook that raises is logged and the lookup still succeeds."""
        self.federation.add_origin("a.example")

        def broken(servers: int, pairs: int) -> None:
            raise RuntimeError("metrics broke")

        keyring = Keyring([DirectKeyFetcher(self.federation, self.clock)], self.clock, on_batch=broken)
        d = keyring.get_keys("a.example", ["ed25519:a"], 0)
        self.clock.advance(0)
        self.assertEqual(list(self.successResultOf(d)), ["ed25519:a"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_disagreement_through_observed_notaries(self) -> None:
        """Observed notary fetchers still form a quorum, and a disagreement is counted."""
        origin = self.federation.add_origin("a.example")
        fetchers = []
        for name in ("n1.example", "n2.example"):
            notary = self.federation.add_notary(name)
            fetchers.append(
                ObservedFetcher(
                    PerspectivesKeyFetcher(self.federation, self.clock, name, notary.verify_keys),
                    self.metrics,
                )
            )
        self.federation.notaries["n2.example"].mode = "forged"
        keyring = Keyring(
            fetchers,
            self.clock,
            policy="quorum",
            quorum=2,
            on_disagreement=self.metrics.observe_disagreement,
        )
        d = keyring.verify_json_for_server(origin.name, origin.sign({"a": 1}), 0)
        self.clock.advance(0)
        self.failureResultOf(d, KeyLookupError)
        self.assertEqual(sample(self.metrics, "synkeys_perspective_disagreements_total"), 1)
        # Both were asked together, as the quorum policy does for notaries.
        self.assertEqual(self.federation.count("POST"), 2)


class SlowStore(MemoryKeyStore):
    """A memory store whose reads answer when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: List[Deferred[None]] = []

    def get_server_keys(self, requests: Any) -> Deferred[Any]:
        gate: Deferred[None] = Deferred()
        self.reads.append(gate)
        return gate.addCallback(lambda _: MemoryKeyStore.get_server_keys(self, requests))


class StoreTests(SynchronousTestCase):
    """:class:`TimedKeyStore`."""

    def setUp(self) -> None:
        self.clock = make_clock()
        self.metrics = ServiceMetrics(self.clock, standard_collectors=False)
        self.inner = SlowStore()
        self.store = TimedKeyStore(self.inner, self.metrics)

    def test_interface(self) -> None:
        """It is an IKeyStore."""
        self.assertTrue(verifyObject(IKeyStore, self.store))

    def test_latency(self) -> None:
        """A call's time is recorded under its operation and outcome, and its result passed on."""
        keys = make_server_keys("a.example", {"ed25519:1": make_signing_key("1")})
        self.successResultOf(self.store.store_server_keys(keys))
        d = self.store.get_server_keys({"a.example": None})
        self.clock.advance(0.125)
        self.inner.reads[0].callback(None)
        self.assertEqual(self.successResultOf(d)["a.example"]["ed25519:1"], keys)
        labels = {"operation": "get_server_keys", "outcome": "ok"}
        self.assertEqual(
            sample(self.metrics, "synkeys_store_operation_duration_seconds_sum", **labels), 0.125
        )
        self.assertEqual(
            sample(
                self.metrics, "synkeys_store_operation_duration_seconds_count",
                operation="store_server_keys", outcome="ok",
            ),
            1,
        )

    def test_unavailable(self) -> None:
        """An outage is recorded as unavailable and the error passes through."""
        self.inner.fail_with("down")
        self.failureResultOf(self.store.ping())
        self.failureResultOf(self.store.evict_server("a.example"))
        for operation in ("ping", "evict_server"):
            self.assertEqual(
                sample(
                    self.metrics, "synkeys_store_operation_duration_seconds_count",
                    operation=operation, outcome="unavailable",
                ),
                1,
            )


class NotaryCollectorTests(SynchronousTestCase):
    """The notary's counters, read at scrape time."""

    def test_counters(self) -> None:
        """Decisions become cache hits and misses; fetch and countersign counters are exposed."""
        counters: Dict[str, int] = {}
        registry = CollectorRegistry()
        registry.register(NotaryCollector(counters))
        self.assertEqual(
            registry.get_sample_value("synkeys_notary_cache_lookups_total", {"result": "hit"}), 0
        )
        counters.update(
            decision_cached=5, decision_due=2, decision_backing_off=1,
            fetch_ok=2, fetch_joined=3, countersigned=2, countersign_cache_hit=4,
        )

        def value(name: str, **labels: str) -> Optional[float]:
            return registry.get_sample_value(name, labels)

        self.assertEqual(value("synkeys_notary_cache_lookups_total", result="hit"), 5)
        self.assertEqual(value("synkeys_notary_cache_lookups_total", result="miss"), 3)
        self.assertEqual(value("synkeys_notary_decisions_total", decision="backing_off"), 1)
        self.assertEqual(value("synkeys_notary_origin_fetches_total", outcome="joined"), 3)
        self.assertEqual(value("synkeys_notary_origin_fetches_total", outcome="failed"), 0)
        self.assertEqual(value("synkeys_notary_countersign_cache_total", result="hit"), 4)


class ServiceMetricsTests(SynchronousTestCase):
    """A whole service in memory, scraped through its metrics site."""

    def setUp(self) -> None:
        self.clock = make_clock()
        self.origin = FakeOrigin("origin.test", self.clock)
        self.service = make_service(self, self.clock, origins=(self.origin,))
        self.client = SiteClient(self.service.site)

    def scrape(self, path: str = "/metrics", **kw: Any) -> Any:
        return SiteClient(self.service.metrics_site).request("GET", path, **kw)

    def value(self, name: str, **labels: str) -> float:
        families = text_string_to_metric_families(self.scrape().body.decode("utf-8"))
        for family in families:
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return float(s.value)
        return 0.0

    def query(self) -> None:
        self.client.send("GET", "/_matrix/key/v2/query/origin.test")
        self.clock.advance(0)
        response = self.client.response()
        assert response is not None
        self.assertEqual(response.code, 200)
        self.assertEqual(response.json()["server_keys"][0]["server_name"], "origin.test")

    def test_every_seam_is_observed(self) -> None:
        """A miss then a hit show in requests, cache, fetch, batch and store metrics."""
        self.query()
        self.query()
        self.assertEqual(self.origin.hits, 1)
        self.assertEqual(
            self.value(
                "synkeys_http_requests_total", endpoint="query", method="GET", code="200"
            ),
            2,
        )
        self.assertEqual(self.value("synkeys_notary_cache_lookups_total", result="miss"), 1)
        self.assertEqual(self.value("synkeys_notary_cache_lookups_total", result="hit"), 1)
        self.assertEqual(
            self.value("synkeys_federation_requests_total", endpoint="server", outcome="ok"), 1
        )
        self.assertEqual(
            self.value("synkeys_key_fetches_total", fetcher="direct", outcome="found"), 1
        )
        self.assertEqual(self.value("synkeys_keyring_batch_servers_count"), 1)
        # The exact number of reads is the notary's business; some were timed.
        self.assertGreater(
            self.value(
                "synkeys_store_operation_duration_seconds_count",
                operation="get_server_keys", outcome="ok",
            ),
            1,
        )
        self.assertEqual(
            self.value(
                "synkeys_store_operation_duration_seconds_count",
                operation="store_server_keys", outcome="ok",
            ),
            1,
        )
        self.assertEqual(self.value("synkeys_http_requests_in_flight"), 0)

    def test_health_and_errors_counted(self) -> None:
        """/health and unknown paths are counted under their own endpoint labels."""
        self.assertEqual(self.client.request("GET", "/health").code, 200)
        self.assertEqual(self.client.request("GET", "/nothing/here").code, 404)
        self.assertEqual(
            self.value("synkeys_http_requests_total", endpoint="health", method="GET", code="200"),
            1,
        )
        self.assertEqual(
            self.value("synkeys_http_requests_total", endpoint="other", method="GET", code="404"),
            1,
        )

    def test_exposition(self) -> None:
        """/metrics and / serve the text format, OpenMetrics on request, and other paths 404."""
        text = self.scrape()
        self.assertEqual(text.code, 200)
        self.assertTrue(text.headers["content-type"].startswith("text/plain; version=0.0.4"))
        self.assertIn(b"# TYPE synkeys_http_requests_total counter", text.body)
        self.assertIn(b"process_", text.body)
        self.assertEqual(self.scrape("/").code, 200)
        openmetrics = self.scrape(headers={"Accept": "application/openmetrics-text"})
        self.assertTrue(
            openmetrics.headers["content-type"].startswith("application/openmetrics-text")
        )
        self.assertTrue(openmetrics.body.endswith(b"# EOF\n"))
        self.assertEqual(self.scrape("/other").code, 404)

    def test_metrics_resource_alone(self) -> None:
        """MetricsResource serves any registry given to it."""
        registry = CollectorRegistry()
        registry.register(NotaryCollector({"decision_cached": 9}))
        from twisted.web.server import Site

        body = SiteClient(Site(MetricsResource(registry), reactor=self.clock)).request(
            "GET", "/metrics"
        ).body
        self.assertIn(b'synkeys_notary_cache_lookups_total{result="hit"} 9.0', body)


class MetricsOptionTests(SynchronousTestCase):
    """``--metrics`` on the command line."""

    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(
            ["--server-name", "example.org", "--signing-key", self.mktemp(),
             "--database", ":memory:", "--listen", "tcp:0:interface=127.0.0.1", *argv]
        )
        return options

    def test_default_none(self) -> None:
        """Without --metrics there is no metrics listener."""
        options = self.parse()
        self.assertEqual(options.config.metrics, [])
        service = makeService(options)
        self.assertEqual(len(list(service)), 1)  # type: ignore[call-overload]

    def test_listeners(self) -> None:
        """Each --metrics endpoint becomes a listener serving the service's metrics site."""
        options = self.parse(
            "--metrics", "tcp:0:interface=127.0.0.1", "--metrics", "unix:/tmp/synkeys-metrics.sock"
        )
        self.assertEqual(len(options.config.metrics), 2)
        service: Any = makeService(options)
        listeners = list(service)
        self.assertEqual(len(listeners), 3)
        self.assertEqual(
            [listener.factory for listener in listeners[1:]],
            [service.metrics_site, service.metrics_site],
        )

    def test_bad_endpoint(self) -> None:
        """An unparseable --metrics endpoint is a usage error naming the flag."""
        with self.assertRaises(UsageError) as raised:
            self.parse("--metrics", "nonsense:1")
        self.assertIn("--metrics", str(raised.exception))
