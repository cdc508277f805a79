"""
Tests for L{synkeys.workers}: sockets bound once per process, adopted as
endpoints (plain and TLS), and ``twistd synkeys --workers 2`` as real
processes on 127.0.0.1 that share the ports, restart a worker that dies and
stop together.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from typing import Any, List, Optional, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from synkeys.config import resolve_config
from synkeys.errors import ConfigError
from synkeys.workers import (
    AdoptedEndpoint,
    WorkerPool,
    bind_shared_listeners,
    flags_of,
    pool_for,
)
from tests.tlsutil import TestPKI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Bound on every wait for a process, in seconds.
PROCESS_WAIT_S = 30.0
LINUX = sys.platform.startswith("linux")


def _close_all(listeners: List[Any]) -> None:
    for listener in listeners:
        for sock in set(listener.sockets):
            sock.close()


class BindTests(SynchronousTestCase):
    """L{bind_shared_listeners} and L{pool_for}."""

    def test_one_port_per_endpoint_for_every_process(self) -> None:
        """tcp:0 is bound once per process, every socket listening on the same port."""
        listeners = bind_shared_listeners(reactor, ["tcp:0:interface=127.0.0.1"], 3)
        self.addCleanup(_close_all, listeners)
        [listener] = listeners
        self.assertEqual(len(listener.sockets), 3)
        self.assertEqual({s.getsockname() for s in listener.sockets},
                         {("127.0.0.1", listener.port)})
        self.assertNotEqual(listener.port, 0)
        self.assertFalse(listener.tls)
        for sock in listener.sockets:
            self.assertTrue(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))

    def test_busy_port(self) -> None:
        """A port another socket holds is a ConfigError naming the endpoint, and nothing stays bound."""
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        free_port = free.getsockname()[1]
        free.close()
        with self.assertRaises(ConfigError) as caught:
            bind_shared_listeners(
                reactor,
                [f"tcp:{free_port}:interface=127.0.0.1", f"tcp:{port}:interface=127.0.0.1"],
                2,
            )
        self.assertIn(f"tcp:{port}", str(caught.exception))
        # The first endpoint's sockets were closed again: its port is free.
        again = socket.socket()
        self.addCleanup(again.close)
        again.bind(("127.0.0.1", free_port))

    def test_unix_endpoint_refused(self) -> None:
        """Only tcp and ssl listeners can be shared by workers."""
        with self.assertRaises(ConfigError) as caught:
            bind_shared_listeners(reactor, [f"unix:{self.mktemp()}"], 2)
        self.assertIn("--workers", str(caught.exception))

    def test_memory_store_refused(self) -> None:
        """Workers need a store they can share, so :memory: is a ConfigError."""
        config = resolve_config(
            {"server_name": "a.test", "database": ":memory:", "workers": "2",
             "listen": ["tcp:0:interface=127.0.0.1"]}
        )
        with self.assertRaises(ConfigError) as caught:
            pool_for(reactor, config, {}, None)
        self.assertIn(":memory:", str(caught.exception))

    def test_spec(self) -> None:
        """A worker is told the settings as given and the descriptors of its own sockets."""
        config = resolve_config(
            {"server_name": "a.test", "database": self.mktemp(), "workers": "2",
             "listen": ["tcp:0:interface=127.0.0.1"]}
        )
        flags = {"server_name": "a.test", "listen": ["tcp:0:interface=127.0.0.1"]}
        pool = pool_for(reactor, config, flags, "/etc/synkeys.yaml")
        self.addCleanup(_close_all, pool.listeners)
        self.assertIsInstance(pool, WorkerPool)
        self.assertEqual(pool.count, 2)
        spec = pool.spec(1)
        self.assertEqual(spec["flags"], flags)
        self.assertEqual(spec["config_path"], "/etc/synkeys.yaml")
        self.assertEqual(spec["fds"], [pool.listeners[0].sockets[1].fileno()])
        self.assertEqual(spec["families"], [socket.AF_INET])
        json.dumps(spec)

    def test_flags_of_options(self) -> None:
        """The flags handed to workers are the command line's, repeated ones as lists."""
        from synkeys.tap import Options

        options = Options()
        options.parseOptions(["--server-name", "a.test", "--listen", "tcp:1", "--listen", "tcp:2"])
        flags = flags_of(options, options.repeated)
        self.assertEqual(flags["server_name"], "a.test")
        self.assertEqual(flags["listen"], ["tcp:1", "tcp:2"])
        self.assertIsNone(flags["database"])


class Hello(Resource):
    """Answers every request with ``hello``."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        return b"hello"


def _get(port: int, context: Optional[ssl.SSLContext] = None) -> Tuple[int, bytes]:
    """A blocking GET / to 127.0.0.1 (run in a thread)."""
    connection: http.client.HTTPConnection
    if context is not None:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    else:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class AdoptedEndpointTests(TestCase):
    """L{AdoptedEndpoint} serves on a socket bound beforehand."""

    async def _serve(self, description: str, context: Optional[ssl.SSLContext]) -> None:
        from twisted.internet.threads import deferToThread

        from synkeys.workers import adopted_endpoints

        listeners = bind_shared_listeners(reactor, [description], 2)
        self.addCleanup(_close_all, listeners)
        [(_, endpoint)] = adopted_endpoints(reactor, listeners, 1)
        self.assertIsInstance(endpoint, AdoptedEndpoint)
        port = await endpoint.listen(Site(Hello()))
        self.addCleanup(port.stopListening)
        number = listeners[0].port
        self.assertEqual(port.getHost().port, number)
        # Only process 1's socket is served here; process 0's is not, so the
        # kernel's choice between them is taken out by closing that one.
        listeners[0].sockets[0].close()
        code, body = await deferToThread(_get, number, context)
        self.assertEqual((code, body), (200, b"hello"))

    def test_plain(self) -> Deferred[None]:
        """A tcp: socket adopted in this process answers HTTP."""
        return Deferred.fromCoroutine(self._serve("tcp:0:interface=127.0.0.1", None))

    def test_tls(self) -> Deferred[None]:
        """An ssl: socket adopted here answers HTTPS with the endpoint's certificate."""
        pki = TestPKI(self.mktemp())
        context = ssl.create_default_context(cafile=pki.ca_path)
        context.check_hostname = False
        return Deferred.fromCoroutine(
            self._serve(pki.ssl_endpoint("w", ["127.0.0.1"]), context)
        )

    def test_context_factory_exposed(self) -> None:
        """The TLS context factory is where synkeys.tlsinfo looks for it (tls_fingerprints)."""
        from synkeys.tlsinfo import context_factory_of

        marker = object()
        endpoint = AdoptedEndpoint(reactor, 0, socket.AF_INET, marker)
        self.assertIs(context_factory_of(endpoint), None)  # no getContext()
        self.assertIs(endpoint.contextFactory, marker)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> List[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _wait_for(what: str, check: Any, timeout_s: float = PROCESS_WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class TwistdWorkersTests(SynchronousTestCase):
    """``twistd -n synkeys --workers 2`` as real processes."""

    if not LINUX:
        skip = "reads /proc to find the worker processes"

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.port = _free_port()
        self.log_path = os.path.join(self.directory, "twistd.log")
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        self.log_file = open(self.log_path, "wb")
        self.addCleanup(self.log_file.close)
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "synkeys",
             "--server-name", f"localhost:{self.port}",
             "--listen", f"tcp:{self.port}:interface=127.0.0.1",
             "--signing-key", os.path.join(self.directory, "signing.key"),
             "--database", os.path.join(self.directory, "keys.sqlite"),
             "--access-log", "log",
             "--workers", "2"],
            cwd=self.directory, env=env, stdin=subprocess.DEVNULL,
            stdout=self.log_file, stderr=subprocess.STDOUT,
        )
        self.addCleanup(self._stop)
        self.worker = _wait_for("the worker", lambda: self._worker())

    def _worker(self) -> Optional[int]:
        children = [p for p in _children(self.process.pid) if _alive(p)]
        return children[0] if len(children) == 1 else None

    def _stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(PROCESS_WAIT_S)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(PROCESS_WAIT_S)
        for child in _children(self.process.pid):
            if _alive(child):
                os.kill(child, signal.SIGKILL)

    def _log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def _serving(self) -> bool:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            connection.request("GET", "/_matrix/key/v2/server")
            ok = connection.getresponse().status == 200
            connection.close()
            return ok
        except OSError:
            return False

    def test_both_processes_answer(self) -> None:
        """Connections to the one port are answered by the first process and by the worker."""
        _wait_for("the port", self._serving)
        _wait_for("the worker to listen", lambda: "[worker-1] Listening" in self._log())
        for _ in range(60):
            self.assertTrue(self._serving())
        access = re.compile(
            r'\[(worker-1|twisted\.python\.log#info)\] .*"GET /_matrix/key/v2/server HTTP/1.1" 200'
        )
        systems = _wait_for(
            "access log lines of both processes",
            lambda: (lambda found: found if len(found) == 2 else None)(
                {m.group(1) for m in access.finditer(self._log())}
            ),
        )
        self.assertEqual(systems, {"worker-1", "twisted.python.log#info"})

    def test_worker_restarted(self) -> None:
        """A worker that dies is started again, and the port keeps answering."""
        _wait_for("the port", self._serving)
        os.kill(self.worker, signal.SIGKILL)
        new = _wait_for(
            "a new worker", lambda: (lambda w: w if w not in (None, self.worker) else None)(
                self._worker()
            )
        )
        self.assertNotEqual(new, self.worker)
        self.assertIn("Worker 1 exited", self._log())
        for _ in range(20):
            self.assertTrue(self._serving())

    def test_stop_stops_workers(self) -> None:
        """SIGTERM to the first process stops the worker too, cleanly."""
        _wait_for("the port", self._serving)
        _wait_for("the worker to listen", lambda: "[worker-1] Listening" in self._log())
        os.kill(self.process.pid, signal.SIGTERM)
        # twistd ends by re-raising the signal that stopped it.
        self.assertIn(self.process.wait(PROCESS_WAIT_S), (0, -signal.SIGTERM))
        self.assertFalse(_alive(self.worker))
        log = self._log()
        self.assertIn("[worker-1] Closed the key store", log)
        self.assertIn("Server Shut Down", log)
        self.assertLess(log.index("[worker-1] Closed the key store"), log.index("Server Shut Down"))
