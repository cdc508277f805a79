"""
synkeys: Matrix server key distribution, version 2, for Twisted.

A key server (``/_matrix/key/v2/server``), a notary
(``/_matrix/key/v2/query``) and a keyring that finds and verifies any
server's keys. The names below are the public API; everything else is
reached through its module.
"""

from synkeys.errors import (
    KeyLookupError,
    MatrixError,
    SignatureVerifyError,
    SynkeysError,
)
from synkeys.fetchers import (
    DirectKeyFetcher,
    PerspectivesKeyFetcher,
    StoreKeyFetcher,
    perspectives_from_config,
)
from synkeys.keyring import Keyring
from synkeys.keys import ServerKeys, VerifyKey

__version__ = "0.1.0"

__all__ = [
    "DirectKeyFetcher",
    "KeyLookupError",
    "Keyring",
    "MatrixError",
    "PerspectivesKeyFetcher",
    "ServerKeys",
    "SignatureVerifyError",
    "StoreKeyFetcher",
    "SynkeysError",
    "VerifyKey",
    "perspectives_from_config",
    "__version__",
]
