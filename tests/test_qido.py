"""QIDO-RS against a running archive with two institutions: API keys and scopes, the same
access rule as C-FIND, DICOM JSON, paging, and dicomweb-client as a real client."""

from __future__ import annotations

import sqlite3

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient

from pocketpacs.cli import main
from tests.conftest import REGION, RunningArchive


@pytest.fixture
def keys(region, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """API keys: north and south with read, north without it."""
    archive, _ = region
    data = ["--data-dir", str(archive.data_dir)]
    made = {}
    for name, institution, scope in (
        ("north", "north", "read"),
        ("south", "south", "read"),
        ("north-share", "north", "share"),
    ):
        assert main(["keys", "create", "--institution", institution, "--scope", scope, *data]) == 0
        made[name] = capsys.readouterr().out.strip()
    return made


def qido(archive: RunningArchive, path: str, key: str | None, **params) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{archive.http}/dicomweb{path}", params=params, headers=headers, timeout=30)


def uids(response: httpx.Response, tag: str = "0020000D") -> list[str]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    return sorted(item[tag]["Value"][0] for item in response.json())


def test_keys_and_scopes(region, keys) -> None:
    archive, _ = region
    for key, status in ((None, 401), ("ppk_nope_nope", 401), (keys["north-share"], 403)):
        response = qido(archive, "/studies", key)
        assert response.status_code == status, response.text
        assert response.json()["detail"]
    assert qido(archive, "/studies", None).headers["www-authenticate"] == "Bearer"
    assert (
        main(["keys", "revoke", keys["south"].split("_")[1], "--data-dir", str(archive.data_dir)])
        == 0
    )
    assert qido(archive, "/studies", keys["south"]).status_code == 401
    connection = sqlite3.connect(f"file:{archive.data_dir / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        refused = connection.execute(
            "SELECT count(*) FROM audit_events WHERE action = 'http' AND outcome = 'refused'"
        ).fetchone()[0]
    finally:
        connection.close()
    assert refused == 5


def test_studies_as_each_institution_sees_them(region, keys) -> None:
    archive, studies = region
    assert uids(qido(archive, "/studies", keys["north"])) == sorted([studies["A"], studies["B"]])
    assert uids(qido(archive, "/studies", keys["south"], PatientName="*")) == [studies["C"]]
    recognised = qido(archive, "/studies", keys["south"], PatientID="P1", IssuerOfPatientID=REGION)
    assert uids(recognised) == sorted([studies["A"], studies["C"]])
    # The same by tag.
    by_tag = qido(archive, "/studies", keys["south"], **{"00100020": "P1", "00100021": REGION})
    assert uids(by_tag) == uids(recognised)


def test_dicom_json_levels_paging_and_bad_requests(region, keys) -> None:
    archive, studies = region
    [study] = qido(archive, "/studies", keys["north"], StudyInstanceUID=studies["A"]).json()
    assert study["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]}
    assert study["00080061"] == {"vr": "CS", "Value": ["CT"]}
    assert study["00201208"] == {"vr": "IS", "Value": [3]}
    assert study["00080020"] == {"vr": "DA", "Value": ["20261101"]}
    assert list(study) == sorted(study)

    instances = qido(archive, f"/studies/{studies['A']}/instances", keys["north"])
    assert len(uids(instances, "00080018")) == 3
    page = qido(archive, f"/studies/{studies['A']}/instances", keys["north"], limit=2, offset=2)
    assert len(page.json()) == 1
    series = qido(archive, f"/studies/{studies['A']}/series", keys["north"], includefield="all")
    [one] = series.json()
    assert one["00080060"]["Value"] == ["CT"] and one["00201209"]["Value"] == [3]
    assert qido(archive, "/studies", keys["north"], PatientName="doe", fuzzymatching="true").json()

    for path, params in (
        ("/studies", {"NoSuchAttribute": "1"}),
        ("/studies", {"limit": "-1"}),
        ("/studies", {"StudyDate": "2026-13-45"}),
        ("/studies", {"Modality": "CT"}),
        ("/studies/not-a-uid/series", {}),
    ):
        response = qido(archive, path, keys["north"], **params)
        assert response.status_code == 400, (path, params, response.text)
        assert response.json()["detail"]


def test_dicomweb_client_searches(region, keys) -> None:
    archive, studies = region
    client = DICOMwebClient(
        url=f"{archive.http}/dicomweb", headers={"Authorization": f"Bearer {keys['north']}"}
    )
    found = client.search_for_studies(search_filters={"PatientID": "Z9"})
    assert [s["0020000D"]["Value"][0] for s in found] == [studies["B"]]
    series = client.search_for_series(study_instance_uid=studies["A"])
    assert len(series) == 1
    instances = client.search_for_instances(study_instance_uid=studies["A"], limit=2)
    assert len(instances) == 2


def test_audit_api_shows_an_institutions_own_events_to_its_admin(region, keys, capsys) -> None:
    archive, _ = region
    data = ["--data-dir", str(archive.data_dir)]
    assert main(["keys", "create", "--institution", "south", "--scope", "admin", *data]) == 0
    admin = capsys.readouterr().out.strip()
    qido(archive, "/studies", keys["south"], PatientID="P1", IssuerOfPatientID=REGION)
    qido(archive, "/studies", keys["north"])

    response = httpx.get(
        f"{archive.http}/api/audit",
        params={"action": "query"},
        headers={"Authorization": f"Bearer {admin}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    events = response.json()
    assert [(e["institution"], e["instances"]) for e in events] == [("south", 2)]
    assert events[0]["actor"] == keys["south"].split("_")[1]
    stores = httpx.get(
        f"{archive.http}/api/audit",
        params={"action": "store"},
        headers={"Authorization": f"Bearer {admin}"},
        timeout=30,
    ).json()
    assert [(e["actor"], e["instances"]) for e in stores] == [("SOUTHCT", 1)]
    # Without admin scope: refused.
    response = httpx.get(
        f"{archive.http}/api/audit",
        headers={"Authorization": f"Bearer {keys['south']}"},
        timeout=30,
    )
    assert response.status_code == 403
