"""
The documentation stays true to the code: the generated reference pages
match it, and every command the docs show parses as the docs write it.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import shlex
from contextlib import redirect_stderr, redirect_stdout
from typing import Any, List, Tuple

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from synkeys.cli import build_parser
from synkeys.config import SETTINGS
from synkeys.servername import parse_server_name
from synkeys.survey import parse_via
from synkeys.tap import Options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")

#: Fenced code blocks whose lines are shell commands.
_SHELL_LANGUAGES = {"console", "sh", "shell", "bash"}
_FENCE = re.compile(r"^```([A-Za-z]*)\s*$")


def load_generator() -> Any:
    """Import docs/gen_config_reference.py."""
    path = os.path.join(DOCS, "gen_config_reference.py")
    spec = importlib.util.spec_from_file_location("gen_config_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def markdown_files() -> List[str]:
    """README.md and every Markdown page under docs/."""
    found = [os.path.join(ROOT, "README.md")]
    for directory, _dirs, files in os.walk(DOCS):
        found.extend(os.path.join(directory, f) for f in files if f.endswith(".md"))
    return sorted(found)


def shell_commands(path: str) -> List[Tuple[str, int, str]]:
    """
    ``(file, line, command)`` for each command in the shell blocks of a
    Markdown file: in ``console`` blocks the lines after ``$``, in
    ``sh``/``bash`` blocks every line; backslash continuations joined and
    ``cmd && cmd`` split.
    """
    commands: List[Tuple[str, int, str]] = []
    language = None
    pending = ""
    start = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            fence = _FENCE.match(line.strip())
            if fence:
                language = None if language is not None else fence.group(1).lower()
                continue
            if language not in _SHELL_LANGUAGES:
                continue
            text = line.strip()
            if not pending:
                if language == "console":
                    if not text.startswith("$ "):
                        continue
                    text = text[2:]
                elif not text or text.startswith("#"):
                    continue
                start = number
            if text.endswith("\\"):
                pending += text[:-1] + " "
                continue
            full, pending = pending + text, ""
            for part in full.split("&&"):
                part = part.strip().rstrip("&").strip()
                if part:
                    commands.append((os.path.relpath(path, ROOT), start, part))
    return commands


def synkeys_argv(command: str) -> List[str] | None:
    """The arguments after ``synkeys`` / ``python -m synkeys``, or ``None``."""
    words = shlex.split(command)
    if words[:1] == ["synkeys"]:
        return words[1:]
    if words[:3] == ["python", "-m", "synkeys"]:
        return words[3:]
    return None


def twistd_argv(command: str) -> List[str] | None:
    """The arguments after ``twistd [twistd options] synkeys``, or ``None``."""
    words = shlex.split(command)
    if not words or os.path.basename(words[0]) != "twistd" or "synkeys" not in words:
        return None
    return words[words.index("synkeys") + 1:]


class _ParseOnly(Options):
    """``twistd synkeys`` options without loading keys or opening the database."""

    def postOptions(self) -> None:  # noqa: N802
        """Parsing is all that is checked."""


class GeneratedPagesTests(SynchronousTestCase):
    """docs/configuration.md and docs/limits.md."""

    def test_up_to_date(self) -> None:
        """The committed pages are what the generator makes from the code now."""
        self.assertEqual(
            load_generator().stale_pages(),
            [],
            "run python docs/gen_config_reference.py",
        )

    def test_every_setting_documented(self) -> None:
        """Each setting's flag, key and help appear in the configuration reference."""
        page = load_generator().configuration_page()
        for setting in SETTINGS:
            self.assertIn(f"`--{setting.flag} {setting.metavar}`", page)
            self.assertIn(f"`{setting.key}`", page)

    def test_limits_read_from_code(self) -> None:
        """A limit's value and its comment come from its module."""
        from synkeys.checks import MAX_KEYS_PER_RESPONSE

        page = load_generator().limits_page()
        self.assertIn(f"| `MAX_KEYS_PER_RESPONSE` | {MAX_KEYS_PER_RESPONSE} | Most keys", page)
        self.assertIn("`127.0.0.0/8`", page)


class DocumentedCommandTests(SynchronousTestCase):
    """Every ``synkeys`` and ``twistd synkeys`` command shown in README.md and docs/."""

    def commands(self) -> List[Tuple[str, int, str]]:
        """Every shell command of every Markdown file."""
        return [c for path in markdown_files() for c in shell_commands(path)]

    def test_extraction_finds_commands(self) -> None:
        """The extraction sees the commands of the pages that show the most of them."""
        found = {(where, argv[0]) for where, _n, c in self.commands() if (argv := synkeys_argv(c))}
        for expected in [
            ("docs/cli.md", "fetch"),
            ("docs/cli.md", "check"),
            ("docs/cli.md", "verify"),
            ("docs/cli.md", "evict"),
            ("docs/cli.md", "migrate"),
            ("docs/troubleshooting.md", "fetch"),
            ("docs/notary.md", "show-key"),
        ]:
            self.assertIn(expected, found)

    def test_synkeys_commands_parse(self) -> None:
        """Each ``synkeys ...`` command parses, and its server names and notaries are valid."""
        checked = 0
        for where, line, command in self.commands():
            argv = synkeys_argv(command)
            if argv is None:
                continue
            out, err = io.StringIO(), io.StringIO()
            try:
                with redirect_stdout(out), redirect_stderr(err):
                    args = build_parser().parse_args(argv)
            except SystemExit as e:
                self.assertEqual(
                    (e.code, "--help" in argv), (0, True), f"{where}:{line}: {command}\n{err.getvalue()}"
                )
                continue
            for name in [getattr(args, "server", None), getattr(args, "server_name", None)]:
                if name is not None:
                    parse_server_name(name)
            for via in getattr(args, "via", []):
                parse_via(via)
            checked += 1
        self.assertGreater(checked, 15)

    def test_twistd_commands_parse(self) -> None:
        """Each ``twistd synkeys ...`` command uses only options the plugin has."""
        checked = 0
        for where, line, command in self.commands():
            argv = twistd_argv(command)
            if argv is None:
                continue
            try:
                _ParseOnly().parseOptions(argv)
            except usage.UsageError as e:
                self.fail(f"{where}:{line}: {command}: {e}")
            checked += 1
        self.assertGreater(checked, 3)

    def test_fetch_and_check_commands_run(self) -> None:
        """The docs' fetch and check commands (unpinned notaries) succeed against fakes of their servers."""
        from tests.test_cli import World

        ran = 0
        for where, line, command in self.commands():
            argv = synkeys_argv(command)
            if argv is None or argv[:1] not in (["fetch"], ["check"]) or "--help" in argv:
                continue
            args = build_parser().parse_args(argv)
            if args.config or any(":ed25519:" in via for via in args.via):
                continue
            world = World()
            world.origin(args.server)
            for via in args.via:
                world.notary(via)
            code, out, err = world.run(*argv)
            self.assertEqual((code, err), (0, ""), f"{where}:{line}: {command}\n{out}")
            ran += 1
        self.assertGreater(ran, 5)
