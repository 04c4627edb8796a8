"""Alembic's environment and versions for the control plane's schema, run from code: ``Database.migrate()`` calls
:func:`upgrade` on a connection it already holds (inside its transaction and lock), so no ``alembic.ini`` or URL
is needed at run time. ``alembic.ini`` next to this package is for writing new versions by hand.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection

HERE = Path(__file__).parent


def config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for this package; with ``connection``, env.py migrates on it and commits nothing."""
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["connection"] = connection
    return cfg


def upgrade(connection: Connection, revision: str = "head") -> None:
    command.upgrade(config(connection), revision)


def downgrade(connection: Connection, revision: str = "base") -> None:
    command.downgrade(config(connection), revision)


def current(connection: Connection) -> str | None:
    """The revision the database is at (None: not migrated)."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()
