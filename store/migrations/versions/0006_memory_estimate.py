"""jobs.memory_estimate (the expected peak memory stated at submission); file sizes as 64-bit integers

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 06:40:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("memory_estimate", sa.JSON(), nullable=True))
    for table in ("models", "datasets"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column("size_bytes", type_=sa.BigInteger(), existing_type=sa.Integer())


def downgrade() -> None:
    for table in ("models", "datasets"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column("size_bytes", type_=sa.Integer(), existing_type=sa.BigInteger())
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("memory_estimate")
