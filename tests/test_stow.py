"""STOW-RS against a running archive: parts stored through the ingest spool, a corrupt
part refused alone with its reason, keys and scopes, and dicomweb-client as a client."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread

from pocketpacs.cli import main
from tests.conftest import spool_files_holding
from tests.test_cstore import small_ct, wait_drained, write

BOUNDARY = "pocketpacs-test-boundary"


@pytest.fixture
def keys(region, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    archive, _ = region
    data = ["--data-dir", str(archive.data_dir)]
    made = {}
    for name, scope in (("ingest", "ingest,read"), ("read", "read")):
        assert main(["keys", "create", "--institution", "north", "--scope", scope, *data]) == 0
        made[name] = capsys.readouterr().out.strip()
    return made


def body(parts: list[tuple[str, bytes]]) -> bytes:
    out = b""
    for content_type, data in parts:
        out += f"--{BOUNDARY}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def stow(archive, key: str, content: bytes, content_type: str | None = None) -> httpx.Response:
    content_type = (
        content_type or f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    )
    return httpx.post(
        f"{archive.http}/dicomweb/studies",
        content=content,
        headers={"Authorization": f"Bearer {key}", "Content-Type": content_type},
        timeout=60,
    )


def rows(data_dir: Path) -> dict[str, tuple]:
    connection = sqlite3.connect(f"file:{data_dir / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        found = connection.execute(
            "SELECT sop_instance_uid, source_institution, source_ae FROM instances"
        ).fetchall()
    finally:
        connection.close()
    return {uid: (institution, ae) for uid, institution, ae in found}


def test_good_parts_stored_and_a_bad_one_refused_alone(region, keys, tmp_path: Path) -> None:
    archive, _ = region
    good = [write(small_ct(number=n, seed="stow"), tmp_path / f"stow{n}.dcm") for n in (1, 2)]
    truncated = good[0].read_bytes()[:-100]
    response = stow(
        archive,
        keys["ingest"],
        body(
            [
                ("application/dicom", good[0].read_bytes()),
                ("application/dicom", truncated),
                ("application/octet-stream", b"not dicom"),
                ("application/dicom", good[1].read_bytes()),
            ]
        ),
    )
    assert response.status_code == 202, response.text
    answer = response.json()
    referenced = [i["00081155"]["Value"][0] for i in answer["00081199"]["Value"]]
    assert referenced == [str(dcmread(p).SOPInstanceUID) for p in good]
    failures = answer["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failures] == [0xC000, 0x0110]
    assert "truncated" in failures[0]["0040A160"]["Value"][0]
    study = str(dcmread(good[0]).StudyInstanceUID)
    assert answer["00081190"]["Value"][0].endswith(f"/dicomweb/studies/{study}")

    wait_drained(archive)
    key_id = keys["ingest"].split("_")[1]
    stored = rows(archive.data_dir)
    for path in good:
        assert stored[str(dcmread(path).SOPInstanceUID)] == ("north", key_id)
    # What went in comes back out unchanged.
    client = DICOMwebClient(
        url=f"{archive.http}/dicomweb", headers={"Authorization": f"Bearer {keys['ingest']}"}
    )
    [back] = client.retrieve_study(study)[:1]
    assert str(back.SOPInstanceUID) in {str(dcmread(p).SOPInstanceUID) for p in good}
    assert not spool_files_holding(archive.data_dir, b"not dicom"), "a refused part left on disk"


def test_refusals(region, keys, tmp_path: Path) -> None:
    archive, _ = region
    good = write(small_ct(number=9, seed="stow-refused"), tmp_path / "one.dcm")
    content = body([("application/dicom", good.read_bytes())])
    assert stow(archive, keys["read"], content).status_code == 403
    assert stow(archive, "ppk_x_y", content).status_code == 401
    wrong = stow(archive, keys["ingest"], good.read_bytes(), "application/dicom")
    assert wrong.status_code == 415 and "multipart/related" in wrong.json()["detail"]
    empty = stow(archive, keys["ingest"], f"--{BOUNDARY}--\r\n".encode())
    assert empty.status_code == 400
    only_bad = stow(archive, keys["ingest"], body([("application/dicom", b"\x00" * 200)]))
    assert only_bad.status_code == 409
    assert only_bad.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert str(dcmread(good).SOPInstanceUID) not in rows(archive.data_dir)


def test_dicomweb_client_stores(region, keys, tmp_path: Path) -> None:
    archive, _ = region
    path = write(small_ct(number=5, seed="stow-client"), tmp_path / "client.dcm")
    client = DICOMwebClient(
        url=f"{archive.http}/dicomweb", headers={"Authorization": f"Bearer {keys['ingest']}"}
    )
    answer = client.store_instances([dcmread(path)])
    assert "00081199" in answer
    wait_drained(archive)
    assert str(dcmread(path).SOPInstanceUID) in rows(archive.data_dir)


def test_storing_into_a_named_study_refuses_other_studies(region, keys, tmp_path: Path) -> None:
    archive, _ = region
    mine = write(small_ct(number=1, seed="stow-named"), tmp_path / "mine.dcm")
    other = write(small_ct(number=1, seed="stow-other"), tmp_path / "other.dcm")
    study = str(dcmread(mine).StudyInstanceUID)
    response = httpx.post(
        f"{archive.http}/dicomweb/studies/{study}",
        content=body(
            [("application/dicom", mine.read_bytes()), ("application/dicom", other.read_bytes())]
        ),
        headers={
            "Authorization": f"Bearer {keys['ingest']}",
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
        },
        timeout=60,
    )
    assert response.status_code == 202, response.text
    [failed] = response.json()["00081198"]["Value"]
    assert failed["00081155"]["Value"] == [str(dcmread(other).SOPInstanceUID)]
    assert failed["00081197"]["Value"] == [0xA900]
    assert "Study Instance UID differs" in failed["0040A160"]["Value"][0]
    bad_path = httpx.post(
        f"{archive.http}/dicomweb/studies/not.a.uid!",
        content=body([("application/dicom", mine.read_bytes())]),
        headers={"Authorization": f"Bearer {keys['ingest']}"},
        timeout=60,
    )
    assert bad_path.status_code == 400
