"""The exception every store raises when its database cannot be used."""

from __future__ import annotations

from synkeys.errors import SynkeysError


class StoreUnavailable(SynkeysError):
    """
    The key store's database could not be reached or used: it is down,
    locked, timed out, or the store was closed. The HTTP layer answers 503.

    :ivar store: A short name of the store, e.g. ``"sqlite"``.
    :ivar reason: What went wrong, for humans and logs.
    """

    def __init__(self, store: str, reason: str) -> None:
        super().__init__(f"{store} key store unavailable: {reason}")
        self.store = store
        self.reason = reason
