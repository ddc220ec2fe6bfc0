"""The metadata index on SQLite and PostgreSQL: schema, upserts under concurrency, queries."""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import replace
from datetime import date

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, text

from storage import layout
from storage.header import InstanceHeader
from storage.index import Index, Origin
from storage.models import Base, Instance, Patient, Study
from storage.query import Query, QueryLevel, Viewer, locate

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.1.1"
ORIGIN = Origin(institution="north", calling_ae="MODALITY1", route="cstore")


def header(
    sop: str, study: str = STUDY, series: str = SERIES, **overrides: object
) -> InstanceHeader:
    values: dict = {
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "sop_instance_uid": sop,
        "study_instance_uid": study,
        "series_instance_uid": series,
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "patient_id": "PID0001",
        "issuer_of_patient_id": "",
        "patient_name": "Doe^Jane",
        "patient_birth_date": date(1970, 1, 1),
        "patient_sex": "F",
        "study_date": date(2026, 11, 1),
        "study_time": "101500",
        "accession_number": "ACC1",
        "study_id": "1",
        "study_description": "CT head",
        "referring_physician_name": "",
        "institution_name": "Test Hospital",
        "modality": "CT",
        "series_number": 1,
        "series_description": "axial",
        "body_part_examined": "HEAD",
        "series_date": None,
        "series_time": "",
        "instance_number": 1,
        "number_of_frames": None,
        "rows": 512,
        "columns": 512,
        "specific_character_set": "",
    }
    values.update(overrides)
    return InstanceHeader(**values)


def record(index: Index, h: InstanceHeader, size: int = 1000, sha: str = "0" * 64) -> bool:
    key = layout.instance_key(h.study_instance_uid, h.series_instance_uid, h.sop_instance_uid)
    return index.record(h, ORIGIN, size, sha, key)


def test_migrate_creates_schema_and_is_idempotent(index: Index) -> None:
    tables = set(inspect(index.engine).get_table_names())
    assert {
        "patients",
        "studies",
        "series",
        "instances",
        "institutions",
        "nodes",
        "api_keys",
        "audit_events",
        "shares",
        "share_days",
        "share_failures",
        "alembic_version",
    } <= tables
    with index.engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).all() == [
            ("0005",)
        ]
    assert record(index, header("1.2.3.1"))

    # Every start migrates: a second (and third) run must change nothing and keep the data.
    index.migrate()
    index.migrate()
    with index.engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).all() == [
            ("0005",)
        ]
    assert index.counts() == {"patients": 1, "studies": 1, "series": 1, "instances": 1}
    assert index.find("1.2.3.1") is not None


def test_models_and_migrations_do_not_drift(index: Index) -> None:
    """What the ORM models declare is exactly what the migrations built, but for the name
    index, which each database has in its own form (migration 0003) and no model declares."""

    def compared(_object, name, type_, _reflected, _compare_to) -> bool:
        return not (type_ == "index" and name == "ix_patients_name")

    with index.engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={
                "compare_type": True,
                "compare_server_default": True,
                "include_object": compared,
            },
        )
        differences = compare_metadata(context, Base.metadata)
    assert differences == []


def test_record_is_true_once_then_false(index: Index) -> None:
    h = header("1.2.3.10")
    assert record(index, h, size=1234, sha="a" * 64) is True
    # The same SOP Instance UID again, even with other bytes: the first row stays.
    assert record(index, h, size=999, sha="b" * 64) is False
    found = index.find("1.2.3.10")
    assert found is not None
    assert (found.size, found.sha256) == (1234, "a" * 64)
    assert index.counts()["instances"] == 1


def test_instances_of_one_series_share_patient_study_and_series(index: Index) -> None:
    assert record(index, header("1.2.3.21", instance_number=1))
    # The second instance carries other study attributes: the first writer's win.
    assert record(index, header("1.2.3.22", instance_number=2, study_description="other"))
    assert index.counts() == {"patients": 1, "studies": 1, "series": 1, "instances": 2}
    first, second = index.find("1.2.3.21"), index.find("1.2.3.22")
    assert first is not None and second is not None
    assert (first.study_instance_uid, first.series_instance_uid) == (STUDY, SERIES)
    assert (second.study_instance_uid, second.series_instance_uid) == (STUDY, SERIES)
    with index.session() as session:
        assert session.execute(select(Study.study_description)).scalars().all() == ["CT head"]
        series_pks = session.execute(select(Instance.series_pk)).scalars().all()
        assert len(set(series_pks)) == 1
        assert session.execute(select(Patient.patient_name)).scalars().all() == ["Doe^Jane"]

    # A second series of the same study adds a series row, not a study or patient row.
    assert record(index, header("1.2.3.23", series=SERIES + ".2"))
    assert index.counts() == {"patients": 1, "studies": 1, "series": 2, "instances": 3}


def test_concurrent_records_of_one_new_study(index: Index) -> None:
    """Eight writers recording a new study at once: no error, one study, one patient."""
    threads_count, per_thread = 8, 12
    barrier = threading.Barrier(threads_count)
    errors: list[BaseException] = []
    results: list[bool] = []
    lock = threading.Lock()

    def writer(number: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                series = f"{SERIES}.{i % 3}"  # three series, created concurrently too
                h = header(f"1.2.3.4.{number}.{i}", series=series, instance_number=i)
                inserted = record(index, h)
                with lock:
                    results.append(inserted)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert results == [True] * (threads_count * per_thread)
    assert index.counts() == {
        "patients": 1,
        "studies": 1,
        "series": 3,
        "instances": threads_count * per_thread,
    }


def test_concurrent_records_of_the_same_instance(index: Index) -> None:
    """The same SOP Instance from eight writers at once: exactly one of them inserts."""
    barrier = threading.Barrier(8)
    results: list[bool | BaseException] = []

    def writer() -> None:
        barrier.wait()
        try:
            results.append(record(index, header("1.2.3.99")))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results, key=repr) == [False] * 7 + [True]
    assert index.counts()["instances"] == 1


def test_find_returns_where_the_object_is(index: Index) -> None:
    h = header("1.2.3.31")
    key = layout.instance_key(STUDY, SERIES, "1.2.3.31")
    assert index.record(h, ORIGIN, 52_428_800_000, "c" * 64, key)  # sizes above 2**32 fit
    found = index.find("1.2.3.31")
    assert found is not None
    assert found.sop_instance_uid == "1.2.3.31"
    assert found.object_key == f"dicom/{STUDY}/{SERIES}/1.2.3.31.dcm"
    assert found.size == 52_428_800_000
    assert found.sha256 == "c" * 64
    assert index.find("1.2.3.32") is None

    with index.session() as session:
        row = session.execute(select(Instance).where(Instance.sop_instance_uid == "1.2.3.31"))
        instance = row.scalar_one()
        assert (instance.source_institution, instance.source_ae) == ("north", "MODALITY1")
        assert instance.transfer_syntax_uid == "1.2.840.10008.1.2.1"
        assert instance.received_at is not None


def test_iter_by_key_is_bytewise_key_order(index: Index) -> None:
    # UIDs chosen so that bytewise order differs from numeric or "natural" order, and a
    # component boundary ('/' 0x2F) sorts after '.' (0x2E).
    studies = ["1.2.9", "1.2.10", "1.2", "1.23", "12.1", "1.2.3"]
    keys = []
    for n, study in enumerate(studies):
        for sop in (f"2.{n}.1", f"2.{n}.10", f"2.{n}.9"):
            h = header(sop, study=study, series=f"{study}.7")
            assert record(index, h)
            keys.append(layout.instance_key(study, f"{study}.7", sop))
    listed = [row.object_key for row in index.iter_by_key()]
    assert listed == sorted(keys, key=lambda k: k.encode())
    assert len(listed) == 18


def test_iter_by_key_on_an_empty_index(index: Index) -> None:
    assert list(index.iter_by_key()) == []


def test_counts(index: Index) -> None:
    assert index.counts() == {"patients": 0, "studies": 0, "series": 0, "instances": 0}
    for n in range(3):
        assert record(index, header(f"1.2.5.{n}"))
    other_patient = header("1.2.6.1", study="1.2.6", series="1.2.6.1", patient_id="PID0002")
    assert record(index, other_patient)
    # Same patient ID under another issuer is another patient.
    issuer = replace(
        other_patient,
        sop_instance_uid="1.2.7.1",
        study_instance_uid="1.2.7",
        series_instance_uid="1.2.7.1",
        issuer_of_patient_id="OTHER",
    )
    assert record(index, issuer)
    assert index.counts() == {"patients": 3, "studies": 3, "series": 3, "instances": 5}


def test_sqlite_lookups_see_each_commit_and_ended_threads_close_their_files(tmp_path) -> None:
    """Lookups by UID run on a SQLite connection of each thread's own (`Index.rows`): one
    made after a connection opened still sees every instance recorded since, and the
    connections of threads that have ended are closed, so an archive whose HTTP worker
    threads come and go does not run out of file handles."""
    path = tmp_path / "index.sqlite3"
    index = Index(f"sqlite:///{path}")
    index.migrate()

    def found(uid: str) -> int:
        query = Query(QueryLevel.IMAGE, {"SOPInstanceUID": uid})
        return len(locate(index, query, Viewer.archive()))

    def open_files() -> int:
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(FileNotFoundError):  # the listing's own, closed since
                count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        return count

    assert found("1.2.3.51") == 0
    record(index, header("1.2.3.51"))
    assert found("1.2.3.51") == 1  # on the connection that answered before the commit
    results: list[int] = []
    open_after = []
    for _ in range(5):
        threads = [
            threading.Thread(target=lambda: results.append(found("1.2.3.51"))) for _ in range(20)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        open_after.append(open_files())
    assert results == [1] * 100
    # SQLite holds a closed connection's descriptor while others lock the file, and
    # reuses it: a few more than after the first round, not 20 more each round.
    assert max(open_after) < open_after[0] + 20
    index.dispose()
    assert open_files() == 0
