"""
:class:`MemoryKeyStore`: an :class:`~synkeys.interfaces.IKeyStore` held in
dicts, for ``--database :memory:`` and as a fake for tests.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from synkeys.interfaces import IKeyStore, StoreResult
from synkeys.keys import ServerKeys
from synkeys.storage.errors import StoreUnavailable
from synkeys.storage.records import supersedes


@implementer(IKeyStore)
class MemoryKeyStore:
    """
    A key store that forgets everything when the process ends.

    It follows the same rules as the SQL stores (see
    :meth:`store_server_keys`), so tests written against it hold for them.
    Every method answers synchronously (the Deferred has already fired).
    """

    def __init__(self) -> None:
        self._rows: dict[str, dict[str, ServerKeys]] = {}
        self._unavailable: str | None = None

    def fail_with(self, reason: str | None) -> None:
        """
        Make every later call fail with :class:`StoreUnavailable` carrying
        ``reason`` (``None`` makes the store work again) — for testing how
        callers survive a database outage.
        """
        self._unavailable = reason

    def _check(self) -> Deferred | None:
        if self._unavailable is not None:
            return fail(StoreUnavailable("memory", self._unavailable))
        return None

    def store_server_keys(self, keys: ServerKeys) -> Deferred[StoreResult]:
        """See :meth:`synkeys.interfaces.IKeyStore.store_server_keys`."""
        failed = self._check()
        if failed is not None:
            return failed
        rows = self._rows.setdefault(keys.server_name, {})
        stored = set()
        kept = set()
        conflicts: dict[str, bytes] = {}
        for key_id in sorted(keys.key_ids):
            existing = rows.get(key_id)
            if existing is None:
                rows[key_id] = keys
                stored.add(key_id)
                continue
            existing_bytes = existing.key_bytes(key_id)
            assert existing_bytes is not None
            if existing_bytes != keys.key_bytes(key_id):
                conflicts[key_id] = existing_bytes
            elif supersedes(
                keys.fetched_ts,
                keys.valid_until_ts,
                existing.fetched_ts,
                existing.valid_until_ts,
            ):
                rows[key_id] = keys
                stored.add(key_id)
            else:
                kept.add(key_id)
        if not rows:
            del self._rows[keys.server_name]
        return succeed(StoreResult(frozenset(stored), frozenset(kept), conflicts))

    def get_server_keys(
        self, requests: Mapping[str, Collection[str] | None]
    ) -> Deferred[dict[str, dict[str, ServerKeys]]]:
        """See :meth:`synkeys.interfaces.IKeyStore.get_server_keys`."""
        failed = self._check()
        if failed is not None:
            return failed
        result: dict[str, dict[str, ServerKeys]] = {}
        for server_name, key_ids in requests.items():
            rows = self._rows.get(server_name, {})
            if key_ids:
                found = {k: rows[k] for k in key_ids if k in rows}
            else:
                found = dict(rows)
            if found:
                result[server_name] = found
        return succeed(result)

    def evict_server(self, server_name: str) -> Deferred[int]:
        """See :meth:`synkeys.interfaces.IKeyStore.evict_server`."""
        failed = self._check()
        if failed is not None:
            return failed
        return succeed(len(self._rows.pop(server_name, {})))

    def ping(self) -> Deferred[None]:
        """See :meth:`synkeys.interfaces.IKeyStore.ping`."""
        failed = self._check()
        if failed is not None:
            return failed
        return succeed(None)

    def close(self) -> Deferred[None]:
        """Forget everything; later calls fail with :class:`StoreUnavailable`."""
        self._rows.clear()
        if self._unavailable is None:
            self._unavailable = "store is closed"
        return succeed(None)
