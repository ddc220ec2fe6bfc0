"""A rendered image asked again by the same caller is answered from memory
(viewer_api.recent_answers): the same answer, audited, never to another caller, and only
for a few seconds."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import httpx
from pydicom import dcmread

from pocketpacs.cli import main
from viewer_api.recent_answers import SECONDS

AUDITED = (
    "SELECT count(*) FROM audit_events WHERE action = 'retrieve' AND resource = ? "
    "AND actor = ? AND outcome = 'ok'"
)


def _key(archive, capsys, institution: str) -> str:
    data = ["--data-dir", str(archive.data_dir)]
    assert main(["keys", "create", "--institution", institution, "--scope", "read", *data]) == 0
    return capsys.readouterr().out.strip()


def _from_memory(archive) -> float:
    for line in httpx.get(f"{archive.http}/metrics", timeout=30).text.splitlines():
        if line.startswith("pocketpacs_answered_from_memory_total "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _audited(archive, path: str, token: str) -> int:
    """Audit rows of retrievals of `path` by the key `token`, once the writer has caught up."""
    with sqlite3.connect(archive.data_dir / "index.sqlite3") as db:
        resource = f"WADO {path}"[:200]  # as the audit trail keeps it
        return db.execute(AUDITED, (resource, token.split("_")[1])).fetchone()[0]


def test_the_same_request_again_is_answered_from_memory_and_audited(
    region, tmp_path: Path, capsys
) -> None:
    archive, _ = region
    first = dcmread(tmp_path / "A1.dcm", stop_before_pixels=True)
    path = (
        f"/dicomweb/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
        f"/instances/{first.SOPInstanceUID}/rendered"
    )
    north, south = _key(archive, capsys, "north"), _key(archive, capsys, "south")
    with httpx.Client(base_url=archive.http, timeout=30) as client:

        def ask(token: str, **headers: str) -> httpx.Response:
            return client.get(path, headers={"Authorization": f"Bearer {token}", **headers})

        before = _from_memory(archive)
        routed = ask(north)
        again = ask(north)
        assert routed.status_code == again.status_code == 200
        assert _from_memory(archive) == before + 1
        assert again.content == routed.content
        for header in ("content-type", "etag", "vary", "cache-control", "content-length"):
            assert again.headers[header] == routed.headers[header]
        held = ask(north, **{"If-None-Match": routed.headers["etag"]})
        assert held.status_code == 304 and held.content == b""
        # Another institution's key is checked by the route, as ever: south may not see it.
        assert ask(south).status_code == 404
        # Another format is another answer.
        assert ask(north, Accept="image/png").headers["content-type"] == "image/png"
        deadline = time.monotonic() + 5
        while _audited(archive, path, north) < 4:
            assert time.monotonic() < deadline, "answers from memory were not audited"
            time.sleep(0.05)


def test_a_revoked_key_is_answered_no_longer_after_a_few_seconds(
    region, tmp_path: Path, capsys
) -> None:
    """The trade the module makes, bounded: a key revoked while its answer is held gets it
    for `SECONDS` at most, then 401."""
    archive, _ = region
    first = dcmread(tmp_path / "B1.dcm", stop_before_pixels=True)
    path = f"/dicomweb/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}/thumbnail"
    token = _key(archive, capsys, "north")
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=archive.http, timeout=30, headers=headers) as client:
        assert client.get(path).status_code == 200
        data = ["--data-dir", str(archive.data_dir)]
        assert main(["keys", "revoke", token.split("_")[1], *data]) == 0
        capsys.readouterr()
        revoked_at = time.monotonic()
        while client.get(path).status_code == 200:
            assert time.monotonic() - revoked_at <= SECONDS + 1
            time.sleep(0.2)
        assert client.get(path).status_code == 401
