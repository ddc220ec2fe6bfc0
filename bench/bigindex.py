"""A 1,000,000-instance index written straight into pocketpacs' database (SQLite or
PostgreSQL), to measure searches at the size of a regional archive without storing a
terabyte first.

The schema comes from pocketpacs itself (`storage.index.Index(url).migrate()`), so the
tables and indexes are exactly the product's; only the rows are bulk-loaded here. Every
value is a function of SEED: the same rows in both databases, every run.

Shape: 100,000 studies of 50,000 patients (each patient has at least one study, the
other 50,000 studies go to random patients), IssuerOfPatientID "REGION", study dates over
2021-2025, 1-3 series per study, 10 instances per study (study 0 holds one series of 100
instances for image-level searches, and 90 studies hold 9, so the total is exactly
1,000,000). Studies are spread over four institutions; "default" is the one a caller of
`serve --open` belongs to.
"""

from __future__ import annotations

import hashlib
import random
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

SEED = 20261122
PATIENTS = 50_000
STUDIES = 100_000
INSTANCES = 1_000_000
ISSUER = "REGION"
OPEN_INSTITUTION = "default"  # pocketpacs' institution of `serve --open` callers
INSTITUTIONS = (("default", 40), ("north", 25), ("south", 20), ("east", 15))
UID_ROOT = "1.2.826.0.1.3680043.10.1087"
FIRST_DAY = date(2021, 1, 1)
DAYS = (date(2025, 12, 31) - FIRST_DAY).days + 1
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"

# modality: (weight, SOP class, rows, columns, bytes per instance, body parts)
MODALITIES = {
    "CT": (30, "1.2.840.10008.5.1.4.1.1.2", 512, 512, 525_000, ("CHEST", "ABDOMEN", "HEAD")),
    "MR": (20, "1.2.840.10008.5.1.4.1.1.4", 256, 256, 132_000, ("HEAD", "KNEE", "SPINE")),
    "CR": (20, "1.2.840.10008.5.1.4.1.1.1", 2500, 2048, 10_240_000, ("CHEST", "HAND")),
    "DX": (10, "1.2.840.10008.5.1.4.1.1.1.1", 2800, 2300, 12_880_000, ("CHEST", "FOOT")),
    "US": (10, "1.2.840.10008.5.1.4.1.1.6.1", 480, 640, 922_000, ("ABDOMEN", "HEART")),
    "MG": (5, "1.2.840.10008.5.1.4.1.1.1.2", 3328, 2560, 17_040_000, ("BREAST",)),
    "PT": (5, "1.2.840.10008.5.1.4.1.1.128", 128, 128, 34_000, ("WHOLEBODY",)),
}
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
_SURNAME_SYLLABLES = ("BA", "KO", "LI", "MA", "NE", "RO", "SA", "TU", "VE", "DI", "GA", "HO")
_GIVEN_SYLLABLES = ("AN", "EL", "IS", "OR", "UL", "AM", "EN", "IR", "OL", "US", "AR", "ET")


@dataclass(frozen=True)
class StudyPlan:
    patient: int
    day: int  # days after FIRST_DAY
    institution: str
    modality: str
    series_sizes: tuple[int, ...]


@dataclass
class Plan:
    """The whole index in compact form; the rows are derived from it on the fly."""

    names: list[str] = field(default_factory=list)
    births: list[date] = field(default_factory=list)
    sexes: list[str] = field(default_factory=list)
    studies: list[StudyPlan] = field(default_factory=list)

    @property
    def series_count(self) -> int:
        return sum(len(s.series_sizes) for s in self.studies)

    @property
    def instance_count(self) -> int:
        return sum(sum(s.series_sizes) for s in self.studies)


def patient_id(number: int) -> str:
    return f"MRN{number + 1:08d}"


def study_uid(number: int) -> str:
    return f"{UID_ROOT}.1.{number + 1}"


def series_uid(study: int, k: int) -> str:
    return f"{UID_ROOT}.2.{study + 1}.{k + 1}"


def sop_uid(study: int, k: int, i: int) -> str:
    return f"{UID_ROOT}.3.{study + 1}.{k + 1}.{i + 1}"


def study_date(plan: StudyPlan) -> date:
    return FIRST_DAY + timedelta(days=plan.day)


def _split(total: int, parts: int) -> tuple[int, ...]:
    base, extra = divmod(total, parts)
    return tuple(base + (1 if k < extra else 0) for k in range(parts))


def make_plan(seed: int = SEED) -> Plan:
    """Patients and studies, drawn from one seeded generator."""
    rng = random.Random(seed)
    plan = Plan()
    for _ in range(PATIENTS):
        surname = "".join(rng.choice(_SURNAME_SYLLABLES) for _ in range(3))
        given = "".join(rng.choice(_GIVEN_SYLLABLES) for _ in range(2))
        plan.names.append(f"{surname}^{given}")
        plan.births.append(date(1930, 1, 1) + timedelta(days=rng.randrange(365 * 85)))
        plan.sexes.append(rng.choice("FM"))
    institutions = [name for name, _ in INSTITUTIONS]
    weights = [w for _, w in INSTITUTIONS]
    modalities = list(MODALITIES)
    modality_weights = [m[0] for m in MODALITIES.values()]
    for number in range(STUDIES):
        patient = number if number < PATIENTS else rng.randrange(PATIENTS)
        day = rng.randrange(DAYS)
        institution = rng.choices(institutions, weights)[0]
        modality = rng.choices(modalities, modality_weights)[0]
        parts = rng.randint(1, 3)
        if number == 0:  # the 100-instance series, visible to an --open caller
            institution, modality, sizes = OPEN_INSTITUTION, "CT", (100,)
        else:
            sizes = _split(9 if number <= 90 else 10, parts)
        plan.studies.append(StudyPlan(patient, day, institution, modality, sizes))
    assert plan.instance_count == INSTANCES, plan.instance_count
    return plan


# rows, in the column order of the INSERTs below -------------------------------------------

PATIENT_COLUMNS = (
    "id",
    "patient_id",
    "issuer_of_patient_id",
    "patient_name",
    "patient_birth_date",
    "patient_sex",
)
STUDY_COLUMNS = (
    "id",
    "study_instance_uid",
    "patient_pk",
    "study_date",
    "study_time",
    "accession_number",
    "study_id",
    "study_description",
    "referring_physician_name",
    "institution_name",
    "source_institution",
    "created_at",
)
SERIES_COLUMNS = (
    "id",
    "series_instance_uid",
    "study_pk",
    "modality",
    "series_number",
    "series_description",
    "body_part_examined",
    "series_date",
    "series_time",
)
INSTANCE_COLUMNS = (
    "id",
    "sop_instance_uid",
    "series_pk",
    "sop_class_uid",
    "instance_number",
    "number_of_frames",
    "rows",
    "columns",
    "transfer_syntax_uid",
    "source_institution",
    "source_ae",
    "received_at",
    "size",
    "sha256",
    "object_key",
)


def _time(number: int) -> str:
    return f"{7 + number % 12:02d}{(number * 7) % 60:02d}{(number * 13) % 60:02d}"


def _stamp(day: date, number: int) -> str:
    """A received/created timestamp as SQLAlchemy writes DateTime to SQLite (and
    PostgreSQL reads as UTC)."""
    clock = _time(number)
    return f"{day.isoformat()} {clock[:2]}:{clock[2:4]}:{clock[4:]}.000000"


def patient_rows(plan: Plan) -> Iterator[tuple]:
    for n in range(PATIENTS):
        yield (
            n + 1,
            patient_id(n),
            ISSUER,
            plan.names[n],
            plan.births[n].isoformat(),
            plan.sexes[n],
        )


def study_rows(plan: Plan) -> Iterator[tuple]:
    for n, s in enumerate(plan.studies):
        day = study_date(s)
        body = MODALITIES[s.modality][5][n % len(MODALITIES[s.modality][5])]
        yield (
            n + 1,
            study_uid(n),
            s.patient + 1,
            day.isoformat(),
            _time(n),
            f"ACC{n + 1:09d}",
            str(n % 1000 + 1),
            f"{s.modality} {body}",
            "REFERRER^" + plan.names[(n * 31) % PATIENTS].split("^")[0],
            f"Hospital {s.institution.title()}",
            s.institution,
            _stamp(day, n),
        )


def _walk(plan: Plan) -> Iterator[tuple[int, int, int, StudyPlan, int]]:
    """(series pk, study number, series number in study, study plan, size) in pk order."""
    pk = 0
    for n, s in enumerate(plan.studies):
        for k, size in enumerate(s.series_sizes):
            pk += 1
            yield pk, n, k, s, size


def series_rows(plan: Plan) -> Iterator[tuple]:
    for pk, n, k, s, _size in _walk(plan):
        body = MODALITIES[s.modality][5][n % len(MODALITIES[s.modality][5])]
        yield (
            pk,
            series_uid(n, k),
            n + 1,
            s.modality,
            k + 1,
            f"{s.modality} {body} series {k + 1}",
            body,
            study_date(s).isoformat(),
            _time(n),
        )


def instance_rows(plan: Plan) -> Iterator[tuple]:
    pk = 0
    for series_pk, n, k, s, size in _walk(plan):
        _, sop_class, rows, columns, nbytes, _ = MODALITIES[s.modality]
        received = _stamp(study_date(s), n)
        study, series = study_uid(n), series_uid(n, k)
        for i in range(size):
            pk += 1
            sop = sop_uid(n, k, i)
            yield (
                pk,
                sop,
                series_pk,
                sop_class,
                i + 1,
                None,
                rows,
                columns,
                EXPLICIT_VR_LE,
                s.institution,
                f"{s.institution.upper()}_{s.modality}",
                received,
                nbytes + i,
                hashlib.sha256(sop.encode()).hexdigest(),
                f"dicom/{study}/{series}/{sop}.dcm",
            )


TABLES: tuple[tuple[str, tuple[str, ...], Callable[[Plan], Iterator[tuple]]], ...] = (
    ("patients", PATIENT_COLUMNS, patient_rows),
    ("studies", STUDY_COLUMNS, study_rows),
    ("series", SERIES_COLUMNS, series_rows),
    ("instances", INSTANCE_COLUMNS, instance_rows),
)


# what the benchmark searches for, and how many matches each search must return --------------


def _visible(s: StudyPlan, all_institutions: bool) -> bool:
    return all_institutions or s.institution == OPEN_INSTITUTION


def probes(plan: Plan) -> dict:
    """Search values and expected match counts for an `--open` caller (institution
    "default": sees its own studies, and every study through PatientID + issuer)."""
    by_patient: dict[int, list[StudyPlan]] = {}
    for s in plan.studies:
        by_patient.setdefault(s.patient, []).append(s)
    # A patient with 3 studies, some at other institutions: PatientID alone finds fewer.
    patient = next(
        p
        for p in range(1000, PATIENTS)
        if len(by_patient[p]) == 3
        and 0 < sum(s.institution == OPEN_INSTITUTION for s in by_patient[p]) < 3
    )
    studies = by_patient[patient]
    surname, given = plan.names[patient].split("^")
    prefix = f"{surname}^{given[0]}"
    first = date(2024, 3, 11)
    low, high = first.strftime("%Y%m%d"), (first + timedelta(days=1)).strftime("%Y%m%d")
    in_range = sum(
        1
        for s in plan.studies
        if _visible(s, False) and first <= study_date(s) <= first + timedelta(days=1)
    )
    named = sum(
        1 for s in plan.studies if _visible(s, False) and plan.names[s.patient].startswith(prefix)
    )
    return {
        "patient_id": patient_id(patient),
        "patient_studies_own": sum(_visible(s, False) for s in studies),
        "patient_studies_all": len(studies),
        "date_range": f"{low}-{high}",
        "date_range_studies": in_range,
        "name_pattern": f"{prefix}*",
        "name_studies": named,
        "image_study_uid": study_uid(0),
        "image_series_uid": series_uid(0, 0),
        "image_instances": plan.studies[0].series_sizes[0],
    }


# loading ----------------------------------------------------------------------------------


def _migrate(url: str) -> None:
    """Create the schema with pocketpacs' own migrations."""
    from storage.index import Index

    index = Index(url)
    try:
        index.migrate()
    finally:
        index.dispose()


def load_sqlite(path: Path, plan: Plan, log=print) -> dict:
    """Schema by pocketpacs, rows by executemany in one transaction (synchronous OFF while
    loading: bench data, rebuilt on failure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    _migrate(f"sqlite:///{path}")
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA cache_size=-512000")
        db.execute("BEGIN")
        for table, columns, rows in TABLES:
            started = time.monotonic()
            marks = ", ".join("?" * len(columns))
            db.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows(plan)
            )
            log(f"    sqlite {table}: {time.monotonic() - started:.1f} s")
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return {"load_s": round(time.monotonic() - began, 1), "bytes": path.stat().st_size}


def pg_url(database: str, driver: str = "postgresql+psycopg") -> str:
    return f"{driver}://postgres@127.0.0.1:5432/{database}"


def create_pg_database() -> str:
    """A fresh database with a random name, created from the `test` database."""
    import psycopg

    name = f"bench_query_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_pg_database(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def load_postgresql(database: str, plan: Plan, log=print) -> dict:
    """Schema by pocketpacs, rows by COPY; sequences moved past the loaded ids; ANALYZE,
    as autovacuum would run it shortly after such a load."""
    import psycopg

    began = time.monotonic()
    _migrate(pg_url(database))
    with psycopg.connect(pg_url(database, "postgresql")) as db:
        db.execute("SET synchronous_commit = off")
        for table, columns, rows in TABLES:
            started = time.monotonic()
            with db.cursor() as cursor:
                statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
                with cursor.copy(statement) as copy:
                    for row in rows(plan):
                        copy.write_row(row)
            db.commit()
            log(f"    postgresql {table}: {time.monotonic() - started:.1f} s")
        for table, _, _ in TABLES:
            db.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"(SELECT max(id) FROM {table}))"
            )
        db.commit()
    with psycopg.connect(pg_url(database, "postgresql"), autocommit=True) as db:
        started = time.monotonic()
        db.execute("ANALYZE")
        log(f"    postgresql ANALYZE: {time.monotonic() - started:.1f} s")
        size = db.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    return {"load_s": round(time.monotonic() - began, 1), "bytes": int(size)}
