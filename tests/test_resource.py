"""Tests for L{synkeys.resource}: /_matrix/key/v2/server and the tree."""

import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource, getChildForRequest
from twisted.web.static import Data
from twisted.web.test.requesthelper import DummyRequest

from synkeys.keyfile import generate_signing_key
from synkeys.keyserver import KeyPublisher
from synkeys.resource import KeyRootResource, build_root, mount_key_resources
from synkeys.signing import decode_b64, verify_signature
from tests.stubhttp import request


class ServerKeysResourceTests(SynchronousTestCase):
    """GET /_matrix/key/v2/server and its errors."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.key = generate_signing_key("k")
        self.publisher = KeyPublisher("example.org", [self.key], self.clock)
        self.root = build_root(self.publisher)

    def test_paths(self) -> None:
        """/server, /server/ and /server/{keyId} answer the same signed body."""
        bodies = set()
        for path in ["/server", "/server/", "/server/ed25519:k", "/server/ed25519:other"]:
            answer = request(self, self.root, "GET", "/_matrix/key/v2" + path)
            self.assertEqual(answer.code, 200, path)
            bodies.add(answer.body)
        self.assertEqual(bodies, {self.publisher.body()})

    def test_sytest_shape(self) -> None:
        """The body has what sytest checks, and the signature verifies over the raw bytes."""
        answer = request(self, self.root, "GET", "/_matrix/key/v2/server")
        obj = answer.json()
        self.assertEqual(obj["server_name"], "example.org")
        self.assertGreater(obj["valid_until_ts"], self.clock.seconds() * 1000)
        self.assertEqual(obj["old_verify_keys"], {})
        self.assertEqual(list(obj["signatures"]), ["example.org"])
        key = decode_b64(obj["verify_keys"]["ed25519:k"]["key"])
        self.assertTrue(verify_signature(obj, "example.org", "ed25519:k", key))
        self.assertEqual(len(decode_b64(obj["signatures"]["example.org"]["ed25519:k"])), 64)

    def test_headers(self) -> None:
        """JSON content type and CORS headers are sent."""
        answer = request(self, self.root, "GET", "/_matrix/key/v2/server")
        self.assertEqual(answer.header("Content-Type"), "application/json")
        self.assertEqual(answer.header("Access-Control-Allow-Origin"), "*")
        self.assertIn("Authorization", answer.header("Access-Control-Allow-Headers") or "")

    def test_head(self) -> None:
        """HEAD answers 200 with no body."""
        answer = request(self, self.root, "HEAD", "/_matrix/key/v2/server")
        self.assertEqual((answer.code, answer.body), (200, b""))

    def test_options(self) -> None:
        """OPTIONS (a CORS preflight) answers 200 with CORS headers."""
        answer = request(self, self.root, "OPTIONS", "/_matrix/key/v2/server")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.header("Access-Control-Allow-Origin"), "*")

    def test_wrong_method(self) -> None:
        """POST, PUT and DELETE on /server are 405 M_UNRECOGNIZED JSON."""
        for method in ["POST", "PUT", "DELETE", "PATCH"]:
            answer = request(self, self.root, method, "/_matrix/key/v2/server", b"{}")
            self.assertEqual(answer.code, 405, method)
            self.assertEqual(answer.json()["errcode"], "M_UNRECOGNIZED")
            self.assertIsNotNone(answer.header("Allow"))

    def test_unknown_paths(self) -> None:
        """Unknown paths under and around the key API are 404 M_UNRECOGNIZED JSON."""
        for path in ["/_matrix/key/v2/nope", "/_matrix/key/v2", "/_matrix/key/v1",
                     "/_matrix", "/", "/other", "/_matrix/key/v2/server/a/b"]:
            answer = request(self, self.root, "GET", path)
            self.assertEqual(answer.code, 404, path)
            self.assertEqual(answer.json()["errcode"], "M_UNRECOGNIZED", path)
            self.assertEqual(answer.header("Content-Type"), "application/json")

    def test_invalid_key_id(self) -> None:
        """A key id outside the grammar is 400 M_INVALID_PARAM."""
        answer = request(self, self.root, "GET", "/_matrix/key/v2/server/rsa:1")
        self.assertEqual(answer.code, 400)
        self.assertEqual(answer.json()["errcode"], "M_INVALID_PARAM")

    def test_not_signed_per_request(self) -> None:
        """Many requests cost one signing."""
        for _ in range(20):
            request(self, self.root, "GET", "/_matrix/key/v2/server")
        self.assertEqual(self.publisher.builds, 1)


class EmbeddingTests(SynchronousTestCase):
    """Mounting the key API into a Site that serves other resources too."""

    def test_mount_beside_other_resources(self) -> None:
        """The key API and an existing resource are both served from one root."""
        root = Resource()
        root.putChild(b"hello", Data(b"hi there", "text/plain"))
        matrix = Resource()
        matrix.putChild(b"client", Data(b"client api", "text/plain"))
        root.putChild(b"_matrix", matrix)
        publisher = KeyPublisher("example.org", [generate_signing_key()], Clock())
        mount_key_resources(root, publisher)

        keys = request(self, root, "GET", "/_matrix/key/v2/server")
        self.assertEqual(keys.code, 200)
        self.assertEqual(json.loads(keys.body)["server_name"], "example.org")
        self.assertEqual(request(self, root, "GET", "/hello").body, b"hi there")
        self.assertEqual(request(self, root, "GET", "/_matrix/client").body, b"client api")


class Leaf(Resource):
    """A leaf that answers nothing."""

    isLeaf = True


class ShortcutTests(SynchronousTestCase):
    """L{KeyRootResource} shortcuts leave requests as the tree walk would."""

    def walk(self, root: Resource, path: bytes) -> tuple:
        request = DummyRequest(path.split(b"/")[1:])
        request.path = path
        found = getChildForRequest(root, request)
        return found, request.prepath, request.postpath

    def test_same_as_walk(self) -> None:
        """A shortcut leads to the same leaf, with the same prepath and postpath."""
        leaf = Leaf()
        walked = Resource()
        walked.putChild(b"a", Resource())
        walked.children[b"a"].putChild(b"b", leaf)
        short = KeyRootResource()
        short.putChild(b"a", walked.children[b"a"])
        short.add_shortcut(b"/a/b", leaf)
        self.assertEqual(self.walk(short, b"/a/b"), (leaf, [b"a", b"b"], []))
        self.assertEqual(self.walk(short, b"/a/b"), self.walk(walked, b"/a/b"))
        # Any other path is walked.
        self.assertEqual(self.walk(short, b"/a/b/"), (leaf, [b"a", b"b"], [b""]))

    def test_only_leaves(self) -> None:
        """A shortcut to a resource that is not a leaf is refused."""
        self.assertRaises(ValueError, KeyRootResource().add_shortcut, b"/x", Resource())

    def test_key_paths(self) -> None:
        """build_root's shortcuts and its walk answer the same body, encoded or not."""
        clock = Clock()
        publisher = KeyPublisher("example.org", [generate_signing_key("k")], clock)
        root = build_root(publisher)
        for path in ("/_matrix/key/v2/server", "/_matrix/key/v2/%73erver"):
            answer = request(self, root, "GET", path)
            self.assertEqual((answer.code, answer.body), (200, publisher.body()), path)
