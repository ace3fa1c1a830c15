"""Files: a user's files, their chunks in order, and which devices hold each chunk.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(1024), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("replicas", sa.Integer, nullable=False),
        sa.Column("sealing", sa.JSON, nullable=True),
        sa.Column("created_at", sa.Double, nullable=False),
    )
    op.create_index("ix_files_user_name", "files", ["user_id", "name"], unique=True)
    op.create_table(
        "file_chunks",
        sa.Column("file_id", sa.String(32), sa.ForeignKey("files.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("idx", sa.Integer, primary_key=True),
        sa.Column("chunk_id", sa.String(64), nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
    )
    op.create_index("ix_file_chunks_chunk", "file_chunks", ["chunk_id"])
    op.create_table(
        "chunk_replicas",
        sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("chunk_id", sa.String(64), primary_key=True),
        sa.Column("device_id", sa.String(32), sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("stored_at", sa.Double, nullable=False),
    )
    op.create_index("ix_chunk_replicas_device_id", "chunk_replicas", ["device_id"])


def downgrade() -> None:
    op.drop_table("chunk_replicas")
    op.drop_table("file_chunks")
    op.drop_table("files")
