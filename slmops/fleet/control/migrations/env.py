"""Alembic's entry point. From code (``migrations.upgrade``) it runs on the connection it is handed, inside the
caller's transaction; from the ``alembic`` command it opens its own engine on ``-x url=...`` or
``SLMOPS_FLEET_DB``."""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from slmops.fleet.control.models import Base

config = context.config


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata, compare_type=True,
                      render_as_batch=connection.dialect.name == "sqlite")  # SQLite alters by copying the table
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ.get("SLMOPS_FLEET_DB", "")
    if not url:
        raise SystemExit("give the database: alembic -x url=sqlite+aiosqlite:///PATH ... (or set SLMOPS_FLEET_DB)")
    return url


async def _online(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            await conn.run_sync(_run)
            await conn.commit()
    finally:
        await engine.dispose()


_connection = config.attributes.get("connection")
if _connection is not None:
    _run(_connection)
elif context.is_offline_mode():
    context.configure(url=_url().replace("+aiosqlite", "").replace("+asyncpg", ""), target_metadata=Base.metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_online(_url()))
