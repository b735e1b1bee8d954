"""webhook_secrets.secret becomes webhook_secrets.sealed: the secret sealed
under a key outside the database (a sealed secret is about 164 characters)

Rows keep their plain secret until genq first reads them, or until
`python -m genq.webhook_secrets reencrypt` seals them all: the key is a
setting of the API and the webhook sender, which a migration is not given.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""
from alembic import op
import sqlalchemy as sa


revision = '0008'
# Other migrations may be written beside this one; at merge this points at the last of them.
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('webhook_secrets') as batch:
        batch.alter_column('secret', new_column_name='sealed', existing_type=sa.String(length=100),
                           type_=sa.Text(), existing_nullable=False)


def downgrade() -> None:
    # Code before 0008 reads the column as the secret itself, and nothing here
    # holds the key that opens a sealed one: sealed rows are deleted, and each
    # tenant gets a new secret on its next use (receivers fetch it again).
    op.execute(sa.text("DELETE FROM webhook_secrets WHERE sealed NOT LIKE 'whsec\\_%' ESCAPE '\\'"))
    with op.batch_alter_table('webhook_secrets') as batch:
        batch.alter_column('sealed', new_column_name='secret', existing_type=sa.Text(),
                           type_=sa.String(length=100), existing_nullable=False)
