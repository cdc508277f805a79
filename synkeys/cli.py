"""
The ``synkeys`` command (also ``python -m synkeys``): key management and
operator tools. Each subcommand has its own ``--help``.

- ``generate-key``, ``show-key``: signing key files;
- ``fetch``, ``check``, ``verify``: ask servers and notaries about keys,
  the way federation does, and say whether they verify;
- ``evict``, ``migrate``: the notary's key cache.

Errors are one line on stderr and a non-zero exit status, never a
traceback. Exit status: 0 verified, 1 not verified (or any other error),
2 usage, 3 a server could not be reached (see :mod:`synkeys.report`).

The commands that talk to the network get everything outside the process
from an :class:`~synkeys.tools.Environment` (reactor, federation client, key store), and
:func:`main` takes a ``runner`` that supplies one, so tests run them
against :class:`synkeys.testing.FakeFederationClient` and a
:class:`~twisted.internet.task.Clock`. Only :func:`react_runner`, used
when none is given, touches the global reactor.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import redirect_stderr, redirect_stdout
from typing import Any, Callable, List, Optional, Sequence, TextIO, Union

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
    textFileLogObserver,
)

from synkeys import tools
from synkeys.config import SETTINGS_BY_KEY, parse_seconds
from synkeys.errors import ConfigError, SynkeysError
from synkeys.tools import DEFAULT_TIMEOUT_S, ClientSettings, Environment

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ClientSettings",
    "Environment",
    "Runner",
    "build_parser",
    "execute",
    "main",
    "react_runner",
]

#: Runs a network command: given a function from an :class:`Environment`
#: to the command's Deferred exit status, returns the exit status.
Runner = Callable[[Callable[[Environment], "Deferred[int]"]], int]


def react_runner(command: Callable[[Environment], Deferred[int]]) -> int:
    """Run ``command`` on the global reactor with :func:`twisted.internet.task.react`."""
    from twisted.internet import task

    codes: List[int] = []

    def start(reactor: Any) -> Deferred[None]:
        return command(Environment(reactor)).addCallback(codes.append)

    try:
        task.react(start)
    except SystemExit:
        pass
    if not codes:
        sys.stderr.write("synkeys: interrupted\n")
        return 130
    return codes[0]


# -- the parser --------------------------------------------------------------


def _timestamp(value: str) -> int:
    """``--at``: milliseconds since the epoch."""
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a timestamp in milliseconds")
    return int(value)


def _seconds(value: str) -> float:
    try:
        return parse_seconds(value)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return int(value)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", metavar="FILE",
        help="the service's YAML config file: its settings apply unless a flag overrides them",
    )


def _add_network_options(parser: argparse.ArgumentParser) -> None:
    for key in ("federation_custom_ca_list", "ip_range_whitelist"):
        setting = SETTINGS_BY_KEY[key]
        parser.add_argument(
            f"--{setting.flag}",
            action="append",
            metavar=setting.metavar,
            dest=setting.flag.replace("-", "_"),
            help=setting.help,
        )
    _add_config(parser)
    parser.add_argument(
        "--timeout", type=_seconds, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
        help=f"give up on a server after this long (default: {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--verbose", "-v", action="count", default=0,
        help="log what happens to stderr (-vv: more)",
    )


def _add_via(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument(
        "--via", action="append", default=[], metavar="NOTARY",
        help=help_text + " NOTARY is NAME:KEYID:PUBLICKEY, or just NAME to use the "
        "notary's keys from --config's trusted_key_servers or, failing that, as "
        "fetched from the notary itself (trust on first use)",
    )


def _add_database_options(parser: argparse.ArgumentParser) -> None:
    setting = SETTINGS_BY_KEY["database"]
    parser.add_argument(
        "--database", metavar=setting.metavar,
        help=f"{setting.help} (default: --config's database, else {setting.default})",
    )
    _add_config(parser)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="synkeys",
        description="Matrix server key distribution v2: key tools for operators. "
        "Run the service itself with 'twistd synkeys'.",
        epilog="Exit status: 0 verified, 1 not verified or error, 2 usage, "
        "3 a server could not be reached.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    gen = sub.add_parser(
        "generate-key",
        help="write a new signing key file (Synapse's format, mode 0600)",
        description="Write a new ed25519 signing key to FILE, which must not exist.",
    )
    gen.add_argument("file", metavar="FILE")
    gen.add_argument("--version", help="key version, the part after 'ed25519:' "
                     "(default: a_ and four random characters)")
    gen.set_defaults(run=tools.generate_key)

    show = sub.add_parser(
        "show-key",
        help="print the key id and public key of a signing key file",
        description="Print 'KEYID PUBLICKEY' for each key in FILE: what another "
        "server puts in its trusted_key_servers.",
    )
    show.add_argument("file", metavar="FILE")
    show.add_argument("--server-name", help="also print a trusted_key_servers snippet "
                      "for this server name")
    show.set_defaults(run=tools.show_key)

    fetch = sub.add_parser(
        "fetch",
        help="fetch a server's keys as federation does and verify them",
        description="Resolve SERVER as federation does (.well-known, SRV, port 8448), "
        "fetch its keys from it directly (or only through the notaries given with "
        "--via), verify every signature and print the keys with a verdict.",
    )
    fetch.add_argument("server", metavar="SERVER")
    _add_via(fetch, "ask this notary instead of the server itself (repeatable).")
    fetch.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_network_options(fetch)
    fetch.set_defaults(run_async=tools.fetch)

    check = sub.add_parser(
        "check",
        help="compare a server's keys at the server and at several notaries",
        description="Ask SERVER itself and every notary given with --via for SERVER's "
        "keys and show side by side where they agree and differ.",
    )
    check.add_argument("server", metavar="SERVER")
    _add_via(check, "a notary to compare with (repeatable, at least one).")
    check.add_argument(
        "--quorum", type=_positive, metavar="N",
        help="how many notaries must confirm each of the server's keys (default: all)",
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_network_options(check)
    check.set_defaults(run_async=tools.check)

    verify = sub.add_parser(
        "verify",
        help="verify a signed JSON object (an event, a request) with the server's keys",
        description="Check that the JSON object in FILE ('-' for stdin) carries a valid "
        "signature of SERVER, finding SERVER's keys through the notaries given "
        "(or --config's trusted_key_servers) and then SERVER itself.",
    )
    verify.add_argument("file", metavar="FILE")
    verify.add_argument("--server", required=True, metavar="NAME",
                        help="the server whose signature to check")
    verify.add_argument(
        "--at", type=_timestamp, metavar="TS",
        help="the time (ms since the epoch) the key must be valid at (default: the "
        "object's origin_server_ts, else now; 0 for room versions 1 to 4)",
    )
    _add_via(verify, "look keys up through this notary first (repeatable).")
    _add_network_options(verify)
    verify.set_defaults(run_async=tools.verify)

    evict = sub.add_parser(
        "evict",
        help="forget a server's cached keys (after it legitimately re-keyed)",
        description="Remove every cached key of SERVER from the notary's key cache "
        "and print how many were removed.",
    )
    evict.add_argument("server", metavar="SERVER")
    _add_database_options(evict)
    evict.add_argument("--verbose", "-v", action="count", default=0, help=argparse.SUPPRESS)
    evict.set_defaults(run_async=tools.evict)

    mig = sub.add_parser(
        "migrate",
        help="bring the key cache's database schema up to date",
        description="Apply pending schema migrations to the key cache and print the "
        "schema version before and after. The service also does this when it starts.",
    )
    _add_database_options(mig)
    mig.set_defaults(run=tools.migrate_database)
    return parser


# -- running -------------------------------------------------------------------


def _parse(
    argv: Optional[Sequence[str]], out: TextIO, err: TextIO
) -> Union[argparse.Namespace, int]:
    """The parsed arguments, or the exit status when argparse has finished (help, usage)."""
    try:
        with redirect_stdout(out), redirect_stderr(err):
            return build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)


def _failed(command: str, err: TextIO, message: str) -> int:
    err.write(f"synkeys {command}: error: {message}\n")
    return 1


def _run_sync(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    run: Callable[[argparse.Namespace, TextIO], int] = args.run
    try:
        return run(args, out)
    except (ConfigError, SynkeysError) as e:
        return _failed(args.command, err, str(e))
    except KeyboardInterrupt:
        err.write("synkeys: interrupted\n")
        return 130


async def _run_async(
    args: argparse.Namespace, out: TextIO, err: TextIO, env: Environment
) -> int:
    run = args.run_async
    observer = None
    if args.verbose:
        level = LogLevel.debug if args.verbose > 1 else LogLevel.info
        observer = FilteringLogObserver(
            textFileLogObserver(err), [LogLevelFilterPredicate(defaultLogLevel=level)]
        )
        globalLogPublisher.addObserver(observer)
    try:
        code: int = await run(args, out, err, env)
        return code
    except (ConfigError, SynkeysError) as e:
        return _failed(args.command, err, str(e))
    except CancelledError:
        return _failed(args.command, err, "timed out")
    except Exception as e:  # the promise is one line, never a traceback
        return _failed(args.command, err, f"unexpected {type(e).__name__}: {e}")
    finally:
        if observer is not None:
            globalLogPublisher.removeObserver(observer)


def execute(
    argv: Optional[Sequence[str]], out: TextIO, err: TextIO, env: Environment
) -> Deferred[int]:
    """
    Run a command line with ``env`` on a reactor that is already running
    (for tests and for programs that embed the tools); fires with the
    exit status.
    """
    args = _parse(argv, out, err)
    if isinstance(args, int):
        return succeed(args)
    if not hasattr(args, "run_async"):
        return succeed(_run_sync(args, out, err))
    return Deferred.fromCoroutine(_run_async(args, out, err, env))


def main(
    argv: Optional[Sequence[str]] = None,
    out: Optional[TextIO] = None,
    err: Optional[TextIO] = None,
    *,
    runner: Optional[Runner] = None,
) -> int:
    """
    Run the command line; returns the exit status.

    :param argv: The arguments (default: ``sys.argv[1:]``).
    :param out: Where reports go (default: stdout).
    :param err: Where errors go (default: stderr).
    :param runner: Runs network commands (default: :func:`react_runner`,
        the real reactor and network).
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    args = _parse(argv, out, err)
    if isinstance(args, int):
        return args
    if not hasattr(args, "run_async"):
        return _run_sync(args, out, err)
    chosen = react_runner if runner is None else runner
    return chosen(lambda env: Deferred.fromCoroutine(_run_async(args, out, err, env)))
