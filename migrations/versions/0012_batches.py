"""OpenAI-style batches: the batches table, and each job's batch and line

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04
"""
from alembic import op
import sqlalchemy as sa


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('batch_id', sa.String(length=32), nullable=True))
        batch.add_column(sa.Column('batch_line', sa.Integer(), nullable=True))
    op.create_index('ix_jobs_batch', 'jobs', ['batch_id', 'batch_line'], postgresql_where=sa.text('batch_id IS NOT NULL'),
                    sqlite_where=sa.text('batch_id IS NOT NULL'))
    op.create_index('ix_jobs_tenant_active', 'jobs', ['tenant_id', 'status', 'id'],
                    postgresql_where=sa.text('batch_id IS NULL'), sqlite_where=sa.text('batch_id IS NULL'))
    op.create_table(
        'batches',
        sa.Column('id', sa.String(length=32), nullable=False),
        sa.Column('tenant_id', sa.String(length=32), nullable=False),
        sa.Column('endpoint', sa.String(length=64), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('input_file_id', sa.String(length=32), nullable=False),
        sa.Column('completion_window', sa.String(length=16), nullable=False),
        sa.Column('total', sa.Integer(), nullable=False),
        sa.Column('output_file_id', sa.String(length=32), nullable=True),
        sa.Column('error_file_id', sa.String(length=32), nullable=True),
        sa.Column('metadata', sa.JSON(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('in_progress_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finalizing_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('cancelling_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('cancelled_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('expired_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_batches_tenant_id_tenants'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_batches')),
    )
    op.create_index('ix_batches_tenant_list', 'batches', ['tenant_id', 'id'])
    op.create_index('ix_batches_open', 'batches', ['status'])


def downgrade() -> None:
    op.drop_index('ix_batches_open', table_name='batches')
    op.drop_index('ix_batches_tenant_list', table_name='batches')
    op.drop_table('batches')
    op.drop_index('ix_jobs_batch', table_name='jobs')
    op.drop_index('ix_jobs_tenant_active', table_name='jobs')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('batch_line')
        batch.drop_column('batch_id')
