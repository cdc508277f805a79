"""
The configuration snippets of ``docs/synapse.md``, rendered for a test.

The page marks each snippet with an HTML comment ``<!-- snippet: NAME -->``
just before its fenced block, and writes it with example values
(``keys.example.org``, a key, a CA path, an address). A test renders a
snippet by replacing each example value with the real one, so the
``homeserver.yaml`` Synapse runs with in the tests is the page's text.
"""

from __future__ import annotations

import os
import re
from typing import Dict, Mapping

DOC_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "docs",
    "synapse.md",
)

_SNIPPET = re.compile(
    r"<!-- snippet: (?P<name>[a-z0-9-]+) -->\n```yaml\n(?P<body>.*?)```", re.DOTALL
)

#: Example values in the ``trusted-key-servers`` snippet.
EXAMPLE_NOTARY_NAME = "keys.example.org"
EXAMPLE_KEY_ID = "ed25519:a_AbCd"
EXAMPLE_PUBLIC_KEY = "XGX0JRS2Af3be3knz2fBiRbApjm2Dh61gXDJA8kcJNI"
#: Example values in the ``private-federation`` snippet.
EXAMPLE_CA_PATH = "/etc/matrix-synapse/keys-ca.pem"
EXAMPLE_ALLOWED_RANGE = "10.1.2.3/32"


class SnippetError(Exception):
    """The page does not hold the snippet, or not with its example values."""


def doc_snippets(path: str = DOC_PATH) -> Dict[str, str]:
    """Every marked YAML snippet of the page, by name."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return {m.group("name"): m.group("body") for m in _SNIPPET.finditer(text)}


def render(name: str, values: Mapping[str, str], path: str = DOC_PATH) -> str:
    """
    The snippet ``name`` with each example value (a key of ``values``)
    replaced by the real one.

    :raises SnippetError: when the snippet is missing, or an example value
        does not occur in it exactly once (so an edit of the page cannot
        silently leave a test value out).
    """
    snippets = doc_snippets(path)
    if name not in snippets:
        raise SnippetError(f"{path} has no snippet {name!r} (found: {sorted(snippets)})")
    text = snippets[name]
    for example, real in values.items():
        count = text.count(example)
        if count != 1:
            raise SnippetError(
                f"snippet {name!r} of {path} holds the example value {example!r} "
                f"{count} times, expected once"
            )
        text = text.replace(example, real)
    return text


def trusted_key_servers_snippet(server_name: str, key_id: str, public_key_b64: str) -> str:
    """The page's ``trusted_key_servers`` snippet naming one notary."""
    return render(
        "trusted-key-servers",
        {
            EXAMPLE_NOTARY_NAME: server_name,
            EXAMPLE_KEY_ID: key_id,
            EXAMPLE_PUBLIC_KEY: public_key_b64,
        },
    )


def private_federation_snippet(ca_path: str, allowed_range: str) -> str:
    """The page's snippet for a key server with a private CA and address."""
    return render(
        "private-federation",
        {EXAMPLE_CA_PATH: ca_path, EXAMPLE_ALLOWED_RANGE: allowed_range},
    )
