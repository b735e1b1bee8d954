"""A job's batch model: what its batch runs on (its model, or the base a LoRA
fine-tune is served on as an adapter); claims group by it

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04
"""
from alembic import op
import sqlalchemy as sa


revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


LINE = ['status', 'pool', 'tenant_id', sa.text('priority DESC'), 'created_at', 'id']


def upgrade() -> None:
    # SQLite makes the column NOT NULL by copying the table, which cannot carry
    # the indexes on `priority DESC`: they go first and come back after.
    op.drop_index('ix_jobs_claim', table_name='jobs')
    op.drop_index('ix_jobs_line', table_name='jobs')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('batch_model', sa.String(length=200), nullable=True))
    # Jobs queued before: each runs on its own model, as it did.
    op.execute("UPDATE jobs SET batch_model = model")
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.alter_column('batch_model', existing_type=sa.String(length=200), nullable=False)
    op.create_index('ix_jobs_line', 'jobs', LINE, unique=False)
    op.create_index('ix_jobs_claim', 'jobs', ['status', 'batch_model', 'batch_key', 'tenant_id',
                                              sa.text('priority DESC'), 'created_at', 'id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_jobs_claim', table_name='jobs')
    op.drop_index('ix_jobs_line', table_name='jobs')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('batch_model')
    op.create_index('ix_jobs_line', 'jobs', LINE, unique=False)
    op.create_index('ix_jobs_claim', 'jobs', ['status', 'model', 'batch_key', 'tenant_id', sa.text('priority DESC'),
                                              'created_at', 'id'], unique=False)
