"""Each instance's pixel layout, read at ingest, so that the renderer reads frames straight
from the stored bytes after a restart too (`storage.header.PixelLayout`). Instances stored
before have none and are rendered as before.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("pixel_layout", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("instances", "pixel_layout")
