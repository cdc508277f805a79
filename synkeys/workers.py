"""
``--workers N``: N processes serving the same listening ports and sharing
the store, so that one service uses N cores.

How it works (Linux and other systems with ``SO_REUSEPORT``):

1. Before anything starts, the first process binds every ``--listen``
   endpoint N times: N listening sockets per port, each with
   ``SO_REUSEPORT``, so the kernel spreads new connections over the N
   sockets (a hash of the connection's addresses), rather than letting
   whichever process wakes first accept them all. A port that cannot be
   bound is an error at once; ``tcp:0`` gets one port, shared by all.
2. That process serves the first socket of each port itself
   (:class:`AdoptedEndpoint` makes a socket look like an endpoint, so
   :class:`~synkeys.app.SynkeysService` needs nothing special).
3. When it starts, it spawns N - 1 workers (``python -m
   synkeys.workers``), handing each its own sockets as inherited file
   descriptors and the same settings; each builds the same service on
   them. A worker's log events come back to the first process through a
   pipe and are logged there (system ``worker-1``, ...), a worker that
   exits is started again after :data:`RESTART_DELAY_S`, and a worker whose
   parent is gone stops by itself.
4. Stopping the first process (SIGTERM) stops the workers the same way:
   each stops accepting, lets its requests finish, closes the store.

Every process has its own memory cache; they share the store, which stays
the source of truth (see :mod:`synkeys.notary`), so an SQLite file or a
PostgreSQL database, not ``:memory:``. Metrics listeners (``--metrics``)
are served by the first process alone and count its requests only.

Where ``SO_REUSEPORT`` does not exist, the processes share one socket per
port instead (the kernel then balances less evenly).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import attr
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from synkeys.errors import ConfigError
from synkeys.tlsinfo import context_factory_of

__all__ = [
    "AdoptedEndpoint",
    "RESTART_DELAY_S",
    "SharedListener",
    "WorkerPool",
    "bind_shared_listeners",
    "flags_of",
    "pool_for",
    "worker_main",
]

log = Logger()

#: How long after a worker exits it is started again.
RESTART_DELAY_S = 1.0
#: How long stopping waits for the workers before killing them.
STOP_TIMEOUT_S = 30.0
#: How often a worker checks that its parent is still there.
PARENT_CHECK_INTERVAL_S = 1.0
#: Separates the JSON log events a worker sends its parent.
_RECORD_SEPARATOR = "\x1e"


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """
    A server endpoint listening on a socket that is already bound and
    listening, given by its file descriptor (TLS wrapped around it when a
    context factory is given).

    :param reactor: Provides ``adoptStreamPort``.
    :param fileno: The listening socket's file descriptor (left open: the
        reactor listens on a duplicate of it).
    :param family: ``socket.AF_INET`` or ``socket.AF_INET6``.
    :param context_factory: For TLS: what an ``ssl:`` endpoint serves.

    :ivar contextFactory: ``context_factory``, where
        :func:`synkeys.tlsinfo.context_factory_of` finds it.
    """

    def __init__(
        self, reactor: Any, fileno: int, family: int, context_factory: Optional[Any] = None
    ) -> None:
        self._reactor = reactor
        self.fileno = fileno
        self.family = family
        self.contextFactory = context_factory

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:  # noqa: N803
        """Serve ``protocolFactory`` on the socket."""
        factory: Any = protocolFactory
        if self.contextFactory is not None:
            factory = TLSMemoryBIOFactory(self.contextFactory, False, protocolFactory)
        try:
            port = self._reactor.adoptStreamPort(self.fileno, self.family, factory)
        except Exception:
            return defer.fail()
        return succeed(port)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class SharedListener:
    """
    One ``--listen`` endpoint bound for every process.

    :ivar description: The endpoint string.
    :ivar family: The sockets' address family.
    :ivar tls: Whether it is an ``ssl:`` endpoint.
    :ivar sockets: One listening socket per process (the same one repeated
        where ``SO_REUSEPORT`` is missing).
    """

    description: str
    family: int
    tls: bool
    sockets: Tuple[socket.socket, ...]

    @property
    def port(self) -> int:
        """The port all the sockets listen on."""
        return int(self.sockets[0].getsockname()[1])


def _address_of(reactor: Any, description: str) -> Tuple[int, str, int, Optional[Any]]:
    """``(port, interface, backlog, context factory or None)`` of a tcp/ssl endpoint."""
    try:
        endpoint = serverFromString(reactor, description)
    except Exception as e:  # Twisted raises many kinds here
        raise ConfigError(f"invalid --listen endpoint {description!r}: {e}") from None
    port = getattr(endpoint, "_port", None)
    interface = getattr(endpoint, "_interface", None)
    backlog = getattr(endpoint, "_backlog", 50)
    if not isinstance(port, int) or not isinstance(interface, str):
        raise ConfigError(
            f"--workers serves tcp:, tcp6: and ssl: listeners only, not {description!r}"
        )
    return port, interface, int(backlog), context_factory_of(endpoint)


def _bind(family: int, interface: str, port: int, backlog: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((interface, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def bind_shared_listeners(
    reactor: Any, descriptions: Sequence[str], processes: int
) -> List[SharedListener]:
    """
    Bind every endpoint once per process (see the module docstring).

    :raises ConfigError: for an endpoint that is not tcp/ssl or cannot be
        bound (every socket bound so far is closed again).
    """
    reuse_port = hasattr(socket, "SO_REUSEPORT")
    listeners: List[SharedListener] = []
    try:
        for description in descriptions:
            port, interface, backlog, context_factory = _address_of(reactor, description)
            family = socket.AF_INET6 if ":" in interface else socket.AF_INET
            sockets: List[socket.socket] = []
            try:
                first = _bind(family, interface, port, backlog, reuse_port)
                sockets.append(first)
                bound_port = first.getsockname()[1]
                for _ in range(processes - 1):
                    sockets.append(
                        _bind(family, interface, bound_port, backlog, reuse_port)
                        if reuse_port
                        else first
                    )
            except OSError as e:
                for sock in set(sockets):
                    sock.close()
                raise ConfigError(f"cannot listen on {description!r}: {e.strerror}") from None
            listeners.append(
                SharedListener(description, family, context_factory is not None, tuple(sockets))
            )
    except ConfigError:
        for listener in listeners:
            for sock in set(listener.sockets):
                sock.close()
        raise
    return listeners


def adopted_endpoints(
    reactor: Any, listeners: Sequence[SharedListener], index: int
) -> List[Tuple[str, AdoptedEndpoint]]:
    """The ``(description, endpoint)`` pairs process ``index`` serves."""
    result = []
    for listener in listeners:
        _, _, _, context_factory = _address_of(reactor, listener.description)
        endpoint = AdoptedEndpoint(
            reactor, listener.sockets[index].fileno(), listener.family, context_factory
        )
        result.append((listener.description, endpoint))
    return result


def pool_for(
    reactor: Any, config: Any, flags: Mapping[str, Any], config_path: Optional[str]
) -> WorkerPool:
    """
    The :class:`WorkerPool` for ``config.workers`` processes, its sockets
    bound.

    :param config: The resolved :class:`synkeys.config.Config`.
    :param flags: From :func:`flags_of`.
    :param config_path: The ``--config`` file, or ``None``.
    :raises ConfigError: when the store cannot be shared (``:memory:``), or
        a listener is not tcp/ssl or cannot be bound.
    """
    if config.database.strip() == ":memory:":
        raise ConfigError("--workers needs a store the processes can share, not :memory:")
    listeners = bind_shared_listeners(reactor, config.listen, config.workers)
    return WorkerPool(reactor, listeners, flags, config_path)


def flags_of(options: Mapping[str, Any], repeated: Mapping[str, List[str]]) -> Dict[str, Any]:
    """
    The settings as given on the command line (by setting key), from
    :class:`synkeys.tap.Options`, so that a worker resolves the same
    configuration from them and the same ``--config`` file.
    """
    from synkeys.config import SETTINGS

    flags: Dict[str, Any] = {s.key: options[s.flag] for s in SETTINGS if not s.repeatable}
    flags.update({key: list(values) for key, values in repeated.items()})
    return flags


class _WorkerProtocol(ProcessProtocol):
    """Relays a worker's log events and notices when it exits."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.ended: Deferred[None] = Deferred()
        self._buffer = ""

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self._buffer += data.decode("utf-8", "replace")
        *records, self._buffer = self._buffer.split(_RECORD_SEPARATOR)
        for record in records:
            if record.strip():
                self._relay(record)

    def _relay(self, record: str) -> None:
        try:
            event = eventFromJSON(record)
        except ValueError:
            log.warn("worker-{index}: {line}", index=self.index, line=record.strip())
            return
        event["log_system"] = f"worker-{self.index}"
        globalLogPublisher(event)

    def errReceived(self, data: bytes) -> None:  # noqa: N802
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                log.warn("worker-{index} stderr: {line}", index=self.index, line=line)

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        self.pool._ended(self, reason)
        self.ended.callback(None)


class WorkerPool(Service):
    """
    Runs the workers of a first process: spawns them when started, starts
    again any that exits, stops them when stopped.

    :param reactor: Spawns the processes and times restarts.
    :param listeners: From :func:`bind_shared_listeners`; process 0 is this
        one.
    :param flags: From :func:`flags_of`.
    :param config_path: The ``--config`` file, or ``None``.
    :param python: The interpreter the workers run.
    """

    def __init__(
        self,
        reactor: Any,
        listeners: Sequence[SharedListener],
        flags: Mapping[str, Any],
        config_path: Optional[str],
        python: str = sys.executable,
    ) -> None:
        self._reactor = reactor
        self.listeners = list(listeners)
        self._flags = dict(flags)
        self._config_path = config_path
        self._python = python
        self.processes: Dict[int, Any] = {}
        self._protocols: Dict[int, _WorkerProtocol] = {}
        self._restarts: Dict[int, Any] = {}
        self.count = len(self.listeners[0].sockets) if self.listeners else 1

    def endpoints(self) -> List[Tuple[str, AdoptedEndpoint]]:
        """What this (the first) process serves."""
        return adopted_endpoints(self._reactor, self.listeners, 0)

    def spec(self, index: int) -> Dict[str, Any]:
        """What worker ``index`` is told: the settings and its sockets."""
        return {
            "index": index,
            "flags": self._flags,
            "config_path": self._config_path,
            "fds": [listener.sockets[index].fileno() for listener in self.listeners],
            "families": [int(listener.family) for listener in self.listeners],
        }

    def startService(self) -> None:  # noqa: N802
        """Spawn the workers."""
        super().startService()
        for index in range(1, self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        if not self.running:
            return
        spec = self.spec(index)
        child_fds: Dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for fd in spec["fds"]:
            child_fds[fd] = fd
        env = dict(os.environ)
        # The workers import this very synkeys, wherever it was found.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(
            [package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        protocol = _WorkerProtocol(self, index)
        self._protocols[index] = protocol
        self.processes[index] = self._reactor.spawnProcess(
            protocol,
            self._python,
            [self._python, "-m", "synkeys.workers", json.dumps(spec)],
            env=env,
            childFDs=child_fds,
        )
        log.info(
            "Started worker {index} as PID {pid}", index=index, pid=self.processes[index].pid
        )

    def _ended(self, protocol: _WorkerProtocol, reason: Failure) -> None:
        index = protocol.index
        if self._protocols.get(index) is protocol:
            del self._protocols[index]
            self.processes.pop(index, None)
        if not self.running:
            return
        log.error(
            "Worker {index} exited ({reason}); starting it again in {delay_s} s",
            index=index,
            reason=reason.getErrorMessage(),
            delay_s=RESTART_DELAY_S,
        )
        self._restarts[index] = self._reactor.callLater(RESTART_DELAY_S, self._spawn, index)

    def stopService(self) -> Deferred[None]:  # noqa: N802
        """Stop every worker (SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT_S`)."""
        super().stopService()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        waits = []
        for index, protocol in list(self._protocols.items()):
            process = self.processes.get(index)
            if process is None:
                continue
            try:
                process.signalProcess("TERM")
            except Exception:  # already gone
                continue
            waits.append(self._bounded(protocol, process))
        return defer.DeferredList(waits).addCallback(lambda _: None)

    def _bounded(self, protocol: _WorkerProtocol, process: Any) -> Deferred[None]:
        def kill() -> None:
            log.warn("Worker {index} did not stop; killing it", index=protocol.index)
            try:
                process.signalProcess("KILL")
            except Exception:  # gone meanwhile
                pass

        timer = self._reactor.callLater(STOP_TIMEOUT_S, kill)

        def stopped(_: object) -> None:
            if timer.active():
                timer.cancel()

        return protocol.ended.addBoth(stopped)

    def supervise(self, service: Any) -> MultiService:
        """``service`` (this process's) and this pool, as one service."""
        both = MultiService()
        service.setServiceParent(both)
        self.setServiceParent(both)
        return both


def worker_main(argv: Optional[Sequence[str]] = None) -> None:
    """
    Run one worker: ``python -m synkeys.workers SPEC`` (see
    :meth:`WorkerPool.spec`). Logs go to stdout as JSON events for the
    first process; the worker stops on SIGTERM or when its parent is gone.
    """
    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall
    from twisted.logger import globalLogBeginner, jsonFileLogObserver

    from synkeys.app import SynkeysService, load_or_generate_keys
    from synkeys.config import resolve_config

    args = list(sys.argv[1:] if argv is None else argv)
    spec = json.loads(args[0])
    globalLogBeginner.beginLoggingTo(
        [jsonFileLogObserver(sys.stdout, recordSeparator=_RECORD_SEPARATOR)],
        redirectStandardIO=False,
    )
    config = resolve_config(spec["flags"], spec["config_path"])
    endpoints = []
    for description, fd, family in zip(config.listen, spec["fds"], spec["families"]):
        _, _, _, context_factory = _address_of(reactor, description)
        endpoints.append((description, AdoptedEndpoint(reactor, fd, family, context_factory)))
    loaded = load_or_generate_keys(config.signing_key_path)
    notary_keys = None
    if config.key_server_signing_keys_path:
        notary_keys = load_or_generate_keys(config.key_server_signing_keys_path)
    service = SynkeysService(
        config,
        reactor,
        loaded,
        endpoints,
        notary_keys=notary_keys,
        metrics_endpoints=[],
        freeze_heap=True,
    )
    parent = os.getppid()

    def check_parent() -> None:
        if os.getppid() != parent:
            log.warn("Parent process {pid} is gone; stopping", pid=parent)
            reactor.stop()  # type: ignore[attr-defined]

    LoopingCall(check_parent).start(PARENT_CHECK_INTERVAL_S, now=False)
    reactor.callWhenRunning(service.startService)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
        "before", "shutdown", service.stopService
    )
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    worker_main()
