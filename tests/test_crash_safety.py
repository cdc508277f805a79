"""
Crash safety: ``kill -9`` in the middle of a burst of cache writes, then
restart. The store must open cleanly and hold every response that was
acknowledged before the kill.

Two processes are killed:

- a purpose-built writer (:func:`writer_main`) that stores responses
  through :class:`~synkeys.storage.SQLiteKeyStore` as fast as it can and
  prints a line for each one the store has acknowledged;
- a real ``twistd -n synkeys`` notary, fetching over TLS from origins on
  127.0.0.1 that answer after random short delays, killed once a third of
  a burst of queries has been answered. Its restart, with every origin
  gone, must answer every acknowledged origin from the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import sqlite3
import sys
from typing import Any, Dict, List, Optional, Sequence

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, gatherResults
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from synkeys.keyfile import generate_signing_key
from synkeys.keyserver import KeyPublisher
from synkeys.signing import canonical_json, verify_signature
from synkeys.storage import SQLiteKeyStore
from tests.helpers import make_server_keys, make_signing_key
from tests.tlsutil import TestPKI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Bound on waiting for a process to start or end.
PROCESS_WAIT_S = 30.0
WRITER_KEY = make_signing_key("crash writer")


def writer_response(index: int) -> Any:
    """The ``index``-th response the writer stores (deterministic, so the test can rebuild it)."""
    return make_server_keys(f"s{index}.crash.test", {"ed25519:w": WRITER_KEY})


def writer_main() -> None:
    """
    Store :func:`writer_response` 0, 1, 2, ... in the SQLite file
    ``sys.argv[1]``, four calls outstanding at a time, and print ``ACK n``
    (flushed) as each call returns. Runs until killed or ``sys.argv[2]``
    responses are stored.
    """
    from twisted.internet import task

    path, count = sys.argv[1], int(sys.argv[2])

    async def run(reactor: Any) -> None:
        store = await SQLiteKeyStore.open(path, reactor)
        sys.stdout.write("OPEN\n")
        sys.stdout.flush()
        semaphore = DeferredSemaphore(4)

        async def one(index: int) -> None:
            await store.store_server_keys(writer_response(index))
            sys.stdout.write(f"ACK {index}\n")
            sys.stdout.flush()

        await gatherResults(
            [semaphore.run(lambda i=i: Deferred.fromCoroutine(one(i))) for i in range(count)]
        )
        await store.close()

    task.react(lambda r: Deferred.fromCoroutine(run(r)))


class _Child(ProcessProtocol):
    """A child process: its output lines, a hook per line, and its end."""

    def __init__(self, on_line: Any = None) -> None:
        self.lines: List[str] = []
        self.errors = b""
        self.on_line = on_line
        #: Fires (with ``None``) when the process has ended; then see :attr:`reason`.
        self.ended: Deferred[None] = Deferred()
        self.reason: Optional[Failure] = None
        self._partial = b""

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self._partial += data
        *complete, self._partial = self._partial.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            if self.on_line is not None:
                self.on_line(line)

    def errReceived(self, data: bytes) -> None:  # noqa: N802
        self.errors += data

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        self.reason = reason
        self.ended.callback(None)

    def kill(self) -> None:
        """SIGKILL it, if it still runs."""
        try:
            self.transport.signalProcess("KILL")
        except Exception:  # noqa: BLE001 - already gone
            pass


def spawn(case: TestCase, args: Sequence[str], on_line: Any = None, cwd: Optional[str] = None) -> _Child:
    """Run ``python args...`` with this source tree on the path; killed at cleanup."""
    child = _Child(on_line)
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    reactor.spawnProcess(child, sys.executable, [sys.executable, *args], env=env, path=cwd)

    async def reap() -> None:
        if not child.ended.called:
            child.kill()
        await child.ended

    case.addCleanup(lambda: Deferred.fromCoroutine(reap()))
    return child


def assert_killed(case: TestCase, child: _Child) -> None:
    """The process ended by SIGKILL."""
    reason = child.reason
    assert reason is not None
    case.assertTrue(reason.check(ProcessTerminated), reason)
    case.assertEqual(reason.value.signal, signal.SIGKILL)


def integrity(path: str) -> str:
    """``PRAGMA integrity_check`` of the SQLite file."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


class WriterCrashTests(TestCase):
    """kill -9 of a process writing through SQLiteKeyStore."""

    async def test_kill_mid_burst(self) -> None:
        """After kill -9 mid-burst the file is intact and holds every acknowledged response, byte for byte."""
        path = os.path.abspath(self.mktemp() + ".db")
        acked: List[int] = []
        kill_after = 150

        def on_line(line: str) -> None:
            if line.startswith("ACK "):
                acked.append(int(line[4:]))
                if len(acked) == kill_after:
                    child.kill()

        child = spawn(
            self,
            ["-c", "from tests.test_crash_safety import writer_main; writer_main()", path, "100000"],
            on_line,
        )
        await child.ended.addTimeout(PROCESS_WAIT_S, reactor)
        assert_killed(self, child)
        self.assertIn("OPEN", child.lines, child.errors)
        self.assertGreaterEqual(len(acked), kill_after)
        self.assertLess(len(acked), 100000, "the writer finished before it was killed")
        self.assertEqual(integrity(path), "ok")

        store = await SQLiteKeyStore.open(path, reactor)
        self.addCleanup(store.close)
        names = {f"s{i}.crash.test": i for i in acked}
        found = await store.get_server_keys({name: None for name in names})
        for name, index in names.items():
            self.assertEqual(found[name]["ed25519:w"].raw, writer_response(index).raw, name)
        # The store still takes writes after the crash.
        result = await store.store_server_keys(writer_response(10**6))
        self.assertEqual(result.stored, {"ed25519:w"})


# -- a real notary -------------------------------------------------------------------


class _SlowKeys(Resource):
    """``/_matrix/key/v2/server`` of one origin, answered after a random short delay."""

    isLeaf = True

    def __init__(self, publisher: KeyPublisher, rng: random.Random) -> None:
        super().__init__()
        self._publisher = publisher
        self._rng = rng
        self.calls: List[Any] = []

    def render_GET(self, request: Request) -> object:  # noqa: N802
        body = self._publisher.body()
        gone: List[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer() -> None:
            if gone:
                return
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.write(body)
            request.finish()

        self.calls.append(reactor.callLater(self._rng.uniform(0, 0.6), answer))
        return NOT_DONE_YET


@implementer(IBodyProducer)
class _Body:
    def __init__(self, data: bytes) -> None:
        self.body = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred[None]:  # noqa: N802
        consumer.write(self.body)
        return Deferred.fromCoroutine(_done())

    def pauseProducing(self) -> None:  # noqa: N802
        pass

    def resumeProducing(self) -> None:  # noqa: N802
        pass

    def stopProducing(self) -> None:  # noqa: N802
        pass


async def _done() -> None:
    return None


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NotaryCrashTests(TestCase):
    """kill -9 of a real ``twistd synkeys`` notary in the middle of a burst of cache writes."""

    origins = 36

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.pki = TestPKI(os.path.join(self.directory, "pki"))
        self.database = os.path.join(self.directory, "notary.sqlite")
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.pool)

    def start_origins(self) -> Dict[str, KeyPublisher]:
        """Origins on 127.0.0.1 (server names ``127.0.0.1:<port>``), stopped at cleanup."""
        from twisted.internet.ssl import PrivateCertificate

        certificate = PrivateCertificate.loadPEM(
            self.pki.ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.bytes()
        )
        rng = random.Random(9)
        publishers: Dict[str, KeyPublisher] = {}
        self.ports: List[Any] = []
        self.slow: List[_SlowKeys] = []
        for _ in range(self.origins):
            root = Resource()
            site = Site(root, reactor=reactor)
            port = reactor.listenSSL(0, site, certificate.options(), interface="127.0.0.1")
            name = f"127.0.0.1:{port.getHost().port}"
            publisher = KeyPublisher(name, [generate_signing_key("o")], reactor)
            slow = _SlowKeys(publisher, rng)
            matrix = Resource()
            key = Resource()
            v2 = Resource()
            root.putChild(b"_matrix", matrix)
            matrix.putChild(b"key", key)
            key.putChild(b"v2", v2)
            v2.putChild(b"server", slow)
            publishers[name] = publisher
            self.ports.append(port)
            self.slow.append(slow)
        self.addCleanup(self.stop_origins)
        return publishers

    async def stop_origins(self) -> None:
        """Stop listening and drop the origins' pending answers."""
        for slow in self.slow:
            for call in slow.calls:
                if call.active():
                    call.cancel()
        ports, self.ports = self.ports, []
        await DeferredList([port.stopListening() for port in ports])

    async def start_notary(self) -> Any:
        """Start ``twistd -n synkeys`` on the database; wait until it listens."""
        port = free_port()
        child = spawn(
            self,
            ["-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
             "--logfile=-", "synkeys",
             "--server-name", "notary.test",
             "--signing-key", os.path.join(self.directory, "notary.key"),
             "--database", self.database,
             "--listen", f"tcp:{port}:interface=127.0.0.1",
             "--federation-ca", self.pki.ca_path,
             "--allow-ip-range", "127.0.0.0/8",
             "--fetch-timeout", "10"],
            cwd=self.directory,
        )
        for _ in range(int(PROCESS_WAIT_S / 0.05)):
            if child.ended.called:
                break
            try:
                code, _ = await self.post(port, {})
            except Exception:  # noqa: BLE001 - not listening yet
                await deferLater(reactor, 0.05, lambda: None)
                continue
            if code == 200:
                child.port = port  # type: ignore[attr-defined]
                return child
        self.fail("the notary did not start:\n" + "\n".join(child.lines) + child.errors.decode())

    async def post(self, port: int, server_keys: Dict[str, Any]) -> Any:
        """POST /query to the notary: status and decoded body."""
        response = await self.agent.request(
            b"POST",
            b"http://127.0.0.1:%d/_matrix/key/v2/query" % port,
            Headers({b"Content-Type": [b"application/json"]}),
            _Body(json.dumps({"server_keys": server_keys}).encode()),
        )
        body = await readBody(response)
        return response.code, json.loads(body)

    async def test_kill_notary_mid_burst(self) -> None:
        """Every origin the notary answered before kill -9 is served from its cache after a restart with all origins gone."""
        publishers = self.start_origins()
        notary = await self.start_notary()
        acked: Dict[str, bytes] = {}
        kill_after = self.origins // 3

        async def ask(name: str) -> None:
            try:
                code, body = await self.post(notary.port, {name: {}})
            except Exception:  # noqa: BLE001 - the notary was killed under it
                return
            for element in body.get("server_keys", []) if code == 200 else []:
                publisher = publishers[name]
                (key_id,) = publisher.verify_keys
                if element["server_name"] == name and verify_signature(
                    element, name, key_id, publisher.verify_keys[key_id]
                ):
                    acked[name] = hashlib.sha256(publisher.body()).digest()
                    if len(acked) == kill_after:
                        notary.kill()

        async def ask_later(index: int, name: str) -> None:
            # Staggered, so that the notary's fetches and writes overlap
            # its answers rather than forming one batch.
            await deferLater(reactor, index * 0.03, lambda: None)
            if not notary.ended.called:
                await ask(name)

        await DeferredList(
            [Deferred.fromCoroutine(ask_later(i, name)) for i, name in enumerate(publishers)]
        )
        await notary.ended.addTimeout(PROCESS_WAIT_S, reactor)
        assert_killed(self, notary)
        self.assertGreaterEqual(len(acked), kill_after)
        self.assertLess(len(acked), self.origins, "every query was answered before the kill")
        self.assertEqual(integrity(self.database), "ok")

        await self.stop_origins()
        restarted = await self.start_notary()
        code, body = await self.post(restarted.port, {name: {} for name in acked})
        self.assertEqual(code, 200)
        served = {e["server_name"]: e for e in body["server_keys"]}
        for name in acked:
            self.assertIn(name, served)
            element = dict(served[name])
            signatures = {k: v for k, v in element["signatures"].items() if k != "notary.test"}
            element["signatures"] = signatures
            self.assertEqual(hashlib.sha256(canonical_json(element)).digest(), acked[name], name)
        restarted.transport.signalProcess("TERM")
        await restarted.ended.addTimeout(PROCESS_WAIT_S, reactor)
