"""
The three ways of finding a server's keys, each an
:class:`~synkeys.interfaces.IKeyFetcher`:

- :class:`StoreKeyFetcher` answers from an :class:`~synkeys.interfaces.IKeyStore`;
- :class:`PerspectivesKeyFetcher` asks one notary with a single
  ``POST /_matrix/key/v2/query`` for every server at once;
- :class:`DirectKeyFetcher` asks each origin's ``/_matrix/key/v2/server``.

Fetchers only translate HTTP to checked :class:`~synkeys.keys.ServerKeys`
values; deciding which answer to trust, batching and de-duplication belong
to :class:`synkeys.keyring.Keyring`. Per-server problems are reported in
:attr:`FetchResult.failures <synkeys.interfaces.FetchResult.failures>`;
the Deferreds themselves do not errback for them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from urllib.parse import quote

import attr
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from synkeys.checks import (
    check_notary_signature,
    check_server_keys_object,
    parse_server_keys,
)
from synkeys.errors import (
    ConfigError,
    FetchError,
    InvalidKeyResponse,
    InvalidSignedJson,
)
from synkeys.interfaces import (
    FetchResult,
    IFederationClient,
    IKeyFetcher,
    IKeyStore,
    KeyRequests,
)
from synkeys.keys import ServerKeys
from synkeys.servername import is_valid_key_id, is_valid_server_name
from synkeys.signing import canonical_json, decode_strict_json, decode_verify_key_bytes

__all__ = [
    "QUERY_PATH",
    "SERVER_KEYS_PATH",
    "DirectKeyFetcher",
    "PerspectivesKeyFetcher",
    "StoreKeyFetcher",
    "TrustedKeyServer",
    "perspectives_from_config",
]

#: Where an origin publishes its keys.
SERVER_KEYS_PATH = b"/_matrix/key/v2/server"
#: A notary's batch query endpoint.
QUERY_PATH = b"/_matrix/key/v2/query"

#: Most ``(server, key id)`` pairs sent to a notary in one POST.
DEFAULT_MAX_PAIRS_PER_QUERY = 1000
#: Most origins asked at the same time by :class:`DirectKeyFetcher`.
DEFAULT_MAX_CONCURRENT_ORIGINS = 50
#: Most elements of a notary answer looked at, per server asked for.
MAX_NOTARY_ELEMENTS_PER_SERVER = 16


def _now_ts(clock: IReactorTime) -> int:
    return int(clock.seconds() * 1000)


def _add_failure(result: FetchResult, server_name: str, reason: str) -> None:
    previous = result.failures.get(server_name)
    result.failures[server_name] = f"{previous}; {reason}" if previous else reason


@implementer(IKeyFetcher)
class StoreKeyFetcher:
    """
    Answers from a key store, without any network.

    A stored current key counts only when its validity
    (:meth:`~synkeys.keys.VerifyKey.valid_until`) reaches the requested
    ``minimum_valid_until_ts``; an old key is returned as it is, since
    whether it covers an object depends on the object's timestamp, which
    the keyring checks.

    :param store: Where checked responses are kept.
    :param cap_key_validity_to_7_days: Apply the seven-day cap when
        comparing a current key's validity with the requested minimum.
    """

    name = "store"

    def __init__(self, store: IKeyStore, *, cap_key_validity_to_7_days: bool = True) -> None:
        self._store = store
        self._cap = cap_key_validity_to_7_days

    def fetch_server_keys(self, requests: KeyRequests) -> Deferred[FetchResult]:
        """Look ``requests`` up in the store."""
        return Deferred.fromCoroutine(self._fetch(requests))

    async def _fetch(self, requests: KeyRequests) -> FetchResult:
        result = FetchResult()
        lookup = {server: (list(ids) or None) for server, ids in requests.items()}
        found = await self._store.get_server_keys(lookup)
        for server_name, by_key_id in found.items():
            wanted = requests.get(server_name)
            if wanted is None:
                continue
            chosen: list[ServerKeys] = []
            for key_id, keys in by_key_id.items():
                if wanted and key_id not in wanted:
                    continue
                key = keys.verify_key(key_id)
                if key is None:
                    continue
                minimum_ts = wanted.get(key_id, 0)
                valid_enough = key.is_old or key.valid_until(cap_to_7_days=self._cap) >= minimum_ts
                if valid_enough and keys not in chosen:
                    chosen.append(keys)
            if chosen:
                result.responses[server_name] = chosen
        return result


@implementer(IKeyFetcher)
class DirectKeyFetcher:
    """
    Asks each origin for its own keys with ``GET /_matrix/key/v2/server``,
    many origins at once.

    An origin answering 404 there is asked again per key id at the older
    ``/_matrix/key/v2/server/{keyId}``.

    :param client: Talks HTTPS to origins (discovery, TLS, limits).
    :param clock: Stamps each response's ``fetched_ts``.
    :param max_concurrent: Most origins asked at the same time.
    """

    name = "direct"
    log = Logger()

    def __init__(
        self,
        client: IFederationClient,
        clock: IReactorTime,
        *,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT_ORIGINS,
    ) -> None:
        self._client = client
        self._clock = clock
        self._semaphore = DeferredSemaphore(max_concurrent)

    def fetch_server_keys(self, requests: KeyRequests) -> Deferred[FetchResult]:
        """GET every requested server's keys from the server itself."""
        return Deferred.fromCoroutine(self._fetch(requests))

    async def _fetch(self, requests: KeyRequests) -> FetchResult:
        result = FetchResult()
        servers = list(requests.items())

        def one(
            server_name: str, key_ids: Sequence[str]
        ) -> Deferred[tuple[list[ServerKeys], str | None]]:
            return Deferred.fromCoroutine(self._fetch_origin(server_name, key_ids))

        answers = await gatherResults(
            [self._semaphore.run(one, server, sorted(ids)) for server, ids in servers]
        )
        for (server_name, _ids), (responses, failure) in zip(servers, answers):
            if responses:
                result.responses[server_name] = responses
            if failure is not None:
                _add_failure(result, server_name, failure)
        return result

    async def _fetch_origin(
        self, server_name: str, key_ids: Sequence[str]
    ) -> tuple[list[ServerKeys], str | None]:
        try:
            keys, code, failure = await self._get(server_name, SERVER_KEYS_PATH)
            if code == 404 and key_ids:
                return await self._fetch_by_key_id(server_name, key_ids)
            return ([keys] if keys is not None else []), failure
        except Exception as e:  # logged; reported as a failure
            # One origin's surprise must not sink the whole batch.
            self.log.failure("fetching keys of {server} failed", server=server_name)
            return [], f"internal error: {e!r}"

    async def _fetch_by_key_id(
        self, server_name: str, key_ids: Sequence[str]
    ) -> tuple[list[ServerKeys], str | None]:
        responses: list[ServerKeys] = []
        failures: list[str] = []
        for key_id in key_ids:
            path = SERVER_KEYS_PATH + b"/" + quote(key_id, safe="").encode("ascii")
            keys, _code, failure = await self._get(server_name, path)
            if keys is not None and keys not in responses:
                responses.append(keys)
            if failure is not None:
                failures.append(failure)
        return responses, ("; ".join(failures) if failures else None)

    async def _get(
        self, server_name: str, path: bytes
    ) -> tuple[ServerKeys | None, int | None, str | None]:
        """One GET: ``(keys or None, HTTP code or None, failure reason or None)``."""
        try:
            response = await self._client.get(server_name, path)
        except FetchError as e:
            self.log.info(
                "fetching {path} from {server} failed: {reason}",
                path=path.decode("ascii"),
                server=server_name,
                reason=e.reason,
            )
            return None, None, e.reason
        if response.code != 200:
            return (
                None,
                response.code,
                f"HTTP {response.code} from {path.decode('ascii')}",
            )
        try:
            keys = parse_server_keys(
                response.body,
                server_name,
                fetched_ts=_now_ts(self._clock),
                source=server_name,
                peer_certificate_sha256=response.peer_certificate_sha256,
            )
        except InvalidKeyResponse as e:
            self.log.warn(
                "invalid key response from {server}: {reason}",
                server=server_name,
                reason=e.reason,
            )
            return None, response.code, f"invalid response: {e.reason}"
        return keys, response.code, None


@attr.s(frozen=True, slots=True, auto_attribs=True)
class TrustedKeyServer:
    """
    A notary the operator trusts, from ``trusted_key_servers``.

    :ivar server_name: The notary's server name.
    :ivar verify_keys: Its key ids mapped to 32-byte ed25519 public keys.
    """

    server_name: str
    verify_keys: Mapping[str, bytes]


def perspectives_from_config(trusted_key_servers: object) -> list[TrustedKeyServer]:
    """
    Parse Synapse's ``trusted_key_servers`` setting::

        [{"server_name": "matrix.org",
          "verify_keys": {"ed25519:auto": "Noi6WqcDj0QmPxCNQqgezwTlBKrfqehY1u2FyWP9uYw"}}]

    Unlike Synapse, ``verify_keys`` is required: a notary whose answers
    cannot be checked is not a notary to trust.

    :raises ConfigError: naming the entry and what is wrong with it.
    """
    if not isinstance(trusted_key_servers, list):
        raise ConfigError("trusted_key_servers must be a list")
    result: list[TrustedKeyServer] = []
    seen = set()
    for index, entry in enumerate(trusted_key_servers):
        where = f"trusted_key_servers[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a mapping")
        unknown = set(entry) - {"server_name", "verify_keys", "accept_keys_insecurely"}
        if unknown:
            raise ConfigError(f"{where} has unknown fields: {', '.join(sorted(unknown))}")
        server_name = entry.get("server_name")
        if not is_valid_server_name(server_name):
            raise ConfigError(f"{where}.server_name is not a valid server name: {server_name!r}")
        assert isinstance(server_name, str)
        if server_name in seen:
            raise ConfigError(f"{where}: {server_name} is listed twice")
        seen.add(server_name)
        raw_keys = entry.get("verify_keys")
        if not isinstance(raw_keys, dict) or not raw_keys:
            raise ConfigError(
                f"{where} ({server_name}) needs verify_keys: a non-empty mapping of "
                "key id to base64 ed25519 key"
            )
        verify_keys: dict[str, bytes] = {}
        for key_id, key in raw_keys.items():
            if not is_valid_key_id(key_id):
                raise ConfigError(f"{where} ({server_name}): invalid key id {key_id!r}")
            try:
                verify_keys[key_id] = decode_verify_key_bytes(key)
            except InvalidSignedJson as e:
                raise ConfigError(f"{where} ({server_name}) {key_id}: {e}") from None
        result.append(TrustedKeyServer(server_name, verify_keys))
    return result


def _chunks(requests: KeyRequests, max_pairs: int) -> Iterator[dict[str, Mapping[str, int]]]:
    """Split requests so that no chunk holds more than ``max_pairs`` pairs."""
    chunk: dict[str, Mapping[str, int]] = {}
    pairs = 0
    for server_name, key_ids in requests.items():
        items = list(key_ids.items())
        if not items:
            # "every key" counts as one pair
            if pairs + 1 > max_pairs and chunk:
                yield chunk
                chunk, pairs = {}, 0
            chunk[server_name] = {}
            pairs += 1
            continue
        while items:
            room = max_pairs - pairs
            if room <= 0:
                yield chunk
                chunk, pairs = {}, 0
                room = max_pairs
            taken, items = items[:room], items[room:]
            merged = dict(chunk.get(server_name, {}))
            merged.update(taken)
            chunk[server_name] = merged
            pairs += len(taken)
    if chunk:
        yield chunk


@implementer(IKeyFetcher)
class PerspectivesKeyFetcher:
    """
    Asks one notary for many servers' keys with a single
    ``POST /_matrix/key/v2/query``.

    Every element of the answer must be a valid object of a server that was
    asked for (origin signatures intact) and must carry a signature of the
    notary by one of ``notary_verify_keys``; anything else is logged and
    reported as a failure, never returned as keys.

    :param client: Talks HTTPS to the notary.
    :param clock: Stamps each response's ``fetched_ts``.
    :param notary_name: The notary's server name.
    :param notary_verify_keys: Key ids of the notary to 32-byte keys.
    :param max_pairs_per_query: Above this many ``(server, key id)`` pairs,
        the query is split into several POSTs.
    """

    log = Logger()

    def __init__(
        self,
        client: IFederationClient,
        clock: IReactorTime,
        notary_name: str,
        notary_verify_keys: Mapping[str, bytes],
        *,
        max_pairs_per_query: int = DEFAULT_MAX_PAIRS_PER_QUERY,
    ) -> None:
        if not notary_verify_keys:
            raise ConfigError(f"notary {notary_name} has no verify keys")
        self._client = client
        self._clock = clock
        self.notary_name = notary_name
        self.notary_verify_keys = dict(notary_verify_keys)
        self.name = f"perspectives:{notary_name}"
        self._max_pairs = max(1, max_pairs_per_query)

    @classmethod
    def from_trusted(
        cls, client: IFederationClient, clock: IReactorTime, trusted: TrustedKeyServer
    ) -> PerspectivesKeyFetcher:
        """Build a fetcher for one parsed ``trusted_key_servers`` entry."""
        return cls(client, clock, trusted.server_name, trusted.verify_keys)

    def fetch_server_keys(self, requests: KeyRequests) -> Deferred[FetchResult]:
        """Ask the notary for ``requests``, in as few POSTs as the bound allows."""
        return Deferred.fromCoroutine(self._fetch(requests))

    async def _fetch(self, requests: KeyRequests) -> FetchResult:
        result = FetchResult()
        for chunk in _chunks(requests, self._max_pairs):
            try:
                await self._query(chunk, result)
            except Exception as e:  # logged; reported as failures
                self.log.failure("querying notary {notary} failed", notary=self.notary_name)
                for server_name in chunk:
                    _add_failure(result, server_name, f"internal error {e!r}")
        return result

    def _fail_all(self, chunk: Mapping[str, object], result: FetchResult, reason: str) -> None:
        self.log.warn("notary {notary}: {reason}", notary=self.notary_name, reason=reason)
        for server_name in chunk:
            _add_failure(result, server_name, reason)

    async def _query(self, chunk: Mapping[str, Mapping[str, int]], result: FetchResult) -> None:
        body = canonical_json(
            {
                "server_keys": {
                    server_name: {
                        key_id: {"minimum_valid_until_ts": minimum_ts}
                        for key_id, minimum_ts in key_ids.items()
                    }
                    for server_name, key_ids in chunk.items()
                }
            }
        )
        try:
            response = await self._client.post_json(self.notary_name, QUERY_PATH, body)
        except FetchError as e:
            self._fail_all(chunk, result, e.reason)
            return
        if response.code != 200:
            self._fail_all(chunk, result, f"HTTP {response.code}")
            return
        try:
            parsed = decode_strict_json(response.body)
        except InvalidSignedJson as e:
            self._fail_all(chunk, result, f"invalid body: {e}")
            return
        elements = parsed.get("server_keys") if isinstance(parsed, dict) else None
        if not isinstance(elements, list):
            self._fail_all(chunk, result, "server_keys is not a list")
            return
        limit = MAX_NOTARY_ELEMENTS_PER_SERVER * len(chunk)
        if len(elements) > limit:
            self.log.warn(
                "notary {notary} sent {count} objects for {asked} servers; reading {limit}",
                notary=self.notary_name,
                count=len(elements),
                asked=len(chunk),
                limit=limit,
            )
            elements = elements[:limit]
        fetched_ts = _now_ts(self._clock)
        reasons: dict[str, list[str]] = {}
        for element in elements:
            server_name = element.get("server_name") if isinstance(element, dict) else None
            if not isinstance(server_name, str) or server_name not in chunk:
                self.log.warn(
                    "notary {notary} sent keys of {server}, which was not asked for; ignored",
                    notary=self.notary_name,
                    server=repr(server_name)[:300],
                )
                continue
            try:
                keys = check_server_keys_object(
                    element, server_name, fetched_ts=fetched_ts, source=self.notary_name
                )
                check_notary_signature(keys, self.notary_name, self.notary_verify_keys)
            except InvalidKeyResponse as e:
                self.log.warn(
                    "notary {notary} sent invalid keys of {server}: {reason}",
                    notary=self.notary_name,
                    server=server_name,
                    reason=e.reason,
                )
                reasons.setdefault(server_name, []).append(e.reason)
                continue
            responses = result.responses.setdefault(server_name, [])
            if keys not in responses:
                responses.append(keys)
        for server_name in chunk:
            if server_name in reasons:
                _add_failure(result, server_name, "; ".join(reasons[server_name]))
            elif server_name not in result.responses:
                _add_failure(result, server_name, "the notary returned no keys")
