"""Pocket film: share links made by staff, and the page and assets a patient's phone loads
(issue 5). A real archive over HTTP; the QR codes read back with zbar."""

from __future__ import annotations

import io
import sqlite3
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pocketpacs.cli import main
from storage.shares import masked_name
from tests.conftest import RunningArchive, started_archive
from tests.test_cstore import small_ct, wait_drained
from tests.test_rendered import _stow

HTML = {"Accept": "text/html"}
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"


def _patient(ds: Dataset) -> Dataset:
    ds.PatientName = "Smith^John"
    ds.PatientSex = "M"
    ds.PatientBirthDate = "19800115"
    ds.StudyDate = "20240610"
    ds.InstitutionName = "North Hospital"
    return ds


def _ct(number: int, seed: str) -> Dataset:
    ds = _patient(small_ct(number=number, seed=seed))
    ds.BodyPartExamined = "CHEST"
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.WindowCenter, ds.WindowWidth = 500, 4000
    # Each slice its own picture: a gradient shifted by the slice number.
    ds.PixelData = (np.arange(64 * 64, dtype=np.int16) // 2 + number * 300).tobytes()
    return ds


def _document(seed: str, sop_class: str, number: int) -> Dataset:
    """A report in the study of `seed`: a Basic Text SR or an encapsulated PDF."""
    like = small_ct(seed=seed)
    ds = Dataset()
    uid = generate_uid(entropy_srcs=[seed, sop_class])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    ds.StudyInstanceUID = like.StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[seed, sop_class, "series"])
    ds.PatientID = like.PatientID
    ds.InstanceNumber = 1
    ds.SeriesNumber = number
    _patient(ds)
    if sop_class == ENCAPSULATED_PDF:
        ds.Modality = "DOC"
        ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
        ds.EncapsulatedDocument = PDF
        return ds
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "18748-4", "LN", "CT Report"
    ds.ConceptNameCodeSequence = Sequence([title])
    finding = Dataset()
    finding.RelationshipType, finding.ValueType = "CONTAINS", "TEXT"
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121071", "DCM", "Finding"
    finding.ConceptNameCodeSequence = Sequence([name])
    finding.TextValue = "No acute abnormality."
    ds.ContentSequence = Sequence([finding])
    return ds


def _blob(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture(scope="module")
def archive(s3_server, tmp_path_factory) -> Iterator[RunningArchive]:
    """Study A: three CT slices, a text report and a PDF report; study B: one CT slice."""
    running = started_archive(s3_server, tmp_path_factory.mktemp("pocket"))
    blobs = [_blob(_ct(n, "study-a")) for n in (1, 2, 3)]
    blobs += [_blob(_document("study-a", BASIC_TEXT_SR, 90))]
    blobs += [_blob(_document("study-a", ENCAPSULATED_PDF, 91))]
    blobs += [_blob(_ct(1, "study-b"))]
    _stow(running, blobs)
    wait_drained(running)
    yield running
    running.stop()


STUDY_A = small_ct(seed="study-a").StudyInstanceUID
STUDY_B = small_ct(seed="study-b").StudyInstanceUID


def share(archive: RunningArchive, study: str = STUDY_A, **options) -> dict:
    response = httpx.post(f"{archive.http}/api/shares", json={"study_uid": study, **options})
    assert response.status_code == 201, response.text
    return response.json()


def client(address: str = "10.0.0.1") -> httpx.Client:
    """A phone at `address` (uvicorn takes X-Forwarded-For from a proxy on loopback)."""
    return httpx.Client(headers={"X-Forwarded-For": address}, timeout=30)


def jpeg(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("L"))


def test_a_link_opens_its_study_on_a_phone(archive: RunningArchive) -> None:
    made = share(archive)
    url = made["url"]
    token = url.rsplit("/", 1)[1]
    assert url == f"{archive.http}/s/{token}" and len(token) >= 32  # 192 random bits
    assert made["qr_png_url"] == url + "/qr.png" and made["access_code"] is None
    for secret in (STUDY_A, "Smith", "PID"):
        assert secret not in url
    with client() as phone:
        page = phone.get(url, headers=HTML)
        assert page.status_code == 200 and "app.js" in page.text
        assert page.headers["cache-control"] == "private, no-cache"
        assert page.headers["referrer-policy"] == "no-referrer"
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert phone.get(url + "/app.js").status_code == 200
        summary = phone.get(url + "/study").json()
        assert summary["patient"] == {"name": "J*** S***", "sex": "M", "age": "44Y"}
        assert summary["study"]["date"] == "2024-06-10"
        assert summary["study"]["institution"] == "North Hospital"
        assert summary["study"]["modalities"] == ["CT"]
        assert summary["study"]["body_parts"] == ["CHEST"]
        assert [s["images"] for s in summary["series"]] == [3]
        assert summary["series"][0]["presets"] == ["lung", "mediastinum", "bone", "brain"]
        assert [r["kind"] for r in summary["reports"]] == ["sr", "pdf"]
        assert summary["download"] is None
        assert STUDY_A not in str(summary)

        thumbnail = jpeg(phone.get(url + "/series/0/thumbnail"))
        slices = [jpeg(phone.get(f"{url}/series/0/images/{n}")) for n in range(3)]
        assert all(s.shape == (64, 64) for s in slices)  # never enlarged
        assert slices[0].mean() < slices[1].mean() < slices[2].mean()  # each its own slice
        assert np.abs(thumbnail.astype(int) - slices[1]).mean() < 3  # the middle slice
        lung = jpeg(phone.get(f"{url}/series/0/images/1", params={"preset": "lung"}))
        bone = jpeg(phone.get(f"{url}/series/0/images/1", params={"preset": "bone"}))
        assert lung.mean() > bone.mean() + 20  # soft values: bright in lung, dark in bone
        assert phone.get(f"{url}/series/0/images/3").status_code == 404
        assert phone.get(f"{url}/series/0/images/0", params={"size": 300}).status_code == 400
        assert phone.get(f"{url}/series/0/images/0", params={"preset": "x"}).status_code == 400

        text = phone.get(url + "/" + summary["reports"][0]["url"]).json()["text"]
        assert "CT Report" in text and "Finding: No acute abnormality." in text
        pdf = phone.get(url + "/" + summary["reports"][1]["url"])
        assert pdf.headers["content-type"] == "application/pdf" and pdf.content == PDF
        assert phone.get(url + "/download").status_code == 403  # not offered by this link

    listed = {s["id"]: s for s in httpx.get(f"{archive.http}/api/shares").json()}
    assert listed[made["id"]]["views"] == 1 and listed[made["id"]]["state"] == "active"
    assert listed[made["id"]]["last_view_at"] is not None
    detail = httpx.get(f"{archive.http}/api/shares/{made['id']}").json()
    assert detail["views_by_day"] == {datetime.now(UTC).date().isoformat(): 1}


def test_a_link_reaches_its_study_only(archive: RunningArchive) -> None:
    """Study B has a series and an image at every position study A's link could name."""
    url = share(archive)["url"]
    other = share(archive, STUDY_B)["url"]
    with client("10.0.0.2") as phone:
        assert phone.get(f"{other}/series/0/images/0").status_code == 200
        for path in (
            "/series/1/thumbnail",
            "/series/1/images/0",
            "/series/-1/images/0",
            "/series/0/images/-1",
            "/report/2",
            f"/studies/{STUDY_B}",
            f"/../../dicomweb/studies/{STUDY_B}/rendered",
            "/series/0%2F..%2F..%2F1/thumbnail",
            "/series/1.0/images/0",
            "/series/0/images/0x1",
        ):
            response = phone.get(url + path)
            assert response.status_code in (404, 422), (path, response.status_code)
        # Another link's token in the same path shape opens only the other study.
        summary = phone.get(f"{other}/study").json()
        assert [s["images"] for s in summary["series"]] == [1] and summary["reports"] == []


def test_access_code_then_lockout(archive: RunningArchive) -> None:
    made = share(archive, access_code=True)
    url, code = made["url"], made["access_code"]
    assert code.isdigit() and len(code) == 6
    wrong = f"{(int(code) + 1) % 10**6:06d}"
    with client("10.0.1.1") as phone:
        assert phone.get(url, headers=HTML).status_code == 200  # the page asks for the code
        for path in ("/study", "/series/0/thumbnail", "/series/0/images/0", "/report/0"):
            assert phone.get(url + path).status_code == 401, path
        refused = phone.post(url + "/code", data={"code": wrong})
        assert refused.status_code == 403 and "4 tries left" in refused.json()["detail"]
        assert phone.post(url + "/code", data={"code": code}).status_code == 204
        assert phone.get(url + "/study").status_code == 200  # the cookie opens it now
        other = share(archive, access_code=True)["url"]
        assert phone.get(other + "/study").status_code == 401  # a cookie opens one link
    with client("10.0.1.2") as guesser:
        for left in (3, 2, 1):  # one failure already counted against this link
            answer = guesser.post(url + "/code", data={"code": wrong})
            assert answer.status_code == 403 and f"{left} tries left" in answer.text
        locked = guesser.post(url + "/code", data={"code": wrong})
        assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 800
        # Locked for everyone now, the right code included...
        assert guesser.post(url + "/code", data={"code": code}).status_code == 429
    with client("10.0.1.3") as patient:
        assert patient.post(url + "/code", data={"code": code}).status_code == 429
    # ...and an address that guessed five times is locked out of other links too.
    fresh = share(archive, access_code=True)
    wrong = f"{(int(fresh['access_code']) + 1) % 10**6:06d}"
    with client("10.0.1.2") as guesser:  # four failures so far from here
        assert guesser.post(fresh["url"] + "/code", data={"code": wrong}).status_code == 403
        answer = guesser.post(fresh["url"] + "/code", data={"code": fresh["access_code"]})
        assert answer.status_code == 429
    with client("10.0.1.4") as patient:
        answer = patient.post(fresh["url"] + "/code", data={"code": fresh["access_code"]})
        assert answer.status_code == 204


def _expire(archive: RunningArchive, share_id: int) -> None:
    """Move a link's expiry into the past, as 30 days passing would."""
    with sqlite3.connect(archive.data_dir / "index.sqlite3") as db:
        db.execute(
            "UPDATE shares SET expires_at = '2020-01-01 00:00:00.000000' WHERE id = ?",
            (share_id,),
        )


def test_expired_revoked_and_unknown_links_say_so(archive: RunningArchive) -> None:
    revoked, expired = share(archive), share(archive)
    assert httpx.delete(f"{archive.http}/api/shares/{revoked['id']}").status_code == 204
    assert httpx.delete(f"{archive.http}/api/shares/999999").status_code == 404
    _expire(archive, expired["id"])
    with client("10.0.2.1") as phone:
        page = phone.get(revoked["url"], headers=HTML)
        assert page.status_code == 410 and "withdrawn" in page.text
        assert "North Hospital" in page.text  # whom to ask, as the patient knows it
        assert page.headers["referrer-policy"] == "no-referrer"
        chinese = phone.get(revoked["url"], headers={**HTML, "Accept-Language": "zh-CN,zh"})
        assert chinese.status_code == 410 and "撤销" in chinese.text
        page = phone.get(expired["url"], headers=HTML)
        assert page.status_code == 410 and "expired" in page.text
        for url in (revoked["url"], expired["url"]):
            assert phone.get(url + "/series/0/images/0").status_code == 410
            assert phone.get(url + "/study").status_code == 410
        base = revoked["url"].rsplit("/", 1)[0]
        unknown = phone.get(base + "/" + "A" * 32, headers=HTML)
        assert unknown.status_code == 404 and "No such link" in unknown.text
        for malformed in ("short", "A" * 31 + ".", "A" * 33):
            assert phone.get(f"{base}/{malformed}/study").status_code == 404
    states = {s["id"]: s["state"] for s in httpx.get(f"{archive.http}/api/shares").json()}
    assert states[revoked["id"]] == "revoked" and states[expired["id"]] == "expired"


def test_download_streams_the_originals(archive: RunningArchive) -> None:
    url = share(archive, allow_download=True)["url"]
    with client("10.0.3.1") as phone:
        assert phone.get(url + "/study").json()["download"] == "download"
        response = phone.get(url + "/download")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive_zip:
        names = archive_zip.namelist()
        datasets = [dcmread(io.BytesIO(archive_zip.read(name))) for name in names]
    assert len(names) == 5
    assert {str(ds.StudyInstanceUID) for ds in datasets} == {STUDY_A}
    stored = {_ct(n, "study-a").SOPInstanceUID for n in (1, 2, 3)}
    assert stored <= {str(ds.SOPInstanceUID) for ds in datasets}
    assert all("Smith" not in name and STUDY_A not in name for name in names)


def _zbar(png: bytes, folder: Path) -> str:
    path = folder / "qr.png"
    path.write_bytes(png)
    out = subprocess.run(
        ["zbarimg", "--quiet", "--raw", str(path)], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_qr_codes_decode_to_the_link(archive: RunningArchive, tmp_path: Path) -> None:
    made = share(archive)
    png = httpx.get(made["qr_png_url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert _zbar(png.content, tmp_path) == made["url"]
    svg = httpx.get(made["url"] + "/qr.svg")
    assert svg.status_code == 200 and svg.content.lstrip().startswith(b"<svg")
    # The command line: prints the link, writes the QR code as PNG and SVG.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pocketpacs",
            "share",
            STUDY_A,
            "--data-dir",
            str(archive.data_dir),
            "--code",
            "--days",
            "7",
            "--qr",
            str(tmp_path / "film"),
        ],
        env=archive.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    url, code_line = out.stdout.split("\n")[:2]
    assert code_line.startswith("access code: ")
    assert _zbar((tmp_path / "film.png").read_bytes(), tmp_path) == url
    assert (tmp_path / "film.svg").read_bytes().lstrip().startswith(b"<svg")
    assert httpx.get(url.replace(url.split("/s/")[0], archive.http) + "/study").status_code == 401


def test_views_and_failures_are_audited_without_tokens(archive: RunningArchive) -> None:
    made = share(archive, access_code=True)
    token = made["url"].rsplit("/", 1)[1]
    with client("10.0.4.1") as phone:
        phone.post(
            made["url"] + "/code",
            data={"code": "000000" if made["access_code"] != "000000" else "111111"},
        )
        phone.post(made["url"] + "/code", data={"code": made["access_code"]})
        phone.get(made["url"] + "/study")
    events = httpx.get(f"{archive.http}/api/audit", params={"limit": 500}).json()
    mine = [e for e in events if e["actor"] == f"link {made['id']}"]
    assert {(e["action"], e["outcome"]) for e in mine} >= {
        ("share-code", "failed"),
        ("share-view", "ok"),
    }
    assert any(e["action"] == "share" and e["outcome"] == "ok" for e in events)
    assert all(token not in str(e) for e in events)
    assert token not in archive.log_path.read_text()


CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def _pinch(page, cdp, spread: float) -> None:
    """Two fingers on the image moving apart by `spread` pixels (real touch events)."""
    box = page.locator("#stage").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2

    def points(d: float) -> list[dict]:
        return [{"x": cx - d, "y": cy, "id": 1}, {"x": cx + d, "y": cy, "id": 2}]

    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": points(20)})
    for step in range(1, 11):
        d = 20 + spread * step / 10
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": points(d)})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})


def _shown(image, in_source: str = "", timeout: float = 30.0) -> None:
    """Wait until an <img> has loaded a picture (from a source holding `in_source`). Read
    through the DevTools protocol: the page's CSP forbids evaluating strings."""
    deadline = time.monotonic() + timeout
    check = "(i, part) => i.complete && i.naturalWidth > 0 && i.src.includes(part)"
    while not image.evaluate(check, in_source):
        assert time.monotonic() < deadline, f"image not shown: {image}"
        time.sleep(0.05)


def test_a_patient_opens_the_pocket_film_on_a_phone(archive: RunningArchive) -> None:
    """Headless Chromium as a phone (390x844, touch): the code, the thumbnails, the
    neighbours preloaded, a drag to the next slice, a pinch, a pan, a double tap, a window
    preset, the report, the ZIP download; then in Chinese on a small phone (360x640)."""
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed (.ci/run installs it)"
    made = share(archive, access_code=True, allow_download=True)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        context = browser.new_context(
            viewport={"width": 390, "height": 844},
            device_scale_factor=3,
            is_mobile=True,
            has_touch=True,
            locale="en-US",
            accept_downloads=True,
        )
        page = context.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on(
            "response",
            lambda r: r.status >= 400 and problems.append(f"{r.status} {r.url.split('/s/')[-1]}"),
        )
        asked: list[str] = []
        page.on("request", lambda r: asked.append(r.url))
        page.goto(made["url"])
        page.locator("#code-input").wait_for()
        page.screenshot(path=ARTIFACTS / "pocket-1-code.png")
        page.fill("#code-input", made["access_code"])
        page.click("#code button")
        first_thumbnail = page.locator("#strip img").first
        first_thumbnail.wait_for()
        _shown(first_thumbnail)
        assert page.locator("#code").is_hidden()
        assert page.locator("#patient").inner_text() == "J*** S***"
        assert page.locator("#facts").inner_text().startswith("Male · 44 y · 2024-06-10 · CT")
        assert "North Hospital" in page.locator("#facts").inner_text()
        _shown(page.locator("#slice"))
        assert page.locator("#position").inner_text() == "2 / 3"
        for neighbour in (0, 2):  # preloaded while slice 2 is shown
            assert any(f"/series/0/images/{neighbour}?size=" in url for url in asked)
        page.screenshot(path=ARTIFACTS / "pocket-2-study.png")

        box = page.locator("#stage").bounding_box()
        y = box["y"] + box["height"] / 2
        page.mouse.move(box["x"] + 300, y)
        page.mouse.down()
        page.mouse.move(box["x"] + 280, y, steps=4)  # a short drag left: the next slice
        page.mouse.up()
        assert page.locator("#position").inner_text() == "3 / 3"

        _pinch(page, context.new_cdp_session(page), 80)
        assert float(page.locator("#stage").get_attribute("data-zoom")) > 1.5
        page.screenshot(path=ARTIFACTS / "pocket-3-zoomed.png")
        before = page.locator("#slice").evaluate("i => i.style.transform")
        page.mouse.move(box["x"] + 200, y)
        page.mouse.down()
        page.mouse.move(box["x"] + 260, y + 40, steps=4)  # zoomed in, a drag pans
        page.mouse.up()
        assert page.locator("#slice").evaluate("i => i.style.transform") != before
        assert page.locator("#position").inner_text() == "3 / 3"  # the same slice
        center = (box["x"] + box["width"] / 2, y)
        page.touchscreen.tap(*center)
        page.touchscreen.tap(*center)  # a double tap when zoomed: back to the whole image
        assert page.locator("#stage").get_attribute("data-zoom") == "1.00"
        page.touchscreen.tap(*center)
        page.touchscreen.tap(*center)  # and again: zoomed in where tapped
        assert page.locator("#stage").get_attribute("data-zoom") == "2.50"

        page.get_by_role("button", name="Lung").click()
        _shown(page.locator("#slice"), "preset=lung")
        page.locator("#report-text").filter(has_text="No acute abnormality").wait_for()
        page.screenshot(path=ARTIFACTS / "pocket-4-lung-report.png", full_page=True)

        with page.expect_download() as downloading:
            page.click("#download")
        saved = ARTIFACTS / "pocket-study.zip"
        downloading.value.save_as(saved)

        small = browser.new_context(
            viewport={"width": 360, "height": 640},
            device_scale_factor=2,
            is_mobile=True,
            has_touch=True,
            locale="zh-CN",
        )
        chinese = small.new_page()
        chinese.goto(share(archive)["url"])
        _shown(chinese.locator("#strip img").first)
        _shown(chinese.locator("#slice"))
        assert chinese.locator("#facts").inner_text().startswith("男 · 44岁 · 2024-06-10")
        assert chinese.get_by_role("button", name="肺窗").is_visible()
        assert chinese.evaluate("() => document.documentElement.scrollWidth") <= 360
        heights = chinese.locator("#presets button").evaluate_all(
            "buttons => buttons.map(b => b.getBoundingClientRect().height)"
        )
        assert len(heights) == 5 and min(heights) >= 44  # a thumb's target
        chinese.screenshot(path=ARTIFACTS / "pocket-5-chinese-360x640.png")
        browser.close()
    with zipfile.ZipFile(saved) as bundle:
        datasets = [dcmread(io.BytesIO(bundle.read(name))) for name in bundle.namelist()]
    assert {str(ds.StudyInstanceUID) for ds in datasets} == {STUDY_A} and len(datasets) == 5
    token = made["url"].rsplit("/", 1)[1]
    # The only refusal: the study asked for before the code was given; no script error.
    assert [p.replace(token, "T") for p in problems if "favicon" not in p] == ["401 T/study"]


@pytest.mark.parametrize(
    ("name", "masked"),
    [
        ("Smith^John", "J*** S***"),
        ("Wang^Xiaoming=王^小明", "王*明"),
        ("Zhang^Ming=张^明", "张*"),
        ("张三明", "张*明"),
        ("Madonna", "M***"),
        ("", ""),
    ],
)
def test_names_are_masked(name: str, masked: str) -> None:
    assert masked_name(name) == masked


def test_staff_share_only_what_their_key_may(region, capsys: pytest.CaptureFixture[str]) -> None:
    """Sharing needs the `share` scope and a study the institution may see; links are
    listed and revoked by their own institution only."""
    archive, studies = region
    data = ["--data-dir", str(archive.data_dir)]
    keys = {}
    for name, institution, scope in (
        ("north", "north", "share"),
        ("north-read", "north", "read"),
        ("south", "south", "share"),
    ):
        assert main(["keys", "create", "--institution", institution, "--scope", scope, *data]) == 0
        keys[name] = {"Authorization": f"Bearer {capsys.readouterr().out.strip()}"}

    def post(key: dict | None, study: str) -> httpx.Response:
        return httpx.post(
            f"{archive.http}/api/shares", json={"study_uid": study}, headers=key or {}
        )

    assert post(None, studies["A"]).status_code == 401
    assert post(keys["north-read"], studies["A"]).status_code == 403
    assert post(keys["south"], studies["A"]).status_code == 404  # north's study, no patient id
    assert post(keys["north"], "1.2.3.bad..uid").status_code == 400
    north = post(keys["north"], studies["A"])
    south = post(keys["south"], studies["C"])
    assert north.status_code == south.status_code == 201
    listed = httpx.get(f"{archive.http}/api/shares", headers=keys["north"]).json()
    assert [s["id"] for s in listed] == [north.json()["id"]]
    revoke = f"{archive.http}/api/shares/{north.json()['id']}"
    assert httpx.delete(revoke, headers=keys["south"]).status_code == 404
    assert httpx.get(north.json()["url"] + "/study").status_code == 200  # still open
    assert httpx.delete(revoke, headers=keys["north"]).status_code == 204
    assert httpx.get(north.json()["url"] + "/study").status_code == 410  # at once


def test_guessing_tokens_locks_the_address(archive: RunningArchive, capsys) -> None:
    """Tokens that open nothing are counted per address: after 20 in 15 minutes the
    address opens no link, a real one included, while others still can; all audited."""
    real = share(archive)["url"]
    base = real.rsplit("/", 1)[0]
    with client("10.0.5.1") as guesser:
        for n in range(20):
            guess = f"{n:032d}" if n % 2 else f"guess-{n}"  # well formed or not
            assert guesser.get(f"{base}/{guess}/study").status_code == 404
        locked = guesser.get(f"{base}/{'B' * 32}", headers=HTML)
        assert locked.status_code == 429 and "Too many attempts" in locked.text
        assert int(locked.headers["retry-after"]) > 800
        assert guesser.get(real + "/study").status_code == 429
    with client("10.0.5.2") as patient:
        assert patient.get(real + "/study").status_code == 200
    # Guesses belong to no institution: the operator's `pocketpacs audit` lists them.
    data = ["--data-dir", str(archive.data_dir), "--limit", "5000"]
    assert main(["audit", "--action", "share-view", "--outcome", "refused", *data]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    mine = [row for row in rows if row[6] == "10.0.5.1"]
    assert len(mine) == 22
    assert sum("too many" in row[8] for row in mine) == 2
    assert all("0" * 10 not in row[5] for row in mine)  # tokens cut in the audit trail
