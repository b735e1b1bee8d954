"""indexes for the fair line: each tenant's queued jobs in its own order, per
pool and per model and batch key, and each tenant's last start in a pool

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
# Other migrations may be written beside this one; at merge this points at the last of them.
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_claim')
        batch_op.create_index('ix_jobs_claim', ['status', 'model', 'batch_key', 'tenant_id', sa.text('priority DESC'),
                                                'created_at', 'id'], unique=False)
        batch_op.create_index('ix_jobs_line', ['status', 'pool', 'tenant_id', sa.text('priority DESC'), 'created_at',
                                               'id'], unique=False)
        batch_op.create_index('ix_jobs_served', ['pool', 'tenant_id', 'started_at'], unique=False,
                              postgresql_where=sa.text('started_at IS NOT NULL'),
                              sqlite_where=sa.text('started_at IS NOT NULL'))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_served')
        batch_op.drop_index('ix_jobs_line')
        batch_op.drop_index('ix_jobs_claim')
        batch_op.create_index('ix_jobs_claim', ['status', 'model', 'batch_key', 'priority', 'created_at'], unique=False)
