"""
The ``/_matrix/key/v2`` resource tree: HTTP in, values to the core, HTTP
out.

Mount it into any :class:`twisted.web.server.Site` with
:func:`mount_key_resources`, or serve :func:`build_root` on its own.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from synkeys.errors import invalid_param, unrecognized
from synkeys.http import (
    MatrixResource,
    method_not_allowed,
    read_body,
    render_call,
    render_error,
    write_json_bytes,
)
from synkeys.keyserver import KeyPublisher
from synkeys.notary import Notary
from synkeys.query import DEFAULT_MAX_KEYS_PER_QUERY, parse_query_body, parse_query_path
from synkeys.servername import is_valid_key_id


class ServerKeysResource(MatrixResource):
    """
    ``GET /_matrix/key/v2/server``, ``/server/`` and the deprecated
    ``/server/{keyId}``: this server's signed keys, the same prepared bytes
    for every request.
    """

    isLeaf = True

    def __init__(self, publisher: KeyPublisher) -> None:
        super().__init__()
        self._publisher = publisher

    def render_GET(self, request: Request) -> Any:  # noqa: N802
        postpath = request.postpath or []
        if len(postpath) > 1:
            render_error(request, unrecognized(404))
        elif postpath and postpath[0] and not is_valid_key_id(
            postpath[0].decode("utf-8", "replace")
        ):
            render_error(request, invalid_param("Invalid key id"))
        else:
            # The spec lets a server answer every key for any key id asked.
            write_json_bytes(request, 200, self._publisher.body())
        return NOT_DONE_YET


class QueryResource(MatrixResource):
    """
    The notary: ``POST /_matrix/key/v2/query`` (both body forms) and
    ``GET /_matrix/key/v2/query/{serverName}[/{keyId}]``.

    :param notary: Answers parsed queries.
    :param max_keys_per_query: Most (server, key id) pairs one POST may ask
        for; more is 400 ``M_LIMIT_EXCEEDED`` before any fetch starts.
    """

    isLeaf = True

    def __init__(
        self, notary: Notary, max_keys_per_query: int = DEFAULT_MAX_KEYS_PER_QUERY
    ) -> None:
        super().__init__()
        self._notary = notary
        self._max_keys = max_keys_per_query

    def _at_root(self, request: Request) -> bool:
        return not request.postpath or request.postpath == [b""]

    def render_GET(self, request: Request) -> Any:  # noqa: N802
        if self._at_root(request):
            return method_not_allowed(
                request, b"POST, OPTIONS", "Use POST, or GET /query/{serverName}"
            )

        return render_call(
            request,
            lambda: self._notary.query(
                parse_query_path(request.postpath or [], request.args or {})
            ),
        )

    def render_POST(self, request: Request) -> Any:  # noqa: N802
        if not self._at_root(request):
            return method_not_allowed(
                request, b"GET, HEAD, OPTIONS", "POST only to /_matrix/key/v2/query"
            )

        return render_call(
            request,
            lambda: self._notary.query(parse_query_body(read_body(request), self._max_keys)),
        )


class KeyV2Resource(MatrixResource):
    """
    ``/_matrix/key/v2``: ``server`` and, when a notary is given, ``query``.
    """

    def __init__(self, publisher: KeyPublisher, query: Optional[IResource] = None) -> None:
        super().__init__()
        self.putChild(b"server", ServerKeysResource(publisher))
        if query is not None:
            self.putChild(b"query", query)


def _child(parent: Resource, name: bytes) -> Resource:
    existing = parent.children.get(name)
    if existing is None:
        existing = MatrixResource()
        parent.putChild(name, existing)
    return existing


def mount_key_resources(
    root: Resource, publisher: KeyPublisher, query: Optional[IResource] = None
) -> KeyV2Resource:
    """
    Mount the key API at ``/_matrix/key/v2`` under ``root``, keeping any
    other children ``root`` (and an existing ``_matrix`` node) already has.

    :returns: the ``/_matrix/key/v2`` resource.
    """
    key = _child(_child(root, b"_matrix"), b"key")
    v2 = KeyV2Resource(publisher, query)
    key.putChild(b"v2", v2)
    return v2


class KeyRootResource(MatrixResource):
    """
    A root resource that finds the leaves of the busiest exact paths
    (``/_matrix/key/v2/server`` and ``/_matrix/key/v2/query``) with one
    dictionary look-up instead of a walk down four levels of the tree,
    about a microsecond of a ``/server`` request. The leaf sees the request
    exactly as after the walk; every other path is walked as usual.
    """

    def __init__(self) -> None:
        super().__init__()
        self._shortcuts: Dict[bytes, Resource] = {}

    def add_shortcut(self, path: bytes, leaf: Resource) -> None:
        """Serve the exact request path ``path`` (``/``-separated, as sent) from ``leaf``."""
        if not leaf.isLeaf:
            raise ValueError(f"a shortcut must lead to a leaf resource, not {leaf!r}")
        self._shortcuts[path] = leaf

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:  # noqa: N802
        leaf = self._shortcuts.get(request.path)
        if leaf is not None and request.prepath is not None and request.postpath is not None:
            # As Resource.getChildForRequest leaves a request at a leaf: every
            # segment moved from postpath to prepath.
            request.prepath.extend(request.postpath)
            del request.postpath[:]
            return leaf
        return super().getChildWithDefault(path, request)


def build_root(publisher: KeyPublisher, query: Optional[IResource] = None) -> Resource:
    """A root resource serving only the key API (404 JSON elsewhere)."""
    root = KeyRootResource()
    v2 = mount_key_resources(root, publisher, query)
    for name, child in v2.children.items():
        if isinstance(child, Resource) and child.isLeaf:
            root.add_shortcut(b"/_matrix/key/v2/" + name, child)
    return root
