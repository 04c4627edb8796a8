"""Scoped changes: which devices a change version concerns, so replicas drop only their cached states.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "change_scopes",
        sa.Column("version", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("devices", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("version", name="pk_change_scopes"),
    )


def downgrade() -> None:
    op.drop_table("change_scopes")
