"""validations.latency_iqr_us and latency_conditions: each latency's spread and how busy the machine was

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 05:15:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("validations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("latency_iqr_us", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("latency_conditions", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("validations", schema=None) as batch_op:
        batch_op.drop_column("latency_conditions")
        batch_op.drop_column("latency_iqr_us")
