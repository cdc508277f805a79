"""
The ``synkeys`` command line, end to end through :func:`synkeys.cli.main`
with in-memory origins and notaries (:mod:`synkeys.testing`) on a
:class:`~twisted.internet.task.Clock`.
"""

from __future__ import annotations

import io
import json
import os
import re
from typing import Any, Dict, List, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from synkeys.cli import Environment, build_parser, main
from synkeys.keyfile import SigningKey, generate_signing_key, write_signing_keys
from synkeys.keyserver import KeyPublisher
from synkeys.resource import build_root
from synkeys.signing import canonical_json, encode_b64, sign_json
from synkeys.storage import MemoryKeyStore, StoreUnavailable
from synkeys.testing import FakeFederationClient, FakeOrigin
from tests.helpers import make_server_keys, make_signing_key

#: The fake clock's time: 2023-11-14 22:13:20 UTC.
NOW_S = 1_700_000_000
NOW_TS = NOW_S * 1000
DAY_MS = 86_400_000


class FakeNotary(Resource):
    """
    ``POST /_matrix/key/v2/query`` of a notary that relays, countersigned,
    what it has "cached" for each server asked about: the fake origin's
    current keys (even while it is offline), or an impostor's.
    """

    isLeaf = True

    def __init__(self, name: str, world: World) -> None:
        super().__init__()
        self.name = name
        self.world = world
        self.key: SigningKey = generate_signing_key("n")
        #: Server name -> origin whose keys this notary relays instead.
        self.impostors: Dict[str, FakeOrigin] = {}

    def render_POST(self, request: Request) -> bytes:  # noqa: N802
        assert request.content is not None
        asked = json.loads(request.content.read())["server_keys"]
        elements = []
        for server_name in asked:
            origin = self.impostors.get(server_name) or self.world.client.origins.get(server_name)
            if origin is None:
                continue
            elements.append(
                sign_json(origin.publisher.json(), self.name, self.key.key_id, self.key.key)
            )
        request.setHeader(b"content-type", b"application/json")
        return canonical_json({"server_keys": elements})

    def pinned(self) -> str:
        """The ``--via`` value pinning this notary's key."""
        return f"{self.name}:{self.key.key_id}:{self.key.public_key_b64}"


class World:
    """Fake origins and notaries behind one fake federation client, on a clock."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW_S)
        self.client = FakeFederationClient()
        self.store = MemoryKeyStore()
        self.opened: List[str] = []

    def origin(self, name: str = "origin.example", version: str = "a") -> FakeOrigin:
        """A healthy origin publishing one key, ``ed25519:<version>``."""
        return self.client.add(FakeOrigin(name, self.clock, [generate_signing_key(version)]))

    def notary(self, name: str) -> FakeNotary:
        """A notary that publishes its own key and relays every origin."""
        notary = FakeNotary(name, self)
        publisher = KeyPublisher(name, [notary.key], self.clock)
        self.client.add_resource(name, build_root(publisher, notary))
        return notary

    def _open_store(self, database: str) -> Deferred[Any]:
        self.opened.append(database)
        return succeed(self.store)

    def run(self, *argv: str) -> Tuple[int, str, str]:
        """Run ``synkeys ARGV`` against this world: (exit status, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()

        def runner(command: Any) -> int:
            env = Environment(
                self.clock,
                client_factory=lambda settings: self.client,
                store_opener=self._open_store,
            )
            d = command(env)
            # The keyring gathers lookups for one reactor turn.
            for _ in range(20):
                if d.called:
                    break
                self.clock.advance(0)
            results: List[Any] = []
            d.addBoth(results.append)
            assert results, "the command did not finish"
            if isinstance(results[0], Failure):
                results[0].raiseException()
            return int(results[0])

        code = main(list(argv), out, err, runner=runner)
        return code, out.getvalue(), err.getvalue()


def table_row(output: str, first_cell: str) -> List[str]:
    """The cells (split on two or more spaces) of the table row starting with ``first_cell``."""
    for line in output.splitlines():
        if line.startswith(first_cell + " "):
            return re.split(r"\s{2,}", line.strip())
    raise AssertionError(f"no row {first_cell!r} in:\n{output}")


def tampered(obj: Dict[str, Any], signer: str, key_id: str) -> Dict[str, Any]:
    """``obj`` with ``signer``'s signature under ``key_id`` replaced by another valid-looking one."""
    other = sign_json({"something": "else"}, signer, key_id, make_signing_key("x"))
    result = dict(obj)
    result["signatures"] = {k: dict(v) for k, v in obj["signatures"].items()}
    result["signatures"][signer][key_id] = other["signatures"][signer][key_id]
    return result


class CommandTestCase(SynchronousTestCase):
    """Builds a fresh :class:`World` for each test."""

    def setUp(self) -> None:
        self.world = World()

    def assertOneLineError(self, err: str, *fragments: str) -> None:  # noqa: N802
        """``err`` is one line, no traceback, containing every fragment."""
        self.assertEqual(err.count("\n"), 1, err)
        self.assertNotIn("Traceback", err)
        for fragment in fragments:
            self.assertIn(fragment, err)


class FetchTests(CommandTestCase):
    """``synkeys fetch``."""

    def test_direct_verified(self) -> None:
        """A healthy origin's key is shown with its validity and source, and the exit status is 0."""
        origin = self.world.origin()
        code, out, err = self.world.run("fetch", "origin.example")
        self.assertEqual((code, err), (0, ""))
        row = table_row(out, "ed25519:a")
        self.assertEqual(row[1], encode_b64(origin.verify_keys["ed25519:a"]))
        self.assertEqual(row[2], "2023-11-15 22:13:20 UTC (in 24 h)")
        self.assertEqual(row[3], "origin.example (origin)")
        self.assertEqual(row[4], "signature verifies")
        self.assertIn("OK: origin.example's keys verify", out)

    def test_unreachable(self) -> None:
        """An offline origin gives exit status 3 and a one-line reason."""
        self.world.origin().online = False
        code, out, err = self.world.run("fetch", "origin.example")
        self.assertEqual(code, 3)
        self.assertOneLineError(err, "synkeys fetch: FAILED: origin.example: connection refused")

    def test_unknown_host(self) -> None:
        """A server that does not exist gives exit status 3 naming the lookup failure."""
        code, out, err = self.world.run("fetch", "nowhere.example")
        self.assertEqual(code, 3)
        self.assertOneLineError(err, "nowhere.example: no such host")

    def test_http_error(self) -> None:
        """An error status counts as unreachable and is named."""
        self.world.origin().override = (502, b"<html>Bad gateway</html>")
        code, out, err = self.world.run("fetch", "origin.example")
        self.assertEqual(code, 3)
        self.assertOneLineError(err, "HTTP 502 from /_matrix/key/v2/server")

    def test_bad_signature(self) -> None:
        """A response whose only signature does not verify fails with exit status 1."""
        keys = make_server_keys("origin.example", {"ed25519:a": make_signing_key("a")})
        body = canonical_json(tampered(dict(keys.json), "origin.example", "ed25519:a"))
        self.world.origin().override = (200, body)
        code, out, err = self.world.run("fetch", "origin.example")
        self.assertEqual(code, 1)
        self.assertOneLineError(err, "no valid signature by origin.example")

    def test_every_signature_checked(self) -> None:
        """One good and one bad signature still fail: every signature must verify."""
        keys = make_server_keys(
            "origin.example",
            {"ed25519:a": make_signing_key("a"), "ed25519:b": make_signing_key("b")},
        )
        body = canonical_json(tampered(dict(keys.json), "origin.example", "ed25519:b"))
        self.world.origin().override = (200, body)
        code, out, err = self.world.run("fetch", "origin.example")
        self.assertEqual(code, 1)
        self.assertEqual(table_row(out, "ed25519:a")[4], "signature verifies")
        self.assertEqual(table_row(out, "ed25519:b")[4], "SIGNATURE DOES NOT VERIFY")
        self.assertOneLineError(err, "the signature by ed25519:b", "does not verify")

    def test_expired(self) -> None:
        """Keys whose valid_until_ts has passed fail with the time since."""
        keys = make_server_keys(
            "origin.example", {"ed25519:a": make_signing_key("a")},
            valid_until_ts=NOW_TS - 3 * 3_600_000,
        )
        self.world.origin().override = (200, keys.raw)
        code, out, err = self.world.run("fetch", "origin.example")
        self.assertEqual(code, 1)
        self.assertOneLineError(err, "origin.example's keys expired 3 h ago")

    def test_short_validity_warning(self) -> None:
        """Keys valid for less than an hour verify, with a warning."""
        keys = make_server_keys(
            "origin.example", {"ed25519:a": make_signing_key("a")},
            valid_until_ts=NOW_TS + 20 * 60_000,
        )
        self.world.origin().override = (200, keys.raw)
        code, out, err = self.world.run("fetch", "origin.example")
        self.assertEqual(code, 0)
        self.assertIn("warning: the response from origin.example expires in 20 min", out)

    def test_old_keys_listed(self) -> None:
        """Old keys are shown with their expiry."""
        keys = make_server_keys(
            "origin.example", {"ed25519:a": make_signing_key("a")},
            old_keys={"ed25519:old": (make_signing_key("old"), NOW_TS - 2 * DAY_MS)},
        )
        self.world.origin().override = (200, keys.raw)
        code, out, err = self.world.run("fetch", "origin.example")
        self.assertEqual(code, 0)
        row = table_row(out, "ed25519:old")
        self.assertEqual(row[2], "expired 2023-11-12 22:13:20 UTC (2 d ago)")
        self.assertEqual(row[4], "old key")

    def test_via_pinned_notary(self) -> None:
        """Through a pinned notary: its countersignature is checked and the origin is not asked."""
        self.world.origin()
        notary = self.world.notary("notary.example")
        code, out, err = self.world.run("fetch", "origin.example", "--via", notary.pinned())
        self.assertEqual((code, err), (0, ""))
        row = table_row(out, "ed25519:a")
        self.assertEqual(row[3], "notary.example (notary)")
        self.assertEqual(row[4], "signature verifies; countersigned (ed25519:n)")
        self.assertEqual(
            [(m, s) for m, s, _p, _b in self.world.client.requests],
            [(b"POST", "notary.example")],
        )

    def test_via_trust_on_first_use(self) -> None:
        """A notary given by name only has its key fetched from itself, and the output says so."""
        self.world.origin()
        notary = self.world.notary("notary.example")
        code, out, err = self.world.run("fetch", "origin.example", "--via", "notary.example")
        self.assertEqual(code, 0)
        self.assertIn("trust on first use", out)
        self.assertIn(f"pin it with --via {notary.pinned()}", out)
        self.assertEqual(
            [(m, s) for m, s, _p, _b in self.world.client.requests],
            [(b"GET", "notary.example"), (b"POST", "notary.example")],
        )

    def test_via_key_from_config(self) -> None:
        """A notary named in --config's trusted_key_servers is pinned from there."""
        self.world.origin()
        notary = self.world.notary("notary.example")
        config = self.mktemp()
        with open(config, "w") as f:
            f.write(
                "trusted_key_servers:\n  - server_name: notary.example\n    verify_keys:\n"
                f"      \"ed25519:n\": \"{notary.key.public_key_b64}\"\n"
            )
        code, out, err = self.world.run(
            "fetch", "origin.example", "--via", "notary.example", "--config", config
        )
        self.assertEqual((code, err), (0, ""))
        self.assertNotIn("trust on first use", out)
        self.assertEqual(len(self.world.client.requests), 1)

    def test_via_wrong_pinned_key(self) -> None:
        """A notary whose countersignature does not match the pinned key fails with exit status 1."""
        self.world.origin()
        self.world.notary("notary.example")
        wrong = encode_b64(bytes(make_signing_key("wrong").verify_key))
        code, out, err = self.world.run(
            "fetch", "origin.example", "--via", f"notary.example:ed25519:n:{wrong}"
        )
        self.assertEqual(code, 1)
        self.assertOneLineError(err, "no valid signature by notary notary.example")

    def test_notaries_disagree(self) -> None:
        """Two notaries reporting different bytes for one key id fail, naming both."""
        origin = self.world.origin()
        honest = self.world.notary("one.example")
        liar = self.world.notary("two.example")
        liar.impostors["origin.example"] = FakeOrigin(
            "origin.example", self.world.clock, [generate_signing_key("a")]
        )
        code, out, err = self.world.run(
            "fetch", "origin.example", "--via", honest.pinned(), "--via", liar.pinned()
        )
        self.assertEqual(code, 1)
        self.assertOneLineError(
            err,
            "sources disagree about ed25519:a",
            f"one.example says {encode_b64(origin.verify_keys['ed25519:a'])}",
            "two.example says",
        )

    def test_notary_unreachable(self) -> None:
        """A notary that cannot be reached gives exit status 3."""
        self.world.origin()
        code, out, err = self.world.run(
            "fetch", "origin.example", "--via", "notary.example"
        )
        self.assertEqual(code, 3)
        self.assertOneLineError(
            err, "notary.example: cannot fetch the notary's own key: no such host"
        )

    def test_json(self) -> None:
        """--json prints the whole report as JSON."""
        origin = self.world.origin()
        code, out, err = self.world.run("fetch", "origin.example", "--json")
        self.assertEqual(code, 0)
        report = json.loads(out)
        self.assertTrue(report["verified"])
        [source] = report["sources"]
        self.assertEqual(source["source"], "origin.example")
        self.assertEqual(
            source["keys"][0],
            {
                "key_id": "ed25519:a",
                "key": encode_b64(origin.verify_keys["ed25519:a"]),
                "old": False,
                "source": "origin.example",
                "via_notary": False,
                "signature": "valid",
                "valid_until_ts": NOW_TS + DAY_MS,
            },
        )

    def test_json_failure(self) -> None:
        """--json reports a failure in the JSON and on stderr."""
        code, out, err = self.world.run("fetch", "nowhere.example", "--json")
        self.assertEqual(code, 3)
        self.assertFalse(json.loads(out)["verified"])
        self.assertOneLineError(err, "no such host")

    def test_invalid_server_name(self) -> None:
        """A SERVER that is not a server name is a one-line error."""
        code, out, err = self.world.run("fetch", "a/b")
        self.assertEqual(code, 1)
        self.assertOneLineError(err, "synkeys fetch: error: 'a/b' is not a server name")

    def test_malformed_via(self) -> None:
        """A --via with a key that is not base64 is a one-line error."""
        code, out, err = self.world.run("fetch", "origin.example", "--via", "n.example:ed25519:n:@@")
        self.assertEqual(code, 1)
        self.assertOneLineError(err, "synkeys fetch: error:", "n.example")

    def test_bad_timeout(self) -> None:
        """A --timeout that is not a number of seconds is a usage error."""
        code, out, err = self.world.run("fetch", "origin.example", "--timeout", "soon")
        self.assertEqual(code, 2)
        self.assertIn("--timeout", err)


class CheckTests(CommandTestCase):
    """``synkeys check``."""

    def setUp(self) -> None:
        super().setUp()
        self.origin = self.world.origin()
        self.one = self.world.notary("one.example")
        self.two = self.world.notary("two.example")

    def test_agree(self) -> None:
        """The origin and two notaries agreeing give one column each and exit status 0."""
        code, out, err = self.world.run(
            "check", "origin.example", "--via", self.one.pinned(), "--via", self.two.pinned()
        )
        self.assertEqual((code, err), (0, ""))
        header = table_row(out, "KEY ID")
        self.assertEqual(
            header[1:],
            ["origin.example (origin)", "one.example (notary)", "two.example (notary)", "RESULT"],
        )
        row = table_row(out, "ed25519:a")
        prefix = encode_b64(self.origin.verify_keys["ed25519:a"])[:10]
        self.assertEqual(row[1:4], [f"{prefix}… (in 24 h)"] * 3)
        self.assertEqual(row[4], "agree (2 of 2 notaries)")
        self.assertIn("OK: the origin and the notaries agree", out)

    def test_differ(self) -> None:
        """A notary relaying other bytes for a key id shows DIFFER and exit status 1."""
        self.two.impostors["origin.example"] = FakeOrigin(
            "origin.example", self.world.clock, [generate_signing_key("a")]
        )
        code, out, err = self.world.run(
            "check", "origin.example", "--via", self.one.pinned(), "--via", self.two.pinned()
        )
        self.assertEqual(code, 1)
        self.assertEqual(table_row(out, "ed25519:a")[-1], "DIFFER")
        self.assertOneLineError(err, "sources disagree about ed25519:a")

    def test_stale_notary(self) -> None:
        """A notary that only knows an older key leaves the current key short of quorum."""
        self.two.impostors["origin.example"] = FakeOrigin(
            "origin.example", self.world.clock, [generate_signing_key("old")]
        )
        code, out, err = self.world.run(
            "check", "origin.example", "--via", self.one.pinned(), "--via", self.two.pinned()
        )
        self.assertEqual(code, 1)
        self.assertEqual(table_row(out, "ed25519:a")[3], "(not listed)")
        self.assertEqual(table_row(out, "ed25519:old")[-1], "not listed by the origin")
        self.assertOneLineError(err, "ed25519:a is confirmed by 1 of the 2 notaries required")

    def test_quorum(self) -> None:
        """With --quorum 1, one notary down still passes, with a warning."""
        self.world.client.resources.pop("two.example")
        args = ["check", "origin.example", "--via", self.one.pinned(), "--via", self.two.pinned()]
        code, out, err = self.world.run(*args)
        self.assertEqual(code, 1)
        self.assertOneLineError(err, "confirmed by 1 of the 2", "two.example: no such host")
        code, out, err = self.world.run(*args, "--quorum", "1")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("warning: two.example did not answer: no such host", out)

    def test_origin_down(self) -> None:
        """An unreachable origin gives exit status 3 even when the notaries agree."""
        self.origin.online = False
        code, out, err = self.world.run("check", "origin.example", "--via", self.one.pinned())
        self.assertEqual(code, 3)
        self.assertEqual(table_row(out, "ed25519:a")[1], "(no answer)")
        self.assertOneLineError(err, "origin.example: connection refused")

    def test_needs_a_notary(self) -> None:
        """check without --via is a one-line error."""
        code, out, err = self.world.run("check", "origin.example")
        self.assertEqual(code, 1)
        self.assertOneLineError(err, "at least one --via")

    def test_quorum_out_of_range(self) -> None:
        """A quorum larger than the notaries given is refused."""
        code, out, err = self.world.run(
            "check", "origin.example", "--via", self.one.pinned(), "--quorum", "2"
        )
        self.assertEqual(code, 1)
        self.assertOneLineError(err, "--quorum 2: must be between 1 and 1")

    def test_json(self) -> None:
        """--json gives each key id's report by source."""
        code, out, err = self.world.run(
            "check", "origin.example", "--via", self.one.pinned(), "--json"
        )
        self.assertEqual(code, 0)
        report = json.loads(out)
        [row] = report["rows"]
        self.assertEqual(row["key_id"], "ed25519:a")
        self.assertEqual(set(row["by_source"]), {"origin.example", "one.example"})
        self.assertTrue(report["verified"])


class VerifyTests(CommandTestCase):
    """``synkeys verify``."""

    def setUp(self) -> None:
        super().setUp()
        self.origin = self.world.origin()
        key = self.origin.signing_keys[0]
        self.event = sign_json(
            {"type": "m.room.message", "origin_server_ts": NOW_TS - 60_000, "content": {}},
            "origin.example", key.key_id, key.key,
        )

    def write(self, obj: Any) -> str:
        """Write ``obj`` as JSON to a new file; return its path."""
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump(obj, f)
        return path

    def test_valid(self) -> None:
        """A validly signed event verifies at its origin_server_ts with exit status 0."""
        path = self.write(self.event)
        code, out, err = self.world.run("verify", path, "--server", "origin.example")
        self.assertEqual((code, err), (0, ""))
        self.assertIn(
            f"OK: {path} carries a valid signature of origin.example by ed25519:a "
            "at 2023-11-14 22:12:20 UTC (its origin_server_ts)",
            out,
        )
        self.assertIn("from origin.example", out)

    def test_tampered(self) -> None:
        """A changed event does not verify: exit status 1."""
        path = self.write(dict(self.event, content={"body": "changed"}))
        code, out, err = self.world.run("verify", path, "--server", "origin.example")
        self.assertEqual(code, 1)
        self.assertOneLineError(err, "signature by ed25519:a does not verify")

    def test_not_signed_by_server(self) -> None:
        """An object without the server's signature is refused before any lookup."""
        path = self.write(self.event)
        code, out, err = self.world.run("verify", path, "--server", "other.example")
        self.assertEqual(code, 1)
        self.assertOneLineError(err, "carries no signature of other.example")
        self.assertEqual(self.world.client.requests, [])

    def test_origin_down(self) -> None:
        """Without any source of keys, exit status 3."""
        self.origin.online = False
        code, out, err = self.world.run("verify", self.write(self.event), "--server", "origin.example")
        self.assertEqual(code, 3)
        self.assertOneLineError(err, "could not find ed25519:a for origin.example")

    def test_via_notary(self) -> None:
        """Keys come from the notary first, so the origin being offline does not matter."""
        notary = self.world.notary("notary.example")
        self.origin.online = False
        code, out, err = self.world.run(
            "verify", self.write(self.event), "--server", "origin.example", "--via", notary.pinned()
        )
        self.assertEqual((code, err), (0, ""))
        self.assertIn("from notary.example", out)

    def test_at_outside_validity(self) -> None:
        """--at after the key's validity fails."""
        code, out, err = self.world.run(
            "verify", self.write(self.event), "--server", "origin.example",
            "--at", str(NOW_TS + 30 * DAY_MS),
        )
        self.assertEqual(code, 1)
        self.assertOneLineError(err, "valid until")

    def test_not_json(self) -> None:
        """A file that is not JSON is a one-line error."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("{not json")
        code, out, err = self.world.run("verify", path, "--server", "origin.example")
        self.assertEqual(code, 1)
        self.assertOneLineError(err, "synkeys verify: error:", "invalid JSON")


class StoreCommandTests(CommandTestCase):
    """``synkeys evict`` and ``synkeys migrate``."""

    def test_evict(self) -> None:
        """evict removes the server's rows from the store, says how many, and closes it."""
        keys = make_server_keys(
            "origin.example", {"ed25519:a": make_signing_key("a")},
            old_keys={"ed25519:old": (make_signing_key("old"), 1000)},
        )
        self.successResultOf(self.world.store.store_server_keys(keys))
        code, out, err = self.world.run("evict", "origin.example", "--database", ":memory:")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out, "Removed 2 cached key(s) of origin.example from :memory:\n")
        # The command closes the store when done.
        self.failureResultOf(
            self.world.store.get_server_keys({"origin.example": None}), StoreUnavailable
        )

    def test_evict_database_from_config(self) -> None:
        """evict takes the database from --config."""
        config = self.mktemp()
        with open(config, "w") as f:
            f.write("database: ':memory:'\n")
        code, out, err = self.world.run("evict", "origin.example", "--config", config)
        self.assertEqual(code, 0)
        self.assertEqual(self.world.opened, [":memory:"])

    def test_evict_missing_database(self) -> None:
        """evict does not create a database that is not there."""
        path = self.mktemp()
        code, out, err = self.world.run("evict", "origin.example", "--database", path)
        self.assertEqual(code, 1)
        self.assertOneLineError(err, f"no key cache at {path}")
        self.assertFalse(os.path.exists(path))
        self.assertEqual(self.world.opened, [])

    def test_migrate(self) -> None:
        """migrate brings a new SQLite database up to date, then has nothing to do."""
        from synkeys.storage import SCHEMA_VERSION

        path = self.mktemp()
        code, out, err = self.world.run("migrate", "--database", path)
        self.assertEqual((code, err), (0, ""))
        self.assertIn(f"{path}: schema version 0 -> {SCHEMA_VERSION}", out)
        code, out, err = self.world.run("migrate", "--database", path)
        self.assertEqual(out, f"{path}: schema version {SCHEMA_VERSION}, up to date\n")

    def test_migrate_unusable(self) -> None:
        """A database in a missing directory is a one-line error."""
        code, out, err = self.world.run("migrate", "--database", "/nonexistent/dir/keys.sqlite")
        self.assertEqual(code, 1)
        self.assertOneLineError(err, "synkeys migrate: error:", "does not exist")

    def test_password_not_printed(self) -> None:
        """A PostgreSQL password never appears in the output."""
        from synkeys.tools import describe_database

        self.assertEqual(
            describe_database("postgresql://keys:s3cret@db.internal/keys"),
            "postgresql://keys:***@db.internal/keys",
        )
        self.assertEqual(
            describe_database("host=db password=s3cret dbname=keys"),
            "host=db password=*** dbname=keys",
        )


class KeyCommandTests(CommandTestCase):
    """``synkeys generate-key`` and ``synkeys show-key``."""

    def test_generate_then_show(self) -> None:
        """A generated key file shows the same key id and public key."""
        path = self.mktemp()
        code, out, err = self.world.run("generate-key", path, "--version", "k1")
        self.assertEqual(code, 0)
        key_line = out.splitlines()[1]
        self.assertTrue(key_line.startswith("ed25519:k1 "))
        code, out, err = self.world.run("show-key", path, "--server-name", "keys.example.org")
        self.assertEqual(out.splitlines()[0], key_line)
        self.assertIn('  - server_name: "keys.example.org"', out)

    def test_generate_refuses_existing(self) -> None:
        """generate-key does not overwrite a key file."""
        path = self.mktemp()
        write_signing_keys(path, [generate_signing_key("k1")])
        code, out, err = self.world.run("generate-key", path)
        self.assertEqual(code, 1)
        self.assertOneLineError(err, "synkeys generate-key: error:")


class HelpTests(SynchronousTestCase):
    """Every subcommand has --help, and usage errors are argparse's."""

    def test_every_command_has_help(self) -> None:
        """--help of each subcommand prints its usage and exits 0."""
        commands = sorted(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
        self.assertEqual(
            commands,
            ["check", "evict", "fetch", "generate-key", "migrate", "show-key", "verify"],
        )
        for command in commands:
            out, err = io.StringIO(), io.StringIO()
            self.assertEqual(main([command, "--help"], out, err), 0)
            self.assertIn(f"usage: synkeys {command}", out.getvalue())

    def test_shared_options_after_subcommand(self) -> None:
        """Shared options are accepted after the subcommand, as users type them."""
        args = build_parser().parse_args(
            ["fetch", "example.org", "--federation-ca", "ca.pem", "--allow-ip-range",
             "10.0.0.0/8", "--timeout", "2.5", "--config", "c.yaml"]
        )
        self.assertEqual(
            (args.federation_ca, args.allow_ip_range, args.timeout, args.config),
            (["ca.pem"], ["10.0.0.0/8"], 2.5, "c.yaml"),
        )

    def test_usage_error(self) -> None:
        """An unknown subcommand exits 2 with argparse's message on stderr."""
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(main(["frobnicate"], out, err), 2)
        self.assertIn("invalid choice", err.getvalue())
