"""
The spec's grammar for server names and key ids (pure functions).

::

    server_name = hostname [ ":" port ]         port = 1*5DIGIT (1..65535)
    hostname    = IPv4address / "[" IPv6address "]" / dns-name
    dns-name    = 1*255dns-char                  dns-char = DIGIT / ALPHA / "-" / "."
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple, Optional

from synkeys.errors import InvalidKeyId, InvalidServerName

_DNS_NAME = re.compile(r"\A[A-Za-z0-9.\-]{1,255}\Z")
_IPV4 = re.compile(r"\A[0-9]{1,3}(\.[0-9]{1,3}){3}\Z")
_PORT = re.compile(r"\A[0-9]{1,5}\Z")
_IPV6_CHARS = re.compile(r"\A[0-9A-Fa-f:.]{2,45}\Z")
_KEY_ID = re.compile(r"\Aed25519:[A-Za-z0-9_]+\Z")
_KEY_VERSION = re.compile(r"\A[A-Za-z0-9_]+\Z")

#: Longest server name accepted: 255 for the host, brackets, colon, port.
MAX_SERVER_NAME_LENGTH = 255 + 2 + 1 + 5
#: Longest key id accepted.
MAX_KEY_ID_LENGTH = 255


class ServerName(NamedTuple):
    """
    A parsed server name.

    :ivar host: The host as written, without brackets for IPv6.
    :ivar port: The explicit port, or ``None``.
    :ivar is_ip: Whether the host is an IP literal.
    """

    host: str
    port: Optional[int]
    is_ip: bool


def parse_server_name(server_name: str) -> ServerName:
    """
    Parse and validate a server name.

    :raises InvalidServerName: when ``server_name`` is not in the grammar.
    """
    if not isinstance(server_name, str) or not server_name:
        raise InvalidServerName("server name is empty")
    if len(server_name) > MAX_SERVER_NAME_LENGTH:
        raise InvalidServerName("server name is too long")
    port: Optional[int] = None
    if server_name.startswith("["):
        end = server_name.find("]")
        if end < 0:
            raise InvalidServerName(f"unterminated IPv6 literal in {server_name!r}")
        host = server_name[1:end]
        rest = server_name[end + 1 :]
        if not _IPV6_CHARS.match(host):
            # ipaddress allows zone ids (fe80::1%eth0); the grammar does not.
            raise InvalidServerName(f"invalid IPv6 literal in {server_name!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidServerName(f"invalid IPv6 literal in {server_name!r}") from None
        if rest:
            if not rest.startswith(":"):
                raise InvalidServerName(f"junk after IPv6 literal in {server_name!r}")
            port = _parse_port(rest[1:], server_name)
        return ServerName(host, port, True)
    host, sep, port_text = server_name.partition(":")
    if sep:
        port = _parse_port(port_text, server_name)
    if not host:
        raise InvalidServerName(f"no host in {server_name!r}")
    if _IPV4.match(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise InvalidServerName(f"invalid IPv4 literal in {server_name!r}") from None
        return ServerName(host, port, True)
    if not _DNS_NAME.match(host):
        raise InvalidServerName(f"invalid host name in {server_name!r}")
    return ServerName(host, port, False)


def _parse_port(text: str, server_name: str) -> int:
    if not _PORT.match(text) or not (1 <= int(text) <= 65535):
        raise InvalidServerName(f"invalid port in {server_name!r}")
    return int(text)


def is_valid_server_name(server_name: object) -> bool:
    """Whether ``server_name`` is a string in the server-name grammar."""
    try:
        parse_server_name(server_name)  # type: ignore[arg-type]
    except InvalidServerName:
        return False
    return True


def check_key_id(key_id: object) -> str:
    """
    Validate a key id (``ed25519:`` and a version of ``[a-zA-Z0-9_]+``).

    :returns: ``key_id`` unchanged.
    :raises InvalidKeyId: when it is not one.
    """
    if (
        not isinstance(key_id, str)
        or len(key_id) > MAX_KEY_ID_LENGTH
        or not _KEY_ID.match(key_id)
    ):
        raise InvalidKeyId(f"invalid key id {key_id!r}: want ed25519:[a-zA-Z0-9_]+")
    return key_id


def is_valid_key_id(key_id: object) -> bool:
    """Whether ``key_id`` is a valid ``ed25519:`` key id."""
    try:
        check_key_id(key_id)
    except InvalidKeyId:
        return False
    return True


def is_valid_key_version(version: object) -> bool:
    """Whether ``version`` is a valid key version (the part after ``ed25519:``)."""
    return (
        isinstance(version, str)
        and len(version) <= MAX_KEY_ID_LENGTH - 8
        and bool(_KEY_VERSION.match(version))
    )
