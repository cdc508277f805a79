"""Tests for :mod:`synkeys.auth`."""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any

import nacl.signing
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.test.requesthelper import DummyRequest

from synkeys.auth import (
    MAX_AUTHORIZATION_HEADERS,
    XMatrixAuth,
    XMatrixProtectedResource,
    authenticate_request,
    parse_authorization_header,
    request_signable,
    sign_request,
)
from synkeys.errors import (
    InvalidKeyId,
    InvalidServerName,
    KeyLookupError,
    MatrixError,
    SignatureVerifyError,
)
from synkeys.signing import JsonDict, decode_b64, encode_b64, verify_signature

ORIGIN = "origin.example"
US = "keys.example"
KEY_ID = "ed25519:k1"
KEY = nacl.signing.SigningKey(b"\x05" * 32)
OTHER_KEY = nacl.signing.SigningKey(b"\x06" * 32)
NOW_TS = 1_700_000_000_000
SIG = encode_b64(b"s" * 64)


class FakeKeyring:
    """A keyring that verifies against fixed keys and records its calls."""

    def __init__(self, keys: dict[str, dict[str, bytes]]) -> None:
        """:param keys: server name → key id → 32-byte key."""
        self.keys = keys
        self.calls: list[tuple[str, JsonDict, int]] = []

    def verify_json_for_server(
        self, server_name: str, json_object: JsonDict, valid_at_ts: int
    ) -> Deferred[None]:
        """Verify ``json_object`` against the fixed keys of ``server_name``."""
        self.calls.append((server_name, json_object, valid_at_ts))
        server_keys = self.keys.get(server_name)
        if not server_keys:
            return fail(KeyLookupError(server_name, None, "no keys"))
        for key_id, key in server_keys.items():
            if verify_signature(json_object, server_name, key_id, key):
                return succeed(None)
        return fail(SignatureVerifyError(server_name, "bad signature"))


def keyring() -> FakeKeyring:
    """A keyring knowing ORIGIN's KEY."""
    return FakeKeyring({ORIGIN: {KEY_ID: bytes(KEY.verify_key)}})


def header(
    method: str = "GET",
    uri: str = "/_matrix/federation/v1/x?a=b",
    content: Any = None,
    destination: str = US,
    key: nacl.signing.SigningKey = KEY,
) -> bytes:
    """A header signed by ORIGIN for a request to ``destination``."""
    return sign_request(ORIGIN, destination, method, uri, content, KEY_ID, key)


class SignRequestTests(SynchronousTestCase):
    """sign_request and request_signable."""

    def test_header_shape(self) -> None:
        """The header is the spec's quoted, comma-separated X-Matrix form."""
        value = header()
        self.assertTrue(
            value.startswith(
                b'X-Matrix origin="origin.example",destination="keys.example",'
                b'key="ed25519:k1",sig="'
            )
        )
        self.assertTrue(value.endswith(b'"'))

    def test_signature_covers_request(self) -> None:
        """The sig verifies over method, uri, origin, destination and content."""
        auth = parse_authorization_header(header("POST", "/p", {"a": 1}))
        signed = request_signable("POST", "/p", ORIGIN, US, {"a": 1})
        signed["signatures"] = {ORIGIN: {KEY_ID: auth.signature_b64}}
        self.assertTrue(verify_signature(signed, ORIGIN, KEY_ID, bytes(KEY.verify_key)))
        signed["uri"] = "/q"
        self.assertFalse(
            verify_signature(signed, ORIGIN, KEY_ID, bytes(KEY.verify_key))
        )

    def test_signable(self) -> None:
        """The signable object holds content only when there is some."""
        self.assertEqual(
            request_signable("GET", "/x", "a", "b", None),
            {"method": "GET", "uri": "/x", "origin": "a", "destination": "b"},
        )
        self.assertEqual(request_signable("PUT", "/x", "a", "b", {})["content"], {})

    def test_refuses_bad_names(self) -> None:
        """Names that could break the header's quoting are refused."""
        self.assertRaises(
            InvalidServerName,
            sign_request,
            'a",x="',
            US,
            "GET",
            "/",
            None,
            KEY_ID,
            KEY,
        )
        self.assertRaises(
            InvalidKeyId, sign_request, ORIGIN, US, "GET", "/", None, "k", KEY
        )


class ParseHeaderTests(SynchronousTestCase):
    """parse_authorization_header."""

    def test_roundtrip(self) -> None:
        """A header made by sign_request parses back to its parts."""
        auth = parse_authorization_header(header())
        self.assertEqual(
            (auth.origin, auth.destination, auth.key_id), (ORIGIN, US, KEY_ID)
        )
        self.assertEqual(len(decode_b64(auth.signature_b64)), 64)

    def test_tolerant(self) -> None:
        """Any order, any case, unquoted values with colons, escapes, spaces and unknown params."""
        value = (
            f'x-matrix   KEY=ed25519:k1 , Sig="{SIG}",, foo="a,b\\"c",'
            f'destination = keys.example:8448,origin="or\\igin.example"'
        ).encode()
        self.assertEqual(
            parse_authorization_header(value),
            XMatrixAuth("origin.example", "keys.example:8448", KEY_ID, SIG),
        )

    def test_unquoted_signature(self) -> None:
        """An unquoted base64 signature with / and + is read whole."""
        sig = encode_b64(b"\xff\xfe" * 32)
        self.assertIn("/", sig)
        value = f"X-Matrix origin=a.example,key=ed25519:k,sig={sig}".encode()
        self.assertEqual(parse_authorization_header(value).signature_b64, sig)

    def test_destination_optional(self) -> None:
        """A header without destination parses with destination None."""
        value = f'X-Matrix origin="a.example",key="ed25519:k",sig="{SIG}"'.encode()
        self.assertIsNone(parse_authorization_header(value).destination)

    def test_malformed(self) -> None:
        """Malformed headers are refused with 401 M_UNAUTHORIZED and a reason."""
        base = f'origin="a.example",key="ed25519:k",sig="{SIG}"'
        cases = {
            b"Bearer abc": "not of scheme X-Matrix",
            b"X-Matrixorigin=a": "not of scheme X-Matrix",
            b"X-Matrix": "no origin",
            f'X-Matrix key="ed25519:k",sig="{SIG}"'.encode(): "no origin",
            b'X-Matrix origin="a.example",sig="' + SIG.encode() + b'"': "no key",
            b'X-Matrix origin="a.example",key="ed25519:k"': "no sig",
            f'X-Matrix origin="a b",key="ed25519:k",sig="{SIG}"'.encode(): "not a server name",
            f"X-Matrix {base},destination=a/b".encode(): "destination",
            f'X-Matrix origin="a.example",key="rsa:k",sig="{SIG}"'.encode(): "not a key id",
            b'X-Matrix origin="a.example",key="ed25519:k",sig="abc"': "not a base64",
            f"X-Matrix {base},origin=b.example".encode(): "given twice",
            f'X-Matrix {base},x="abc'.encode(): "unterminated",
            f"X-Matrix {base},x=".encode(): "has no value",
            f"X-Matrix {base},x".encode(): "has no value",
            f"X-Matrix {base} junk".encode(): "junk after",
            f"X-Matrix {base},=a".encode(): "malformed",
            'X-Matrix origin="é"'.encode(): "not ASCII",
        }
        for value, reason in cases.items():
            exc = self.assertRaises(MatrixError, parse_authorization_header, value)
            self.assertEqual((exc.code, exc.errcode), (401, "M_UNAUTHORIZED"))
            self.assertIn(reason, exc.msg, value)


class AuthenticateTests(SynchronousTestCase):
    """authenticate_request against a fake keyring."""

    def authenticate(
        self,
        headers: list[bytes],
        method: bytes = b"GET",
        uri: bytes = b"/_matrix/federation/v1/x?a=b",
        content: bytes | None = None,
        ring: FakeKeyring | None = None,
    ) -> Deferred[str]:
        """Run authenticate_request as US at NOW_TS."""
        return Deferred.fromCoroutine(
            authenticate_request(
                ring or keyring(), US, method, uri, headers, content, NOW_TS
            )
        )

    def assertUnauthorized(self, d: Deferred[str], reason: str) -> None:
        """Assert ``d`` failed with 401 M_UNAUTHORIZED mentioning ``reason``."""
        exc = self.failureResultOf(d, MatrixError).value
        self.assertEqual((exc.code, exc.errcode), (401, "M_UNAUTHORIZED"))
        self.assertIn(reason, exc.msg)

    def test_valid(self) -> None:
        """A correctly signed request yields its origin, checked at now."""
        ring = keyring()
        d = self.authenticate([header()], ring=ring)
        self.assertEqual(self.successResultOf(d), ORIGIN)
        self.assertEqual(ring.calls[0][0], ORIGIN)
        self.assertEqual(ring.calls[0][2], NOW_TS)

    def test_valid_with_content(self) -> None:
        """A signed POST body is part of what is verified."""
        hdr = header("POST", "/p", {"a": 1})
        d = self.authenticate([hdr], b"POST", b"/p", b'{"a": 1}')
        self.assertEqual(self.successResultOf(d), ORIGIN)
        d = self.authenticate([hdr], b"POST", b"/p", b'{"a": 2}')
        self.assertUnauthorized(d, "bad signature")

    def test_forged(self) -> None:
        """A signature by a key the origin does not own is refused."""
        self.assertUnauthorized(
            self.authenticate([header(key=OTHER_KEY)]), "bad signature"
        )

    def test_other_method_or_uri(self) -> None:
        """A signature for another method or target is refused."""
        self.assertUnauthorized(self.authenticate([header()], method=b"PUT"), "bad")
        self.assertUnauthorized(self.authenticate([header()], uri=b"/other"), "bad")

    def test_wrong_destination(self) -> None:
        """A header naming another destination is refused without asking the keyring."""
        ring = keyring()
        d = self.authenticate([header(destination="other.example")], ring=ring)
        self.assertUnauthorized(d, "destination 'other.example' is not this server")
        self.assertEqual(ring.calls, [])

    def test_no_destination(self) -> None:
        """A header without destination is verified as addressed to us."""
        auth = parse_authorization_header(header())
        old_style = (
            f'X-Matrix origin="{ORIGIN}",key="{KEY_ID}",sig="{auth.signature_b64}"'
        ).encode()
        self.assertEqual(self.successResultOf(self.authenticate([old_style])), ORIGIN)

    def test_unknown_origin(self) -> None:
        """An origin whose keys cannot be found is refused."""
        ring = FakeKeyring({})
        self.assertUnauthorized(self.authenticate([header()], ring=ring), "no keys")

    def test_missing_header(self) -> None:
        """A request without X-Matrix headers is refused."""
        self.assertUnauthorized(self.authenticate([]), "Missing X-Matrix")
        self.assertUnauthorized(self.authenticate([b"Bearer x"]), "Missing X-Matrix")

    def test_malformed_header(self) -> None:
        """A malformed header is refused with its parse error."""
        self.assertUnauthorized(self.authenticate([b"X-Matrix origin=a"]), "no key")

    def test_one_of_several_valid(self) -> None:
        """With several headers, one that verifies is enough."""
        headers = [
            b"Bearer x",
            b"X-Matrix garbage",
            header(key=OTHER_KEY),
            header(destination="other.example"),
            header(),
        ]
        self.assertEqual(self.successResultOf(self.authenticate(headers)), ORIGIN)

    def test_header_limit(self) -> None:
        """Only the first MAX_AUTHORIZATION_HEADERS X-Matrix headers are tried."""
        ring = keyring()
        headers = [header(key=OTHER_KEY)] * MAX_AUTHORIZATION_HEADERS + [header()]
        self.assertUnauthorized(self.authenticate(headers, ring=ring), "bad signature")
        self.assertEqual(len(ring.calls), MAX_AUTHORIZATION_HEADERS)

    def test_body_not_json(self) -> None:
        """A body that is not strict JSON is refused."""
        for body in [b"{", b'{"a":1.5}', b'{"a":1,"a":1}']:
            d = self.authenticate([header()], b"POST", b"/p", body)
            self.assertUnauthorized(d, "not signable JSON")

    def test_uri_not_utf8(self) -> None:
        """A request target that is not UTF-8 is refused."""
        self.assertUnauthorized(self.authenticate([header()], uri=b"/\xff"), "not text")

    def test_other_keyring_errors_propagate(self) -> None:
        """Unexpected keyring errors are not turned into 401s."""
        ring = keyring()
        ring.verify_json_for_server = lambda *a: fail(RuntimeError("boom"))  # type: ignore[method-assign]
        self.failureResultOf(self.authenticate([header()], ring=ring), RuntimeError)


class Inner(Resource):
    """A leaf that reports who called it and what body it read."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        """Answer the origin, path and body as JSON."""
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(
            {
                "origin": getattr(request, "authenticated_origin", None),
                "postpath": [p.decode() for p in request.postpath],
                "body": request.content.read().decode(),
            }
        ).encode()


class ProtectedResourceTests(SynchronousTestCase):
    """XMatrixProtectedResource through treq's in-memory client."""

    def setUp(self) -> None:
        """Wrap a tree with Inner at /_matrix/federation."""
        root = Resource()
        matrix = Resource()
        root.putChild(b"_matrix", matrix)
        matrix.putChild(b"federation", Inner())
        self.clock = Clock()
        self.clock.advance(NOW_TS / 1000)
        self.ring = keyring()
        protected = XMatrixProtectedResource(
            root, self.ring, US, self.clock, max_body_bytes=100
        )
        self.treq = StubTreq(protected)

    def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        """Make a request and return its code and decoded JSON."""
        response = self.successResultOf(
            self.treq.request(method, f"https://{US}{path}", **kwargs)
        )
        body = self.successResultOf(self.treq.content(response))
        if response.code != 200 or method != "HEAD":
            self.assertEqual(
                response.headers.getRawHeaders(b"content-type"), [b"application/json"]
            )
        return response.code, json.loads(body) if body else None

    def test_valid_get(self) -> None:
        """A signed GET reaches the inner resource with authenticated_origin set."""
        path = "/_matrix/federation/v1/x?a=b"
        code, body = self.request(
            "GET", path, headers={b"Authorization": [header("GET", path)]}
        )
        self.assertEqual(code, 200)
        self.assertEqual(body["origin"], ORIGIN)
        self.assertEqual(body["postpath"], ["v1", "x"])
        self.assertEqual(self.ring.calls[0][2], NOW_TS)

    def test_valid_post_body_still_readable(self) -> None:
        """The inner resource reads the whole body after authentication read it."""
        path = "/_matrix/federation/send"
        code, body = self.request(
            "POST",
            path,
            data=b'{"a": 1}',
            headers={b"Authorization": [header("POST", path, {"a": 1})]},
        )
        self.assertEqual(code, 200)
        self.assertEqual(body["body"], '{"a": 1}')

    def test_forged(self) -> None:
        """A forged signature answers 401 Matrix JSON and never reaches the inner resource."""
        path = "/_matrix/federation/v1/x"
        code, body = self.request(
            "GET",
            path,
            headers={b"Authorization": [header("GET", path, key=OTHER_KEY)]},
        )
        self.assertEqual(code, 401)
        self.assertEqual(body["errcode"], "M_UNAUTHORIZED")
        self.assertIn("bad signature", body["error"])
        self.assertNotIn("origin", body)

    def test_missing(self) -> None:
        """An unsigned request answers 401."""
        code, body = self.request("GET", "/_matrix/federation/v1/x")
        self.assertEqual((code, body["errcode"]), (401, "M_UNAUTHORIZED"))

    def test_too_large(self) -> None:
        """A body over the limit answers 413 M_TOO_LARGE before any key lookup."""
        path = "/_matrix/federation/send"
        code, body = self.request(
            "POST",
            path,
            data=b"[" + b"1," * 100 + b"1]",
            headers={b"Authorization": [header("POST", path, [1] * 101)]},
        )
        self.assertEqual((code, body["errcode"]), (413, "M_TOO_LARGE"))
        self.assertEqual(self.ring.calls, [])


class ProtectedResourceDirectTests(SynchronousTestCase):
    """XMatrixProtectedResource driven with a DummyRequest."""

    def test_body_too_large_without_length(self) -> None:
        """A body over the limit with no Content-Length answers 413."""
        protected = XMatrixProtectedResource(Inner(), keyring(), US, Clock(), 10)
        request = DummyRequest([b"x"])
        request.method = b"POST"
        request.content = BytesIO(b"[" + b"1," * 10 + b"1]")
        self.assertIs(protected.render(request), NOT_DONE_YET)
        self.assertEqual(request.responseCode, 413)
        self.assertIn(b"M_TOO_LARGE", b"".join(request.written))

    def test_client_gone_cancels(self) -> None:
        """When the client goes away the pending key lookup is cancelled."""
        cancelled = []
        ring = keyring()
        ring.verify_json_for_server = lambda *a: Deferred(cancelled.append)  # type: ignore[method-assign]
        protected = XMatrixProtectedResource(Inner(), ring, US, Clock())
        request = DummyRequest([b"x"])
        request.uri = b"/x"
        request.requestHeaders.addRawHeader(b"authorization", header("GET", "/x"))
        self.assertIs(protected.render(request), NOT_DONE_YET)
        self.assertEqual(cancelled, [])
        request.processingFailed(Failure(ConnectionDone()))
        self.assertEqual(len(cancelled), 1)
        self.assertEqual(request.written, [])

    def test_inner_error_is_500(self) -> None:
        """An exception in the wrapped resource answers 500 Matrix JSON."""

        class Broken(Resource):
            isLeaf = True

            def render(self, request: Request) -> bytes:
                raise ValueError("broken")

        protected = XMatrixProtectedResource(Broken(), keyring(), US, Clock())
        request = DummyRequest([])
        request.uri = b"/x"
        request.requestHeaders.addRawHeader(b"authorization", header("GET", "/x"))
        protected.render(request)
        self.assertEqual(request.responseCode, 500)
        self.assertIn(b"M_UNKNOWN", b"".join(request.written))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
