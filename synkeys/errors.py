"""
Exceptions that carry their fields and, where they reach the wire, their
Matrix error code and HTTP status.

Every resource maps these to ``{"errcode", "error"}`` JSON in one place
(:func:`synkeys.http.render_error`); nothing else formats errors.
"""

from __future__ import annotations

from typing import Any, Dict, Optional


class SynkeysError(Exception):
    """Base class of every exception synkeys raises on purpose."""


class MatrixError(SynkeysError):
    """
    An error that is answered to an HTTP client as Matrix JSON.

    :ivar code: HTTP status code.
    :ivar errcode: Matrix error code, e.g. ``M_BAD_JSON``.
    :ivar msg: Human-readable explanation.
    :ivar extra: Further fields merged into the JSON body.
    """

    def __init__(
        self,
        code: int,
        errcode: str,
        msg: str,
        extra: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__(msg)
        self.code = code
        self.errcode = errcode
        self.msg = msg
        self.extra = dict(extra or {})

    def to_json(self) -> Dict[str, Any]:
        """The error body as a JSON-able dict."""
        body: Dict[str, Any] = {"errcode": self.errcode, "error": self.msg}
        body.update(self.extra)
        return body


def bad_json(msg: str) -> MatrixError:
    """400 ``M_BAD_JSON``: the request body is JSON of the wrong shape."""
    return MatrixError(400, "M_BAD_JSON", msg)


def not_json(msg: str = "Content not JSON.") -> MatrixError:
    """400 ``M_NOT_JSON``: the request body is not JSON at all."""
    return MatrixError(400, "M_NOT_JSON", msg)


def invalid_param(msg: str) -> MatrixError:
    """400 ``M_INVALID_PARAM``: a server name, key id or parameter is invalid."""
    return MatrixError(400, "M_INVALID_PARAM", msg)


def unrecognized(code: int = 404, msg: str = "Unrecognized request") -> MatrixError:
    """404 or 405 ``M_UNRECOGNIZED``: no such endpoint or method."""
    return MatrixError(code, "M_UNRECOGNIZED", msg)


class ConfigError(SynkeysError):
    """The configuration (flags, config file or key files) is invalid."""


class InvalidServerName(SynkeysError, ValueError):
    """A string is not a server name under the spec's grammar."""


class InvalidKeyId(SynkeysError, ValueError):
    """A string is not a key id of the form ``ed25519:[a-zA-Z0-9_]+``."""


class InvalidSignedJson(SynkeysError, ValueError):
    """
    Bytes received are not strict canonical-JSON material, or an object
    fails a structural check.
    """


class InvalidKeyResponse(SynkeysError):
    """
    A server-keys response (from an origin or a notary) failed a check.

    :ivar server_name: The server the response was for.
    :ivar reason: Why it was rejected.
    """

    def __init__(self, server_name: str, reason: str) -> None:
        super().__init__(f"invalid key response for {server_name}: {reason}")
        self.server_name = server_name
        self.reason = reason


class KeyLookupError(SynkeysError):
    """
    No usable key could be found for a server.

    :ivar server_name: The server whose key was wanted.
    :ivar key_ids: The key ids that were looked for.
    :ivar reason: What went wrong, for humans.
    """

    def __init__(self, server_name: str, key_ids: Any, reason: str) -> None:
        ids = ", ".join(sorted(key_ids)) if key_ids else "any key"
        super().__init__(f"could not find {ids} for {server_name}: {reason}")
        self.server_name = server_name
        self.key_ids = frozenset(key_ids or ())
        self.reason = reason


class SignatureVerifyError(SynkeysError):
    """
    Keys were found for a server, but no signature of it verified.

    :ivar server_name: The server whose signature was checked.
    :ivar reason: What went wrong, for humans.
    """

    def __init__(self, server_name: str, reason: str) -> None:
        super().__init__(f"signature of {server_name} does not verify: {reason}")
        self.server_name = server_name
        self.reason = reason


class FetchError(SynkeysError):
    """
    Fetching from a remote server failed (unreachable, TLS, HTTP error,
    blocked address, too large, timed out).

    :ivar server_name: The server that was asked.
    :ivar reason: What went wrong, for humans and logs.
    :ivar kind: A short machine-readable outcome, e.g. ``"timeout"``,
        ``"tls"``, ``"blocked"``, ``"http"``, ``"too_large"``, ``"dns"``,
        ``"connect"``, ``"redirect"``; used for logs and metrics.
    """

    def __init__(self, server_name: str, reason: str, kind: str = "error") -> None:
        super().__init__(f"fetching from {server_name} failed: {reason}")
        self.server_name = server_name
        self.reason = reason
        self.kind = kind
