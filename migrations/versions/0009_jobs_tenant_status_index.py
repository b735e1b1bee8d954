"""ix_jobs_tenant_status: a tenant's jobs of one status, newest first

GET /v1/jobs?status=...&cursor=... reads `WHERE tenant_id = ? AND status = ?
AND id < ? ORDER BY id DESC LIMIT n`, and the active-jobs quota counts a
tenant's queued and running jobs: both walk (tenant_id, status, id) in order,
never a tenant's whole history.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""
from alembic import op


revision = '0009'
# Other migrations may be written beside this one; at merge this points at the last of them.
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_jobs_tenant_status', 'jobs', ['tenant_id', 'status', 'id'])


def downgrade() -> None:
    op.drop_index('ix_jobs_tenant_status', table_name='jobs')
