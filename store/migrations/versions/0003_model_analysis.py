"""models.analysis: the layer table an upload's analysis found, for feasibility checks without loading the model

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05 04:00:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: rows from before this revision have none; the API analyses their file again on first reuse.
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('analysis', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_column('analysis')
