"""Persisted work: a run's or deployment's state, attempt and spec, and the checkpoints it wrote.

Runs recorded before this revision have no state (shown "unknown", as before); checkpoints are
stage states in the blob store, named by their sha256.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("state", sa.String(16), nullable=True))
    op.add_column("runs", sa.Column("attempt", sa.Integer, nullable=False, server_default="0"))
    op.add_column("runs", sa.Column("spec", sa.JSON, nullable=True))
    op.add_column("runs", sa.Column("error", sa.Text, nullable=True))
    op.add_column("runs", sa.Column("updated_at", sa.Double, nullable=True))
    op.create_index("ix_runs_state", "runs", ["state"])
    op.create_table(
        "run_checkpoints",
        sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("step", sa.Integer, primary_key=True),
        sa.Column("stage", sa.Integer, primary_key=True),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_run_checkpoints_digest", "run_checkpoints", ["digest"])


def downgrade() -> None:
    op.drop_table("run_checkpoints")
    op.drop_index("ix_runs_state", "runs")
    for column in ("updated_at", "error", "spec", "attempt", "state"):
        op.drop_column("runs", column)
