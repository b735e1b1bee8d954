"""A webhook on a batch's end: batches.webhook, and deliveries that belong to a batch instead of a job

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04
"""
from alembic import op
import sqlalchemy as sa


revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('batches') as batch:
        batch.add_column(sa.Column('webhook', sa.Text(), nullable=True))
    with op.batch_alter_table('webhook_deliveries') as batch:
        batch.alter_column('job_id', existing_type=sa.String(length=32), nullable=True)
        batch.add_column(sa.Column('batch_id', sa.String(length=32), nullable=True))
        batch.create_foreign_key(op.f('fk_webhook_deliveries_batch_id_batches'), 'batches', ['batch_id'], ['id'],
                                 ondelete='CASCADE')
    op.create_index('ix_webhook_deliveries_batch', 'webhook_deliveries', ['batch_id', 'id'],
                    postgresql_where=sa.text('batch_id IS NOT NULL'), sqlite_where=sa.text('batch_id IS NOT NULL'))


def downgrade() -> None:
    op.drop_index('ix_webhook_deliveries_batch', table_name='webhook_deliveries')
    op.execute("DELETE FROM webhook_deliveries WHERE job_id IS NULL")
    with op.batch_alter_table('webhook_deliveries') as batch:
        batch.drop_constraint(op.f('fk_webhook_deliveries_batch_id_batches'), type_='foreignkey')
        batch.drop_column('batch_id')
        batch.alter_column('job_id', existing_type=sa.String(length=32), nullable=False)
    with op.batch_alter_table('batches') as batch:
        batch.drop_column('webhook')
