"""The runnable examples in docs/ work as the docs say."""

import importlib.util
import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.stubhttp import request

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "examples")


def load_example(name: str):  # type: ignore[no-untyped-def]
    """Import docs/examples/NAME.py as a module."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, name + ".py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class EmbedKeyserverExampleTests(SynchronousTestCase):
    """docs/examples/embed_keyserver.py."""

    def test_both_resources_served(self) -> None:
        """The example site serves the key API and its own /hello."""
        example = load_example("embed_keyserver")
        site = example.build_site("example.org", self.mktemp(), Clock())
        keys = request(self, site.resource, "GET", "/_matrix/key/v2/server")
        self.assertEqual(keys.code, 200)
        self.assertEqual(keys.json()["server_name"], "example.org")
        hello = request(self, site.resource, "GET", "/hello")
        self.assertEqual(hello.body, b"Hello from my own resource\n")
