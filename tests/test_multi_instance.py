"""
Two real ``twistd synkeys`` processes sharing one PostgreSQL schema, with
an origin served over TLS by this process: a key fetched through instance
A is served by instance B from the shared cache, without a new fetch, even
once the origin is gone.

Needs ``SYNKEYS_TEST_POSTGRES`` (skipped with the reason otherwise). The
helpers here (:class:`TwistdProcess`, :class:`TLSOrigin`, :func:`http_get`)
are shared with :mod:`tests.test_shutdown`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from io import BytesIO
from typing import Any, List, Optional, Sequence, Tuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from synkeys.keyfile import generate_signing_key, read_signing_keys
from synkeys.keyserver import KeyPublisher
from synkeys.resource import mount_key_resources
from synkeys.signing import verify_signature
from tests.tlsutil import TestPKI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSTGRES_DSN = os.environ.get("SYNKEYS_TEST_POSTGRES", "")
NO_POSTGRES = "set SYNKEYS_TEST_POSTGRES to a PostgreSQL DSN to run PostgreSQL tests"
#: Bound on every wait for a process (start, stop), in seconds.
PROCESS_WAIT_S = 30.0
_POLL_S = 0.05
_LISTENING = re.compile(r"Listening for (requests|metrics) on 127\.0\.0\.1:(\d+)")


async def sleep(seconds: float) -> None:
    """Let the reactor run for ``seconds``."""
    await deferLater(reactor, seconds, lambda: None)


async def http_request(
    url: str, method: bytes = b"GET", body: Optional[bytes] = None
) -> Tuple[int, bytes]:
    """One request on a connection of its own: status and body."""
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    producer = FileBodyProducer(BytesIO(body)) if body is not None else None
    response = await agent.request(method, url.encode("ascii"), None, producer)
    return response.code, await readBody(response)


async def http_get(url: str) -> Tuple[int, Any]:
    """GET ``url``: status and decoded JSON body."""
    code, body = await http_request(url)
    return code, json.loads(body)


class TwistdProcess:
    """
    One ``twistd -n synkeys`` process run from this source tree, logging to
    a file, listening on ports it picks itself (read back from its log).

    :ivar port: The main listener's port, once :meth:`start` returned.
    :ivar metrics_port: The metrics listener's port, if any.
    """

    def __init__(self, case: TestCase, directory: str, name: str, args: Sequence[str]) -> None:
        self.case = case
        self.name = name
        self.directory = directory
        self.log_path = os.path.join(directory, f"{name}.log")
        self.args = list(args)
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.port = 0
        self.metrics_port: Optional[int] = None

    async def start(self) -> None:
        """Start it and wait (bounded) until every listener is bound."""
        env = dict(os.environ, PYTHONPATH=ROOT)
        command = [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", f"--logfile={self.log_path}", "synkeys", *self.args,
        ]
        self.process = subprocess.Popen(
            command, cwd=self.directory, env=env,
            stdout=subprocess.DEVNULL, stderr=open(self.log_path + ".stderr", "wb"),
        )
        self.case.addCleanup(self.kill)
        wants_metrics = any(a.startswith("--metrics") for a in self.args)
        for _ in range(int(PROCESS_WAIT_S / _POLL_S)):
            found = dict(_LISTENING.findall(self.log()))
            if "requests" in found and ("metrics" in found or not wants_metrics):
                self.port = int(found["requests"])
                if wants_metrics:
                    self.metrics_port = int(found["metrics"])
                return
            if self.process.poll() is not None:
                break
            await sleep(_POLL_S)
        self.case.fail(f"{self.name} did not start listening:\n{self.logs()}")

    def url(self, path: str) -> str:
        """A URL on its main listener."""
        return f"http://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        """Its log so far."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def logs(self) -> str:
        """Its log and its stderr, for failure messages."""
        try:
            with open(self.log_path + ".stderr", encoding="utf-8", errors="replace") as f:
                stderr = f.read()
        except FileNotFoundError:
            stderr = ""
        return f"--- {self.name} log ---\n{self.log()}--- {self.name} stderr ---\n{stderr}"

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process (by its PID)."""
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait_exit(self) -> int:
        """Wait (bounded) for it to exit; its exit status."""
        assert self.process is not None
        for _ in range(int(PROCESS_WAIT_S / _POLL_S)):
            code = self.process.poll()
            if code is not None:
                return code
            await sleep(_POLL_S)
        self.case.fail(f"{self.name} did not exit:\n{self.logs()}")

    def kill(self) -> None:
        """End the process if it still runs: SIGTERM, then SIGKILL."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=PROCESS_WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=PROCESS_WAIT_S)

    async def metric(self, name: str, **labels: str) -> float:
        """One sample from its metrics listener (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        code, body = await http_request(f"http://127.0.0.1:{self.metrics_port}/metrics")
        self.case.assertEqual(code, 200)
        for family in text_string_to_metric_families(body.decode("utf-8")):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0


class _OriginSite(Site):
    def __init__(self, origin: TLSOrigin, root: IResource) -> None:
        super().__init__(root, reactor=reactor)
        self._origin = origin

    def getResourceFor(self, request: Request) -> IResource:  # noqa: N802
        self._origin.hits += 1
        if self._origin.holding:
            return _Hold(self._origin)
        return super().getResourceFor(request)


class _Hold(Resource):
    isLeaf = True

    def __init__(self, origin: TLSOrigin) -> None:
        super().__init__()
        self._origin = origin

    def render(self, request: Request) -> object:
        self._origin.held.append(request)
        return NOT_DONE_YET


class TLSOrigin:
    """
    A Matrix origin publishing its keys over TLS on a port of 127.0.0.1
    that it picks itself; its server name is ``127.0.0.1:<port>``.

    :ivar hits: Requests received.
    :ivar holding: While true, requests wait in :attr:`held` until
        :meth:`release`.
    """

    def __init__(self, pki: TestPKI) -> None:
        self.pki = pki
        self.hits = 0
        self.holding = False
        self.held: List[Request] = []
        self.server_name = ""
        self.publisher: Optional[KeyPublisher] = None
        self._port: Any = None

    async def start(self) -> None:
        """Listen, then publish keys under the name the port gives."""
        root = Resource()
        endpoint = serverFromString(reactor, self.pki.ssl_endpoint("origin", ["127.0.0.1"]))
        self._port = await endpoint.listen(_OriginSite(self, root))
        self.server_name = f"127.0.0.1:{self._port.getHost().port}"
        self.publisher = KeyPublisher(self.server_name, [generate_signing_key("o")], reactor)
        mount_key_resources(root, self.publisher)

    def release(self) -> None:
        """Answer the held requests with the keys, and stop holding."""
        assert self.publisher is not None
        self.holding = False
        held, self.held = self.held, []
        for request in held:
            body = self.publisher.body()
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.write(body)
            request.finish()

    async def stop(self) -> None:
        """Stop listening (idempotent)."""
        if self._port is not None:
            port, self._port = self._port, None
            await port.stopListening()


def dsn_with_schema(dsn: str, schema: str) -> str:
    """``dsn`` whose connections use ``schema`` (libpq ``options``)."""
    parts = urlsplit(dsn)
    query = parse_qsl(parts.query) + [("options", f"-csearch_path={schema}")]
    return urlunsplit(parts._replace(query=urlencode(query)))


def notary_args(name: str, directory: str, database: str, ca_path: str) -> List[str]:
    """Flags of a notary instance fetching from TLS origins on 127.0.0.1."""
    return [
        "--server-name", name,
        "--signing-key", os.path.join(directory, f"{name}.key"),
        "--database", database,
        "--listen", "tcp:0:interface=127.0.0.1",
        "--metrics", "tcp:0:interface=127.0.0.1",
        "--allow-ip-range", "127.0.0.0/8",
        "--federation-ca", ca_path,
    ]


class MultiInstanceTests(TestCase):
    """Instances A and B behind an imaginary load balancer, one database."""

    skip = None if POSTGRES_DSN else NO_POSTGRES

    def admin(self, sql: str) -> None:
        """Run ``sql`` on the test database, autocommitted."""
        import psycopg2  # type: ignore[import-untyped]

        conn = psycopg2.connect(POSTGRES_DSN)
        conn.autocommit = True
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql)
        finally:
            conn.close()

    async def setUp(self) -> None:  # type: ignore[override]
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        schema = f"synkeys_test_{uuid.uuid4().hex[:16]}"
        self.admin(f'CREATE SCHEMA "{schema}"')
        # Cleanups run last-in first-out: the schema goes after the processes.
        self.addCleanup(self.admin, f'DROP SCHEMA "{schema}" CASCADE')
        self.database = dsn_with_schema(POSTGRES_DSN, schema)
        self.pki = TestPKI(os.path.join(self.directory, "pki"))
        self.origin = TLSOrigin(self.pki)
        await self.origin.start()
        self.addCleanup(self.origin.stop)
        self.instances: List[TwistdProcess] = []

    async def instance(self, name: str) -> TwistdProcess:
        """Start a notary instance on the shared database."""
        process = TwistdProcess(
            self, self.directory, name,
            notary_args(name, self.directory, self.database, self.pki.ca_path),
        )
        self.instances.append(process)
        await process.start()
        return process

    def dump_logs(self) -> str:
        return "\n".join(p.logs() for p in self.instances)

    async def test_fetch_through_a_read_through_b(self) -> None:
        """A key fetched through A is served by B from the shared cache, origin gone, with no fetch by B."""
        try:
            await self._fetch_through_a_read_through_b()
        except BaseException:
            print(self.dump_logs())
            raise

    async def _fetch_through_a_read_through_b(self) -> None:
        # One after the other: each applies the migrations when it starts.
        a = await self.instance("a.notary.test")
        b = await self.instance("b.notary.test")
        query = f"/_matrix/key/v2/query/{self.origin.server_name}"
        code, body = await http_get(a.url(query))
        self.assertEqual(code, 200, body)
        [element] = body["server_keys"]
        self.assertEqual(element["server_name"], self.origin.server_name)
        self.assertEqual(self.origin.hits, 1)
        self.assertEqual(
            await a.metric(
                "synkeys_federation_requests_total", endpoint="server", outcome="ok"
            ),
            1,
        )
        await self.origin.stop()

        code, body = await http_get(b.url(query))
        self.assertEqual(code, 200, body)
        [relayed] = body["server_keys"]
        assert self.origin.publisher is not None
        self.assertEqual(relayed["verify_keys"], self.origin.publisher.json()["verify_keys"])
        # Countersigned by B, with the key B publishes.
        [b_key] = read_signing_keys(os.path.join(self.directory, "b.notary.test.key"))
        self.assertTrue(
            verify_signature(relayed, "b.notary.test", b_key.key_id, b_key.public_key)
        )
        self.assertNotIn("a.notary.test", relayed["signatures"])
        # B answered from the cache: it did not even try the (gone) origin.
        self.assertEqual(
            await b.metric("synkeys_notary_cache_lookups_total", result="hit"), 1
        )
        for outcome in ("ok", "connect", "timeout", "tls"):
            self.assertEqual(
                await b.metric(
                    "synkeys_federation_requests_total", endpoint="server", outcome=outcome
                ),
                0,
            )
        self.assertEqual(self.origin.hits, 1)
        self.assertIn(f"Fetched keys of {self.origin.server_name} through direct", a.log())
        self.assertNotIn(f"keys of {self.origin.server_name} through", b.log())

        # Both stop cleanly on SIGTERM, closing their pools.
        for process in (a, b):
            process.signal(signal.SIGTERM)
        for process in (a, b):
            # twistd re-raises the signal once shut down, so the status says why it ended.
            self.assertIn(await process.wait_exit(), (0, -signal.SIGTERM), process.logs())
            self.assertIn("Closed the key store", process.log())
            self.assertIn("Server Shut Down.", process.log())

