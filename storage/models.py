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
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
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
