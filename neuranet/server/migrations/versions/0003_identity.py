"""Identity: API token expiry, disabled users, one device name per owner.

Existing duplicate device names (allowed before) are renamed ``NAME-2``, ``NAME-3``, ... in
enrolment order, so no device is lost and the oldest keeps its name.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

NAME_LENGTH = 100


def _unique_name(name: str, taken: set[str]) -> str:
    n = 2
    while True:
        suffix = f"-{n}"
        candidate = name[: NAME_LENGTH - len(suffix)] + suffix
        if candidate not in taken:
            return candidate
        n += 1


def _rename_duplicate_devices() -> None:
    conn = op.get_bind()
    devices = sa.table("devices", sa.column("id", sa.String), sa.column("user_id", sa.String),
                       sa.column("name", sa.String), sa.column("created_at", sa.Double))
    rows = conn.execute(sa.select(devices.c.id, devices.c.user_id, devices.c.name)
                        .order_by(devices.c.user_id, devices.c.created_at, devices.c.id)).all()
    taken: dict[str, set[str]] = {}
    for _, user_id, name in rows:
        taken.setdefault(user_id, set()).add(name)
    seen: set[tuple[str, str]] = set()
    for device_id, user_id, name in rows:
        if (user_id, name) not in seen:
            seen.add((user_id, name))
            continue
        new = _unique_name(name, taken[user_id])
        taken[user_id].add(new)
        seen.add((user_id, new))
        conn.execute(devices.update().where(devices.c.id == device_id).values(name=new))


def upgrade() -> None:
    # Plain ADD COLUMN (no batch copy): recreating `users` on SQLite would cascade-delete its rows.
    op.add_column("api_tokens", sa.Column("expires_at", sa.Double, nullable=True))
    op.add_column("users", sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()))
    _rename_duplicate_devices()
    op.create_index("ix_devices_user_name", "devices", ["user_id", "name"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_devices_user_name", "devices")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("disabled")
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("expires_at")
