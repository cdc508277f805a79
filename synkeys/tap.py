"""
``twistd synkeys``: command-line options and the service maker.

Options are generated from :data:`synkeys.config.SETTINGS`; everything is
checked in :meth:`Options.postOptions` so that a bad flag, config file or
key file is a one-line error, not a traceback.
"""

from __future__ import annotations

from typing import Any, Dict, List

from twisted.application.service import IService
from twisted.python import usage

from synkeys.config import SETTINGS, Setting, resolve_config
from synkeys.errors import ConfigError


def _repeatable(setting: Setting) -> Any:
    def opt(self: Options, value: str) -> None:
        self.repeated.setdefault(setting.key, []).append(value)

    opt.__doc__ = setting.help
    return opt


def _help(setting: Setting) -> str:
    if setting.default in (None, []):
        return setting.help
    return f"{setting.help} [default: {setting.default}]"


class Options(usage.Options):
    """``twistd synkeys`` options; every one also settable in ``--config``."""

    synopsis = "[options]"
    longdesc = (
        "Serve this server's Matrix signing keys (/_matrix/key/v2/server) and act "
        "as a key notary (/_matrix/key/v2/query). Every option can also be set in "
        "a YAML file given by --config, with Synapse's homeserver.yaml names; "
        "flags win over the file."
    )
    optParameters: List[List[Any]] = [
        ["config", "c", None, "A YAML config file.", str],
    ] + [
        [s.flag, None, None, _help(s)]
        for s in SETTINGS
        if not s.repeatable
    ]

    def __init__(self) -> None:
        super().__init__()
        self.repeated: Dict[str, List[str]] = {}

    def postOptions(self) -> None:  # noqa: N802
        flags: Dict[str, Any] = {
            s.key: self[s.flag] for s in SETTINGS if not s.repeatable
        }
        flags.update(self.repeated)
        try:
            self.config = resolve_config(flags, self["config"])
            self._prepare()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None

    def _prepare(self) -> None:
        from twisted.internet import reactor

        from synkeys.app import load_or_generate_keys, parse_endpoints, trusted_key_servers
        from synkeys.storage import StoreUnavailable, migrate

        self.loaded_keys = load_or_generate_keys(self.config.signing_key_path)
        self.notary_keys = None
        if self.config.key_server_signing_keys_path:
            self.notary_keys = load_or_generate_keys(self.config.key_server_signing_keys_path)
        trusted_key_servers(self.config)
        self.endpoints = parse_endpoints(reactor, self.config.listen)
        self.metrics_endpoints = parse_endpoints(reactor, self.config.metrics, "metrics")
        try:
            migrate(self.config.database)
        except StoreUnavailable as e:
            raise ConfigError(f"cannot use database: {e}") from None
        self.worker_pool = None
        if self.config.workers > 1:
            from synkeys.workers import flags_of, pool_for

            flags = flags_of(self, self.repeated)
            self.worker_pool = pool_for(reactor, self.config, flags, self["config"])
            self.endpoints = self.worker_pool.endpoints()


for _setting in SETTINGS:
    if _setting.repeatable:
        setattr(Options, "opt_" + _setting.flag.replace("-", "_"), _repeatable(_setting))


def makeService(options: Options) -> IService:  # noqa: N802
    """Build the service ``twistd synkeys`` runs."""
    from twisted.internet import reactor

    from synkeys.app import SynkeysService

    service = SynkeysService(
        options.config,
        reactor,
        options.loaded_keys,
        options.endpoints,
        notary_keys=options.notary_keys,
        metrics_endpoints=options.metrics_endpoints,
        freeze_heap=True,
    )
    pool = getattr(options, "worker_pool", None)
    if pool is not None:
        return pool.supervise(service)
    return service
