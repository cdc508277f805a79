"""
A store usable before it has finished opening: every call waits for the
real store, and fails with :class:`StoreUnavailable` if it never opened.

The service builds its resources at once and opens the database in the
background; requests that arrive meanwhile wait rather than fail.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Dict, Mapping, Optional

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from synkeys.interfaces import IKeyStore, StoreResult
from synkeys.keys import ServerKeys
from synkeys.storage.errors import StoreUnavailable


@implementer(IKeyStore)
class OpeningStore:
    """
    Forwards to the store ``opened`` fires with.

    :param opened: Fires with an :class:`IKeyStore`, or fails.
    """

    def __init__(self, opened: Deferred[IKeyStore]) -> None:
        self._store: Optional[IKeyStore] = None
        self._error: Optional[Failure] = None
        self._waiting: list = []
        opened.addCallbacks(self._opened, self._failed)

    @property
    def store(self) -> Optional[IKeyStore]:
        """The real store once open, else ``None``."""
        return self._store

    def _opened(self, store: IKeyStore) -> None:
        self._store = store
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(store)

    def _failed(self, failure: Failure) -> None:
        self._error = failure
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(self._unavailable())

    def _unavailable(self) -> StoreUnavailable:
        assert self._error is not None
        return StoreUnavailable("key", f"the store did not open: {self._error.getErrorMessage()}")

    def _call(self, use: Callable[[IKeyStore], Deferred[Any]]) -> Deferred[Any]:
        if self._store is not None:
            return use(self._store)
        if self._error is not None:
            return Deferred.fromCoroutine(_raise(self._unavailable()))
        d: Deferred[IKeyStore] = Deferred()
        self._waiting.append(d)
        return d.addCallback(use)

    def store_server_keys(self, keys: ServerKeys) -> Deferred[StoreResult]:
        """See :meth:`IKeyStore.store_server_keys`."""
        return self._call(lambda s: s.store_server_keys(keys))

    def get_server_keys(
        self, requests: Mapping[str, Optional[Collection[str]]]
    ) -> Deferred[Dict[str, Dict[str, ServerKeys]]]:
        """See :meth:`IKeyStore.get_server_keys`."""
        return self._call(lambda s: s.get_server_keys(requests))

    def evict_server(self, server_name: str) -> Deferred[int]:
        """See :meth:`IKeyStore.evict_server`."""
        return self._call(lambda s: s.evict_server(server_name))

    def ping(self) -> Deferred[None]:
        """See :meth:`IKeyStore.ping`."""
        return self._call(lambda s: s.ping())

    def close(self) -> Deferred[None]:
        """See :meth:`IKeyStore.close`."""
        return self._call(lambda s: s.close())


async def _raise(error: Exception) -> Any:
    raise error
