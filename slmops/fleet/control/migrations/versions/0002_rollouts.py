"""Wave rollouts: the rollouts, the devices each targeted (assignments), and the reports' latency histogram buckets
that gates sum per hardware class.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-10
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "report_buckets",
        sa.Column("device_id", sa.String(32), nullable=False),
        sa.Column("window_start", sa.Float(), nullable=False),
        sa.Column("metric", sa.SmallInteger(), nullable=False),
        sa.Column("bucket", sa.SmallInteger(), nullable=False),
        sa.Column("release", sa.String(160), nullable=True),
        sa.Column("hardware_class", sa.String(64), nullable=False),
        sa.Column("window_end", sa.Float(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "window_start", "metric", "bucket", name="pk_report_buckets"),
    )
    # covering: the gates' sums read the index alone
    op.create_index("ix_report_buckets_release_class", "report_buckets",
                    ["release", "hardware_class", "window_end", "metric", "bucket", "count"])
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("release_id", sa.Integer(), nullable=False),
        sa.Column("group", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("previous", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("created_by", sa.String(80), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["release_id"], ["releases.id"], name="fk_rollouts_release_id_releases"),
        sa.PrimaryKeyConstraint("id", name="pk_rollouts"),
    )
    for column in ("release_id", "group", "status"):
        op.create_index(f"ix_rollouts_{column}", "rollouts", [column])
    op.create_table(
        "rollout_assignments",
        sa.Column("rollout_id", sa.String(32), nullable=False),
        sa.Column("device_id", sa.String(32), nullable=False),
        sa.Column("hardware_class", sa.String(64), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("assigned_at", sa.Float(), nullable=False),
        sa.Column("from_version", sa.BigInteger(), nullable=False),
        sa.Column("reverted_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], name="fk_rollout_assignments_rollout_id_rollouts",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("rollout_id", "device_id", name="pk_rollout_assignments"),
    )
    op.create_index("ix_rollout_assignments_device_live", "rollout_assignments", ["device_id", "reverted_at"])


def downgrade() -> None:
    op.drop_index("ix_rollout_assignments_device_live", table_name="rollout_assignments")
    op.drop_table("rollout_assignments")
    for column in ("status", "group", "release_id"):
        op.drop_index(f"ix_rollouts_{column}", table_name="rollouts")
    op.drop_table("rollouts")
    op.drop_index("ix_report_buckets_release_class", table_name="report_buckets")
    op.drop_table("report_buckets")
