"""
Interoperability with a real Synapse homeserver (issue 7).

Each test starts Synapse (``matrix-synapse``, the ``interop`` extra) as a
subprocess federating over TLS on 127.0.0.1 with a trustme CA, and runs
synkeys key servers and notaries in-process beside it. Without Synapse
installed the tests are skipped, with the reason shown.
"""
