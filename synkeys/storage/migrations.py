"""
Versioned schema migrations, one schema for SQLite and PostgreSQL.

Migrations are the files ``synkeys/storage/schema/NN_name.sql``, applied in
order of ``NN``; ``{bytes}`` in them is the engine's binary column type.
The ``schema_version`` table has one row per applied migration, so the
database's version is the largest ``version`` in it. A database newer than
this code refuses to open rather than be written by code that does not
know its shape.
"""

from __future__ import annotations

import re
from importlib.resources import files
from typing import Any

import attr
from twisted.logger import Logger

from synkeys.errors import ConfigError
from synkeys.storage.dialect import Dialect

log = Logger()

_FILE_NAME = re.compile(r"\A(\d+)_([a-z0-9_]+)\.sql\Z")

_CREATE_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version     INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    applied_at  TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
)
"""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Migration:
    """
    One schema change.

    :ivar version: The schema version the database has once it is applied.
    :ivar name: A short description, from the file name.
    :ivar sql: The statements, with ``{bytes}`` not yet substituted.
    """

    version: int
    name: str
    sql: str

    def statements(self, dialect: Dialect) -> list[str]:
        """The migration's statements, one per item, for ``dialect``."""
        text = self.sql.replace("{bytes}", dialect.bytes_type)
        lines = [line.split("--", 1)[0] for line in text.splitlines()]
        return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class MigrationResult:
    """
    What :func:`apply_migrations` did.

    :ivar before: The schema version found (0 for an empty database).
    :ivar after: The schema version now.
    """

    before: int
    after: int

    @property
    def applied(self) -> tuple[int, ...]:
        """The versions applied, in order."""
        return tuple(range(self.before + 1, self.after + 1))


def load_migrations() -> tuple[Migration, ...]:
    """Read the migrations shipped in ``synkeys/storage/schema/``, in order."""
    found = []
    for entry in files("synkeys.storage").joinpath("schema").iterdir():
        match = _FILE_NAME.match(entry.name)
        if match is None:
            continue
        found.append(
            Migration(int(match.group(1)), match.group(2), entry.read_text("utf-8"))
        )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"storage migrations are not numbered 1..n: {versions}")
    return tuple(found)


MIGRATIONS = load_migrations()
#: The schema version this code writes and understands.
SCHEMA_VERSION = MIGRATIONS[-1].version


def read_schema_version(cursor: Any) -> int:
    """The database's schema version (0 when it has none); needs the table."""
    cursor.execute("SELECT MAX(version) FROM schema_version")
    row = cursor.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def apply_migrations(cursor: Any, dialect: Dialect, where: str = "") -> MigrationResult:
    """
    Bring the database behind the DB-API ``cursor`` up to
    :data:`SCHEMA_VERSION`, in one transaction that the caller commits.

    Two processes starting together are serialised by
    :attr:`Dialect.migration_lock`; the second finds nothing to do.

    :param where: The database, for messages (never a password).
    :raises ConfigError: when the database's schema is newer than this code.
    """
    cursor.execute(dialect.migration_lock)
    cursor.execute(_CREATE_VERSION_TABLE)
    before = read_schema_version(cursor)
    if before > SCHEMA_VERSION:
        raise ConfigError(
            f"database {where} has schema version {before}, newer than the "
            f"version {SCHEMA_VERSION} this synkeys knows; upgrade synkeys"
        )
    for migration in MIGRATIONS[before:]:
        log.info(
            "Applying {dialect} schema migration {version} ({name}) to {where}",
            dialect=dialect.name,
            version=migration.version,
            name=migration.name,
            where=where,
        )
        for statement in migration.statements(dialect):
            cursor.execute(statement)
        cursor.execute(
            dialect.sql("INSERT INTO schema_version (version, name) VALUES (?, ?)"),
            (migration.version, migration.name),
        )
    return MigrationResult(before, SCHEMA_VERSION)
