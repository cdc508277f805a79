"""
The ``synkeys`` command (also ``python -m synkeys``): key management and
operator tools. Each subcommand has its own ``--help``.

Errors are one line on stderr and a non-zero exit status, never a
traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence, TextIO

from synkeys.errors import ConfigError, SynkeysError
from synkeys.keyfile import (
    generate_signing_key,
    read_signing_keys,
    write_signing_keys,
)


def _generate_key(args: argparse.Namespace, out: TextIO) -> int:
    key = generate_signing_key(args.version)
    write_signing_keys(args.file, [key])
    out.write(f"Wrote {key.key_id} to {args.file} (mode 0600)\n")
    out.write(f"{key.key_id} {key.public_key_b64}\n")
    return 0


def _show_key(args: argparse.Namespace, out: TextIO) -> int:
    keys = read_signing_keys(args.file)
    for key in keys:
        out.write(f"{key.key_id} {key.public_key_b64}\n")
    if args.server_name:
        out.write("\n# for another server's homeserver.yaml:\ntrusted_key_servers:\n")
        out.write(f'  - server_name: "{args.server_name}"\n    verify_keys:\n')
        for key in keys:
            out.write(f'      "{key.key_id}": "{key.public_key_b64}"\n')
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="synkeys",
        description="Matrix server key distribution v2: key tools for operators. "
        "Run the service itself with 'twistd synkeys'.",
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
    gen.set_defaults(run=_generate_key)

    show = sub.add_parser(
        "show-key",
        help="print the key id and public key of a signing key file",
        description="Print 'KEYID PUBLICKEY' for each key in FILE: what another "
        "server puts in its trusted_key_servers.",
    )
    show.add_argument("file", metavar="FILE")
    show.add_argument("--server-name", help="also print a trusted_key_servers snippet "
                      "for this server name")
    show.set_defaults(run=_show_key)
    return parser


def main(
    argv: Optional[Sequence[str]] = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace, TextIO], int] = args.run
    try:
        return run(args, out)
    except (ConfigError, SynkeysError) as e:
        err.write(f"synkeys {args.command}: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        err.write("synkeys: interrupted\n")
        return 130


