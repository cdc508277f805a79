"""
What the network and store subcommands of ``synkeys`` do, given parsed
arguments, where to write, and an :class:`Environment`: everything outside
the process (reactor, federation client, key store) comes from the
environment, so tests run these against fakes.

:mod:`synkeys.cli` parses the command line and runs them; the asking is
done by :mod:`synkeys.survey` and the keyring, the judging and printing by
:mod:`synkeys.report`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

import attr
from twisted.internet.defer import Deferred

from synkeys.app import trusted_key_servers
from synkeys.config import Config, resolve_config
from synkeys.errors import (
    ConfigError,
    InvalidServerName,
    InvalidSignedJson,
    KeyLookupError,
    SignatureVerifyError,
)
from synkeys.fetchers import DirectKeyFetcher, PerspectivesKeyFetcher
from synkeys.interfaces import IFederationClient, IKeyStore
from synkeys.keyfile import (
    generate_signing_key,
    read_signing_keys,
    write_signing_keys,
)
from synkeys.keyring import Keyring
from synkeys.report import (
    EXIT_NOT_VERIFIED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    Answer,
    check_json,
    check_lines,
    compare,
    fetch_json,
    fetch_lines,
    fetch_verdict,
    format_ts,
    relative,
)
from synkeys.servername import parse_server_name
from synkeys.signing import decode_strict_json, encode_b64, verify_signature
from synkeys.storage import MEMORY, MemoryKeyStore, migrate, open_store
from synkeys.storage.postgres import is_postgres_dsn
from synkeys.survey import NotarySpec, Survey, TrustedNotary, parse_via

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ClientSettings",
    "Environment",
    "check",
    "describe_database",
    "evict",
    "fetch",
    "generate_key",
    "migrate_database",
    "show_key",
    "verify",
]

#: How long one request of ``fetch``/``check``/``verify`` may take, so a
#: dead server answers within seconds rather than the service's 30.
DEFAULT_TIMEOUT_S = 10.0

#: Where the tools act for no server of their own, config resolution still
#: wants a server name; this one is never used for anything.
_NO_SERVER_NAME = "localhost"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ClientSettings:
    """
    How the tools talk to other servers.

    :ivar federation_ca_files: Extra trusted CA files (PEM).
    :ivar allowed_ip_ranges: CIDR ranges allowed despite the blocklist.
    :ivar timeout_s: Bound on each request (and each connection attempt).
    :ivar max_response_bytes: Largest response read.
    """

    federation_ca_files: Tuple[str, ...]
    allowed_ip_ranges: Tuple[str, ...]
    timeout_s: float
    max_response_bytes: int


class Environment:
    """
    Everything the network commands use outside the process.

    By default it reaches the real network with a
    :class:`~synkeys.federation.client.FederationClient` (server discovery,
    CA-verified TLS, the IP blocklist) and opens real stores; tests pass
    fakes.

    :param reactor: Time for everything; TCP and name resolution too
        unless ``client_factory`` is given.
    :param client_factory: Builds the federation client from the settings
        (default: a real :class:`FederationClient`).
    :param store_opener: Opens a key store from a ``--database`` value
        (default: :func:`synkeys.storage.open_store`).
    """

    def __init__(
        self,
        reactor: Any,
        *,
        client_factory: Optional[Callable[[ClientSettings], IFederationClient]] = None,
        store_opener: Optional[Callable[[str], Deferred[IKeyStore]]] = None,
    ) -> None:
        self.reactor = reactor
        self._client_factory = client_factory
        self._store_opener = store_opener
        self._discovery: Any = None
        self._ip_filter: Any = None
        self._settings: Optional[ClientSettings] = None

    def now_ts(self) -> int:
        """The reactor's time in milliseconds."""
        return int(self.reactor.seconds() * 1000)

    def client(self, settings: ClientSettings) -> IFederationClient:
        """A federation client configured by ``settings``."""
        if self._client_factory is not None:
            return self._client_factory(settings)
        from synkeys.federation.client import FederationClient
        from synkeys.federation.discovery import ServerDiscovery, make_srv_lookup
        from synkeys.federation.ipfilter import IPFilter

        try:
            ip_filter = IPFilter(allowed=settings.allowed_ip_ranges)
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None
        # Discovery is built here, not inside the client, so that a TLS
        # failure can be explained by looking at the same target.
        discovery = ServerDiscovery(
            self.reactor, lambda url: client.fetch_url(url), make_srv_lookup(self.reactor)
        )
        client = FederationClient(
            self.reactor,
            ip_filter=ip_filter,
            federation_ca_files=settings.federation_ca_files,
            connect_timeout_s=settings.timeout_s,
            request_timeout_s=settings.timeout_s,
            max_response_bytes=settings.max_response_bytes,
            discovery=discovery,
        )
        self._discovery, self._ip_filter, self._settings = discovery, ip_filter, settings
        return client

    def open_store(self, database: str) -> Deferred[IKeyStore]:
        """Open the key store ``database`` names."""
        if self._store_opener is not None:
            return self._store_opener(database)
        return open_store(database, self.reactor)

    async def route(self, server_name: str) -> Optional[str]:
        """Where discovery sends requests for ``server_name``, if known."""
        if self._discovery is None:
            return None
        try:
            target = await self._discovery.resolve(server_name)
        except Exception:  # best effort: only for a note
            return None
        from synkeys.certprobe import describe_address

        return (
            f"{server_name} is reached at {describe_address(target.host, target.port)}; "
            f"its certificate must be valid for {target.tls_server_name}"
        )

    async def explain_certificate(self, server_name: str) -> Optional[str]:
        """
        After a TLS failure: which names the certificate that
        ``server_name``'s target presents is really for, if it can be had.
        """
        if self._discovery is None or self._settings is None:
            return None
        from synkeys.certprobe import explain, fetch_certificate

        try:
            target = await self._discovery.resolve(server_name)
            info = await fetch_certificate(
                self.reactor,
                self.reactor.nameResolver,
                self._ip_filter,
                target.host,
                target.port,
                target.tls_server_name,
                self._settings.timeout_s,
            )
        except Exception:  # best effort: the TLS failure itself is reported anyway
            return None
        return explain(
            info, target.host, target.port, target.tls_server_name, self.reactor.seconds()
        )


# -- shared options --------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    flags: Dict[str, Any] = {"server_name": _NO_SERVER_NAME}
    flags["federation_custom_ca_list"] = getattr(args, "federation_ca", None) or []
    flags["ip_range_whitelist"] = getattr(args, "allow_ip_range", None) or []
    flags["database"] = getattr(args, "database", None)
    return resolve_config(flags, args.config)


def _client_settings(args: argparse.Namespace, config: Config) -> ClientSettings:
    return ClientSettings(
        tuple(config.federation_custom_ca_list),
        tuple(config.ip_range_whitelist),
        args.timeout,
        config.max_response_size,
    )


def _server_name(value: str) -> str:
    try:
        parse_server_name(value)
    except InvalidServerName as e:
        raise ConfigError(f"{value!r} is not a server name: {e}") from None
    return value


def _notary_specs(values: Sequence[str], config: Config) -> Tuple[NotarySpec, ...]:
    """``--via`` values; a name without keys takes pinned keys from the config file."""
    pinned = {t.server_name: t.verify_keys for t in trusted_key_servers(config)}
    specs = []
    for value in values:
        spec = parse_via(value)
        if spec.verify_keys is None and spec.name in pinned:
            spec = NotarySpec(spec.name, pinned[spec.name])
        specs.append(spec)
    return tuple(specs)


def _first_use_notes(notaries: Sequence[Optional[TrustedNotary]]) -> List[str]:
    notes = []
    for notary in notaries:
        if notary is not None and notary.first_use:
            keys = ", ".join(
                f"{key_id} {encode_b64(key)}" for key_id, key in sorted(notary.verify_keys.items())
            )
            notes.append(
                f"trusting notary {notary.name}'s key {keys} as fetched from {notary.name} "
                f"itself (trust on first use); pin it with --via {notary.pin()}"
            )
    return notes


async def _explain_tls(env: Environment, survey: Survey, answers: List[Answer]) -> List[Answer]:
    explained = []
    for answer in answers:
        if answer.failed and survey.certificate_problem(answer.source):
            text = await env.explain_certificate(answer.source)
            if text:
                answer = attr.evolve(answer, failure=f"{answer.failure}; {text}")
        explained.append(answer)
    return explained


def _write_json(out: TextIO, value: Any) -> None:
    out.write(json.dumps(value, indent=2) + "\n")


# -- commands ----------------------------------------------------------------


def generate_key(args: argparse.Namespace, out: TextIO) -> int:
    """``synkeys generate-key``: write a new signing key file."""
    key = generate_signing_key(args.version)
    write_signing_keys(args.file, [key])
    out.write(f"Wrote {key.key_id} to {args.file} (mode 0600)\n")
    out.write(f"{key.key_id} {key.public_key_b64}\n")
    return 0


def show_key(args: argparse.Namespace, out: TextIO) -> int:
    """``synkeys show-key``: print a key file's key ids and public keys."""
    keys = read_signing_keys(args.file)
    for key in keys:
        out.write(f"{key.key_id} {key.public_key_b64}\n")
    if args.server_name:
        out.write("\n# for another server's homeserver.yaml:\ntrusted_key_servers:\n")
        out.write(f'  - server_name: "{args.server_name}"\n    verify_keys:\n')
        for key in keys:
            out.write(f'      "{key.key_id}": "{key.public_key_b64}"\n')
    return 0


def describe_database(database: str) -> str:
    """A ``--database`` value for output, without a password."""
    hidden = re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", database)
    return re.sub(r"(password\s*=\s*)\S+", r"\1***", hidden)


def migrate_database(args: argparse.Namespace, out: TextIO) -> int:
    """``synkeys migrate``: bring the key cache's schema up to date."""
    config = _config(args)
    where = describe_database(config.database)
    result = migrate(config.database)
    if result.applied:
        applied = ", ".join(str(v) for v in result.applied)
        out.write(
            f"{where}: schema version {result.before} -> {result.after} "
            f"(applied migration {applied})\n"
        )
    else:
        out.write(f"{where}: schema version {result.after}, up to date\n")
    return 0


async def evict(args: argparse.Namespace, out: TextIO, err: TextIO, env: Environment) -> int:
    """``synkeys evict``: forget a server's cached keys."""
    config = _config(args)
    server_name = _server_name(args.server)
    where = describe_database(config.database)
    if _is_missing_sqlite_file(config.database):
        raise ConfigError(f"no key cache at {where} (give --database or --config)")
    store = await env.open_store(config.database)
    try:
        removed = await store.evict_server(server_name)
    finally:
        await store.close()
    out.write(f"Removed {removed} cached key(s) of {server_name} from {where}\n")
    return 0


def _is_missing_sqlite_file(database: str) -> bool:
    return database != MEMORY and not is_postgres_dsn(database) and not os.path.exists(database)


async def fetch(args: argparse.Namespace, out: TextIO, err: TextIO, env: Environment) -> int:
    """``synkeys fetch``: fetch a server's keys directly or through notaries, and judge them."""
    config = _config(args)
    server_name = _server_name(args.server)
    specs = _notary_specs(args.via, config)
    survey = Survey(env.client(_client_settings(args, config)), env.reactor)
    origin, via = await survey.ask(server_name, specs, origin=not specs)
    answers = [origin] if origin is not None else [answer for answer, _ in via]
    answers = await _explain_tls(env, survey, answers)
    notes = _first_use_notes([notary for _, notary in via])
    if origin is not None:
        route = await env.route(server_name)
        if route:
            notes.insert(0, route)
    now_ts = env.now_ts()
    verdict = fetch_verdict(server_name, answers, now_ts)
    if args.json:
        _write_json(out, fetch_json(server_name, answers, verdict, notes))
    else:
        lines = fetch_lines(server_name, answers, verdict, now_ts, notes, with_failure=False)
        out.write("\n".join(lines) + "\n")
    if not verdict.ok:
        err.write(f"synkeys fetch: FAILED: {verdict.summary}\n")
    return verdict.exit_code


async def check(args: argparse.Namespace, out: TextIO, err: TextIO, env: Environment) -> int:
    """``synkeys check``: compare the origin's keys with the notaries', side by side."""
    config = _config(args)
    server_name = _server_name(args.server)
    specs = _notary_specs(args.via, config)
    if not specs:
        raise ConfigError("check needs at least one --via NOTARY to compare with")
    quorum = len(specs) if args.quorum is None else args.quorum
    if not 1 <= quorum <= len(specs):
        raise ConfigError(
            f"--quorum {quorum}: must be between 1 and {len(specs)}, the notaries given"
        )
    survey = Survey(env.client(_client_settings(args, config)), env.reactor)
    origin, via = await survey.ask(server_name, specs, origin=True)
    assert origin is not None
    answers = await _explain_tls(env, survey, [origin, *(answer for answer, _ in via)])
    notes = _first_use_notes([notary for _, notary in via])
    now_ts = env.now_ts()
    comparison = compare(server_name, answers[0], answers[1:], quorum, now_ts)
    if args.json:
        _write_json(out, check_json(comparison, notes))
    else:
        lines = check_lines(comparison, now_ts, notes, with_failure=False)
        out.write("\n".join(lines) + "\n")
    if not comparison.verdict.ok:
        err.write(f"synkeys check: FAILED: {comparison.verdict.summary}\n")
    return comparison.verdict.exit_code


def _read_json_file(path: str) -> Dict[str, Any]:
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    try:
        obj = decode_strict_json(data)
    except InvalidSignedJson as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return obj


def _signature_key_ids(obj: Dict[str, Any], server_name: str) -> List[str]:
    signatures = obj.get("signatures")
    own = signatures.get(server_name) if isinstance(signatures, dict) else None
    return sorted(own) if isinstance(own, dict) else []


async def verify(args: argparse.Namespace, out: TextIO, err: TextIO, env: Environment) -> int:
    """``synkeys verify``: check a signed JSON object with the keyring."""
    config = _config(args)
    server_name = _server_name(args.server)
    obj = _read_json_file(args.file)
    key_ids = _signature_key_ids(obj, server_name)
    if not key_ids:
        err.write(f"synkeys verify: {args.file} carries no signature of {server_name}\n")
        return EXIT_NOT_VERIFIED
    if args.at is not None:
        valid_at_ts, at_source = args.at, "--at"
    elif isinstance(obj.get("origin_server_ts"), int):
        valid_at_ts, at_source = obj["origin_server_ts"], "its origin_server_ts"
    else:
        valid_at_ts, at_source = env.now_ts(), "now"

    client = env.client(_client_settings(args, config))
    survey = Survey(client, env.reactor)
    if args.via:
        specs = _notary_specs(args.via, config)
    else:
        specs = tuple(
            NotarySpec(t.server_name, t.verify_keys) for t in trusted_key_servers(config)
        )
    notaries = []
    for spec in specs:
        notary, problem = await survey.trust(spec)
        if notary is None:
            assert problem is not None
            err.write(f"synkeys verify: notary {problem.source}: {problem.failure}\n")
            return EXIT_UNREACHABLE if problem.unreachable else EXIT_NOT_VERIFIED
        notaries.append(notary)
    for note in _first_use_notes(notaries):
        out.write(f"note: {note}\n")

    store = MemoryKeyStore()
    fetchers: List[Any] = [
        PerspectivesKeyFetcher(survey.client, env.reactor, n.name, n.verify_keys) for n in notaries
    ]
    fetchers.append(DirectKeyFetcher(survey.client, env.reactor))
    keyring = Keyring(fetchers, env.reactor, store=store)
    when = f"at {format_ts(valid_at_ts)} ({at_source})"
    try:
        await keyring.verify_json_for_server(server_name, obj, valid_at_ts)
    except SignatureVerifyError as e:
        err.write(f"synkeys verify: FAILED {when}: {e}\n")
        return EXIT_NOT_VERIFIED
    except KeyLookupError as e:
        err.write(f"synkeys verify: FAILED: {e}\n")
        unreachable = bool(survey.client.transport_failures)
        return EXIT_UNREACHABLE if unreachable else EXIT_NOT_VERIFIED

    stored = (await store.get_server_keys({server_name: key_ids})).get(server_name, {})
    now_ts = env.now_ts()
    for key_id in key_ids:
        keys = stored.get(key_id)
        key = keys.key_bytes(key_id) if keys is not None else None
        if keys is None or key is None or not verify_signature(obj, server_name, key_id, key):
            continue
        verify_key = keys.verify_key(key_id)
        assert verify_key is not None
        until = verify_key.valid_until()
        out.write(
            f"OK: {args.file} carries a valid signature of {server_name} by {key_id} {when}\n"
            f"key {key_id} {encode_b64(key)} from {keys.source}, "
            f"{'expired' if verify_key.is_old else 'valid until'} {format_ts(until)} "
            f"({relative(until, now_ts)})\n"
        )
        return EXIT_OK
    out.write(f"OK: {args.file} carries a valid signature of {server_name} {when}\n")
    return EXIT_OK
