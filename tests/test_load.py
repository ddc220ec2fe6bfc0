"""A short mixed load (issue 6; `bench/load.py` runs the long one): modalities pushing on
several associations, clients searching and fetching thumbnails, and phones opening a
pocket film link, at once. No failure, no error response, memory not climbing, and the
phones' link-to-thumbnail time within the pocket film's budget."""

from __future__ import annotations

import io

import httpx
from pydicom import dcmread

from tests.conftest import started_archive
from tests.load import run_load
from tests.test_cstore import wait_drained
from tests.test_pocket import _ct
from tests.test_rendered import _stow

SECONDS = 12


def test_mixed_load(s3_server, tmp_path) -> None:
    archive = started_archive(s3_server, tmp_path)
    try:
        blobs = []
        for number in (1, 2, 3):
            out = io.BytesIO()
            _ct(number, "load-study").save_as(out, enforce_file_format=True)
            blobs.append(out.getvalue())
        _stow(archive, blobs)
        wait_drained(archive)
        template = dcmread(io.BytesIO(blobs[0]))
        study = str(template.StudyInstanceUID)
        link = httpx.post(f"{archive.http}/api/shares", json={"study_uid": study}).json()["url"]
        assert archive.process is not None
        result = run_load(
            pid=archive.process.pid,
            dicom_port=archive.dicom_port,
            http=archive.http,
            template=template,
            link=link,
            seconds=SECONDS,
            associations=6,
            searchers=3,
            phones=10,
            thumbnail_path=f"/dicomweb/studies/{study}/thumbnail",
            folder=tmp_path / "modalities",
            files_each=100,
        )
        summary = result.summary()
        print(summary)
        assert result.store_errors == [] and result.http_errors == []
        assert set(result.stores) == {"run ok", "instances"} and result.stores["instances"] > 600
        assert set(result.http) == {200}, summary["http"]
        assert summary["phone_opens"] >= 10 and summary["phone_open_p95_s"] < 1.5
        # Memory levels off: the last second not far above the peak of the first half.
        half = result.rss_mb[: len(result.rss_mb) // 2]
        assert result.rss_mb[-1] < max(half) * 1.5, result.rss_mb
        wait_drained(archive, timeout=180)
        assert httpx.get(f"{archive.http}/healthz").status_code == 200
    finally:
        archive.stop()
