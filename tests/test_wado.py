"""WADO-RS against a running archive with two institutions: studies, series and instances
as multipart/related, metadata from the per-series cache, and who may retrieve what."""

from __future__ import annotations

import re
from io import BytesIO
from pathlib import Path

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import get_frame
from pydicom.uid import generate_uid

from pocketpacs.cli import main
from tests.conftest import REGION, RunningArchive, bucket_of
from tests.dicom_factory import multiframe_rgb
from tests.test_cstore import (
    associated,
    dataset_bytes,
    run_storescu,
    send_raw,  # noqa: F401  (pynetdicom sends files as they are)
    small_ct,
    wait_drained,
    write,
)


@pytest.fixture
def keys(region, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    archive, _ = region
    data = ["--data-dir", str(archive.data_dir)]
    made = {}
    for institution in ("north", "south"):
        assert main(["keys", "create", "--institution", institution, "--scope", "read", *data]) == 0
        made[institution] = capsys.readouterr().out.strip()
    return made


def wado(archive: RunningArchive, path: str, key: str, **params) -> httpx.Response:
    return httpx.get(
        f"{archive.http}/dicomweb{path}",
        params=params,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def parts(response: httpx.Response) -> list[bytes]:
    """The bodies of a multipart/related application/dicom response."""
    assert response.headers["content-type"].startswith(
        'multipart/related; type="application/dicom"'
    ), response.text
    return parts_of(response)


def parts_of(response: httpx.Response) -> list[bytes]:
    """The bodies of any multipart/related response."""
    assert response.status_code == 200, response.text
    content_type = response.headers["content-type"]
    boundary = re.search(r"boundary=(\S+)", content_type).group(1).encode()
    body = response.content
    assert body.endswith(b"--" + boundary + b"--\r\n")
    found = []
    for chunk in body.split(b"--" + boundary)[1:-1]:
        head, _, rest = chunk.partition(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        found.append(rest[:length])
    return found


def sent(tmp_path: Path, letter: str) -> dict[str, bytes]:
    return {
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): dataset_bytes(p.read_bytes())
        for p in sorted(tmp_path.glob(f"{letter}*.dcm"))
    }


def as_received(blobs: list[bytes]) -> dict[str, bytes]:
    return {
        str(dcmread(BytesIO(b), stop_before_pixels=True).SOPInstanceUID): dataset_bytes(b)
        for b in blobs
    }


def test_study_series_and_instance_as_stored(region, keys, tmp_path: Path) -> None:
    archive, studies = region
    want = sent(tmp_path, "A")
    assert as_received(parts(wado(archive, f"/studies/{studies['A']}", keys["north"]))) == want
    [series] = {dcmread(p).SeriesInstanceUID for p in tmp_path.glob("A*.dcm")}
    got = parts(wado(archive, f"/studies/{studies['A']}/series/{series}", keys["north"]))
    assert as_received(got) == want
    uid = next(iter(want))
    one = parts(
        wado(archive, f"/studies/{studies['A']}/series/{series}/instances/{uid}", keys["north"])
    )
    assert as_received(one) == {uid: want[uid]}


def test_another_institution_needs_the_patient_identifier(region, keys) -> None:
    archive, studies = region
    path = f"/studies/{studies['A']}"
    assert wado(archive, path, keys["south"]).status_code == 404
    assert (
        wado(archive, path, keys["south"], PatientID="P1", IssuerOfPatientID="OTHER").status_code
        == 404
    )
    found = parts(wado(archive, path, keys["south"], PatientID="P1", IssuerOfPatientID=REGION))
    assert len(found) == 3
    assert wado(archive, "/studies/1.2.3.999", keys["north"]).status_code == 404
    assert wado(archive, "/studies/../etc", keys["north"]).status_code in (400, 404)
    assert wado(archive, "/studies/1.2.x", keys["north"]).status_code == 400


def test_rendered_images_follow_the_same_rule(region, keys) -> None:
    """A thumbnail or rendered image of another institution's study: only with the exact
    patient identifier, like the study itself; never without a key."""
    archive, studies = region
    thumbnail = f"/studies/{studies['A']}/thumbnail"
    assert wado(archive, thumbnail, keys["south"]).status_code == 404
    shown = wado(archive, thumbnail, keys["south"], PatientID="P1", IssuerOfPatientID=REGION)
    assert shown.status_code == 200
    assert shown.content.startswith(b"\xff\xd8\xff")
    assert wado(archive, thumbnail, keys["north"]).status_code == 200
    assert httpx.get(f"{archive.http}/dicomweb{thumbnail}", timeout=30).status_code == 401


def test_metadata_from_the_series_cache(region, keys, s3_server, tmp_path: Path) -> None:
    archive, studies = region
    [series] = {dcmread(p).SeriesInstanceUID for p in tmp_path.glob("A*.dcm")}
    response = wado(archive, f"/studies/{studies['A']}/series/{series}/metadata", keys["north"])
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/dicom+json")
    items = response.json()
    assert len(items) == 3
    assert all("7FE00010" not in item for item in items)
    assert items[0]["00100010"]["Value"] == [{"Alphabetic": "Doe^Jane"}]
    store = bucket_of(archive, s3_server)
    cached = [o.key for o in store.list("derived/metadata/")]
    assert cached == [f"derived/metadata/{studies['A']}/{series}.json"]

    # A new instance in the series: the cache is rebuilt on the next request.
    ds = small_ct(number=4, seed="find-A")
    ds.PatientID, ds.IssuerOfPatientID, ds.PatientName = "P1", REGION, "Doe^Jane"
    ds.StudyDate = "20261101"
    path = write(ds, tmp_path / "A4.dcm")
    assert run_storescu(archive, str(path), calling_ae="NORTHCT").returncode == 0
    wait_drained(archive)
    response = wado(archive, f"/studies/{studies['A']}/metadata", keys["north"])
    assert len(response.json()) == 4
    uid = str(ds.SOPInstanceUID)
    [one] = wado(
        archive, f"/studies/{studies['A']}/series/{series}/instances/{uid}/metadata", keys["north"]
    ).json()
    assert one["00080018"]["Value"] == [uid]


def test_dicomweb_client_retrieves(region, keys, tmp_path: Path) -> None:
    archive, studies = region
    client = DICOMwebClient(
        url=f"{archive.http}/dicomweb", headers={"Authorization": f"Bearer {keys['north']}"}
    )
    datasets = client.retrieve_study(studies["B"])
    assert [str(d.SOPInstanceUID) for d in datasets] == list(sent(tmp_path, "B"))
    metadata = client.retrieve_study_metadata(studies["B"])
    assert len(metadata) == 1


def _push_as_north(archive: RunningArchive, ds, path: Path) -> tuple[str, str, str]:
    """Store a data set as sent by north's modality, in its own transfer syntax."""
    ds.PatientID, ds.IssuerOfPatientID = "P1", REGION
    ds.save_as(path, enforce_file_format=True)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    with associated(archive, [(str(ds.SOPClassUID), syntax)], calling_ae="NORTHCT") as assoc:
        assert assoc.send_c_store(path).Status == 0x0000
    wait_drained(archive)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def frames_of(archive: RunningArchive, uids: tuple[str, str, str], numbers: str, key: str):
    study, series, sop = uids
    path = f"/studies/{study}/series/{series}/instances/{sop}/frames/{numbers}"
    return wado(archive, path, key)


@pytest.mark.usefixtures("send_raw")
def test_frames_native_and_encapsulated(region, keys, tmp_path: Path) -> None:
    archive, _ = region
    native = dcmread(multiframe_rgb(tmp_path / "rgb", frames=5, size=32, seed="frames"))
    uids = _push_as_north(archive, native, tmp_path / "native.dcm")
    size = 32 * 32 * 3
    response = frames_of(archive, uids, "2,5", keys["north"])
    assert response.headers["content-type"].startswith(
        'multipart/related; type="application/octet-stream"'
    )
    assert parts_of(response) == [native.PixelData[size : 2 * size], native.PixelData[4 * size :]]

    rle = dcmread(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    rle.SOPInstanceUID = generate_uid(entropy_srcs=["frames-rle"])
    rle.file_meta.MediaStorageSOPInstanceUID = rle.SOPInstanceUID
    uids = _push_as_north(archive, rle, tmp_path / "rle.dcm")
    second = get_frame(rle.PixelData, 1, number_of_frames=2)
    assert parts_of(frames_of(archive, uids, "2", keys["north"])) == [second]

    assert frames_of(archive, uids, "3", keys["north"]).status_code == 404
    assert frames_of(archive, uids, "0", keys["north"]).status_code == 400
    assert frames_of(archive, uids, "1,x", keys["north"]).status_code == 400
    assert frames_of(archive, uids, "1", keys["south"]).status_code == 404

    # Three frames declared, two fragments stored: the third cannot be cut out (415 with the
    # reason), the others still can, and the archive carries on.
    short = dcmread(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    short.SOPInstanceUID = generate_uid(entropy_srcs=["frames-short"])
    short.file_meta.MediaStorageSOPInstanceUID = short.SOPInstanceUID
    short.NumberOfFrames = 3
    uids = _push_as_north(archive, short, tmp_path / "short.dcm")
    broken = frames_of(archive, uids, "3", keys["north"])
    assert broken.status_code == 415, broken.text
    assert "cannot extract the frame" in broken.json()["detail"]
    assert parts_of(frames_of(archive, uids, "2", keys["north"])) == [second]
