"""The index search behind C-FIND and QIDO-RS, on SQLite and PostgreSQL: PS3.4 C.2.2.2
matching at every level, computed keys, and the access rule."""

from __future__ import annotations

from dataclasses import replace
from datetime import date

import pytest

from storage import layout
from storage.header import InstanceHeader
from storage.index import Index, Origin
from storage.query import InvalidQuery, Query, QueryLevel, Viewer, locate, search
from tests.test_index import SERIES, STUDY, header

NORTH, SOUTH = Viewer("north"), Viewer("south")


def put(index: Index, h: InstanceHeader, institution: str) -> None:
    key = layout.instance_key(h.study_instance_uid, h.series_instance_uid, h.sop_instance_uid)
    assert index.record(h, Origin(institution=institution, calling_ae="X"), 10, "0" * 64, key)


@pytest.fixture
def region(index: Index) -> Index:
    """North holds two studies of patient P1 (CT 3 images + MR 1; CT 1) and one of Zhang;
    south holds one of P1 (same patient ID and issuer) and one of its own patient."""
    base = header("1.1", issuer_of_patient_id="REGION", patient_id="P1", patient_name="Doe^Jane")
    for n in range(3):
        put(index, replace(base, sop_instance_uid=f"1.1.{n}", instance_number=n + 1), "north")
    put(
        index,
        replace(base, sop_instance_uid="1.1.9", series_instance_uid="2.2.9", modality="MR"),
        "north",
    )
    put(
        index,
        replace(
            base,
            sop_instance_uid="1.2.1",
            study_instance_uid="3.2",
            series_instance_uid="2.3",
            study_date=date(2025, 6, 30),
            study_time="230000",
            accession_number="ACC2",
        ),
        "north",
    )
    put(
        index,
        header(
            "1.3.1",
            study="3.3",
            series="2.4",
            patient_id="Z9",
            issuer_of_patient_id="REGION",
            patient_name="Zhang^Ming",
            study_date=date(2026, 11, 20),
        ),
        "north",
    )
    put(
        index,
        replace(
            base,
            sop_instance_uid="1.4.1",
            study_instance_uid="3.4",
            series_instance_uid="2.5",
            study_date=date(2026, 10, 1),
            accession_number="S-ACC",
        ),
        "south",
    )
    put(
        index,
        header(
            "1.5.1",
            study="3.5",
            series="2.6",
            patient_id="S7",
            issuer_of_patient_id="REGION",
            patient_name="Smith^John",
        ),
        "south",
    )
    return index


def studies(index: Index, viewer: Viewer, **keys: str) -> list[str]:
    found = search(index, Query(QueryLevel.STUDY, keys), viewer)
    return sorted(str(m["StudyInstanceUID"]) for m in found)


def test_single_value_wildcard_and_case_insensitive_names(region: Index) -> None:
    assert studies(region, NORTH, AccessionNumber="ACC2") == ["3.2"]
    assert studies(region, NORTH, PatientName="doe^jane") == [STUDY, "3.2"]
    assert studies(region, NORTH, PatientName="ZHANG*") == ["3.3"]
    assert studies(region, NORTH, PatientName="Zh?ng^M*") == ["3.3"]
    assert studies(region, NORTH, AccessionNumber="acc2") == []  # only names ignore case
    assert studies(region, NORTH, PatientName="*") == [STUDY, "3.2", "3.3"]
    # SQL wildcards in a value are plain characters.
    assert studies(region, NORTH, PatientName="Doe%") == []


def test_date_and_time_ranges_and_uid_lists(region: Index) -> None:
    assert studies(region, NORTH, StudyDate="20261101") == [STUDY]
    assert studies(region, NORTH, StudyDate="20251201-") == [STUDY, "3.3"]
    assert studies(region, NORTH, StudyDate="-20251231") == ["3.2"]
    assert studies(region, NORTH, StudyDate="20250101-20261101") == [STUDY, "3.2"]
    assert studies(region, NORTH, StudyTime="2200-2359") == ["3.2"]
    assert studies(region, NORTH, StudyTime="-1015") == [STUDY, "3.3"]
    assert studies(region, NORTH, StudyInstanceUID="3.2\\3.3\\3.9") == ["3.2", "3.3"]
    with pytest.raises(InvalidQuery, match="StudyDate"):
        studies(region, NORTH, StudyDate="2026-13-01")


def test_computed_keys_and_modalities_in_study(region: Index) -> None:
    [match] = search(
        region,
        Query(
            QueryLevel.STUDY,
            {
                "StudyInstanceUID": STUDY,
                "ModalitiesInStudy": "",
                "NumberOfStudyRelatedSeries": "",
                "NumberOfStudyRelatedInstances": "",
                "PatientName": "",
            },
        ),
        NORTH,
    )
    assert match["ModalitiesInStudy"] == ["CT", "MR"]
    assert match["NumberOfStudyRelatedSeries"] == 2
    assert match["NumberOfStudyRelatedInstances"] == 4
    assert match["PatientName"] == "Doe^Jane"
    assert studies(region, NORTH, ModalitiesInStudy="MR") == [STUDY]
    assert studies(region, NORTH, ModalitiesInStudy="MR\\CT") == [STUDY, "3.2", "3.3"]


def test_every_level(region: Index) -> None:
    patients = search(
        region,
        Query(QueryLevel.PATIENT, {"PatientID": "", "NumberOfPatientRelatedStudies": ""}),
        NORTH,
    )
    assert {(m["PatientID"], m["NumberOfPatientRelatedStudies"]) for m in patients} == {
        ("P1", 2),
        ("Z9", 1),
    }
    series = search(
        region,
        Query(
            QueryLevel.SERIES,
            {"StudyInstanceUID": STUDY, "Modality": "", "NumberOfSeriesRelatedInstances": ""},
        ),
        NORTH,
    )
    assert sorted((m["Modality"], m["NumberOfSeriesRelatedInstances"]) for m in series) == [
        ("CT", 3),
        ("MR", 1),
    ]
    images = search(
        region,
        Query(QueryLevel.IMAGE, {"SeriesInstanceUID": SERIES, "InstanceNumber": ""}),
        NORTH,
    )
    assert sorted(m["InstanceNumber"] for m in images) == [1, 2, 3]
    assert all("SOPInstanceUID" in m for m in images)
    page = search(
        region,
        Query(QueryLevel.IMAGE, {"SeriesInstanceUID": SERIES}, limit=2, offset=1),
        NORTH,
    )
    assert len(page) == 2
    with pytest.raises(InvalidQuery, match="below the STUDY level"):
        search(region, Query(QueryLevel.STUDY, {"Modality": "CT"}), NORTH)


def test_other_institutions_only_through_an_exact_patient_identifier(region: Index) -> None:
    # Browsing: south sees only what south sent, whatever the wildcard.
    assert studies(region, SOUTH, PatientName="*") == ["3.4", "3.5"]
    assert studies(region, SOUTH, StudyDate="19000101-") == ["3.4", "3.5"]
    assert studies(region, SOUTH, PatientID="P*", IssuerOfPatientID="REGION") == ["3.4"]
    assert studies(region, SOUTH, PatientID="P1") == ["3.4"]  # no issuer: no recognition
    # Result recognition: the exact identifier shows the patient's studies everywhere.
    assert studies(region, SOUTH, PatientID="P1", IssuerOfPatientID="REGION") == [
        STUDY,
        "3.2",
        "3.4",
    ]
    # ... and only that patient's.
    assert studies(region, SOUTH, PatientID="Z9", IssuerOfPatientID="OTHER") == []
    patients = search(region, Query(QueryLevel.PATIENT, {"PatientID": ""}), SOUTH)
    assert sorted(m["PatientID"] for m in patients) == ["P1", "S7"]
    images = search(region, Query(QueryLevel.IMAGE, {"StudyInstanceUID": STUDY}), SOUTH)
    assert images == []


def test_a_configured_regional_identifier_recognises_without_the_issuer(region: Index) -> None:
    regional = Viewer("south", regional_issuer="REGION")
    # P1's issuer is the regional one: the PatientID alone is enough.
    assert studies(region, regional, PatientID="P1") == [STUDY, "3.2", "3.4"]
    # Not with a wildcard, and not for a hospital's own local identifiers.
    assert studies(region, regional, PatientID="P*") == ["3.4"]
    assert studies(region, Viewer("south", regional_issuer="NATIONAL"), PatientID="P1") == ["3.4"]
    # An explicit issuer still works as before.
    assert studies(region, regional, PatientID="Z9", IssuerOfPatientID="REGION") == ["3.3"]
    # A patient's counts cover what the identifier makes visible, nothing more: all of
    # P1's studies, but of L5 (a local identifier, seen at both hospitals) only south's.
    for n, institution in enumerate(("north", "south")):
        local = header(f"1.9.{n}", study=f"3.9.{n}", series=f"2.9.{n}", patient_id="L5")
        put(region, replace(local, issuer_of_patient_id="LOCAL"), institution)
    counts = {"NumberOfPatientRelatedStudies": "", "NumberOfPatientRelatedInstances": ""}
    for patient_id, expected in (("P1", (3, 6)), ("L5", (1, 1))):
        [patient] = search(
            region, Query(QueryLevel.PATIENT, {"PatientID": patient_id, **counts}), regional
        )
        assert (
            patient["NumberOfPatientRelatedStudies"],
            patient["NumberOfPatientRelatedInstances"],
        ) == expected


def test_searches_of_one_shape_share_a_statement_not_its_values(region: Index) -> None:
    """Searches that differ only in their values (or in who asks) run one statement, built
    once for their shape: each is still answered with its own values."""
    for dates, expected in (
        ("20250101-20251231", ["3.2"]),
        ("20261101-20261231", [STUDY, "3.3"]),
        ("20250701-20251231", []),
    ):
        assert studies(region, NORTH, StudyDate=dates) == expected
    assert studies(region, NORTH, StudyInstanceUID="3.3\\3.9") == ["3.3"]
    listed = f"3.2\\3.3\\3.9\\{STUDY}"
    assert studies(region, NORTH, StudyInstanceUID=listed) == [STUDY, "3.2", "3.3"]
    assert studies(region, NORTH, PatientName="*") == [STUDY, "3.2", "3.3"]
    assert studies(region, SOUTH, PatientName="*") == ["3.4", "3.5"]
    pages = [
        search(region, Query(QueryLevel.STUDY, {"StudyInstanceUID": ""}, limit=1, offset=n), NORTH)
        for n in range(4)
    ]
    assert [[m["StudyInstanceUID"] for m in page] for page in pages] == [
        [STUDY],
        ["3.2"],
        ["3.3"],
        [],
    ]


@pytest.mark.parametrize(
    ("keys", "studies"),
    [
        ({"StudyTime": "220000-235959"}, {"3.2"}),  # a condition with literals of its own
        ({"StudyInstanceUID": "3.2\\3.3"}, {"3.2", "3.3"}),  # a list: expanded by SQLAlchemy
        ({"PatientID": "P1", "AccessionNumber": "ACC2"}, {"3.2"}),
    ],
)
def test_a_retrieval_locates_what_a_search_matches(region: Index, keys, studies) -> None:
    """C-MOVE, C-GET and WADO-RS locate instances (`locate`, run on the driver's own
    connection) with the matching and the access rule of a search, on either database."""
    found = search(
        region,
        Query(QueryLevel.STUDY, {**keys, "StudyInstanceUID": keys.get("StudyInstanceUID", "")}),
        NORTH,
    )
    located = locate(region, Query(QueryLevel.STUDY, keys), NORTH)
    assert {m["StudyInstanceUID"] for m in found} == studies
    assert {item.study_instance_uid for item in located} == studies
