"""Makes ``twistd synkeys`` available once synkeys is installed."""

from twisted.application.service import ServiceMaker

synkeys = ServiceMaker(
    "synkeys",
    "synkeys.tap",
    "Matrix server key distribution v2: key server and notary.",
    "synkeys",
)
