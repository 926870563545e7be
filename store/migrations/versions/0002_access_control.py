"""access control: api keys, owners, public jobs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 15:15:20.602723
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('owner', sa.String(length=64), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('prefix', sa.String(length=12), nullable=False),
    sa.Column('revoked', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key_hash')
    )
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_keys_owner'), ['owner'], unique=False)

    op.create_table('ownerships',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('owner', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('object_id', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('owner', 'kind', 'object_id', name='uq_ownership')
    )
    with op.batch_alter_table('ownerships', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ownerships_object_id'), ['object_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_ownerships_owner'), ['owner'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        # Jobs from before access control belong to the embedded default's owner, "local".
        batch_op.add_column(sa.Column('owner', sa.String(length=64), nullable=False, server_default='local'))
        batch_op.add_column(sa.Column('public', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.create_index(batch_op.f('ix_jobs_owner'), ['owner'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_owner'))
        batch_op.drop_column('public')
        batch_op.drop_column('owner')

    with op.batch_alter_table('ownerships', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ownerships_owner'))
        batch_op.drop_index(batch_op.f('ix_ownerships_object_id'))

    op.drop_table('ownerships')
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_keys_owner'))

    op.drop_table('api_keys')
