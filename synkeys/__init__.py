"""
synkeys: Matrix server key distribution, version 2, for Twisted.

A key server (``/_matrix/key/v2/server``), a notary
(``/_matrix/key/v2/query``) and a keyring that finds and verifies any
server's keys.
"""

__version__ = "0.1.0"
