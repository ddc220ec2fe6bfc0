"""An index for person-name searches on patients, in the form each database can use for a
case-insensitive exact or prefix match (see `storage.query.NameLike`).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # SQLite's LIKE ignores (ASCII) case, and uses an index of the NOCASE collation.
        op.execute("CREATE INDEX ix_patients_name ON patients (patient_name COLLATE NOCASE)")
    else:
        # text_pattern_ops: usable by LIKE 'prefix%' whatever the database's collation.
        op.execute(
            "CREATE INDEX ix_patients_name ON patients (lower(patient_name) text_pattern_ops)"
        )


def downgrade() -> None:
    op.execute("DROP INDEX ix_patients_name")
