"""
MkDocs hooks for the synkeys docs:

- before the build, fail when a generated reference page
  (``docs/configuration.md``, ``docs/limits.md``) no longer matches the
  code (``python docs/gen_config_reference.py`` rewrites them);
- after rendering, show reST cross-reference roles left in docstrings
  (``:class:`~synkeys.keys.ServerKeys```) as code (``ServerKeys``), since
  the API reference renders docstrings as Markdown.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROLE = re.compile(r":[a-z]+:<code>(~?)([^<]+?)</code>")


def _generator() -> Any:
    path = os.path.join(os.path.dirname(_HERE), "gen_config_reference.py")
    spec = importlib.util.spec_from_file_location("gen_config_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_pre_build(config: Any) -> None:
    """Refuse to build from stale generated pages."""
    from mkdocs.exceptions import PluginError

    stale = _generator().stale_pages()
    if stale:
        raise PluginError(
            f"generated pages out of date: {', '.join(stale)}; "
            "run python docs/gen_config_reference.py"
        )


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    """Render reST roles as code: ``~`` keeps only the last dotted part."""

    def code(match: re.Match[str]) -> str:
        target = match.group(2)
        if "&lt;" in target:
            # :role:`Title <target>` shows the title.
            return f"<code>{target.split('&lt;', 1)[0].strip()}</code>"
        shown = target.rsplit(".", 1)[-1] if match.group(1) else target
        return f"<code>{shown}</code>"

    return _ROLE.sub(code, html)
