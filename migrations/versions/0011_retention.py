"""Retention and deletes: when a job's outputs were expired, a tenant's own
retention, the storage deletes owed by deleted rows, and the sweep's index

Revision ID: 0011
Revises: 0010_job_trace_context
Create Date: 2026-12-04
"""
from alembic import op
import sqlalchemy as sa


revision = '0011'
# Other migrations may be written beside this one; at merge this points at the last of them.
down_revision = '0010_job_trace_context'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('expired_at', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('tenants') as batch:
        batch.add_column(sa.Column('retention', sa.JSON(), nullable=True))
    op.create_index('ix_jobs_expiry', 'jobs', ['completed_at'], postgresql_where=sa.text('completed_at IS NOT NULL'),
                    sqlite_where=sa.text('completed_at IS NOT NULL'))
    op.create_table(
        'storage_deletes',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), primary_key=True, autoincrement=True),
        sa.Column('key', sa.String(length=300), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index('ix_storage_deletes_next_attempt_at', 'storage_deletes', ['next_attempt_at'])


def downgrade() -> None:
    op.drop_index('ix_storage_deletes_next_attempt_at', table_name='storage_deletes')
    op.drop_table('storage_deletes')
    op.drop_index('ix_jobs_expiry', table_name='jobs')
    with op.batch_alter_table('tenants') as batch:
        batch.drop_column('retention')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('expired_at')
