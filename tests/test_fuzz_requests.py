"""
Property-based tests of what clients can send: generated requests go
through the real resource tree and the real HTTP parser (a
:class:`twisted.web.server.Site` built as :class:`synkeys.app.SynkeysService`
builds it, fed raw bytes), and every answer is either a Matrix error
``{"errcode", "error"}`` with a 4xx status or the correct answer. Never a
5xx, never a hang.

Correctness is judged by oracles written here from the spec (and the
limits synkeys documents), not by calling the code under test:
:func:`oracle_post_query` for POST bodies and :func:`oracle_get_path` for
GET paths.
"""

from __future__ import annotations

import json
import re
import string
from typing import Any, Dict, FrozenSet, List, Optional, Tuple
from urllib.parse import quote, unquote_to_bytes

import attr
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from synkeys.app import LoadedKeys, SynkeysService, load_or_generate_keys
from synkeys.config import resolve_config
from synkeys.http import MAX_BODY_BYTES
from synkeys.keyfile import generate_signing_key, write_signing_keys
from synkeys.metrics import ServiceMetrics
from synkeys.signing import MAX_SAFE_INTEGER, decode_b64, verify_signature
from synkeys.testing import FakeFederationClient, FakeOrigin

NOTARY = "notary.test"
NOTARY_KEY = generate_signing_key("notary")
#: The POST pair limit the tree is built with: small, so that generated
#: bodies cross it often.
MAX_KEYS = 8
#: Healthy origins the fake federation client serves (case matters).
HEALTHY = ["origin.test", "origin.test:8448", "Origin.test", "1.2.3.4", "[::1]:8448"]
#: Origins that exist but fail: offline, 500, and a 200 that is not keys.
FAILING = ["down.test", "broken.test", "garbage.test"]

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# -- the world ---------------------------------------------------------------


class World:
    """
    A whole notary service in memory, built by :class:`SynkeysService` as
    ``twistd synkeys`` builds it (memory store, no listeners), fetching
    from fake origins; requests go through its :class:`Site` as raw bytes.
    """

    def __init__(self, clock: Clock, origins: Dict[str, FakeOrigin], keys: LoadedKeys) -> None:
        self.clock = clock
        config = resolve_config(
            {
                "server_name": NOTARY,
                "signing_key_path": keys.path,
                "database": ":memory:",
                "listen": [],
                "max_keys_per_query": str(MAX_KEYS),
            }
        )
        self.service = SynkeysService(
            config,
            clock,
            keys,
            [],
            federation_client=FakeFederationClient(list(origins.values())),
            metrics_endpoints=[],
            metrics=ServiceMetrics(clock, standard_collectors=False),
        )
        self.publisher = self.service.publisher
        self.site = self.service.site

    def exchange(self, raw: bytes) -> Answer:
        """Send raw request bytes on a new connection and read the whole answer."""
        transport = StringTransport()
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert channel is not None
        channel.makeConnection(transport)
        channel.dataReceived(raw)
        head = raw.startswith(b"HEAD ")
        answer = None
        for _ in range(50):
            answer = Answer.parse(transport.value(), head)
            if answer is not None:
                break
            self.clock.advance(0)
        channel.connectionLost(Failure(ConnectionDone()))
        if answer is None:
            raise AssertionError(f"no complete answer to {raw[:200]!r}: {transport.value()[:300]!r}")
        return answer


@attr.s(frozen=True, auto_attribs=True)
class Answer:
    """A parsed HTTP response."""

    code: int
    headers: Dict[bytes, bytes]
    body: bytes

    @classmethod
    def parse(cls, data: bytes, head: bool = False) -> Optional[Answer]:
        """
        The response in ``data``, or ``None`` while it is incomplete; the
        answer to a HEAD request (``head``) ends with its headers.
        """
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return None
        lines = head.split(b"\r\n")
        code = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = headers.get(b"content-length")
        if head:
            return cls(code, headers, rest)
        if length is None:
            return cls(code, headers, rest)
        if len(rest) < int(length):
            return None
        return cls(code, headers, rest[: int(length)])

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


def make_origins(clock: Clock) -> Dict[str, FakeOrigin]:
    """The fake origins: healthy ones, and ones that fail in different ways."""
    origins = {name: FakeOrigin(name, clock) for name in HEALTHY + FAILING}
    origins["down.test"].online = False
    origins["broken.test"].override = (500, b'{"errcode":"M_UNKNOWN","error":"oops"}')
    origins["garbage.test"].override = (200, b"\xff not json")
    return origins


def post(path: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    """A raw POST request."""
    return (
        b"POST " + path.encode("ascii") + b" HTTP/1.1\r\nHost: notary.test\r\n"
        b"Connection: close\r\nContent-Type: " + content_type + b"\r\n"
        b"Content-Length: %d\r\n\r\n" % (len(body),)
    ) + body


def request(method: bytes, target: bytes) -> bytes:
    """A raw request without a body."""
    return method + b" " + target + b" HTTP/1.1\r\nHost: notary.test\r\nConnection: close\r\n\r\n"


# -- oracles -----------------------------------------------------------------


class _Invalid(Exception):
    """The oracle says the input is not a valid request."""


_DNS_NAME = re.compile(r"[A-Za-z0-9.\-]{1,255}")
_DOTTED_QUAD = re.compile(r"[0-9]+(\.[0-9]+){3}")
_KEY_ID = re.compile(r"ed25519:[A-Za-z0-9_]+")


def spec_server_name(name: object) -> bool:
    """
    The spec's server-name grammar (appendix), written out here: host
    (IPv4 literal, bracketed IPv6 literal without zone, or 1..255 of
    ``[A-Za-z0-9.-]``) and an optional port 1..65535 of at most five
    digits. Like synkeys, a dotted quad of digits is read as an IPv4
    literal and must be one (``1.2.3.256`` is refused).
    """
    import ipaddress

    if not isinstance(name, str) or not name:
        return False
    port = None
    if name.startswith("["):
        host, sep, rest = name[1:].partition("]")
        if not sep or not re.fullmatch(r"[0-9A-Fa-f:.]+", host):
            return False
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        if rest:
            if not rest.startswith(":"):
                return False
            port = rest[1:]
    else:
        host, sep, port_text = name.partition(":")
        if sep:
            port = port_text
        if not _DNS_NAME.fullmatch(host):
            return False
        if _DOTTED_QUAD.fullmatch(host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                return False
    if port is not None:
        if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
            return False
    return True


def spec_key_id(key_id: object) -> bool:
    """``ed25519:`` and a version of ``[A-Za-z0-9_]+``, at most 255 characters."""
    return isinstance(key_id, str) and len(key_id) <= 255 and bool(_KEY_ID.fullmatch(key_id))


def _strict_pairs(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    seen: Dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _Invalid("duplicate key")
        seen[key] = value
    return seen


def _strict_int(text: str) -> int:
    value = int(text)
    if text.lstrip("-") == "0" and text.startswith("-"):
        raise _Invalid("-0")
    if abs(value) > MAX_SAFE_INTEGER:
        raise _Invalid("integer out of range")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Invalid("float overflows")
    return value


def _constant(name: str) -> Any:
    raise _Invalid(name)


def _walk(value: Any, depth: int = 0) -> None:
    """Refuse nesting deeper than 32 and strings with lone surrogates."""
    if depth > 32:
        raise _Invalid("too deep")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _Invalid("lone surrogate") from None
    elif isinstance(value, list):
        for item in value:
            _walk(item, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            _walk(key, depth + 1)
            _walk(item, depth + 1)


def _no_float(text: str) -> float:
    raise _Invalid("float")


def strict_json(body: bytes, floats: bool = True) -> Any:
    """
    Decode ``body`` as JSON that has a canonical form: UTF-8, no duplicate
    keys, no NaN or infinities, integers within ±(2**53-1), no ``-0``, no
    lone surrogates, nesting at most 32 deep. Finite floats are tolerated
    when ``floats`` (queries are not signed); signed objects may have none.
    Raises :class:`_Invalid`.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _Invalid("not UTF-8") from None
    try:
        value = json.loads(
            text,
            object_pairs_hook=_strict_pairs,
            parse_int=_strict_int,
            parse_float=_finite_float if floats else _no_float,
            parse_constant=_constant,
        )
    except (ValueError, RecursionError):
        raise _Invalid("not JSON") from None
    _walk(value)
    return value


#: A valid query as the oracle reads it: server -> key ids (None: all).
Wanted = Dict[str, Optional[FrozenSet[str]]]


def oracle_post_query(body: bytes, max_keys: int = MAX_KEYS) -> Optional[Wanted]:
    """
    What a POST /query body validly asks for, or ``None`` when it is not a
    valid query: a JSON object whose ``server_keys`` maps valid server names
    to either a list of valid key ids (the seed's form) or an object of
    valid key ids to objects whose ``minimum_valid_until_ts``, when present
    and not null, is an integer in [0, 2**53-1]; at most ``max_keys``
    (server, key id) pairs, a server with no key ids counting as one.
    """
    try:
        content = strict_json(body)
    except _Invalid:
        return None
    if not isinstance(content, dict) or not isinstance(content.get("server_keys"), dict):
        return None
    wanted: Wanted = {}
    pairs = 0
    for server, asked in content["server_keys"].items():
        if not spec_server_name(server):
            return None
        if isinstance(asked, list):
            key_ids = asked
        elif isinstance(asked, dict):
            key_ids = list(asked)
            for criteria in asked.values():
                if not isinstance(criteria, dict):
                    return None
                minimum = criteria.get("minimum_valid_until_ts")
                if minimum is not None and (
                    type(minimum) is not int or not 0 <= minimum <= MAX_SAFE_INTEGER
                ):
                    return None
        else:
            return None
        if not all(spec_key_id(k) for k in key_ids):
            return None
        pairs += max(1, len(key_ids))
        wanted[server] = frozenset(key_ids) or None
    if pairs > max_keys:
        return None
    return wanted


def oracle_get_path(target: bytes) -> Optional[Wanted]:
    """
    What a ``GET`` request target under ``/_matrix/key/v2/query/`` validly
    asks for, or ``None``: segments are split on ``/`` and then
    percent-decoded (so ``%2F`` stays inside its segment); one trailing
    empty segment is allowed; then a UTF-8 valid server name and optionally
    a valid key id; a ``minimum_valid_until_ts`` parameter, when given,
    must be 1..16 digits no larger than 2**53-1 (its first value counts).
    """
    prefix = b"/_matrix/key/v2/query/"
    path, _, query = target.partition(b"?")
    if not path.startswith(prefix):
        return None
    segments = [unquote_to_bytes(s) for s in path[len(prefix) :].split(b"/")]
    if len(segments) > 1 and segments[-1] == b"":
        segments = segments[:-1]
    if not 1 <= len(segments) <= 2:
        return None
    try:
        texts = [s.decode("utf-8") for s in segments]
    except UnicodeDecodeError:
        return None
    if not spec_server_name(texts[0]):
        return None
    key_ids: Optional[FrozenSet[str]] = None
    if len(texts) == 2:
        if not spec_key_id(texts[1]):
            return None
        key_ids = frozenset([texts[1]])
    values = [
        unquote_to_bytes(value.replace(b"+", b" "))
        for name, _, value in (pair.partition(b"=") for pair in query.split(b"&"))
        if unquote_to_bytes(name.replace(b"+", b" ")) == b"minimum_valid_until_ts"
    ]
    if values:
        if not re.fullmatch(rb"[0-9]{1,16}", values[0]) or int(values[0]) > MAX_SAFE_INTEGER:
            return None
    return {texts[0]: key_ids}


# -- checking answers ----------------------------------------------------------


class AnswerChecks(SynchronousTestCase):
    """Assertions shared by the property tests."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.origins = make_origins(self.clock)
        key_path = self.mktemp()
        write_signing_keys(key_path, [NOTARY_KEY])
        self.keys = load_or_generate_keys(key_path)
        # Sign every origin's body now, so examples do not pay for it.
        for origin in self.origins.values():
            origin.publisher.body()

    def world(self) -> World:
        """A fresh notary service (empty cache) in front of the shared fake origins."""
        return World(self.clock, self.origins, self.keys)

    def assert_well_formed(self, answer: Answer, method: bytes = b"GET") -> None:
        """Never a 5xx; JSON with a Matrix error for every 4xx."""
        self.assertLess(answer.code, 500, answer)
        self.assertEqual(answer.headers.get(b"content-type"), b"application/json", answer)
        if method == b"HEAD":
            self.assertEqual(answer.body, b"")
            return
        body = answer.json()
        self.assertIsInstance(body, dict, answer)
        if answer.code >= 400:
            self.assertIn(answer.code, (400, 404, 405, 413), answer)
            self.assertIsInstance(body.get("errcode"), str, answer)
            self.assertTrue(body["errcode"].startswith("M_"), answer)
            self.assertIsInstance(body.get("error"), str, answer)

    def assert_correct_query_answer(self, answer: Answer, wanted: Wanted) -> None:
        """
        200 with exactly one element for each server that should be
        answered (the notary itself; healthy origins with a requested key),
        each countersigned by the notary with the origin's signature intact.
        """
        self.assertEqual(answer.code, 200, answer)
        elements = answer.json()["server_keys"]
        self.assertIsInstance(elements, list)
        answered: Dict[str, int] = {}
        notary_key = NOTARY_KEY.public_key
        for element in elements:
            name = element["server_name"]
            answered[name] = answered.get(name, 0) + 1
            self.assertTrue(
                verify_signature(element, NOTARY, NOTARY_KEY.key_id, notary_key), name
            )
            if name in self.origins:
                origin = self.origins[name]
                for key_id, key in origin.verify_keys.items():
                    self.assertTrue(verify_signature(element, name, key_id, key), name)
        expected = {}
        for server, key_ids in wanted.items():
            if server == NOTARY:
                expected[server] = 1
            elif server in HEALTHY:
                has = set(self.origins[server].verify_keys)
                if key_ids is None or key_ids & has:
                    expected[server] = 1
        self.assertEqual(answered, expected)


# -- generators ----------------------------------------------------------------

_dns = st.text(string.ascii_letters + string.digits + "-.", min_size=1, max_size=40)
_valid_names = st.one_of(
    st.sampled_from(HEALTHY + FAILING + [NOTARY, "ORIGIN.TEST", "unknown.test"]),
    st.builds(
        lambda host, port: host + port,
        st.one_of(
            _dns,
            st.ip_addresses(v=4).map(str),
            st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
        ),
        st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}")),
    ),
)
#: Server names outside (or at the edges of) the grammar.
_odd_names = st.one_of(
    st.sampled_from(
        [
            "",
            ":8448",
            "a b",
            "a/b",
            "localhost:http",
            "a:0",
            "a:65536",
            "a:008448",
            "[::1",
            "[fe80::1%eth0]",
            "1.2.3.256",
            "a" * 255,
            "a" * 256,
            "b" * 300,
            "é.example",
            "a\x00b",
            "origin.test\n",
            "origin.test.",
            "..",
            "\ud800",
        ]
    ),
    st.text(max_size=20),
    st.text(min_size=250, max_size=320, alphabet="ab.:-[]"),
)
_any_names = st.one_of(_valid_names, _odd_names)
_valid_key_ids = st.one_of(
    st.sampled_from(["ed25519:a", "ed25519:zzz", "ed25519:" + "x" * 247]),
    st.text(string.ascii_letters + string.digits + "_", min_size=1, max_size=12).map(
        lambda v: "ed25519:" + v
    ),
)
_odd_key_ids = st.one_of(
    st.sampled_from(["", "ed25519:", "ED25519:a", "ed25519:a-b", "curve25519:a", "ed25519:" + "x" * 248]),
    st.text(max_size=12),
)
_any_key_ids = st.one_of(_valid_key_ids, _odd_key_ids)


def _json_scalars() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.sampled_from([0, -1, MAX_SAFE_INTEGER, MAX_SAFE_INTEGER + 1, -MAX_SAFE_INTEGER - 1]),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=10),
    )


_json_values = st.recursive(
    _json_scalars(),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=12,
)
_timestamps = st.one_of(
    st.integers(min_value=-10, max_value=2**60),
    st.sampled_from([1_700_000_000_000, 1_800_000_000_000, MAX_SAFE_INTEGER, 0]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.none(),
    st.booleans(),
    st.text(max_size=5),
)
_criteria = st.one_of(
    st.fixed_dictionaries({}, optional={"minimum_valid_until_ts": _timestamps}),
    _json_values,
)
_server_entry = st.one_of(
    st.lists(_any_key_ids, max_size=4),
    st.dictionaries(_any_key_ids, _criteria, max_size=4),
    _json_values,
)
_query_objects = st.one_of(
    st.fixed_dictionaries(
        {"server_keys": st.dictionaries(_any_names, _server_entry, max_size=5)},
        optional={"extra": _json_values},
    ),
    st.fixed_dictionaries(
        {"server_keys": st.dictionaries(_valid_names, st.lists(_valid_key_ids, max_size=3), max_size=4)}
    ),
    _json_values,
)


def _dump(value: Any, ensure_ascii: bool) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, allow_nan=False)


@st.composite
def post_bodies(draw: st.DrawFn) -> bytes:
    """
    Bytes for a POST /query body: JSON of every shape and of the query's
    shape, then sometimes made nastier at the text level (duplicate keys,
    big or negative or float numbers, lone surrogates, invalid UTF-8, deep
    nesting, truncation).
    """
    value = draw(_query_objects)
    text = _dump(value, draw(st.booleans()))
    twist = draw(
        st.sampled_from(
            ["none", "none", "duplicate", "number", "surrogate", "utf8", "deep", "truncate", "raw"]
        )
    )
    if twist == "duplicate" and text.startswith("{") and len(text) > 2:
        text = '{"server_keys":{},' + text[1:]
    elif twist == "number":
        number = draw(
            st.sampled_from(
                ["1e400", "-0", "-0.0", "9007199254740992", "-9007199254740992", "1.5",
                 "12345678901234567890123", "NaN", "Infinity", "-Infinity", "0.1e-400"]
            )
        )
        minimum = draw(st.sampled_from(["1", number]))
        text = (
            '{"server_keys":{"origin.test":{"ed25519:a":{"minimum_valid_until_ts":'
            + minimum
            + '}}},"n":'
            + number
            + "}"
        )
    elif twist == "surrogate":
        text = '{"server_keys":{"\\ud800origin.test":[]},"x":"\\udfff"}'
    elif twist == "utf8":
        raw = text.encode("utf-8", "surrogatepass")
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"])) + raw[at:]
    elif twist == "deep":
        depth = draw(st.sampled_from([31, 32, 33, 100, 5000]))
        text = '{"server_keys":{},"deep":' + "[" * depth + "]" * depth + "}"
    elif twist == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    elif twist == "raw":
        return draw(st.binary(max_size=64))
    return text.encode("utf-8", "surrogatepass")


_segment_text = st.one_of(
    _any_names,
    _any_key_ids,
    st.text(max_size=12),
    st.text(min_size=290, max_size=310, alphabet="abc"),
    st.sampled_from(["", ".", "..", "%", "%2F", "%zz", "a/b", "\x00", "?", "#", " "]),
)


def _encode_segment(text: str, how: str) -> bytes:
    """``text`` as a raw path segment, percent-encoded as ``how`` says."""
    raw = text.encode("utf-8", "surrogatepass")
    if how == "all":
        return quote(raw, safe="").encode("ascii")
    if how == "readable":
        return quote(raw, safe=":[]@!$&'()*+,;=-._~").encode("ascii")
    # Only what a request line cannot carry raw is escaped; "%" and "/"
    # stay literal, so "%2F" and "a/b" reach the parser as written.
    return quote(raw, safe="/%:[]").encode("ascii")


_HOW = st.sampled_from(["all", "readable", "literal"])


@st.composite
def path_segments(draw: st.DrawFn) -> bytes:
    """One raw path segment: generated text, percent-encoded in one of several ways."""
    return _encode_segment(draw(_segment_text), draw(_HOW))


@st.composite
def query_paths(draw: st.DrawFn) -> List[bytes]:
    """
    Path segments after ``/query/``: usually shaped like a real query
    (a server name, maybe a key id, maybe a trailing slash), sometimes
    anything.
    """
    if draw(st.integers(0, 3)) == 0:
        return draw(st.lists(path_segments(), max_size=3))
    segments = [_encode_segment(draw(st.one_of(_valid_names, _any_names)), draw(_HOW))]
    if draw(st.booleans()):
        key_id = draw(st.one_of(_valid_key_ids, _valid_key_ids, _any_key_ids))
        segments.append(_encode_segment(key_id, draw(_HOW)))
    if draw(st.integers(0, 4)) == 0:
        segments.append(b"")
    return segments


@st.composite
def query_strings(draw: st.DrawFn) -> bytes:
    """An optional query string, usually about ``minimum_valid_until_ts``."""
    value = draw(
        st.one_of(
            st.integers(0, 2**60).map(str),
            st.sampled_from(["", "-1", "1.5", "1e12", "9007199254740991", "9007199254740992",
                             "00000000000000001", "0x10", "%31%32", "+1", " 1"]),
            st.text(max_size=6),
        )
    )
    parts = [b"minimum_valid_until_ts=" + quote(value.encode("utf-8", "surrogatepass"), safe="%+").encode()]
    if draw(st.booleans()):
        parts.append(b"minimum_valid_until_ts=x")
    if draw(st.booleans()):
        parts.insert(0, b"other=1")
    return draw(st.sampled_from([b"", b"?" + b"&".join(parts)]))


# -- the properties ----------------------------------------------------------------


class PostQueryFuzzTests(AnswerChecks):
    """POST /_matrix/key/v2/query with generated bodies."""

    @FUZZ
    @given(post_bodies())
    @example(b'{"server_keys":{"origin.test":{}}}')
    @example(b'{"server_keys":{"origin.test":["ed25519:a"],"notary.test":[]}}')
    @example(b'{"server_keys":{"origin.test":{"ed25519:a":{"minimum_valid_until_ts":null}}}}')
    @example(b'{"server_keys":{"origin.test":{"ed25519:a":{"minimum_valid_until_ts":true}}}}')
    @example(b'{"server_keys":{},"server_keys":{"origin.test":{}}}')
    @example(b'{"server_keys":{"origin.test":{}},"f":1.5}')
    @example(b'{"server_keys":{"origin.test":{}},"f":1e400}')
    @example(b'{"server_keys":{"origin.test":{}},"s":"\\ud800"}')
    @example(b"[" * 100_000)
    @example(b"")
    def test_post_bodies(self, body: bytes) -> None:
        """Any body gets a 4xx Matrix error when it is not a valid query, and the right answer when it is."""
        answer = self.world().exchange(post("/_matrix/key/v2/query", body))
        self.assert_well_formed(answer)
        wanted = oracle_post_query(body)
        if wanted is None:
            self.assertEqual(answer.code, 400, (body[:200], answer))
        else:
            self.assert_correct_query_answer(answer, wanted)

    def test_body_too_large(self) -> None:
        """A body over the 1 MiB cap is 413 M_TOO_LARGE, announced or not."""
        body = b'{"server_keys":{},"pad":"' + b"x" * MAX_BODY_BYTES + b'"}'
        answer = self.world().exchange(post("/_matrix/key/v2/query", body))
        self.assertEqual(answer.code, 413)
        self.assertEqual(answer.json()["errcode"], "M_TOO_LARGE")

    def test_post_elsewhere(self) -> None:
        """POST under /query/... is 405 and POST to unknown paths is 404, both as Matrix JSON."""
        world = self.world()
        for path, code in [
            ("/_matrix/key/v2/query/origin.test", 405),
            ("/_matrix/key/v2/server", 405),
            ("/_matrix/key/v2/nowhere", 404),
        ]:
            answer = world.exchange(post(path, b'{"server_keys":{}}'))
            self.assertEqual(answer.code, code, path)
            self.assert_well_formed(answer)


class GetQueryFuzzTests(AnswerChecks):
    """GET /_matrix/key/v2/query/{serverName}[/{keyId}] with generated paths."""

    @FUZZ
    @given(query_paths(), query_strings())
    @example([b"origin.test"], b"")
    @example([b"origin.test", b"ed25519%3Aa"], b"?minimum_valid_until_ts=1")
    @example([b"origin.test", b""], b"")
    @example([b"%5B%3A%3A1%5D%3A8448"], b"")
    @example([b"origin.test%2Fed25519:a"], b"")
    @example([b"origin%00.test"], b"")
    @example([b"%ff"], b"")
    @example([b"origin.test"], b"?minimum_valid_until_ts=9007199254740992")
    @example([b"a" * 300], b"")
    def test_get_paths(self, segments: List[bytes], query: bytes) -> None:
        """Any GET under /query answers a 4xx Matrix error unless the path is valid, then the right answer."""
        target = b"/_matrix/key/v2/query/" + b"/".join(segments) + query
        answer = self.world().exchange(request(b"GET", target))
        self.assert_well_formed(answer)
        wanted = oracle_get_path(target)
        if wanted is None:
            self.assertGreaterEqual(answer.code, 400, (target, answer))
        else:
            self.assert_correct_query_answer(answer, wanted)

    @FUZZ
    @given(_valid_names.filter(lambda n: n != NOTARY), st.data())
    def test_server_names_round_trip(self, name: str, data: st.DataObject) -> None:
        """A generated valid server name, served by an origin, comes back exactly as asked through GET /query."""
        assume(spec_server_name(name))
        added = name not in self.origins
        if added:
            self.origins[name] = FakeOrigin(name, self.clock)
        try:
            safe = data.draw(st.sampled_from(["", ":[]"]))
            target = b"/_matrix/key/v2/query/" + quote(name, safe=safe).encode("ascii")
            answer = self.world().exchange(request(b"GET", target))
        finally:
            if added:
                del self.origins[name]
        self.assertEqual(answer.code, 200, answer)
        names = [element["server_name"] for element in answer.json()["server_keys"]]
        self.assertEqual(names, [] if name in FAILING else [name])

    @FUZZ
    @given(_odd_names.filter(lambda n: not spec_server_name(n)))
    def test_invalid_names_refused(self, name: str) -> None:
        """A server name outside the grammar is refused as 400 M_INVALID_PARAM by GET and by POST alike."""
        raw = name.encode("utf-8", "surrogatepass")
        world = self.world()
        if raw:
            answer = world.exchange(
                request(b"GET", b"/_matrix/key/v2/query/" + quote(raw, safe="").encode("ascii"))
            )
            self.assertEqual(answer.code, 400, (name, answer))
            self.assertEqual(answer.json()["errcode"], "M_INVALID_PARAM")
        body = b'{"server_keys":{%s:{}}}' % (
            json.dumps(name).encode("ascii"),
        )
        answer = world.exchange(post("/_matrix/key/v2/query", body))
        self.assertEqual(answer.code, 400, (name, answer))
        # A lone surrogate has no canonical form: the body is refused as JSON.
        self.assertIn(answer.json()["errcode"], ("M_INVALID_PARAM", "M_BAD_JSON"))


_METHODS = st.one_of(
    st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH",
                     b"TRACE", b"CONNECT", b"get", b"PROPFIND"]),
    st.text(string.ascii_letters + "!#$%&'*+-.^_`|~", min_size=1, max_size=10).map(
        lambda s: s.encode("ascii")
    ),
)
_TARGETS = st.one_of(
    st.sampled_from(
        [b"/", b"/_matrix", b"/_matrix/key", b"/_matrix/key/v2", b"/_matrix/key/v2/server",
         b"/_matrix/key/v2/server/", b"/_matrix/key/v2/server/ed25519:a",
         b"/_matrix/key/v2/server/rsa:1", b"/_matrix/key/v2/server/a/b",
         b"/_matrix/key/v2/query", b"/_matrix/key/v2/query/", b"/_matrix/key/v2/query/origin.test",
         b"/_matrix/key/v1/server", b"/%00", b"//", b"/_matrix//key"]
    ),
    st.lists(path_segments(), min_size=1, max_size=4).map(lambda s: b"/" + b"/".join(s)),
)


class MethodFuzzTests(AnswerChecks):
    """Any method on any path."""

    @FUZZ
    @given(_METHODS, _TARGETS)
    def test_methods_and_paths(self, method: bytes, target: bytes) -> None:
        """Every method on every path is answered without a 5xx, with Matrix JSON."""
        answer = self.world().exchange(request(method, target))
        self.assert_well_formed(answer, method)
        if method == b"OPTIONS":
            self.assertEqual(answer.code, 200)
        elif method not in (b"GET", b"HEAD", b"POST"):
            self.assertIn(answer.code, (404, 405), (method, target))

    @FUZZ
    @given(st.one_of(st.just(b""), path_segments()))
    def test_server_key_ids(self, segment: bytes) -> None:
        """GET /server/{keyId} answers this server's signed keys for a valid key id and 400 otherwise."""
        world = self.world()
        answer = world.exchange(request(b"GET", b"/_matrix/key/v2/server/" + segment))
        self.assert_well_formed(answer)
        text = unquote_to_bytes(segment).decode("utf-8", "replace")
        if b"/" in segment:
            self.assertGreaterEqual(answer.code, 400)
        elif not text or spec_key_id(text):
            self.assertEqual((answer.code, answer.body), (200, world.publisher.body()))
        else:
            self.assertEqual(answer.code, 400, (segment, answer))
        self.assertEqual(decode_b64(NOTARY_KEY.public_key_b64), NOTARY_KEY.public_key)


class OracleTests(SynchronousTestCase):
    """The oracles themselves agree with the spec's examples."""

    def test_server_name_oracle(self) -> None:
        """The spec's valid and invalid server-name examples are classified as the spec says."""
        for name in ["matrix.org", "matrix.org:8888", "1.2.3.4", "1.2.3.4:1234",
                     "[1234:5678::abcd]", "[1234:5678::abcd]:5678"]:
            self.assertTrue(spec_server_name(name), name)
        for name in ["localhost:http", "a b", "a/b", ":8448", ""]:
            self.assertFalse(spec_server_name(name), name)

    def test_query_oracle(self) -> None:
        """Both body forms are valid queries; a duplicate key, a float timestamp or too many pairs are not."""
        self.assertEqual(
            oracle_post_query(b'{"server_keys":{"a.b":{"ed25519:x":{"minimum_valid_until_ts":5}}}}'),
            {"a.b": frozenset(["ed25519:x"])},
        )
        self.assertEqual(oracle_post_query(b'{"server_keys":{"a.b":[]}}'), {"a.b": None})
        self.assertIsNone(oracle_post_query(b'{"server_keys":{},"server_keys":{}}'))
        self.assertIsNone(
            oracle_post_query(b'{"server_keys":{"a.b":{"ed25519:x":{"minimum_valid_until_ts":5.0}}}}')
        )
        many = {"server_keys": {f"s{i}.test": {} for i in range(MAX_KEYS + 1)}}
        self.assertIsNone(oracle_post_query(json.dumps(many).encode()))
