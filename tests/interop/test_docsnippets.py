"""
The configuration snippets of ``docs/synapse.md``: present, rendered with
the values the Synapse tests use, and in step with ``synkeys show-key``.
These need no Synapse, so they run everywhere.
"""

from __future__ import annotations

import io

import yaml
from twisted.trial.unittest import SynchronousTestCase

from synkeys.cli import main
from synkeys.fetchers import perspectives_from_config
from synkeys.keyfile import generate_signing_key, write_signing_keys
from tests.interop.docsnippets import (
    SnippetError,
    doc_snippets,
    private_federation_snippet,
    render,
    trusted_key_servers_snippet,
)


class DocSnippetTests(SynchronousTestCase):
    """docs/synapse.md's snippets."""

    def test_page_marks_both_snippets(self) -> None:
        """The page holds exactly the two snippets the Synapse tests read."""
        self.assertEqual(set(doc_snippets()), {"trusted-key-servers", "private-federation"})

    def test_trusted_key_servers_matches_show_key(self) -> None:
        """The trusted_key_servers snippet says what 'synkeys show-key --server-name' prints."""
        key = generate_signing_key()
        path = self.mktemp()
        write_signing_keys(path, [key])
        out = io.StringIO()
        self.assertEqual(main(["show-key", path, "--server-name", "localhost:8448"], out), 0)
        printed = yaml.safe_load(out.getvalue().split("\n", 1)[1])
        rendered = yaml.safe_load(
            trusted_key_servers_snippet("localhost:8448", key.key_id, key.public_key_b64)
        )
        self.assertEqual(rendered, printed)
        [trusted] = perspectives_from_config(rendered["trusted_key_servers"])
        self.assertEqual(
            (trusted.server_name, dict(trusted.verify_keys)),
            ("localhost:8448", {key.key_id: key.public_key}),
        )

    def test_private_federation_rendered(self) -> None:
        """The private-network snippet carries the CA path and the allowed range given."""
        rendered = yaml.safe_load(private_federation_snippet("/tmp/ca.pem", "127.0.0.1/32"))
        self.assertEqual(
            rendered,
            {"federation_custom_ca_list": ["/tmp/ca.pem"], "ip_range_whitelist": ["127.0.0.1/32"]},
        )

    def test_missing_example_value_refused(self) -> None:
        """Rendering with an example value the snippet lacks fails instead of ignoring it."""
        self.assertRaises(
            SnippetError, render, "trusted-key-servers", {"nowhere.example.org": "x"}
        )
