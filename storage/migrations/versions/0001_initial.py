"""Patient, study, series and instance tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "patients",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("patient_id", sa.String(), nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(), nullable=False),
        sa.Column("patient_name", sa.String(), nullable=False),
        sa.Column("patient_birth_date", sa.Date(), nullable=True),
        sa.Column("patient_sex", sa.String(), nullable=False),
        sa.UniqueConstraint("patient_id", "issuer_of_patient_id"),
    )
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("patient_pk", sa.Integer(), sa.ForeignKey("patients.id"), nullable=False),
        sa.Column("study_date", sa.Date(), nullable=True),
        sa.Column("study_time", sa.String(), nullable=False),
        sa.Column("accession_number", sa.String(), nullable=False),
        sa.Column("study_id", sa.String(), nullable=False),
        sa.Column("study_description", sa.String(), nullable=False),
        sa.Column("referring_physician_name", sa.String(), nullable=False),
        sa.Column("institution_name", sa.String(), nullable=False),
        sa.Column("source_institution", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_studies_patient", "studies", ["patient_pk"])
    op.create_index("ix_studies_study_date", "studies", ["study_date"])
    op.create_index("ix_studies_accession_number", "studies", ["accession_number"])
    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("series_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("study_pk", sa.Integer(), sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("modality", sa.String(), nullable=False),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("series_description", sa.String(), nullable=False),
        sa.Column("body_part_examined", sa.String(), nullable=False),
        sa.Column("series_date", sa.Date(), nullable=True),
        sa.Column("series_time", sa.String(), nullable=False),
    )
    op.create_index("ix_series_study", "series", ["study_pk"])
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("series_pk", sa.Integer(), sa.ForeignKey("series.id"), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("number_of_frames", sa.Integer(), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("columns", sa.Integer(), nullable=True),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("source_institution", sa.String(), nullable=False),
        sa.Column("source_ae", sa.String(16), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("object_key", sa.String(255), nullable=False, unique=True),
    )
    op.create_index("ix_instances_series", "instances", ["series_pk"])


def downgrade() -> None:
    op.drop_table("instances")
    op.drop_table("series")
    op.drop_table("studies")
    op.drop_table("patients")
