"""
Every setting of synkeys, defined once: its command-line flag, its key in
the YAML config file (Synapse's ``homeserver.yaml`` name where one exists),
its default and its meaning.

``twistd synkeys`` and ``synkeys`` build their options from
:data:`SETTINGS`, and the configuration reference in ``docs/`` is generated
from it, so the three cannot drift apart. Command-line flags win over the
config file, which wins over the defaults.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import attr
import yaml

from synkeys.errors import ConfigError, InvalidServerName
from synkeys.keyfile import OldVerifyKey, parse_old_key_flag, parse_old_keys_config
from synkeys.servername import parse_server_name


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Setting:
    """
    One setting.

    :ivar flag: The long flag without dashes, e.g. ``server-name``.
    :ivar key: The config file key, e.g. ``server_name``.
    :ivar default: The value when neither flag nor file gives one (after
        ``parse``).
    :ivar help: One line for ``--help`` and the docs.
    :ivar repeatable: Whether the flag may be given several times (a list).
    :ivar parse: Turns a flag string or a config value into the value.
    :ivar metavar: What the flag's argument is called in help.
    """

    flag: str
    key: str
    default: Any
    help: str
    repeatable: bool = False
    parse: Optional[Callable[[Any], Any]] = None
    metavar: str = "VALUE"


_DURATION = re.compile(r"\A([0-9]+)(ms|s|m|h|d|w|y)?\Z")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000,
            "w": 604_800_000, "y": 31_536_000_000}


def parse_duration_ms(value: Any) -> int:
    """
    A duration as Synapse writes them: an integer of milliseconds, or a
    number with a unit ``ms``, ``s``, ``m``, ``h``, ``d``, ``w`` or ``y``
    (``"1d"``, ``"30m"``). Returns milliseconds.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = _DURATION.match(value.strip())
        if match:
            return int(match.group(1)) * _UNIT_MS[match.group(2) or "ms"]
    raise ConfigError(f"invalid duration {value!r}: use e.g. 1d, 12h, 30m, 90s or milliseconds")


def parse_seconds(value: Any) -> float:
    """A positive number of seconds (``"10"``, ``2.5``)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"invalid number of seconds {value!r}") from None
    if not 0 < seconds <= 3600:
        raise ConfigError(f"{value!r} seconds is out of range (0, 3600]")
    return seconds


def parse_size(value: Any) -> int:
    """A size in bytes: an integer, or with a suffix ``K``, ``M`` (binary)."""
    text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
    scale = 1
    if text[-1:] in ("K", "M"):
        scale = 1024 if text[-1] == "K" else 1024 * 1024
        text = text[:-1]
    if not text.isdigit() or int(text) * scale <= 0:
        raise ConfigError(f"invalid size {value!r}: use e.g. 1048576, 512K or 1M")
    return int(text) * scale


def parse_positive_int(value: Any) -> int:
    """A positive integer."""
    if isinstance(value, bool):
        raise ConfigError(f"expected a positive integer, got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"expected a positive integer, got {value!r}") from None
    if number <= 0:
        raise ConfigError(f"expected a positive integer, got {value!r}")
    return number


def parse_access_log(value: Any) -> str:
    """
    Where the access log goes: ``off``, ``log`` (the twistd log) or a file
    path. YAML reads a bare ``off``/``on`` as a boolean: false is ``off``,
    true is ``log``.
    """
    if isinstance(value, bool):
        return "log" if value else "off"
    text = str(value).strip()
    if not text:
        raise ConfigError("access log: use off, log, or a file path")
    return text


#: More worker processes than this is a mistake, whatever the machine.
MAX_WORKERS = 64


def parse_workers(value: Any) -> int:
    """A number of worker processes, 1 to :data:`MAX_WORKERS`."""
    number = parse_positive_int(value)
    if number > MAX_WORKERS:
        raise ConfigError(f"at most {MAX_WORKERS} workers, got {number}")
    return number


def parse_cidr(value: Any) -> str:
    """An IPv4 or IPv6 network in CIDR notation."""
    try:
        return str(ipaddress.ip_network(str(value), strict=False))
    except ValueError:
        raise ConfigError(f"invalid IP range {value!r}: use CIDR like 127.0.0.0/8") from None


def parse_server_name_setting(value: Any) -> str:
    """A server name in the spec's grammar."""
    try:
        parse_server_name(value)
    except InvalidServerName as e:
        raise ConfigError(f"invalid server name: {e}") from None
    return str(value)


def parse_old_key(value: Any) -> OldVerifyKey:
    """An old key from the flag form ``KEYID:PUBLICKEY:EXPIRED_TS``."""
    if isinstance(value, OldVerifyKey):
        return value
    return parse_old_key_flag(str(value))


SETTINGS: Sequence[Setting] = (
    Setting("server-name", "server_name", None,
            "This server's name (required), e.g. keys.example.org.",
            parse=parse_server_name_setting, metavar="NAME"),
    Setting("signing-key", "signing_key_path", "synkeys.signing.key",
            "Signing key file in Synapse's format; generated (mode 0600) if missing.",
            metavar="FILE"),
    Setting("old-signing-key", "old_signing_keys", [],
            "A retired key published under old_verify_keys: KEYID:PUBLICKEY:EXPIRED_TS "
            "(repeatable; in the file: Synapse's old_signing_keys mapping).",
            repeatable=True, parse=parse_old_key, metavar="KEY"),
    Setting("key-refresh-interval", "key_refresh_interval", 86_400_000,
            "How long the published keys are valid (valid_until_ts = now + this); "
            "re-signed when half has passed.", parse=parse_duration_ms, metavar="DURATION"),
    Setting("listen", "listen", ["tcp:8008:interface=127.0.0.1"],
            "A Twisted endpoint to serve on, e.g. tcp:8008:interface=127.0.0.1 or "
            "ssl:8448:privateKey=key.pem:certKey=cert.pem (repeatable).",
            repeatable=True, metavar="ENDPOINT"),
    Setting("database", "database", "synkeys.sqlite",
            "Key cache: a SQLite file path, or postgresql://user@host:port/dbname.",
            metavar="PATH-OR-DSN"),
    Setting("federation-ca", "federation_custom_ca_list", [],
            "Extra CA certificates (PEM) trusted for federation TLS, besides the "
            "system store (repeatable).", repeatable=True, metavar="FILE"),
    Setting("allow-ip-range", "ip_range_whitelist", [],
            "Allow fetching from this otherwise blocked IP range, in CIDR (repeatable).",
            repeatable=True, parse=parse_cidr, metavar="CIDR"),
    Setting("perspective", "trusted_key_servers", [],
            "An upstream notary the notary fetches through: NAME:KEYID:PUBLICKEY "
            "(repeatable; in the file: Synapse's trusted_key_servers list).",
            repeatable=True, metavar="NOTARY"),
    Setting("notary-signing-key", "key_server_signing_keys_path", None,
            "A separate signing key file the notary countersigns with "
            "(default: the server's own keys).", metavar="FILE"),
    Setting("max-response-size", "max_response_size", 1024 * 1024,
            "Largest origin response read, in bytes (K and M suffixes allowed).",
            parse=parse_size, metavar="BYTES"),
    Setting("max-keys-per-query", "max_keys_per_query", 2048,
            "Most (server, key id) pairs one POST /query may ask for.",
            parse=parse_positive_int, metavar="N"),
    Setting("max-concurrent-fetches", "max_concurrent_fetches", 50,
            "Most origin fetches in flight at once.",
            parse=parse_positive_int, metavar="N"),
    Setting("connect-timeout", "connect_timeout", 10.0,
            "Seconds to wait for an origin's TCP and TLS connection.",
            parse=parse_seconds, metavar="SECONDS"),
    Setting("fetch-timeout", "fetch_timeout", 30.0,
            "Seconds an origin fetch may take in all.",
            parse=parse_seconds, metavar="SECONDS"),
    Setting("metrics", "metrics", [],
            "A Twisted endpoint serving Prometheus metrics, apart from --listen, e.g. "
            "tcp:9108:interface=127.0.0.1 (repeatable; default: no metrics listener).",
            repeatable=True, metavar="ENDPOINT"),
    Setting("access-log", "access_log", "off",
            "One line per request (combined log format): 'off', 'log' (into the "
            "twistd log) or a file path. Off by default: into the twistd log it "
            "halves the key server's throughput (see docs/performance.md).",
            parse=parse_access_log, metavar="WHERE"),
    Setting("workers", "workers", 1,
            "Processes serving the listeners and sharing the store (see "
            "docs/performance.md); at most one per core is useful.",
            parse=parse_workers, metavar="N"),
)

SETTINGS_BY_KEY: Mapping[str, Setting] = {s.key: s for s in SETTINGS}
SETTINGS_BY_FLAG: Mapping[str, Setting] = {s.flag: s for s in SETTINGS}


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Config:
    """The resolved settings: flags over file over defaults."""

    server_name: str
    signing_key_path: str
    old_signing_keys: List[OldVerifyKey]
    key_refresh_interval: int
    listen: List[str]
    database: str
    federation_custom_ca_list: List[str]
    ip_range_whitelist: List[str]
    trusted_key_servers: List[Any]
    key_server_signing_keys_path: Optional[str]
    max_response_size: int
    max_keys_per_query: int
    max_concurrent_fetches: int
    connect_timeout: float
    fetch_timeout: float
    metrics: List[str] = attr.Factory(list)
    access_log: str = "off"
    workers: int = 1


def read_config_file(path: str) -> Dict[str, Any]:
    """
    Read a YAML config file.

    :raises ConfigError: when unreadable, not YAML, not a mapping, or it has
        keys synkeys does not know (a typo should not pass silently).
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    unknown = sorted(set(map(str, data)) - set(SETTINGS_BY_KEY))
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s): {', '.join(unknown)}")
    return data


def _from_file(setting: Setting, value: Any) -> Any:
    if setting.key == "old_signing_keys":
        return parse_old_keys_config(value)
    if setting.repeatable:
        if not isinstance(value, list):
            raise ConfigError(f"{setting.key} must be a list")
        if setting.key == "trusted_key_servers":
            return value
        return [_parse_one(setting, item) for item in value]
    return _parse_one(setting, value)


def _parse_one(setting: Setting, value: Any) -> Any:
    if value is None:
        return None
    try:
        return setting.parse(value) if setting.parse else str(value)
    except ConfigError as e:
        raise ConfigError(f"{setting.key} / --{setting.flag}: {e}") from None


def resolve_config(
    flags: Mapping[str, Any], config_path: Optional[str] = None
) -> Config:
    """
    Resolve the configuration.

    :param flags: Flag values by setting key; ``None`` (or an empty list for
        repeatable settings) means not given.
    :param config_path: A YAML config file, or ``None``.
    :raises ConfigError: for anything invalid or missing.
    """
    from_file = read_config_file(config_path) if config_path else {}
    values: Dict[str, Any] = {}
    for setting in SETTINGS:
        flag_value = flags.get(setting.key)
        if setting.repeatable and flag_value:
            if setting.key == "trusted_key_servers":
                values[setting.key] = list(flag_value)
            else:
                values[setting.key] = [_parse_one(setting, v) for v in flag_value]
        elif not setting.repeatable and flag_value is not None:
            values[setting.key] = _parse_one(setting, flag_value)
        elif setting.key in from_file:
            values[setting.key] = _from_file(setting, from_file[setting.key])
        else:
            values[setting.key] = (
                list(setting.default) if setting.repeatable else setting.default
            )
    if not values["server_name"]:
        raise ConfigError("--server-name (server_name in the config file) is required")
    return Config(**values)
