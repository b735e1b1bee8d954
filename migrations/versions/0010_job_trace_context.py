"""jobs.trace_context: the creating request's trace context

While traces are on (GENQ_OTEL_ENDPOINT), a job keeps the W3C trace context of
the request that created it, so the worker's span for the job joins that
trace (genq/tracing.py). Null otherwise; nothing reads it for a poll.

Revision ID: 0010_job_trace_context
Revises: 0009
Create Date: 2026-12-04
"""
import sqlalchemy as sa
from alembic import op


revision = '0010_job_trace_context'
# Other migrations may be written beside this one; at merge this points at the last of them.
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('trace_context', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:  # SQLite drops a column by copying the table
        batch.drop_column('trace_context')
