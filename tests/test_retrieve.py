"""C-MOVE and C-GET against a running archive with two institutions: DCMTK `movescu` to a
`storescp` the test starts, and `getscu`; files received compared with what was sent."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from pocketpacs.cli import main
from tests.conftest import REGION, RunningArchive, dcmtk_env, free_port
from tests.test_cstore import (
    associated,
    dataset_bytes,
    send_raw,  # noqa: F401  (pynetdicom sends files as they are)
    wait_drained,
)


@pytest.fixture
def destination(region, tmp_path: Path) -> Iterator[Path]:
    """A DCMTK storescp registered as node DEST (institution north); yields its folder."""
    archive, _ = region
    folder = tmp_path / "received"
    folder.mkdir()
    port = free_port()
    process = subprocess.Popen(
        ["storescp", "-aet", "DEST", "-od", str(folder), str(port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    data = ["--data-dir", str(archive.data_dir)]
    assert (
        main(["nodes", "add", "DEST", "127.0.0.1", str(port), "--institution", "north", *data]) == 0
    )
    time.sleep(0.5)
    yield folder
    process.terminate()
    process.wait(10)


def movescu(archive: RunningArchive, calling_ae: str, destination: str, *keys: str) -> str:
    command = ["movescu", "-v", "-S", "-aet", calling_ae, "-aem", destination]
    command += ["-aec", archive.ae_title]
    for key in keys:
        command += ["-k", key]
    command += ["127.0.0.1", str(archive.dicom_port)]
    result = subprocess.run(command, env=dcmtk_env(), capture_output=True, text=True, timeout=120)
    return result.stdout + result.stderr


def received(folder: Path) -> dict[str, bytes]:
    return {
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p.read_bytes()
        for p in folder.iterdir()
    }


def sent(tmp_path: Path, letter: str) -> dict[str, bytes]:
    return {
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p.read_bytes()
        for p in sorted(tmp_path.glob(f"{letter}*.dcm"))
    }


def test_c_move_sends_the_study_as_stored(region, destination: Path, tmp_path: Path) -> None:
    archive, studies = region
    output = movescu(
        archive, "NORTHCT", "DEST", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={studies['A']}"
    )
    assert "Received Final Move Response (Success)" in output, output
    got, want = received(destination), sent(tmp_path, "A")
    assert got.keys() == want.keys()
    for uid in want:
        assert dataset_bytes(got[uid]) == dataset_bytes(want[uid])


def test_c_move_to_an_unknown_destination_is_refused(region, destination: Path) -> None:
    archive, studies = region
    output = movescu(
        archive,
        "NORTHCT",
        "NOWHERE",
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={studies['A']}",
    )
    assert "Received Final Move Response (Refused: MoveDestinationUnknown)" in output, output
    assert list(destination.iterdir()) == []


@pytest.mark.parametrize("model", ["move", "get"])
def test_a_retrieval_that_cannot_be_matched_says_why(region, destination: Path, model) -> None:
    """An unknown query level, C-MOVE and C-GET: 0xA900 with an Error Comment naming it,
    nothing sent."""
    archive, studies = region
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "FRAME"
    identifier.StudyInstanceUID = studies["A"]
    ae = AE(ae_title="NORTHCT")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    sop_class = {
        "move": StudyRootQueryRetrieveInformationModelMove,
        "get": StudyRootQueryRetrieveInformationModelGet,
    }[model]
    ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", archive.dicom_port, ae_title=archive.ae_title)
    try:
        assert assoc.is_established
        if model == "move":
            responses = list(assoc.send_c_move(identifier, "DEST", sop_class))
        else:
            responses = list(assoc.send_c_get(identifier, sop_class))
        final = responses[-1][0]
        assert final.Status == 0xA900
        assert "FRAME" in final.ErrorComment
        assoc.release()
    finally:
        ae.shutdown()
    assert list(destination.iterdir()) == []


def test_other_institutions_retrieve_only_with_the_exact_patient_identifier(
    region,
    destination: Path,
) -> None:
    archive, studies = region
    study = f"StudyInstanceUID={studies['A']}"
    output = movescu(archive, "SOUTHCT", "DEST", "QueryRetrieveLevel=STUDY", study)
    assert list(destination.iterdir()) == [], output
    output = movescu(
        archive,
        "SOUTHCT",
        "DEST",
        "QueryRetrieveLevel=STUDY",
        study,
        "PatientID=P1",
        f"IssuerOfPatientID={REGION}",
    )
    assert "Received Final Move Response (Success)" in output, output
    assert len(list(destination.iterdir())) == 3


def test_c_get_returns_a_series_over_the_same_association(region, tmp_path: Path) -> None:
    archive, studies = region
    folder = tmp_path / "got"
    folder.mkdir()
    command = [
        "getscu",
        "-v",
        "-S",
        "-aet",
        "NORTHCT",
        "-aec",
        archive.ae_title,
        "-od",
        str(folder),
    ]
    command += ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={studies['B']}"]
    command += ["127.0.0.1", str(archive.dicom_port)]
    result = subprocess.run(command, env=dcmtk_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    got, want = received(folder), sent(tmp_path, "B")
    assert got.keys() == want.keys() and len(got) == 1
    for uid in want:
        assert dataset_bytes(got[uid]) == dataset_bytes(want[uid])


@pytest.mark.usefixtures("send_raw")
def test_c_move_counts_sub_operations_and_lists_failed_instances(region, destination: Path) -> None:
    """An instance the destination cannot take (RLE to a storescp accepting only native
    syntaxes) fails alone: the others arrive, and the final response says which failed."""
    archive, studies = region
    rle = dcmread(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    rle.SOPInstanceUID = generate_uid(entropy_srcs=["move-rle"])
    rle.file_meta.MediaStorageSOPInstanceUID = rle.SOPInstanceUID
    rle.StudyInstanceUID = studies["A"]
    rle.PatientID, rle.IssuerOfPatientID = "P1", REGION
    path = destination.parent / "rle.dcm"
    rle.save_as(path, enforce_file_format=True)
    context = [(str(rle.SOPClassUID), str(rle.file_meta.TransferSyntaxUID))]
    with associated(archive, context, calling_ae="NORTHCT") as assoc:
        assert assoc.send_c_store(path).Status == 0x0000
    wait_drained(archive)

    ae = AE(ae_title="NORTHCT")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", archive.dicom_port, ae_title=archive.ae_title)
    try:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = studies["A"]
        responses = list(
            assoc.send_c_move(identifier, "DEST", StudyRootQueryRetrieveInformationModelMove)
        )
        assoc.release()
    finally:
        ae.shutdown()
    final, answer = responses[-1]
    assert final.Status == 0xB000, final
    assert final.NumberOfCompletedSuboperations == 3
    assert final.NumberOfFailedSuboperations == 1
    # One failed instance: a single UI value.
    assert answer.FailedSOPInstanceUIDList == str(rle.SOPInstanceUID)
    assert len(list(destination.iterdir())) == 3
