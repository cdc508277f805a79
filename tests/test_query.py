"""Tests for L{synkeys.query}: parsing notary queries, both POST forms and GET paths."""

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from synkeys.errors import MatrixError
from synkeys.query import ServerQuery, parse_query_body, parse_query_path


def body(obj: Any) -> bytes:
    """``obj`` as a JSON request body."""
    return json.dumps(obj).encode("utf-8")


class ParseQueryBodyTests(SynchronousTestCase):
    """parse_query_body."""

    def assert_error(
        self, raw: bytes, code: int, errcode: str, max_keys: int = 2048
    ) -> MatrixError:
        """Parsing ``raw`` fails with ``code`` and ``errcode``; returns the error."""
        error = self.assertRaises(MatrixError, parse_query_body, raw, max_keys)
        self.assertEqual((error.code, error.errcode), (code, errcode), error.msg)
        return error

    def test_todays_form(self) -> None:
        """Key ids with criteria parse, the largest minimum winning."""
        query = parse_query_body(
            body(
                {
                    "server_keys": {
                        "a.test": {
                            "ed25519:1": {"minimum_valid_until_ts": 5},
                            "ed25519:2": {"minimum_valid_until_ts": 9},
                        }
                    }
                }
            )
        )
        self.assertEqual(query, {"a.test": ServerQuery(frozenset(["ed25519:1", "ed25519:2"]), 9)})

    def test_criteria_without_minimum(self) -> None:
        """A key id with empty criteria has no minimum."""
        query = parse_query_body(body({"server_keys": {"a.test": {"ed25519:1": {}}}}))
        self.assertEqual(query, {"a.test": ServerQuery(frozenset(["ed25519:1"]), None)})

    def test_empty_object_is_all_keys(self) -> None:
        """``"server": {}`` asks for every key of the server."""
        query = parse_query_body(body({"server_keys": {"a.test": {}}}))
        self.assertEqual(query, {"a.test": ServerQuery(None, None)})

    def test_seed_form(self) -> None:
        """The seed's list of key ids parses, without a minimum."""
        query = parse_query_body(body({"server_keys": {"a.test:8448": ["ed25519:1"]}}))
        self.assertEqual(query, {"a.test:8448": ServerQuery(frozenset(["ed25519:1"]), None)})

    def test_seed_form_empty_list_is_all_keys(self) -> None:
        """An empty list of key ids asks for every key."""
        query = parse_query_body(body({"server_keys": {"a.test": []}}))
        self.assertEqual(query, {"a.test": ServerQuery(None, None)})

    def test_no_servers(self) -> None:
        """An empty server_keys object is an empty query."""
        self.assertEqual(parse_query_body(body({"server_keys": {}})), {})

    def test_not_json(self) -> None:
        """Bytes that are not JSON (or not UTF-8) are M_NOT_JSON."""
        for raw in [b"", b"{", b"not json", b"\xff\xfe{}", b"{'server_keys': {}}"]:
            self.assert_error(raw, 400, "M_NOT_JSON")

    def test_wrong_shape(self) -> None:
        """JSON of the wrong shape is M_BAD_JSON."""
        for obj in [
            [],
            "server_keys",
            {},
            {"server_keys": []},
            {"server_keys": None},
            {"server_keys": {"a.test": "ed25519:1"}},
            {"server_keys": {"a.test": {"ed25519:1": []}}},
            {"server_keys": {"a.test": {"ed25519:1": {"minimum_valid_until_ts": "5"}}}},
            {"server_keys": {"a.test": {"ed25519:1": {"minimum_valid_until_ts": -1}}}},
            {"server_keys": {"a.test": {"ed25519:1": {"minimum_valid_until_ts": 1.5}}}},
            {"server_keys": {"a.test": {"ed25519:1": {"minimum_valid_until_ts": True}}}},
        ]:
            self.assert_error(body(obj), 400, "M_BAD_JSON")

    def test_not_canonical_material(self) -> None:
        """Duplicate keys, NaN and huge integers are M_BAD_JSON, not a crash."""
        for raw in [
            b'{"server_keys": {}, "server_keys": {}}',
            b'{"server_keys": NaN}',
            b'{"server_keys": {"a.test": {"ed25519:1": {"minimum_valid_until_ts": 99999999999999999999}}}}',
            b"[" * 100 + b"]" * 100,
        ]:
            self.assert_error(raw, 400, "M_BAD_JSON")

    def test_invalid_server_name(self) -> None:
        """A server name outside the grammar is M_INVALID_PARAM."""
        for name in ["", "a b", "a/b", "localhost:http", ":8448", "x" * 300]:
            self.assert_error(body({"server_keys": {name: {}}}), 400, "M_INVALID_PARAM")

    def test_invalid_key_id(self) -> None:
        """A malformed key id, in either form, is M_INVALID_PARAM."""
        for wanted in [{"nokey": {}}, {"ed25519:": {}}, ["ed25519:a b"], [5], [None]]:
            self.assert_error(body({"server_keys": {"a.test": wanted}}), 400, "M_INVALID_PARAM")

    def test_limit(self) -> None:
        """More pairs than the limit is M_LIMIT_EXCEEDED naming the limit; the limit itself is fine."""
        wanted = {f"ed25519:{i}": {} for i in range(5)}
        error = self.assert_error(
            body({"server_keys": {"a.test": wanted}}), 400, "M_LIMIT_EXCEEDED", max_keys=4
        )
        self.assertIn("4", error.msg)
        self.assertEqual(error.to_json()["limit"], 4)
        self.assertEqual(len(parse_query_body(body({"server_keys": {"a.test": wanted}}), 5)), 1)

    def test_limit_counts_all_keys_as_one(self) -> None:
        """Each server asked for all keys counts as one pair."""
        servers = {f"s{i}.test": {} for i in range(3)}
        self.assert_error(body({"server_keys": servers}), 400, "M_LIMIT_EXCEEDED", max_keys=2)
        self.assertEqual(len(parse_query_body(body({"server_keys": servers}), 3)), 3)

    def test_limit_checked_before_names(self) -> None:
        """An oversized query is refused for its size even if it also has bad names."""
        servers = {f"bad name {i}": {} for i in range(3)}
        self.assert_error(body({"server_keys": servers}), 400, "M_LIMIT_EXCEEDED", max_keys=2)


class ParseQueryPathTests(SynchronousTestCase):
    """parse_query_path."""

    def test_server_and_key_id(self) -> None:
        """/query/{server}/{keyId} asks for that key."""
        self.assertEqual(
            parse_query_path([b"a.test", b"ed25519:1"], {}),
            {"a.test": ServerQuery(frozenset(["ed25519:1"]), None)},
        )

    def test_server_only(self) -> None:
        """/query/{server} (and with a trailing slash) asks for every key."""
        for path in [[b"a.test"], [b"a.test", b""]]:
            self.assertEqual(parse_query_path(path, {}), {"a.test": ServerQuery(None, None)})

    def test_ipv6_server(self) -> None:
        """A bracketed IPv6 literal with a port is a valid server."""
        self.assertEqual(
            parse_query_path([b"[::1]:8448"], {}), {"[::1]:8448": ServerQuery(None, None)}
        )

    def test_minimum(self) -> None:
        """minimum_valid_until_ts in the query string is read."""
        self.assertEqual(
            parse_query_path([b"a.test"], {b"minimum_valid_until_ts": [b"1234"]}),
            {"a.test": ServerQuery(None, 1234)},
        )

    def test_bad_minimum(self) -> None:
        """A minimum that is not a millisecond timestamp is M_INVALID_PARAM."""
        for value in [b"", b"-1", b"1.5", b"abc", b"9" * 17, b"9007199254740992"]:
            error = self.assertRaises(
                MatrixError,
                parse_query_path,
                [b"a.test"],
                {b"minimum_valid_until_ts": [value]},
            )
            self.assertEqual(error.errcode, "M_INVALID_PARAM", value)

    def test_invalid_names(self) -> None:
        """Bad server names, key ids and non-UTF-8 are M_INVALID_PARAM."""
        for path in [[b"a b"], [b"a.test", b"nokey"], [b"\xff"], [b"a.test", b"ed25519:\xff"]]:
            error = self.assertRaises(MatrixError, parse_query_path, path, {})
            self.assertEqual((error.code, error.errcode), (400, "M_INVALID_PARAM"), path)

    def test_other_paths(self) -> None:
        """No server, or too many segments, is 404."""
        for path in [[], [b""], [b"a.test", b"ed25519:1", b"x"]]:
            error = self.assertRaises(MatrixError, parse_query_path, path, {})
            self.assertEqual((error.code, error.errcode), (404, "M_UNRECOGNIZED"), path)
