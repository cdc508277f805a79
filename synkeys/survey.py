"""
Asking the sources a federating server would ask about one server's keys
(the origin itself, notaries) and keeping each answer apart, with exactly
why it failed: what ``synkeys fetch`` and ``synkeys check`` show.

Built on :class:`~synkeys.fetchers.DirectKeyFetcher` and
:class:`~synkeys.fetchers.PerspectivesKeyFetcher`, so every check a
notary or keyring makes is made here too; this module only adds the
bookkeeping an operator needs (which source, reachable or not, which
notary key signed). It takes an :class:`~synkeys.interfaces.IFederationClient`
and a clock, so it runs against fakes as well as the network.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, Optional, Tuple

import attr
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from synkeys.checks import check_notary_signature
from synkeys.errors import ConfigError, FetchError, InvalidKeyResponse, InvalidServerName
from synkeys.fetchers import (
    DirectKeyFetcher,
    PerspectivesKeyFetcher,
    perspectives_from_config,
)
from synkeys.interfaces import FederationResponse, IFederationClient
from synkeys.keys import ServerKeys
from synkeys.report import Answer
from synkeys.servername import parse_server_name
from synkeys.signing import encode_b64

__all__ = ["NotarySpec", "RecordingClient", "Survey", "TrustedNotary", "parse_via"]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class NotarySpec:
    """
    A notary as given on the command line (``--via``).

    :ivar name: The notary's server name.
    :ivar verify_keys: Its pinned keys (key id to 32 bytes), or ``None``
        when none were given and its own key is to be fetched from it.
    """

    name: str
    verify_keys: Optional[Mapping[str, bytes]] = None


@attr.s(frozen=True, slots=True, auto_attribs=True)
class TrustedNotary:
    """
    A notary whose keys are known.

    :ivar name: Its server name.
    :ivar verify_keys: Key id to 32-byte public key.
    :ivar first_use: Whether the keys were fetched from the notary itself
        just now (trust on first use) rather than pinned.
    """

    name: str
    verify_keys: Mapping[str, bytes]
    first_use: bool = False

    def pin(self) -> str:
        """The ``--via`` value that pins these keys (the first key, by id)."""
        key_id = sorted(self.verify_keys)[0]
        return f"{self.name}:{key_id}:{encode_b64(self.verify_keys[key_id])}"


def parse_via(value: str) -> NotarySpec:
    """
    Parse ``--via NAME`` or ``--via NAME:KEYID:PUBLICKEY`` (the name may
    carry a port; the key id has a colon of its own).

    :raises ConfigError: when malformed.
    """
    parts = value.rsplit(":", 3)
    if len(parts) == 4 and parts[1] == "ed25519":
        name, key_id, key = parts[0], f"{parts[1]}:{parts[2]}", parts[3]
        trusted = perspectives_from_config(
            [{"server_name": name, "verify_keys": {key_id: key}}]
        )[0]
        return NotarySpec(trusted.server_name, trusted.verify_keys)
    if ":ed25519:" in value:
        raise ConfigError(
            f"--via {value!r}: expected NAME or NAME:KEYID:PUBLICKEY, e.g. "
            "matrix.org:ed25519:auto:Noi6WqcDj0QmPxCNQqgezwTlBKrfqehY1u2FyWP9uYw"
        )
    try:
        parse_server_name(value)
    except InvalidServerName as e:
        raise ConfigError(f"--via {value!r}: {e}") from None
    return NotarySpec(value)


def _describe_response(response: FederationResponse, path: bytes) -> str:
    return f"HTTP {response.code} from {path.decode('ascii', 'replace')}"


@implementer(IFederationClient)
class RecordingClient:
    """
    Passes requests on and remembers, per server, whether the last one
    failed to get a successful HTTP answer, so that "could not reach it"
    can be told apart from "it answered something that does not verify".

    :param client: The client to pass requests to.
    :ivar transport_failures: Server name to the reason its last request
        did not get a 200 answer; absent when it did.
    :ivar kinds: Server name to the :attr:`FetchError.kind
        <synkeys.errors.FetchError.kind>` of that failure (``"http"`` for
        an error status).
    """

    def __init__(self, client: IFederationClient) -> None:
        self._client = client
        self.transport_failures: Dict[str, str] = {}
        self.kinds: Dict[str, str] = {}

    def _watch(
        self, server_name: str, path: bytes, d: Deferred[FederationResponse]
    ) -> Deferred[FederationResponse]:
        def answered(response: FederationResponse) -> FederationResponse:
            if response.code == 200:
                self.transport_failures.pop(server_name, None)
                self.kinds.pop(server_name, None)
            else:
                self.transport_failures[server_name] = _describe_response(response, path)
                self.kinds[server_name] = "http"
            return response

        def failed(failure):  # type: ignore[no-untyped-def]
            if failure.check(FetchError):
                self.transport_failures[server_name] = failure.value.reason
                self.kinds[server_name] = failure.value.kind
            return failure

        return d.addCallbacks(answered, failed)

    def get(self, server_name: str, path: bytes) -> Deferred[FederationResponse]:
        """GET through the wrapped client, recording the outcome."""
        return self._watch(server_name, path, self._client.get(server_name, path))

    def post_json(
        self, server_name: str, path: bytes, body: bytes
    ) -> Deferred[FederationResponse]:
        """POST through the wrapped client, recording the outcome."""
        return self._watch(server_name, path, self._client.post_json(server_name, path, body))


class Survey:
    """
    Asks the origin and notaries about a server's keys, each separately.

    :param client: Talks to the origin and the notaries.
    :param clock: Stamps the responses' ``fetched_ts``.
    """

    def __init__(self, client: IFederationClient, clock: IReactorTime) -> None:
        self.client = RecordingClient(client)
        self._clock = clock
        self._direct = DirectKeyFetcher(self.client, clock)

    def _answer(
        self,
        source: str,
        is_notary: bool,
        responses: Tuple[ServerKeys, ...],
        failure: Optional[str],
        countersigned_by: Optional[str] = None,
    ) -> Answer:
        unreachable = not responses and source in self.client.transport_failures
        return Answer(source, is_notary, responses, failure, unreachable, countersigned_by)

    async def ask_origin(self, server_name: str) -> Answer:
        """Fetch ``server_name``'s keys from the server itself."""
        result = await self._direct.fetch_server_keys({server_name: {}})
        responses = tuple(result.responses.get(server_name, ()))
        failure = result.failures.get(server_name)
        if not responses and failure is None:
            failure = "no keys"
        return self._answer(server_name, False, responses, failure)

    def certificate_problem(self, server_name: str) -> bool:
        """Whether the last request to ``server_name`` failed its TLS checks."""
        return self.client.kinds.get(server_name) == "tls"

    async def trust(self, spec: NotarySpec) -> Tuple[Optional[TrustedNotary], Optional[Answer]]:
        """
        The notary's keys: pinned ones as they are, otherwise fetched from
        the notary itself (trust on first use).

        :returns: The trusted notary, or ``None`` and an :class:`Answer`
            saying why its keys could not be had.
        """
        if spec.verify_keys is not None:
            return TrustedNotary(spec.name, spec.verify_keys), None
        own = await self.ask_origin(spec.name)
        current: Dict[str, bytes] = {}
        for keys in own.responses:
            current.update(keys.verify_keys)
        if not current:
            failure = f"cannot fetch the notary's own key: {own.failure}"
            return None, attr.evolve(own, is_notary=True, failure=failure)
        return TrustedNotary(spec.name, current, first_use=True), None

    async def ask_notary(self, notary: TrustedNotary, server_name: str) -> Answer:
        """Ask ``notary`` for ``server_name``'s keys, checking its signature."""
        fetcher = PerspectivesKeyFetcher(self.client, self._clock, notary.name, notary.verify_keys)
        result = await fetcher.fetch_server_keys({server_name: {}})
        responses = tuple(result.responses.get(server_name, ()))
        failure = result.failures.get(server_name)
        if responses:
            failure = None
        signed_by = None
        for keys in responses:
            try:
                signed_by = check_notary_signature(keys, notary.name, notary.verify_keys)
            except InvalidKeyResponse:
                # The fetcher returns only countersigned responses; should
                # that ever change, show the row without a notary key id.
                signed_by = None
        # The notary's own reachability, not the origin's, decides here.
        unreachable = not responses and notary.name in self.client.transport_failures
        if unreachable:
            failure = self.client.transport_failures[notary.name]
        return Answer(notary.name, True, responses, failure, unreachable, signed_by)

    async def ask_via(
        self, spec: NotarySpec, server_name: str
    ) -> Tuple[Answer, Optional[TrustedNotary]]:
        """:meth:`trust` the notary, then :meth:`ask_notary` it."""
        notary, problem = await self.trust(spec)
        if notary is None:
            assert problem is not None
            return problem, None
        return await self.ask_notary(notary, server_name), notary

    async def ask(
        self, server_name: str, notaries: Tuple[NotarySpec, ...], *, origin: bool
    ) -> Tuple[Optional[Answer], Tuple[Tuple[Answer, Optional[TrustedNotary]], ...]]:
        """
        Ask the origin (when ``origin``) and every notary, all at once.

        :returns: The origin's answer (or ``None``), and each notary's
            answer with the notary as trusted, in the order given.
        """
        origin_d: Deferred[Answer] | None = (
            Deferred.fromCoroutine(self.ask_origin(server_name)) if origin else None
        )
        via = await gatherResults(
            [Deferred.fromCoroutine(self.ask_via(spec, server_name)) for spec in notaries]
        )
        origin_answer = (await origin_d) if origin_d is not None else None
        return origin_answer, tuple(via)
