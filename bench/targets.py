"""
The processes a benchmark run starts, each on 127.0.0.1 only, each stopped
by its own PID: synkeys (``twistd synkeys``), a real Synapse, the raw
Twisted ceiling (:mod:`bench.raw_server`) and the origin farm
(:mod:`bench.origin_farm`), plus the blocking HTTP helpers the harness uses
to talk to them.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from typing import IO, Any, Dict, List, Mapping, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LOOPBACK = "127.0.0.1"
#: How long any process may take to start serving.
START_TIMEOUT_S = 90.0
#: How long any process may take to exit after SIGTERM.
STOP_TIMEOUT_S = 15.0
#: Bound on any single HTTP request the harness makes itself.
REQUEST_TIMEOUT_S = 30.0
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def child_env() -> Dict[str, str]:
    """The environment for child processes: this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# -- /proc ---------------------------------------------------------------


def _children() -> Dict[int, List[int]]:
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def process_tree(pid: int) -> List[int]:
    """``pid`` and all its descendants."""
    children = _children()
    result, todo = [], [pid]
    while todo:
        current = todo.pop()
        result.append(current)
        todo.extend(children.get(current, []))
    return result


def cpu_s(pids: List[int]) -> float:
    """User plus system CPU seconds used so far by ``pids``."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / _TICKS_PER_S


def rss_mib(pid: int) -> float:
    """Resident memory of one process, in MiB."""
    with open(f"/proc/{pid}/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * _PAGE_SIZE / (1024 * 1024)


# -- HTTP ------------------------------------------------------------------


def http_request(
    url: str,
    method: str = "GET",
    body: Optional[bytes] = None,
    ca_path: Optional[str] = None,
    timeout_s: float = REQUEST_TIMEOUT_S,
) -> Tuple[int, bytes]:
    """One request on a connection of its own; the status and the body."""
    scheme, rest = url.split("://", 1)
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    connection: http.client.HTTPConnection
    if scheme == "https":
        context = ssl.create_default_context(cafile=ca_path)
        context.check_hostname = False
        connection = http.client.HTTPSConnection(
            host, int(port), timeout=timeout_s, context=context
        )
    else:
        connection = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, "/" + path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_until_serving(url: str, process: Process, ca_path: Optional[str] = None) -> None:
    """Poll ``url`` until it answers 200, the process exits, or time is up."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited while starting\n{process.log_tail()}")
        try:
            code, _ = http_request(url, ca_path=ca_path, timeout_s=2.0)
            if code == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{process.name} did not serve {url} in time\n{process.log_tail()}")


# -- processes -------------------------------------------------------------


class Process:
    """
    A child process with its output in a log file, stopped by its PID.

    :param name: For messages.
    :param argv: The command.
    :param log_path: Where its stdout and stderr go.
    """

    def __init__(self, name: str, argv: List[str], log_path: str, cwd: str) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")
        self.popen = subprocess.Popen(
            argv,
            cwd=cwd,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def first_json_line(self) -> Any:
        """Wait (bounded) for the first line of the log that is JSON, and decode it."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("{"):
                        return json.loads(line)
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited while starting\n{self.log_tail()}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} printed nothing in time\n{self.log_tail()}")

    def pids(self) -> List[int]:
        """This process and its descendants (workers)."""
        return process_tree(self.pid)

    def stop(self) -> None:
        """SIGTERM by PID, then SIGKILL if it lingers."""
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(STOP_TIMEOUT_S)
        self._log.close()

    def log_tail(self, lines: int = 40) -> str:
        """The end of its log."""
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])


class Target:
    """
    A server under load: a plain and a TLS listener serving
    ``/_matrix/key/v2/server`` (and, for notaries, ``/query``).

    :ivar name: ``synkeys``, ``synapse`` or ``raw``.
    :ivar plain_port: Its plain HTTP port.
    :ivar tls_port: Its TLS port.
    :ivar process: Its process.
    :ivar notary: Whether it answers ``/query``.
    :ivar server_name: The name it signs as.
    """

    name = ""
    notary = True
    server_name = ""
    plain_port = 0
    tls_port = 0
    process: Process

    def url(self, scheme: str, path: str) -> str:
        """``scheme://127.0.0.1:PORT/path``."""
        port = self.tls_port if scheme == "https" else self.plain_port
        return f"{scheme}://{LOOPBACK}:{port}{path}"

    def pids(self) -> List[int]:
        """Every process serving."""
        return self.process.pids()

    def verify_keys(self) -> Dict[str, str]:
        """Its published ``verify_keys`` (key id to unpadded base64)."""
        code, body = http_request(self.url("http", "/_matrix/key/v2/server"))
        if code != 200:
            raise RuntimeError(f"{self.name} /server answered {code}")
        return {k: v["key"] for k, v in json.loads(body)["verify_keys"].items()}

    def stop(self) -> None:
        """Stop its process."""
        self.process.stop()


class RawTarget(Target):
    """The raw Twisted ceiling (:mod:`bench.raw_server`)."""

    name = "raw"
    notary = False

    def __init__(self, workdir: str, key_path: str, cert_path: str) -> None:
        self.process = Process(
            "raw",
            [sys.executable, os.path.join(HERE, "raw_server.py"), "--key", key_path,
             "--cert", cert_path],
            os.path.join(workdir, "raw.log"),
            workdir,
        )
        ports = self.process.first_json_line()
        self.plain_port, self.tls_port = ports["plain"], ports["tls"]


class SynkeysTarget(Target):
    """
    ``twistd -n synkeys`` from this checkout, federating through the test
    CA to 127.0.0.1, with a SQLite store.

    :param workers: ``--workers``.
    :param extra_args: More ``twistd synkeys`` flags.
    """

    name = "synkeys"

    def __init__(
        self,
        workdir: str,
        key_path: str,
        cert_path: str,
        ca_path: str,
        *,
        workers: int = 1,
        label: str = "synkeys",
        extra_args: Tuple[str, ...] = (),
    ) -> None:
        os.makedirs(workdir, exist_ok=True)
        self.plain_port, self.tls_port = free_port(), free_port()
        self.server_name = f"localhost:{self.tls_port}"
        argv = [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", "synkeys",
            "--server-name", self.server_name,
            "--signing-key", os.path.join(workdir, "signing.key"),
            "--database", os.path.join(workdir, "synkeys.sqlite"),
            "--listen", f"tcp:{self.plain_port}:interface={LOOPBACK}",
            "--listen", f"ssl:{self.tls_port}:privateKey={key_path}:certKey={cert_path}"
                        f":interface={LOOPBACK}",
            "--federation-ca", ca_path,
            "--allow-ip-range", f"{LOOPBACK}/32",
            "--access-log", "off",
        ]
        if workers != 1:
            argv += ["--workers", str(workers)]
        argv += list(extra_args)
        self.name = label
        self.process = Process(label, argv, os.path.join(workdir, f"{label}.log"), workdir)
        wait_until_serving(self.url("http", "/_matrix/key/v2/server"), self.process)


#: Synapse logs at WARNING, to its log file (no access log lines).
SYNAPSE_LOG_CONFIG = """\
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: {path}
root:
  level: WARNING
  handlers: [file]
disable_existing_loggers: false
"""


class SynapseTarget(Target):
    """
    A real Synapse (``tests.interop.synapse``'s configuration), its own
    notary (``trusted_key_servers: []``), trusting the test CA and 127.0.0.1,
    logging at WARNING, with a plain listener beside the TLS one.
    """

    name = "synapse"

    def __init__(self, workdir: str, pki: Any) -> None:
        from tests.interop.synapse import SynapseHomeserver

        log_config_path = os.path.join(workdir, "log.yaml")
        os.makedirs(workdir, exist_ok=True)
        with open(log_config_path, "w", encoding="utf-8") as f:
            f.write(SYNAPSE_LOG_CONFIG.format(path=os.path.join(workdir, "warnings.log")))
        self.plain_port = free_port()
        plain_port = self.plain_port
        extra = (
            f"federation_custom_ca_list: [{json.dumps(pki.ca_path)}]\n"
            f"ip_range_whitelist: ['{LOOPBACK}/32']\n"
            "trusted_key_servers: []\n"
            "suppress_key_server_warning: true\n"
            f"log_config: {json.dumps(log_config_path)}\n"
        )

        class BenchSynapse(SynapseHomeserver):
            def base_config(self) -> Dict[str, Any]:
                config = super().base_config()
                tls_listener = config["listeners"][0]
                config["listeners"].append(
                    dict(tls_listener, port=plain_port, tls=False)
                )
                return config

        self.homeserver = BenchSynapse(workdir, pki, extra)
        self.tls_port = self.homeserver.port
        self.server_name = self.homeserver.server_name
        self.homeserver.write_config()
        self.process = Process(
            "synapse",
            [sys.executable, "-m", "synapse.app.homeserver", "-c", self.homeserver.config_path],
            self.homeserver.log_path,
            workdir,
        )
        wait_until_serving(self.url("http", "/_matrix/key/v2/server"), self.process)


class OriginFarm:
    """The origin farm (:mod:`bench.origin_farm`) and its control API."""

    def __init__(self, workdir: str, key_path: str, cert_path: str) -> None:
        self.process = Process(
            "origins",
            [sys.executable, os.path.join(HERE, "origin_farm.py"), "--key", key_path,
             "--cert", cert_path],
            os.path.join(workdir, "origins.log"),
            workdir,
        )
        self.control = self.process.first_json_line()["control"]

    def spawn(self, count: int, delay_ms: int = 0) -> Dict[str, Dict[str, str]]:
        """Start ``count`` new origins; their names and verify keys."""
        code, body = http_request(
            f"http://{LOOPBACK}:{self.control}/spawn",
            "POST",
            json.dumps({"count": count, "delay_ms": delay_ms}).encode(),
        )
        if code != 200:
            raise RuntimeError(f"origin farm: {code} {body!r}")
        origins: Dict[str, Dict[str, str]] = json.loads(body)["origins"]
        return origins

    def hits(self, names: Optional[Mapping[str, Any]] = None) -> Dict[str, int]:
        """Requests received so far, by origin (only ``names`` when given)."""
        code, body = http_request(f"http://{LOOPBACK}:{self.control}/hits")
        if code != 200:
            raise RuntimeError(f"origin farm: {code} {body!r}")
        hits: Dict[str, int] = json.loads(body)
        if names is not None:
            return {name: hits.get(name, 0) for name in names}
        return hits

    def times(self, names: Mapping[str, Any]) -> Dict[str, List[float]]:
        """When each of ``names`` was asked (``time.monotonic()`` seconds)."""
        code, body = http_request(f"http://{LOOPBACK}:{self.control}/times")
        if code != 200:
            raise RuntimeError(f"origin farm: {code} {body!r}")
        times: Dict[str, List[float]] = json.loads(body)
        return {name: times.get(name, []) for name in names}

    def stop(self) -> None:
        """Stop the farm."""
        self.process.stop()
