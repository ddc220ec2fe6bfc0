"""The metadata index: patient, study, series, instance (PS3.4 C.6 information model).

Column names are the DICOM keywords in snake_case. Each level holds the attributes that
C-FIND and QIDO-RS match on at that level; the instance row also records where the bytes
came from and where they are (institution, calling AE, received time, size, SHA-256,
transfer syntax, object key). The schema is created and changed only by the Alembic
migrations in `storage/migrations`.
"""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# UIDs are validated (at most 64 characters) before they reach the index. Other values are
# stored whole and unbounded: real headers exceed their VR's maximum length often enough,
# and an archive must not refuse or cut a study for it.
UI = String(64)
LO = SH = CS = PN = TM = String()


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("patient_id", "issuer_of_patient_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(LO, default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(LO, default="")
    # Indexed for case-insensitive search in a form per database (migration 0003).
    patient_name: Mapped[str] = mapped_column(PN, default="")
    patient_birth_date: Mapped[date | None] = mapped_column(Date)
    patient_sex: Mapped[str] = mapped_column(CS, default="")


class Study(Base):
    __tablename__ = "studies"
    __table_args__ = (
        Index("ix_studies_patient", "patient_pk"),
        Index("ix_studies_study_date", "study_date"),
        Index("ix_studies_accession_number", "accession_number"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UI, unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.id"))
    study_date: Mapped[date | None] = mapped_column(Date)
    study_time: Mapped[str] = mapped_column(TM, default="")
    accession_number: Mapped[str] = mapped_column(SH, default="")
    study_id: Mapped[str] = mapped_column(SH, default="")
    study_description: Mapped[str] = mapped_column(LO, default="")
    referring_physician_name: Mapped[str] = mapped_column(PN, default="")
    institution_name: Mapped[str] = mapped_column(LO, default="")
    source_institution: Mapped[str] = mapped_column(LO, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Series(Base):
    __tablename__ = "series"
    __table_args__ = (Index("ix_series_study", "study_pk"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UI, unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    modality: Mapped[str] = mapped_column(CS, default="")
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str] = mapped_column(LO, default="")
    body_part_examined: Mapped[str] = mapped_column(CS, default="")
    series_date: Mapped[date | None] = mapped_column(Date)
    series_time: Mapped[str] = mapped_column(TM, default="")


class Instance(Base):
    __tablename__ = "instances"
    __table_args__ = (Index("ix_instances_series", "series_pk"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UI, unique=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"))
    sop_class_uid: Mapped[str] = mapped_column(UI)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax_uid: Mapped[str] = mapped_column(UI)
    source_institution: Mapped[str] = mapped_column(LO, default="")
    source_ae: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    object_key: Mapped[str] = mapped_column(String(255), unique=True)
    # Where the frames lie and how they are displayed (`storage.header.PixelLayout`, as
    # text), for the renderer; none for compressed and other pixel data it does not cover.
    pixel_layout: Mapped[str | None] = mapped_column(Text)


# The registry and the audit trail (issue 3): who may call, with what, and what they did.


class Institution(Base):
    """A hospital on the platform; every caller and every stored study belongs to one."""

    __tablename__ = "institutions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(LO, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Node(Base):
    """A DICOM peer: its calling AE title identifies the institution, and C-MOVE sends to
    its host and port."""

    __tablename__ = "nodes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(16), unique=True)
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    institution_pk: Mapped[int] = mapped_column(ForeignKey("institutions.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiKey(Base):
    """An HTTP caller's key. Only a SHA-256 of the secret is kept: the key is shown once."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    institution_pk: Mapped[int] = mapped_column(ForeignKey("institutions.id"))
    scopes: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(LO, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AuditEvent(Base):
    """One thing somebody did or tried: who, for which institution, what, when, from where,
    with what outcome, and how many instances it touched."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_at", "at"),
        Index("ix_audit_events_institution_at", "institution", "at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(LO)  # calling AE title, key id, or "cli"
    institution: Mapped[str] = mapped_column(LO, default="")
    action: Mapped[str] = mapped_column(String(32))
    resource: Mapped[str] = mapped_column(LO, default="")
    source: Mapped[str] = mapped_column(LO, default="")  # peer address
    outcome: Mapped[str] = mapped_column(String(16))
    instances: Mapped[int] = mapped_column(Integer, default=0)
    detail: Mapped[str] = mapped_column(LO, default="")


# Pocket film (issue 5): share links a patient opens on a phone.


class Share(Base):
    """A link to one study. Only a SHA-256 of its token is kept (the token is the link and
    is shown once), and of its access code only a SHA-256 taken with the token, so the
    database alone opens nothing."""

    __tablename__ = "shares"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(UI)
    institution: Mapped[str] = mapped_column(String(64))
    created_by: Mapped[str] = mapped_column(LO, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    access_code_sha256: Mapped[str | None] = mapped_column(String(64))
    allow_download: Mapped[bool] = mapped_column(Boolean, default=False)
    views: Mapped[int] = mapped_column(Integer, default=0)
    last_view_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ShareDay(Base):
    """Views of a link on one day (UTC)."""

    __tablename__ = "share_days"
    __table_args__ = (UniqueConstraint("share_pk", "day"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    share_pk: Mapped[int] = mapped_column(ForeignKey("shares.id"))
    day: Mapped[date] = mapped_column(Date)
    views: Mapped[int] = mapped_column(Integer, default=0)


class ShareFailure(Base):
    """A wrong access code (its link) or a token that opens nothing (no link): counted per
    link and per address to lock out guessing."""

    __tablename__ = "share_failures"
    __table_args__ = (
        Index("ix_share_failures_share_at", "share_pk", "at"),
        Index("ix_share_failures_source_at", "source", "at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    share_pk: Mapped[int | None] = mapped_column(ForeignKey("shares.id"))
    source: Mapped[str] = mapped_column(LO)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
