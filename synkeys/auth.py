"""
Matrix federation request authentication (server-server API, "Request
Authentication"): the ``X-Matrix`` ``Authorization`` header.

A request is authenticated by signing the JSON object
``{"method", "uri", "origin", "destination"[, "content"]}`` with the
origin's key and sending the signature as::

    Authorization: X-Matrix origin="a.example",destination="b.example",key="ed25519:k",sig="..."

:func:`sign_request`, :func:`parse_authorization_header` and
:func:`request_signable` are pure; :func:`authenticate_request` verifies
against a keyring; :class:`XMatrixProtectedResource` puts that in front of
any resource tree.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

import attr
import nacl.signing
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource, getChildForRequest
from twisted.web.server import NOT_DONE_YET, Request

from synkeys.errors import (
    InvalidKeyId,
    InvalidServerName,
    InvalidSignedJson,
    KeyLookupError,
    MatrixError,
    SignatureVerifyError,
)
from synkeys.http import error_for, render_error
from synkeys.servername import check_key_id, parse_server_name
from synkeys.signing import (
    JsonDict,
    decode_b64,
    decode_strict_json,
    encode_b64,
    signature_bytes,
)

__all__ = [
    "MAX_AUTHORIZATION_HEADERS",
    "MAX_AUTH_BODY_BYTES",
    "SignatureVerifier",
    "XMatrixAuth",
    "XMatrixProtectedResource",
    "authenticate_request",
    "parse_authorization_header",
    "request_signable",
    "sign_request",
    "unauthorized",
]

log = Logger()

#: Largest request body read to check its signature (1 MiB).
MAX_AUTH_BODY_BYTES = 1024 * 1024
#: At most this many ``X-Matrix`` headers of one request are tried: each
#: try may make the keyring fetch keys from the claimed origin.
MAX_AUTHORIZATION_HEADERS = 4

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Unquoted values are read leniently: the spec asks recipients to allow
# colons, and unquoted base64 signatures carry "/", "+" and "=" too.
_UNQUOTED_VALUE = re.compile(r'[^\s,"]+')
_SCHEME = re.compile(r"[ \t]*X-Matrix(?:[ \t]+(.*?))?[ \t]*", re.IGNORECASE | re.DOTALL)
_OWS = re.compile(r"[ \t]*")


def unauthorized(msg: str) -> MatrixError:
    """401 ``M_UNAUTHORIZED``: the request is not (validly) signed."""
    return MatrixError(401, "M_UNAUTHORIZED", msg)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class XMatrixAuth:
    """
    The parameters of one ``X-Matrix`` ``Authorization`` header.

    :ivar origin: The server that claims to have sent the request.
    :ivar destination: The server it was meant for, or ``None`` when the
        header (from a server older than spec v1.3) does not say.
    :ivar key_id: The origin's key that made the signature.
    :ivar signature_b64: The signature, base64 as sent.
    """

    origin: str
    destination: str | None
    key_id: str
    signature_b64: str


class SignatureVerifier(Protocol):
    """What :func:`authenticate_request` needs of a keyring."""

    def verify_json_for_server(
        self, server_name: str, json_object: JsonDict, valid_at_ts: int
    ) -> Deferred[None]:
        """
        Fire when ``json_object`` carries a valid signature of
        ``server_name`` by a key valid at ``valid_at_ts`` (ms); errback with
        :class:`KeyLookupError` or :class:`SignatureVerifyError` otherwise.
        """


def request_signable(
    method: str,
    uri: str,
    origin: str,
    destination: str,
    content: Any | None,
) -> JsonDict:
    """
    The object an ``X-Matrix`` signature covers.

    :param method: The HTTP method, e.g. ``"GET"``.
    :param uri: The request target as sent: path and query, no host.
    :param content: The decoded JSON body, or ``None`` when there is none.
    """
    signable: JsonDict = {
        "method": method,
        "uri": uri,
        "origin": origin,
        "destination": destination,
    }
    if content is not None:
        signable["content"] = content
    return signable


def sign_request(
    origin: str,
    destination: str,
    method: str,
    uri: str,
    content: Any | None,
    key_id: str,
    signing_key: nacl.signing.SigningKey,
) -> bytes:
    """
    The ``Authorization`` header value authenticating a request from
    ``origin`` to ``destination``.

    :raises InvalidServerName: when ``origin`` or ``destination`` is not a
        server name (which also keeps quotes out of the header).
    :raises InvalidKeyId: when ``key_id`` is not one.
    """
    parse_server_name(origin)
    parse_server_name(destination)
    check_key_id(key_id)
    signable = request_signable(method, uri, origin, destination, content)
    sig = encode_b64(signature_bytes(signable, signing_key))
    return (
        f'X-Matrix origin="{origin}",destination="{destination}",'
        f'key="{key_id}",sig="{sig}"'
    ).encode("ascii")


def _is_x_matrix(value: bytes) -> bool:
    return value.lstrip(b" \t")[:9].lower() in (
        b"x-matrix",
        b"x-matrix ",
        b"x-matrix\t",
    )


def _parse_params(text: str) -> dict[str, str]:
    """Parse ``name=value`` pairs separated by commas (RFC 7235 auth-params)."""
    params: dict[str, str] = {}
    pos = 0
    end = len(text)
    while True:
        # Empty list elements ("a=1,,b=2") are allowed by the #rule.
        while pos < end and text[pos] in " \t,":
            pos += 1
        if pos == end:
            return params
        name_match = _TOKEN.match(text, pos)
        if name_match is None:
            raise unauthorized(
                f"malformed X-Matrix parameter at {text[pos : pos + 20]!r}"
            )
        name = name_match.group().lower()
        pos = _OWS.match(text, name_match.end()).end()  # type: ignore[union-attr]
        if pos == end or text[pos] != "=":
            raise unauthorized(f"X-Matrix parameter {name[:40]!r} has no value")
        pos = _OWS.match(text, pos + 1).end()  # type: ignore[union-attr]
        if pos < end and text[pos] == '"':
            value, pos = _parse_quoted(text, pos + 1)
        else:
            value_match = _UNQUOTED_VALUE.match(text, pos)
            if value_match is None:
                raise unauthorized(f"X-Matrix parameter {name[:40]!r} has no value")
            value, pos = value_match.group(), value_match.end()
        pos = _OWS.match(text, pos).end()  # type: ignore[union-attr]
        if pos < end and text[pos] != ",":
            raise unauthorized(f"junk after X-Matrix parameter {name[:40]!r}")
        # Two values for one name would let parsers disagree on which counts.
        if name in params:
            raise unauthorized(f"X-Matrix parameter {name[:40]!r} given twice")
        params[name] = value


def _parse_quoted(text: str, pos: int) -> tuple[str, int]:
    """Read a quoted-string whose opening quote ends at ``pos``."""
    chars = []
    while pos < len(text):
        c = text[pos]
        if c == "\\":
            if pos + 1 == len(text):
                break
            chars.append(text[pos + 1])
            pos += 2
        elif c == '"':
            return "".join(chars), pos + 1
        else:
            chars.append(c)
            pos += 1
    raise unauthorized("unterminated quoted string in X-Matrix header")


def parse_authorization_header(value: bytes) -> XMatrixAuth:
    """
    Parse one ``Authorization`` header value of scheme ``X-Matrix``.

    Tolerant as the spec asks: parameters in any order, names in any case,
    values quoted (with backslash escapes) or not, colons in unquoted
    values, optional whitespace, unknown parameters ignored; ``destination``
    may be missing.

    :raises MatrixError: 401 ``M_UNAUTHORIZED`` saying what is wrong.
    """
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        raise unauthorized("Authorization header is not ASCII") from None
    scheme = _SCHEME.fullmatch(text)
    if scheme is None:
        raise unauthorized("Authorization header is not of scheme X-Matrix")
    params = _parse_params(scheme.group(1) or "")
    for required in ("origin", "key", "sig"):
        if required not in params:
            raise unauthorized(f"X-Matrix header has no {required}")
    origin = params["origin"]
    destination = params.get("destination")
    for what, name in (("origin", origin), ("destination", destination)):
        if name is None:
            continue
        try:
            parse_server_name(name)
        except InvalidServerName:
            raise unauthorized(
                f"X-Matrix {what} {name[:300]!r} is not a server name"
            ) from None
    try:
        key_id = check_key_id(params["key"])
    except InvalidKeyId:
        raise unauthorized(
            f"X-Matrix key {params['key'][:80]!r} is not a key id"
        ) from None
    try:
        signature = decode_b64(params["sig"])
    except InvalidSignedJson:
        signature = b""
    if len(signature) != 64:
        raise unauthorized("X-Matrix sig is not a base64 ed25519 signature")
    return XMatrixAuth(origin, destination, key_id, params["sig"])


async def authenticate_request(
    keyring: SignatureVerifier,
    server_name_of_this_server: str,
    method: bytes,
    uri: bytes,
    headers: Sequence[bytes],
    content_bytes: bytes | None,
    now_ts: int,
) -> str:
    """
    Authenticate a request by its ``X-Matrix`` headers.

    Each ``X-Matrix`` header (at most :data:`MAX_AUTHORIZATION_HEADERS`) is
    tried in turn until one verifies; other schemes are skipped.

    :param keyring: Verifies signatures with the origin's keys.
    :param server_name_of_this_server: Our name; a header naming another
        destination is refused, and a header naming none is checked as
        if it named us.
    :param method: The request method as received.
    :param uri: The request target as received (path and query).
    :param headers: Every ``Authorization`` header value of the request.
    :param content_bytes: The request body; ``None`` or empty for none.
    :param now_ts: Now (ms): the keys must be valid then.
    :returns: The authenticated origin's server name.
    :raises MatrixError: 401 ``M_UNAUTHORIZED`` with the reasons.
    """
    candidates = [h for h in headers if _is_x_matrix(h)][:MAX_AUTHORIZATION_HEADERS]
    if not candidates:
        raise unauthorized("Missing X-Matrix Authorization header")
    try:
        method_text = method.decode("ascii")
        uri_text = uri.decode("utf-8")
    except UnicodeDecodeError:
        raise unauthorized("request method or target is not text") from None
    content = None
    if content_bytes:
        try:
            content = decode_strict_json(content_bytes)
        except InvalidSignedJson as e:
            raise unauthorized(f"request body is not signable JSON: {e}") from None

    reasons = []
    for header in candidates:
        try:
            auth = parse_authorization_header(header)
        except MatrixError as e:
            reasons.append(e.msg)
            continue
        destination = auth.destination
        if destination is None:
            destination = server_name_of_this_server
        elif destination != server_name_of_this_server:
            reasons.append(f"destination {destination!r} is not this server")
            continue
        signed = request_signable(
            method_text, uri_text, auth.origin, destination, content
        )
        signed["signatures"] = {auth.origin: {auth.key_id: auth.signature_b64}}
        try:
            await keyring.verify_json_for_server(auth.origin, signed, now_ts)
        except (KeyLookupError, SignatureVerifyError) as e:
            reasons.append(str(e))
            continue
        return auth.origin
    raise unauthorized("; ".join(reasons))


def _read_body(request: Request, max_bytes: int) -> bytes | None:
    """The request body, leaving ``request.content`` at 0 for the next reader."""
    length = request.getHeader(b"content-length")
    if length is not None and length.strip().isdigit() and int(length) > max_bytes:
        raise MatrixError(413, "M_TOO_LARGE", "Request body too large")
    content = getattr(request, "content", None)
    if content is None:
        return None
    content.seek(0)
    data = content.read(max_bytes + 1)
    content.seek(0)
    if len(data) > max_bytes:
        raise MatrixError(413, "M_TOO_LARGE", "Request body too large")
    return data


class XMatrixProtectedResource(Resource):
    """
    Put ``X-Matrix`` authentication in front of a resource tree.

    Every request is authenticated first; only then is the rest of its
    path looked up in ``wrapped`` and rendered there, with
    ``request.authenticated_origin`` set to the origin's server name.
    Failures answer 401 ``M_UNAUTHORIZED`` (413 ``M_TOO_LARGE`` for a body
    over ``max_body_bytes``) as Matrix JSON; the body stays readable from
    the start for the wrapped resource.
    """

    # A leaf, so that the wrapped tree is walked only after authentication.
    isLeaf = True

    def __init__(
        self,
        wrapped: IResource,
        keyring: SignatureVerifier,
        server_name: str,
        clock: IReactorTime,
        max_body_bytes: int = MAX_AUTH_BODY_BYTES,
    ) -> None:
        """
        :param wrapped: The resource tree to protect.
        :param keyring: Verifies signatures.
        :param server_name: This server's name.
        :param clock: Source of the time keys must be valid at.
        :param max_body_bytes: Largest body accepted.
        """
        super().__init__()
        self._wrapped = wrapped
        self._keyring = keyring
        self._server_name = server_name
        self._clock = clock
        self._max_body_bytes = max_body_bytes

    def render(self, request: Request) -> object:
        """Authenticate ``request``, then hand it to the wrapped tree."""
        try:
            body = _read_body(request, self._max_body_bytes)
        except MatrixError as e:
            render_error(request, e)
            return NOT_DONE_YET
        d = Deferred.fromCoroutine(
            authenticate_request(
                self._keyring,
                self._server_name,
                request.method,
                request.uri,
                request.requestHeaders.getRawHeaders(b"authorization", []),
                body,
                int(self._clock.seconds() * 1000),  # type: ignore[misc]
            )
        )
        finished = [False]

        def gone(_: object) -> None:
            finished[0] = True
            d.cancel()

        request.notifyFinish().addErrback(gone)

        def authenticated(origin: str) -> None:
            if finished[0]:
                return
            request.authenticated_origin = origin  # type: ignore[attr-defined]
            try:
                request.render(getChildForRequest(self._wrapped, request))
            except Exception:  # noqa: BLE001 - answered as a 500 and logged
                render_error(request, error_for(Failure()))

        def refused(failure: Failure) -> None:
            if finished[0] or failure.check(CancelledError):
                return
            render_error(request, error_for(failure))

        d.addCallbacks(authenticated, refused)
        d.addErrback(lambda f: log.failure("Error while authenticating", f))
        return NOT_DONE_YET
