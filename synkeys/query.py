"""
Parsing and validating notary queries (pure): the POST body in both of its
forms, and the GET path and query string, into ``{server_name:
ServerQuery}``.
"""

from __future__ import annotations

from typing import Any, Dict, FrozenSet, Mapping, Optional

import attr

from synkeys.errors import MatrixError, bad_json, invalid_param, not_json
from synkeys.servername import is_valid_key_id, is_valid_server_name
from synkeys.signing import MAX_SAFE_INTEGER, InvalidSignedJson, decode_strict_json


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ServerQuery:
    """
    What a query asks of one server.

    :ivar key_ids: The key ids asked for; ``None`` for all of them.
    :ivar minimum_valid_until_ts: The largest minimum validity asked for
        any of them, or ``None`` (meaning now).
    """

    key_ids: Optional[FrozenSet[str]] = None
    minimum_valid_until_ts: Optional[int] = None


#: ``server_name -> ServerQuery``.
Query = Dict[str, ServerQuery]

#: Default cap on (server, key id) pairs in one POST; peers batch up to 1,024.
DEFAULT_MAX_KEYS_PER_QUERY = 2048


def _timestamp(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SAFE_INTEGER:
        raise bad_json(f"{where}: minimum_valid_until_ts must be a non-negative integer")
    return value


def _server(name: Any) -> str:
    if not is_valid_server_name(name):
        raise invalid_param(f"Invalid server name {str(name)[:300]!r}")
    return str(name)


def _key_id(key_id: Any, server: str) -> str:
    if not is_valid_key_id(key_id):
        raise invalid_param(f"Invalid key id {str(key_id)[:300]!r} for {server}")
    return str(key_id)


def parse_query_body(body: bytes, max_keys: int = DEFAULT_MAX_KEYS_PER_QUERY) -> Query:
    """
    Parse a ``POST /_matrix/key/v2/query`` body, either today's form
    ``{"server_keys": {srv: {keyId: {"minimum_valid_until_ts": N}}}}`` or
    the seed's ``{"server_keys": {srv: [keyId, ...]}}``.

    :raises MatrixError: 400 ``M_NOT_JSON``, ``M_BAD_JSON``,
        ``M_INVALID_PARAM`` or ``M_LIMIT_EXCEEDED`` (with the limit).
    """
    try:
        content = decode_strict_json(body, allow_floats=True)
    except InvalidSignedJson as e:
        reason = str(e)
        if reason.startswith(("invalid JSON", "body is not valid UTF-8")):
            raise not_json(f"Content not JSON: {reason}") from None
        raise bad_json(f"Content not usable: {reason}") from None
    if not isinstance(content, dict):
        raise bad_json("Body must be a JSON object")
    server_keys = content.get("server_keys")
    if not isinstance(server_keys, dict):
        raise bad_json("'server_keys' must be an object of server name to key ids")
    pairs = sum(max(1, len(v)) if isinstance(v, (dict, list)) else 1 for v in server_keys.values())
    if pairs > max_keys:
        raise MatrixError(
            400,
            "M_LIMIT_EXCEEDED",
            f"Too many keys asked for: {pairs} (server, key id) pairs; the limit is {max_keys}",
            {"limit": max_keys},
        )
    query: Query = {}
    for server_name, wanted in server_keys.items():
        server = _server(server_name)
        key_ids = set()
        minimum: Optional[int] = None
        if isinstance(wanted, list):
            for key_id in wanted:
                key_ids.add(_key_id(key_id, server))
        elif isinstance(wanted, dict):
            for key_id, criteria in wanted.items():
                key_id = _key_id(key_id, server)
                where = f"server_keys[{server}][{key_id}]"
                if not isinstance(criteria, dict):
                    raise bad_json(f"{where} must be an object")
                key_ids.add(key_id)
                value = criteria.get("minimum_valid_until_ts")
                if value is not None:
                    value = _timestamp(value, where)
                    minimum = value if minimum is None else max(minimum, value)
        else:
            raise bad_json(f"server_keys[{server}] must be an object or a list of key ids")
        query[server] = ServerQuery(frozenset(key_ids) or None, minimum)
    return query


def parse_query_path(postpath: list[bytes], args: Mapping[bytes, list[bytes]]) -> Query:
    """
    Parse ``GET /_matrix/key/v2/query/{serverName}[/{keyId}]`` with its
    optional ``minimum_valid_until_ts`` query parameter.

    :raises MatrixError: 400 ``M_INVALID_PARAM``; 404 for other paths.
    """
    parts = [p for p in postpath]
    if parts and parts[-1] == b"" and len(parts) > 1:
        parts = parts[:-1]
    if not parts or not parts[0] or len(parts) > 2:
        raise MatrixError(404, "M_UNRECOGNIZED", "Unrecognized request")
    try:
        server = _server(parts[0].decode("utf-8"))
        key_id = _key_id(parts[1].decode("utf-8"), server) if len(parts) == 2 else None
    except UnicodeDecodeError:
        raise invalid_param("Path is not UTF-8") from None
    minimum: Optional[int] = None
    values = args.get(b"minimum_valid_until_ts")
    if values:
        text = values[0].decode("ascii", "replace")
        if not text.isdigit() or len(text) > 16:
            raise invalid_param("minimum_valid_until_ts must be a millisecond timestamp")
        minimum = int(text)
        if minimum > MAX_SAFE_INTEGER:
            raise invalid_param("minimum_valid_until_ts must be a millisecond timestamp")
    return {server: ServerQuery(frozenset([key_id]) if key_id else None, minimum)}
