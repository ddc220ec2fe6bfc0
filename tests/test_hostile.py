"""Values aimed at object keys, SQL and headers (issue 6), in every place an HTTP caller
puts a value: path UIDs, QIDO-RS keys and parameters, the share API's body and a pocket
film's paths. Each gets a 4xx with a reason (or, as a search value, simply matches
nothing); none a 5xx, no header is injected, and nothing stored changes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from tests.conftest import RunningArchive, started_archive
from tests.test_cstore import wait_drained
from tests.test_rendered import _stow

HOSTILE = {
    "dot-dot": "../../etc/passwd",
    "uid-dot-dot": "1.2.3/../../4",
    "encoded-nul": "1.2.3%00",
    "nul": "1.2.3\x00.4",
    "quote": "1.2.3' OR '1'='1",
    "sql": '1.2.3"; DROP TABLE studies;--',
    "crlf": "1.2.3\r\nX-Injected: yes",
    "encoded-crlf": "1.2.3%0d%0aX-Injected:%20yes",
    "long-digits": "9" * 10_000,
    "long-uid": "1." * 5_000 + "1",
    "unicode": "1.2.3\u202e\ufeff",
}


@pytest.fixture(scope="module")
def stored(s3_server, tmp_path_factory) -> Iterator[tuple[RunningArchive, dict[str, str]]]:
    archive = started_archive(s3_server, tmp_path_factory.mktemp("hostile"))
    source = get_testdata_file("CT_small.dcm")
    _stow(archive, [Path(source).read_bytes()])
    wait_drained(archive)
    ds = dcmread(source, stop_before_pixels=True)
    uids = {
        "study": str(ds.StudyInstanceUID),
        "series": str(ds.SeriesInstanceUID),
        "instance": str(ds.SOPInstanceUID),
    }
    yield archive, uids
    archive.stop()


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else " " for ch in text).strip()


def _studies(archive: RunningArchive) -> list:
    return httpx.get(f"{archive.http}/dicomweb/studies", timeout=30).json()


def _checked(response: httpx.Response, where: str) -> httpx.Response:
    assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:200]}"
    assert "x-injected" not in response.headers, where
    return response


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_values_are_refused_everywhere(stored, name: str) -> None:
    archive, uids = stored
    raw = HOSTILE[name]
    value = quote(raw, safe="/%")  # in a path as a client must send it: percent-encoded
    before = _studies(archive)
    study, series, instance = uids["study"], uids["series"], uids["instance"]
    paths = [
        f"/dicomweb/studies/{value}",
        f"/dicomweb/studies/{value}/metadata",
        f"/dicomweb/studies/{study}/series/{value}",
        f"/dicomweb/studies/{study}/series/{series}/instances/{value}",
        f"/dicomweb/studies/{study}/series/{series}/instances/{value}/rendered",
        f"/dicomweb/studies/{study}/series/{series}/instances/{instance}/frames/{value}",
        f"/dicomweb/studies/{study}/series/{series}/instances/{instance}/frames/{value}/rendered",
        f"/dicomweb/studies/{value}/thumbnail",
        f"/s/{value}",
        f"/s/{value}/study",
        f"/api/shares/{value}",
    ]
    with httpx.Client(base_url=archive.http, timeout=60) as client:
        for path in paths:
            response = _checked(client.get(path), path)
            assert response.status_code in (400, 404, 405, 422), (path, response.status_code)
            if response.status_code == 400:
                assert response.json()["detail"], path  # a reason
        for parameter in ("PatientID", "StudyInstanceUID", "includefield", "limit", "00100020"):
            where = f"QIDO {parameter}"
            response = _checked(client.get("/dicomweb/studies", params={parameter: raw}), where)
            if response.status_code == 200:  # a search value matching nothing
                assert parameter in ("PatientID", "00100020") and response.json() == [], where
            else:
                assert response.status_code in (400, 422), (where, response.status_code)
        for query in (
            {"PatientID": uids["study"], "viewport": raw},
            {"window": raw},
            {"quality": raw},
        ):
            path = f"/dicomweb/studies/{study}/series/{series}/instances/{instance}/rendered"
            response = _checked(client.get(path, params=query), f"rendered {query}")
            assert response.status_code in (200, 400, 404), (query, response.status_code)
        for body in ({"study_uid": raw}, {"study_uid": study, "expires_in_days": raw}):
            response = _checked(client.post("/api/shares", json=body), f"share {body}")
            assert response.status_code in (400, 404, 422), (body, response.status_code)
        response = _checked(
            # A header cannot carry NUL, CR or LF at all (the HTTP layer refuses them).
            client.get("/dicomweb/studies", headers={"Accept": _printable(raw).encode()}),
            "Accept",
        )
    assert _studies(archive) == before  # nothing stored changed
    assert httpx.get(f"{archive.http}/healthz").status_code == 200
