"""C-FIND against a running archive with two institutions: DCMTK `findscu` and pynetdicom
as clients, match counts and returned keys checked, and what each hospital may see."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import replace

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from storage.header import InstanceHeader
from storage.index import Index, IndexEntry, Origin
from storage.registry import DEFAULT_INSTITUTION
from tests.conftest import REGION, RunningArchive, dcmtk_env


def findscu(archive: RunningArchive, calling_ae: str, *keys: str, root: str = "-S") -> list[dict]:
    """Run findscu; return each response identifier as keyword -> value (from its dump)."""
    command = ["findscu", "-v", root, "-aet", calling_ae, "-aec", archive.ae_title]
    for key in keys:
        command += ["-k", key]
    command += ["127.0.0.1", str(archive.dicom_port)]
    result = subprocess.run(command, env=dcmtk_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    responses = []
    for block in re.split(r"I: Find Response: \d+ \(Pending\)", result.stdout + result.stderr)[1:]:
        found = {}
        for tag_line in re.finditer(
            r"\(\w{4},\w{4}\) \w\w (?:\[(.*?)\]|\(no value available\)).*?# +\d+, \d+ (\w+)", block
        ):
            found[tag_line.group(2)] = (tag_line.group(1) or "").rstrip()
        responses.append(found)
    return responses


def test_each_institution_browses_only_what_it_sent(region) -> None:
    archive, studies = region
    keys = (
        "QueryRetrieveLevel=STUDY",
        "PatientName=*",
        "StudyInstanceUID",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedInstances",
    )
    north = findscu(archive, "NORTHCT", *keys)
    assert sorted(r["StudyInstanceUID"] for r in north) == sorted([studies["A"], studies["B"]])
    counts = {r["StudyInstanceUID"]: r["NumberOfStudyRelatedInstances"] for r in north}
    assert counts[studies["A"]] == "3"
    assert all(r["ModalitiesInStudy"] == "CT" for r in north)
    south = findscu(archive, "SOUTHCT", *keys)
    assert [r["StudyInstanceUID"] for r in south] == [studies["C"]]
    # Not by date either.
    south = findscu(
        archive, "SOUTHCT", "QueryRetrieveLevel=STUDY", "StudyDate=19000101-", "StudyInstanceUID"
    )
    assert [r["StudyInstanceUID"] for r in south] == [studies["C"]]


def test_result_recognition_through_the_exact_patient_identifier(region) -> None:
    archive, studies = region
    found = findscu(
        archive,
        "SOUTHCT",
        "QueryRetrieveLevel=STUDY",
        "PatientID=P1",
        f"IssuerOfPatientID={REGION}",
        "StudyInstanceUID",
        "PatientName",
    )
    assert sorted(r["StudyInstanceUID"] for r in found) == sorted([studies["A"], studies["C"]])
    assert all(r["PatientName"] == "Doe^Jane" for r in found)
    # A wildcard in the identifier is browsing again.
    found = findscu(
        archive,
        "SOUTHCT",
        "QueryRetrieveLevel=STUDY",
        "PatientID=P*",
        f"IssuerOfPatientID={REGION}",
        "StudyInstanceUID",
    )
    assert [r["StudyInstanceUID"] for r in found] == [studies["C"]]


@contextlib.contextmanager
def querying(
    archive: RunningArchive,
    calling_ae: str,
    with_move: bool,
    *models: str,
    syntaxes: list[str] = DEFAULT_TRANSFER_SYNTAXES,
) -> Iterator[Association]:
    """A pynetdicom association proposing Study Root FIND and `models` (in `syntaxes`),
    and Study Root MOVE too `with_move`: then pynetdicom serves it, else the lean acceptor."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for model in (*models, StudyRootQueryRetrieveInformationModelFind):
        ae.add_requested_context(model, syntaxes)
    if with_move:
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", archive.dicom_port, ae_title=archive.ae_title)
    try:
        assert assoc.is_established
        yield assoc
        assoc.release()
    finally:
        ae.shutdown()


@pytest.mark.parametrize("with_move", [False, True], ids=["find-only", "find-and-move"])
def test_patient_root_levels_with_pynetdicom_and_bad_levels(region, with_move: bool) -> None:
    """The same answers whichever acceptor serves the association: the lean one takes
    query-only associations, pynetdicom those that also propose retrieval."""
    archive, studies = region
    with querying(
        archive, "NORTHCT", with_move, PatientRootQueryRetrieveInformationModelFind
    ) as assoc:

        def ask(model, **keys) -> tuple[list[Dataset], int]:
            identifier = Dataset()
            for keyword, value in keys.items():
                setattr(identifier, keyword, value)
            pending, final = [], None
            for status, answer in assoc.send_c_find(identifier, model):
                if status.Status == 0xFF00:
                    pending.append(answer)
                else:
                    final = status
            return pending, final.Status

        patients, status = ask(
            PatientRootQueryRetrieveInformationModelFind,
            QueryRetrieveLevel="PATIENT",
            PatientID="",
            NumberOfPatientRelatedStudies="",
        )
        assert status == 0x0000
        assert {(p.PatientID, p.NumberOfPatientRelatedStudies) for p in patients} == {
            ("P1", 1),
            ("Z9", 1),
        }
        images, status = ask(
            PatientRootQueryRetrieveInformationModelFind,
            QueryRetrieveLevel="IMAGE",
            PatientID="P1",
            StudyInstanceUID=studies["A"],
            SeriesInstanceUID="",
            SOPInstanceUID="",
            InstanceNumber="",
            Rows=None,
            Columns=None,
            NumberOfFrames="",
        )
        assert status == 0x0000
        assert sorted(int(i.InstanceNumber) for i in images) == [1, 2, 3]
        # US keys come back as numbers, absent values as empty elements.
        assert {(i.Rows, i.Columns) for i in images} == {(64, 64)}
        assert all(i.NumberOfFrames in (None, "") for i in images)
        _, status = ask(StudyRootQueryRetrieveInformationModelFind, QueryRetrieveLevel="PATIENT")
        assert status == 0xA900
        _, status = ask(StudyRootQueryRetrieveInformationModelFind, QueryRetrieveLevel="FRAME")
        assert status == 0xA900
        # A list of 1,300 UIDs (62 KB, about as long as an explicit-VR UI element can be) is
        # matched like any other.
        unknown = [f"2.25.{n + 1}{'7' * 38}" for n in range(1300)]
        listed, status = ask(
            StudyRootQueryRetrieveInformationModelFind,
            QueryRetrieveLevel="STUDY",
            StudyInstanceUID="\\".join([*unknown, studies["A"]]),
        )
        assert status == 0x0000
        assert [str(s.StudyInstanceUID) for s in listed] == [studies["A"]]
        assert assoc.is_established

    connection = sqlite3.connect(f"file:{archive.data_dir / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        queries = connection.execute(
            "SELECT actor, institution, outcome, instances FROM audit_events "
            "WHERE action = 'query' ORDER BY id"
        ).fetchall()
    finally:
        connection.close()
    assert queries == [
        ("NORTHCT", "north", "ok", 2),
        ("NORTHCT", "north", "ok", 3),
        ("NORTHCT", "north", "failed", 0),
        ("NORTHCT", "north", "failed", 0),
        ("NORTHCT", "north", "ok", 1),
    ]


@pytest.mark.parametrize("with_move", [False, True], ids=["find-only", "find-and-move"])
def test_names_in_another_character_set(archive: RunningArchive, tmp_path, with_move) -> None:
    """A patient's name in Chinese (ISO_IR 192, as the region's hospitals send it) is
    matched by wildcard and comes back as stored, whichever acceptor serves the
    association; so does an identifier carrying a sequence."""
    from tests.test_cstore import run_storescu, small_ct, wait_drained, write

    ds = small_ct(seed="utf8-name")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "张^三"
    ds.PatientID = "CN1"
    result = run_storescu(archive, str(write(ds, tmp_path / "cn.dcm")))
    assert result.returncode == 0, result.stdout + result.stderr
    wait_drained(archive)

    with querying(archive, "ANYONE", with_move) as assoc:
        by_name = Dataset()
        by_name.SpecificCharacterSet = "ISO_IR 192"
        by_name.QueryRetrieveLevel = "STUDY"
        by_name.PatientName = "张*"
        by_name.PatientID = ""
        by_id = Dataset()
        by_id.QueryRetrieveLevel = "STUDY"
        by_id.PatientID = "CN1"
        by_id.PatientName = ""
        by_id.ReferencedStudySequence = []
        for identifier in (by_name, by_id):
            responses = list(
                assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
            )
            assert [s.Status for s, _ in responses] == [0xFF00, 0x0000]
            answer = responses[0][1]
            assert (answer.PatientID, str(answer.PatientName)) == ("CN1", "张^三")


@pytest.mark.parametrize("with_move", [False, True], ids=["find-only", "find-and-move"])
def test_an_unreadable_identifier_gets_0xc000_with_a_reason(archive, with_move) -> None:
    """A value the data dictionary's VR cannot hold (2 bytes for an FD, in Implicit VR):
    0xC000 saying which element, on either acceptor, and the association goes on."""
    with querying(archive, "ANYONE", with_move, syntaxes=[ImplicitVRLittleEndian]) as assoc:
        broken = Dataset()
        broken.QueryRetrieveLevel = "STUDY"
        broken.PatientID = "P1"
        broken.add_new(0x00189087, "OB", b"\x01\x02")  # Diffusion b-value, FD
        [(status, _)] = assoc.send_c_find(broken, StudyRootQueryRetrieveInformationModelFind)
        assert status.Status == 0xC000
        assert status.ErrorComment.startswith("(0018,9087)")
        fine = Dataset()
        fine.QueryRetrieveLevel = "STUDY"
        fine.PatientID = "NOBODY"
        responses = list(assoc.send_c_find(fine, StudyRootQueryRetrieveInformationModelFind))
        assert [s.Status for s, _ in responses] == [0x0000]


def _index_a_large_series(archive: RunningArchive, count: int) -> tuple[str, str]:
    """`count` instances of one series written straight into the archive's index (C-FIND
    reads nothing else), sent by the institution `--open` callers belong to."""
    study, series = f"2.25.{uuid.uuid4().int}", f"2.25.{uuid.uuid4().int}"
    template = InstanceHeader(
        sop_class_uid=CTImageStorage,
        sop_instance_uid="",
        study_instance_uid=study,
        series_instance_uid=series,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        patient_id="MANY",
        issuer_of_patient_id="",
        patient_name="Many^Slices",
        patient_birth_date=None,
        patient_sex="O",
        study_date=None,
        study_time="",
        accession_number="",
        study_id="",
        study_description="",
        referring_physician_name="",
        institution_name="",
        modality="CT",
        series_number=1,
        series_description="",
        body_part_examined="",
        series_date=None,
        series_time="",
        instance_number=None,
        number_of_frames=None,
        rows=512,
        columns=512,
        specific_character_set="",
    )
    origin = Origin(institution=DEFAULT_INSTITUTION, calling_ae="MODALITY", route="cstore")
    entries = []
    for number in range(1, count + 1):
        uid = f"{series}.{number}"
        header = replace(template, sop_instance_uid=uid, instance_number=number)
        entries.append(IndexEntry(header, origin, 1, "0" * 64, f"unused/{uid}"))
    index = Index(f"sqlite:///{archive.data_dir / 'index.sqlite3'}")
    try:
        for start in range(0, count, 500):
            index.record_many(entries[start : start + 500])
    finally:
        index.dispose()
    return study, series


def test_c_cancel_stops_the_responses(archive: RunningArchive) -> None:
    """A peer that cancels after a few responses gets the Cancel status at once, not the
    thousands of matches that remain (DCMTK findscu --cancel)."""
    study, series = _index_a_large_series(archive, 20_000)
    command = ["findscu", "-v", "-S", "-aet", "ANYONE", "-aec", archive.ae_title, "--cancel", "3"]
    for key in ("QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}"):
        command += ["-k", key]
    command += ["-k", f"SeriesInstanceUID={series}", "-k", "SOPInstanceUID"]
    command += ["-k", "InstanceNumber", "127.0.0.1", str(archive.dicom_port)]
    result = subprocess.run(command, env=dcmtk_env(), capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    pending = len(re.findall(r"Find Response: \d+ \(Pending\)", output))
    assert 3 <= pending < 1_000, output[-2000:]
    assert "Received Final Find Response (Cancel" in output, output[-2000:]
    # The archive carries on, and the series is whole.
    images = findscu(
        archive,
        "ANYONE",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={study}",
        "SeriesInstanceUID",
        "NumberOfSeriesRelatedInstances",
    )
    assert [i["NumberOfSeriesRelatedInstances"] for i in images] == ["20000"]
    # The audit trail counts what was sent before the cancel, not what matched.
    connection = sqlite3.connect(f"file:{archive.data_dir / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        [(outcome, instances, detail)] = connection.execute(
            "SELECT outcome, instances, detail FROM audit_events "
            "WHERE action = 'query' AND resource LIKE 'IMAGE %'"
        ).fetchall()
    finally:
        connection.close()
    assert outcome == "partial"
    assert instances == pending
    assert detail == f"cancelled after {pending} of 20000"
