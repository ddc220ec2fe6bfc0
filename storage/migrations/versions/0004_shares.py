"""Pocket film share links, their views per day and wrong access codes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "shares",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("institution", sa.String(64), nullable=False),
        sa.Column("created_by", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("access_code_sha256", sa.String(64), nullable=True),
        sa.Column("allow_download", sa.Boolean(), nullable=False),
        sa.Column("views", sa.Integer(), nullable=False),
        sa.Column("last_view_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "share_days",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("share_pk", sa.Integer(), sa.ForeignKey("shares.id"), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("views", sa.Integer(), nullable=False),
        sa.UniqueConstraint("share_pk", "day"),
    )
    op.create_table(
        "share_failures",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("share_pk", sa.Integer(), sa.ForeignKey("shares.id"), nullable=True),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_share_failures_share_at", "share_failures", ["share_pk", "at"])
    op.create_index("ix_share_failures_source_at", "share_failures", ["source", "at"])


def downgrade() -> None:
    op.drop_table("share_failures")
    op.drop_table("share_days")
    op.drop_table("shares")
