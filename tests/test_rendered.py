"""Rendered images and thumbnails from a running archive: pydicom's test files stored by
STOW-RS, rendered over HTTP, and checked against DCMTK's `dcmj2pnm` (an independent
renderer) or against what a reader would notice on the image."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import av
import httpx
import imagecodecs
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    HEVCMP51,
    JPEG2000MC,
    MPEG2MPML,
    MPEG2MPMLF,
    MPEG4HP41,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000MCLossless,
    VideoPhotographicImageStorage,
    generate_uid,
)
from sqlalchemy import text

from storage.frames import FrameNotFound
from storage.header import layout_from_text, read_header
from storage.index import Index, Origin
from storage.ingest import IngestPipeline, InstanceToStore
from storage.local_copies import LocalCopies
from storage.objects import ObjectStore
from storage.query import Located, Query, QueryLevel, Viewer, locate
from storage.rendering import (
    Rendering,
    Undecodable,
    Window,
    WindowFunction,
    displayed,
    render,
    render_laid_out,
)
from storage.renditions import RENDERED_PREFIX, NotHere, Rendition, Renditions, rendition_key
from tests.conftest import RunningArchive, bucket_of, started_archive
from tests.test_cstore import small_ct, wait_drained
from viewer_api.app import create_app
from viewer_api.deps import Services
from viewer_api.routes.rendered import RenderedLane, media_type_of

BOUNDARY = "rendered-test-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
FILES = (
    "CT_small.dcm",  # CT, Rescale Intercept -1024: windows in Hounsfield units
    "MR_small.dcm",  # a stored window
    "RG1_UNCR.dcm",  # chest film, MONOCHROME1
    "OBXXXX1A.dcm",  # ultrasound, PALETTE COLOR
    "US1_J2KR.dcm",  # colour Doppler, JPEG 2000 (YBR_RCT)
    "SC_rgb_rle.dcm",  # colour bars, RLE
    "SC_ybr_full_422_uncompressed.dcm",  # the same bars, YBR_FULL_422
    "JPGExtended.dcm",  # 12-bit JPEG Extended
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS
    "JPEG2000.dcm",  # JPEG 2000, grey
    "emri_small.dcm",  # enhanced MR, 10 frames
    "emri_small_big_endian.dcm",  # the same, Explicit VR Big Endian
    "image_dfl.dcm",  # deflated
)


def _stow(archive: RunningArchive, blobs: list[bytes]) -> None:
    body = b""
    for blob in blobs:
        body += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body += blob + b"\r\n"
    body += f"--{BOUNDARY}--\r\n".encode()
    response = httpx.post(
        f"{archive.http}/dicomweb/studies",
        content=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text


def store(archive: RunningArchive, ds: Dataset, **save_options) -> str:
    """Store one data set by STOW-RS, wait until it is in, and return its instance path."""
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True, **save_options)
    _stow(archive, [out.getvalue()])
    wait_drained(archive)
    return (
        f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )


@pytest.fixture(scope="module")
def stored(s3_server, tmp_path_factory) -> Iterator[tuple[RunningArchive, dict[str, str]]]:
    """An `--open` archive holding FILES, and each file's instance path by file name."""
    archive = started_archive(s3_server, tmp_path_factory.mktemp("rendered"))
    paths = {}
    blobs = []
    for name in FILES:
        source = get_testdata_file(name)
        ds = dcmread(source, stop_before_pixels=True)
        paths[name] = (
            f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}"
        )
        blobs.append(Path(source).read_bytes())
    _stow(archive, blobs)
    wait_drained(archive)
    yield archive, paths
    archive.stop()


def get(archive: RunningArchive, path: str, accept: str = "image/png", **params) -> httpx.Response:
    return httpx.get(f"{archive.http}{path}", params=params, headers={"Accept": accept}, timeout=60)


def image(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)))


def dcmtk(name: str, *options: str, tmp_path: Path) -> np.ndarray:
    out = tmp_path / "dcmtk.png"
    subprocess.run(
        ["dcmj2pnm", *options, "+on", get_testdata_file(name), str(out)],
        check=True,
        capture_output=True,
    )
    return np.asarray(Image.open(out).convert("L"), dtype=np.float64)


@pytest.mark.parametrize(
    ("name", "dcmtk_options", "params"),
    [
        ("CT_small.dcm", ("+Ww", "40", "400"), {"window": "40,400,linear"}),
        ("CT_small.dcm", ("+Ww", "40", "400", "+Wfs"), {"window": "40,400,sigmoid"}),
        ("MR_small.dcm", ("+Wi", "1"), {}),
        ("RG1_UNCR.dcm", ("+Wi", "1"), {}),
        ("emri_small.dcm", ("+Ww", "300", "600", "+F", "4"), {"window": "300,600"}),
    ],
    ids=["ct-linear", "ct-sigmoid", "mr-stored-window", "cr-monochrome1", "mr-frame-4"],
)
def test_matches_dcmtk(stored, tmp_path: Path, name: str, dcmtk_options, params) -> None:
    """Within rounding of DCMTK's rendering of the same file with the same window: each
    renderer maps to 8 bits on its own, so a pixel may differ by one grey level (mean
    difference at most one level, no pixel more than two)."""
    archive, paths = stored
    frame = dcmtk_options[dcmtk_options.index("+F") + 1] if "+F" in dcmtk_options else ""
    path = paths[name] + (f"/frames/{frame}/rendered" if frame else "/rendered")
    ours = image(get(archive, path, **params)).astype(np.float64)
    reference = dcmtk(name, *dcmtk_options, tmp_path=tmp_path)
    assert ours.shape == reference.shape
    difference = np.abs(ours - reference)
    assert difference.mean() <= 1.0
    assert difference.max() <= 2


def test_a_window_gives_the_grey_its_hounsfield_units_call_for(stored) -> None:
    """CT at window 40/400 (soft tissue): air black, bone white, water at 40 % grey."""
    archive, paths = stored
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    hounsfield = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    grey = image(get(archive, paths["CT_small.dcm"] + "/rendered", window="40,400"))
    assert grey[hounsfield <= -160].max() == 0
    assert grey[hounsfield >= 240].min() == 255
    near_water = np.abs(hounsfield) <= 2
    assert near_water.any()
    assert np.abs(grey[near_water].astype(float) - 0.4 * 255).max() <= 2


def test_a_chest_film_shows_bone_white(stored) -> None:
    """MONOCHROME1 (high values dark): the lungs come out darker than the spine."""
    archive, paths = stored
    grey = image(get(archive, paths["RG1_UNCR.dcm"] + "/rendered")).astype(np.float64)
    rows, columns = grey.shape
    spine = grey[rows // 3 : rows // 2, columns // 2 - 40 : columns // 2 + 40].mean()
    lung = grey[rows // 3 : rows // 2, columns // 4 - 40 : columns // 4 + 40].mean()
    assert spine > lung + 60


@pytest.mark.parametrize("name", ["OBXXXX1A.dcm", "US1_J2KR.dcm"])
def test_colour_images_come_out_in_colour(stored, name: str) -> None:
    archive, paths = stored
    rgb = image(get(archive, paths[name] + "/rendered")).astype(np.int32)
    assert rgb.ndim == 3 and rgb.shape[2] == 3
    # Coloured pixels: the channels differ widely somewhere (Doppler, palette overlays).
    spread = rgb.max(axis=2) - rgb.min(axis=2)
    assert (spread > 100).sum() > 100


@pytest.mark.parametrize("name", ["SC_rgb_rle.dcm", "SC_ybr_full_422_uncompressed.dcm"])
def test_colour_bars_keep_their_colours(stored, name: str) -> None:
    """The top band of pydicom's colour-bar image is red, RGB (RLE) or YBR alike."""
    archive, paths = stored
    rgb = image(get(archive, paths[name] + "/rendered")).astype(np.int32)
    red, green, blue = rgb[5, 50]
    assert red > 200 and green < 60 and blue < 60


@pytest.mark.parametrize(
    "name",
    [
        "JPGExtended.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "JPEG2000.dcm",
        "emri_small_big_endian.dcm",
        "image_dfl.dcm",
    ],
)
def test_every_stored_encoding_renders(stored, name: str) -> None:
    """Each decodes and is rendered as the uncompressed pixels, windowed the same way,
    would be: compared with pydicom's own decoding through the same window."""
    archive, paths = stored
    ds = dcmread(get_testdata_file(name))
    pixels = ds.pixel_array[0] if int(ds.get("NumberOfFrames", 1) or 1) > 1 else ds.pixel_array
    low, high = np.percentile(pixels, (5, 95))
    center, width = (low + high) / 2, max(high - low, 2)
    grey = image(get(archive, paths[name] + "/rendered", window=f"{center},{width}"))
    expected = np.clip((pixels - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255
    assert grey.shape == pixels.shape
    assert np.abs(grey - expected).mean() <= 1.0


def test_formats_viewport_and_quality(stored) -> None:
    archive, paths = stored
    path = paths["RG1_UNCR.dcm"] + "/rendered"
    for accept, signature in (
        ("image/jpeg", b"\xff\xd8\xff"),
        ("image/png", b"\x89PNG"),
        ("image/webp", b"RIFF"),
        ("image/webp;q=0.5, image/png", b"\x89PNG"),
        ("*/*", b"\xff\xd8\xff"),
    ):
        response = get(archive, path, accept=accept, viewport="64,64")
        assert response.status_code == 200, response.text
        assert response.content.startswith(signature), accept
        assert response.headers["content-type"].startswith(
            accept.split(",")[-1].split(";")[0].strip().replace("*/*", "image/jpeg")
        )
    ds = dcmread(get_testdata_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    small = Image.open(io.BytesIO(get(archive, path, viewport="200,200").content))
    assert max(small.size) == 200
    assert abs(small.size[0] / small.size[1] - ds.Columns / ds.Rows) < 0.02
    low = get(archive, path, accept="image/jpeg", quality="10").content
    high = get(archive, path, accept="image/jpeg", quality="95").content
    assert len(low) < len(high)


def test_thumbnails_show_the_middle_slice(stored, tmp_path: Path) -> None:
    archive, paths = stored
    slices = [small_ct(number=n, seed="thumbnail-series") for n in (1, 2, 3)]
    blobs = []
    for n, ds in enumerate(slices):
        pixels = np.zeros((64, 64), dtype=np.int16)
        pixels[n * 20 : n * 20 + 10, :] = 1000  # a bright band, lower on each slice
        ds.PixelData = pixels.tobytes()
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        blobs.append(out.getvalue())
        assert int(ds.InstanceNumber) == n + 1
    _stow(archive, blobs)
    wait_drained(archive)
    study, series = slices[0].StudyInstanceUID, slices[0].SeriesInstanceUID
    middle = f"/dicomweb/studies/{study}/series/{series}/instances/{slices[1].SOPInstanceUID}"
    expected = get(archive, middle + "/thumbnail").content
    assert get(archive, f"/dicomweb/studies/{study}/series/{series}/thumbnail").content == expected
    assert get(archive, f"/dicomweb/studies/{study}/thumbnail").content == expected
    first = get(
        archive, middle.replace(slices[1].SOPInstanceUID, slices[0].SOPInstanceUID) + "/thumbnail"
    )
    assert first.content != expected
    # A multi-frame instance's thumbnail is its middle frame (5 of 10, by frame number).
    frames = paths["emri_small.dcm"]
    assert (
        get(archive, frames + "/thumbnail").content
        == get(archive, frames + "/frames/5/rendered", viewport="256,256").content
    )


def test_bad_requests_get_a_reason(stored, tmp_path: Path) -> None:
    archive, paths = stored
    ct = paths["CT_small.dcm"]
    for path, params, accept, status in (
        (ct + "/frames/2/rendered", {}, "image/png", 404),
        (paths["emri_small.dcm"] + "/frames/11/rendered", {}, "image/png", 404),
        (ct + "/frames/1,2/rendered", {}, "image/png", 400),
        (ct + "/rendered", {"window": "abc"}, "image/png", 400),
        (ct + "/rendered", {"window": "40,0"}, "image/png", 400),
        (ct + "/rendered", {"window": "40,400,cubic"}, "image/png", 400),
        (ct + "/rendered", {"viewport": "0,10"}, "image/png", 400),
        (ct + "/rendered", {"quality": "101"}, "image/jpeg", 400),
        (ct + "/rendered", {}, "application/pdf", 406),
        (ct + "/rendered", {}, "image/jpeg;q=0, image/png;q=0, image/webp;q=0, */*", 406),
        (ct + "/frames/%C2%B2/rendered", {}, "image/png", 400),
        (ct + "/rendered", {"quality": "²"}, "image/jpeg", 400),
        (ct + "/rendered", {"viewport": "0.5,0.5"}, "image/png", 400),
        (ct + "/rendered", {"window": "nan,400"}, "image/png", 400),
        (ct.replace("/instances/", "/instances/9") + "/rendered", {}, "image/png", 404),
    ):
        response = get(archive, path, accept=accept, **params)
        assert response.status_code == status, (path, params, response.text)
        assert response.json()["detail"]


def test_an_undecodable_frame_is_a_415_and_the_archive_goes_on(stored) -> None:
    """JPEG 2000 whose codestream is damaged: a reason, not a server error."""
    archive, paths = stored
    ds = dcmread(get_testdata_file("JPEG2000.dcm"))
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".9"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    data = bytearray(ds.PixelData)
    data[40:-8] = b"\x00" * (len(data) - 48)  # keep the item tags, wipe the codestream
    ds.PixelData = bytes(data)
    response = get(archive, store(archive, ds) + "/rendered")
    assert response.status_code == 415, response.text
    assert "cannot be decoded" in response.json()["detail"]
    assert get(archive, paths["JPEG2000.dcm"] + "/rendered").status_code == 200


def renditions(archive: RunningArchive) -> dict[str, float]:
    """The archive's count of renditions served, by source (rendered now, or cached), and
    of answers given again from memory ("memory")."""
    text = httpx.get(f"{archive.http}/metrics", timeout=30).text
    found = {"rendered": 0.0, "cached": 0.0, "memory": 0.0}
    for line in text.splitlines():
        if line.startswith("pocketpacs_renditions_total{"):
            source = line.split('source="')[1].split('"')[0]
            found[source] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("pocketpacs_answered_from_memory_total "):
            found["memory"] = float(line.rsplit(" ", 1)[1])
    return found


def test_a_rendition_is_kept_and_served_again_without_decoding(stored) -> None:
    archive, paths = stored
    path = paths["MR_small.dcm"] + "/rendered"
    before = renditions(archive)
    first = get(archive, path, window="600,1200", quality="80", accept="image/jpeg")
    after_first = renditions(archive)
    again = get(archive, path, window="600,1200", quality="80", accept="image/jpeg")
    after_again = renditions(archive)
    assert first.status_code == again.status_code == 200
    assert again.content == first.content
    assert after_first["rendered"] == before["rendered"] + 1
    assert after_again["rendered"] == after_first["rendered"]
    served_again = after_again["cached"] + after_again["memory"]
    assert served_again == after_first["cached"] + after_first["memory"] + 1
    # Other parameters are another rendition.
    get(archive, path, window="600,1000", quality="80", accept="image/jpeg")
    assert renditions(archive)["rendered"] == after_again["rendered"] + 1


def test_series_thumbnails_are_made_after_ingest(stored, s3_server) -> None:
    """The worker renders a new series' thumbnail once the series is quiet: the first
    request for it is served from the bucket."""
    archive, _ = stored
    ds = small_ct(number=1, seed="thumbnail-worker")
    store(archive, ds)
    bucket = bucket_of(archive, s3_server)
    prefix = f"derived/rendered/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/"
    deadline = time.monotonic() + 30
    while not list(bucket.list(prefix)):
        assert time.monotonic() < deadline, "no thumbnail made after ingest"
        time.sleep(0.2)
    made = renditions(archive)  # served over HTTP: the worker's work is not counted here
    path = f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/thumbnail"
    response = get(archive, path, accept="image/jpeg")
    assert response.status_code == 200
    assert response.content.startswith(b"\xff\xd8\xff")
    assert renditions(archive) == {**made, "cached": made["cached"] + 1}


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        ("", "image/jpeg"),
        ("image/png", "image/png"),
        ("image/webp;q=0.5, image/png", "image/png"),
        ("image/*", "image/jpeg"),
        # Refused by name, so the wildcard gives the next format, not the refused one.
        ("image/jpeg;q=0, image/png;q=0.5, */*;q=0.8", "image/webp"),
        ("text/html, image/png;q=0.9, */*;q=0.1", "image/png"),
    ],
)
def test_the_format_the_client_prefers(accept: str, chosen: str) -> None:
    assert media_type_of(accept) == chosen


@pytest.mark.parametrize("name", ["vlut_04.dcm", "mlut_18.dcm"])
def test_lut_sequences_in_implicit_vr_render(stored, name: str) -> None:
    """A VOI LUT Sequence and a Modality LUT Sequence, their LUT Data read as OW (Implicit
    VR): rendered through the tables, not a server error."""
    archive, _ = stored
    ds = dcmread(get_testdata_file(name))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID + ".7"
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = store(archive, ds, implicit_vr=True, little_endian=True) + "/rendered"
    grey = image(get(archive, path)).astype(np.float64)
    assert grey.shape == (ds.Rows, ds.Columns)
    assert grey.std() > 10  # an image, not a blank


def test_htj2k_renders_as_the_same_image_uncompressed(stored) -> None:
    """HTJ2K (encoded here with imagecodecs, losslessly): the same grey values as the
    uncompressed original through the same window."""
    archive, paths = stored
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.PixelData = encapsulate([imagecodecs.htj2k_encode(ds.pixel_array)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID + ".8"
    htj2k = image(get(archive, store(archive, ds) + "/rendered", window="40,400"))
    original = image(get(archive, paths["CT_small.dcm"] + "/rendered", window="40,400"))
    assert np.array_equal(htj2k, original)


def _renamed(ds: Dataset) -> Dataset:
    """A copy of `ds` as an instance of its own."""
    copy = ds.copy()
    copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return copy


@pytest.mark.parametrize(
    ("name", "syntax", "unsigned"),
    [
        ("CT_small.dcm", JPEG2000MCLossless, False),
        ("CT_small.dcm", JPEG2000MCLossless, True),  # a codestream that lost the sign
        ("SC_rgb.dcm", JPEG2000MC, False),
    ],
)
def test_jpeg_2000_part_2_renders_as_the_same_image_uncompressed(
    stored, name, syntax, unsigned
) -> None:
    """The JPEG 2000 Part 2 (multi-component) syntaxes, which pydicom has no decoder for:
    a codestream encoded here with imagecodecs (losslessly, the colour one with its
    component transform) renders as the uncompressed original; signed pixels in a
    codestream that says unsigned are read as Pixel Representation says, as pydicom does
    for Part 1 (negative stored values stay black, not white)."""
    archive, paths = stored
    ds = dcmread(get_testdata_file(name))
    original = ds.pixel_array
    colour = original.ndim == 3
    if unsigned:
        original = original.copy()
        original[:8] = -1000  # negative stored values: the sign bit set
        ds.PixelData = original.tobytes()
        paths = {**paths, name: store(archive, _renamed(ds))}
        original = original.view(np.uint16)
    ds.PixelData = encapsulate([imagecodecs.jpeg2k_encode(original, level=0, mct=colour)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    if colour:
        ds.PhotometricInterpretation = "YBR_RCT"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    rendered = image(get(archive, store(archive, ds) + "/rendered", window="40,400"))
    if colour:
        assert np.array_equal(rendered, original)
    else:
        expected = image(get(archive, paths[name] + "/rendered", window="40,400"))
        assert np.array_equal(rendered, expected)


def test_pixel_padding_is_left_black(stored) -> None:
    """Padding (PixelPaddingValue) is masked, not windowed: on a MONOCHROME1 image, where
    low values are white, the padded rows stay black beside white pixels of nearly the
    same value."""
    archive, _ = stored
    ds = small_ct(number=1, seed="padding")
    pixels = np.full((64, 64), -990, dtype=np.int16)
    pixels[:10, :] = -1000  # padding
    pixels[40:, :] = 500
    ds.PixelData = pixels.tobytes()
    ds.PixelPaddingValue = -1000
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    grey = image(get(archive, store(archive, ds) + "/rendered", window="0,200"))
    assert grey[:10].max() == 0  # padding: black
    assert grey[10:40].min() == 255  # -990, below the window, white in MONOCHROME1
    assert grey[40:].max() == 0  # 500, above the window, black in MONOCHROME1


def test_an_enhanced_ct_renders_each_frame_in_its_own_window(stored) -> None:
    """Enhanced CT (pydicom's eCT_Supplemental, two frames) given a window per frame in its
    Per-Frame Functional Groups, over the shared one: each frame comes out as its own
    window makes it, in Hounsfield units from the shared Pixel Value Transformation."""
    archive, _ = stored
    ds = dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    windows = [(40.0, 400.0), (-600.0, 1500.0)]  # soft tissue, then lung
    for group, (center, width) in zip(ds.PerFrameFunctionalGroupsSequence, windows, strict=True):
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth = center, width
        group.FrameVOILUTSequence = [voi]
    path = store(archive, ds)
    hounsfield = ds.pixel_array.astype(np.float64) - 1024  # Rescale Intercept -1024, slope 1
    for number, (center, width) in enumerate(windows, start=1):
        grey = image(get(archive, f"{path}/frames/{number}/rendered"))
        expected = np.clip((hounsfield[number - 1] - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
        assert np.abs(grey - expected * 255).mean() <= 1.0, f"frame {number}"


def test_a_window_from_the_pixels_covers_their_bulk() -> None:
    """With no window asked for or stored, the window spans the 0.5th to 99.5th percentile
    of the non-padding pixels (taken from a grid of them on a large image): the image
    comes out as the exact percentiles would make it, within one grey level on average,
    and the padding stays black."""
    rng = np.random.default_rng(7)
    pixels = rng.normal(300, 400, (1200, 1000)).astype(np.int16)
    pixels[:100] = -2000  # padding, far below everything else
    ds = small_ct(number=1, seed="bulk")
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelPaddingValue = -2000
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    shown = pixels[100:].astype(np.float64) - 1024
    low, high = np.percentile(shown, (0.5, 99.5))
    center, width = (low + high) / 2 + 0.5, high - low + 1
    expected = np.clip((shown - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255
    grey = displayed(ds, pixels, 0)
    assert grey[:100].max() == 0
    assert np.abs(grey[100:] - expected).mean() <= 1.0
    assert grey[100:].min() == 0 and grey[100:].max() == 255  # the tails clipped, not lost


def _variant(name: str, tmp_path: Path) -> Path:
    """A small stored object of each kind the pixel layout covers, with what trips a
    reader of raw samples: bits above BitsStored set, a sign in bit 11, several frames.
    Without a stored window, the window comes from the pixels."""
    rng = np.random.default_rng(11)
    ds = small_ct(number=1, seed=name)
    syntax = None
    if name == "signed 12 of 16, high bits set":
        values = rng.integers(-2048, 2048, (40, 30)).astype(np.int16)
        raw = (values.view(np.uint16) & 0x0FFF) | 0xB000  # garbage above bit 11
        ds.Rows, ds.Columns, ds.BitsStored, ds.HighBit = 40, 30, 12, 11
        ds.PixelRepresentation, ds.PixelData = 1, raw.astype(np.uint16).tobytes()
        ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 1, -1024, 40, 400
    elif name == "unsigned 12 of 16, high bits set":
        raw = rng.integers(0, 4096, (40, 30)).astype(np.uint16) | 0x7000
        ds.Rows, ds.Columns, ds.BitsStored, ds.HighBit = 40, 30, 12, 11
        ds.PixelRepresentation, ds.PixelData = 0, raw.tobytes()
    elif name == "MONOCHROME1, 8 bits, padded, implicit VR":
        raw = rng.integers(0, 256, (33, 17)).astype(np.uint8)
        raw[:3] = 7
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 33, 17, 8, 8, 7
        ds.PixelRepresentation, ds.PhotometricInterpretation = 0, "MONOCHROME1"
        ds.PixelPaddingValue, ds.PixelData = 7, raw.tobytes() + b"\0"  # odd length, padded
        ds["PixelData"].VR = "OB"
        syntax = ImplicitVRLittleEndian
    elif name == "signed 16 of 16, padding range, no window":
        values = rng.integers(-32768, 32768, (24, 36)).astype(np.int16)
        values[:4] = -2000 - np.arange(36, dtype=np.int16)  # padding, within the range
        ds.Rows, ds.Columns, ds.BitsStored, ds.HighBit = 24, 36, 16, 15
        ds.PixelRepresentation, ds.PixelData = 1, values.tobytes()
        ds.PixelPaddingValue, ds.PixelPaddingRangeLimit = -2000, -2100
        ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-20"
    elif name == "MONOCHROME1, stored sigmoid window":
        raw = rng.integers(0, 1024, (30, 30)).astype(np.uint16)
        ds.Rows, ds.Columns, ds.BitsStored, ds.HighBit = 30, 30, 10, 9
        ds.PixelRepresentation, ds.PhotometricInterpretation = 0, "MONOCHROME1"
        ds.PixelData = raw.tobytes()
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = ["500", "80"], ["300", "20"], "SIGMOID"
    elif name == "three grey frames":
        frames = rng.integers(0, 3000, (3, 20, 24)).astype(np.int16)
        ds.Rows, ds.Columns, ds.NumberOfFrames = 20, 24, 3
        ds.PixelData = frames.tobytes()
    elif name == "RGB, two frames":
        ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = 12, 10, 2, 3
        ds.PhotometricInterpretation, ds.PlanarConfiguration = "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = rng.integers(0, 256, (2, 12, 10, 3)).astype(np.uint8).tobytes()
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    path = tmp_path / f"{abs(hash(name))}.dcm"
    ds.save_as(path, enforce_file_format=True, little_endian=True, implicit_vr=bool(syntax))
    return path


@pytest.mark.parametrize(
    "name",
    [
        "signed 12 of 16, high bits set",
        "unsigned 12 of 16, high bits set",
        "MONOCHROME1, 8 bits, padded, implicit VR",
        "signed 16 of 16, padding range, no window",
        "MONOCHROME1, stored sigmoid window",
        "three grey frames",
        "RGB, two frames",
    ],
)
def test_a_frame_read_by_its_layout_renders_as_pydicom_decodes_it(name, tmp_path) -> None:
    """The pixel layout read at ingest locates every frame in the stored bytes: each frame
    rendered from it is, byte for byte, the image pydicom's own decoding gives, with the
    stored window, requested ones of each function and a viewport; a frame outside the
    object is refused the same way, and bytes cut short are undecodable, not a server
    error. Each rendering twice: the second from the tables the first left."""
    path = _variant(name, tmp_path)
    layout = read_header(path).pixels
    assert layout is not None
    data = path.read_bytes()
    renderings = [
        Rendering("image/png"),
        Rendering("image/png", (8, 8), Window(100, 900)),
        Rendering("image/png", None, Window(-30.5, 0.5, WindowFunction.LINEAR_EXACT)),
        Rendering("image/png", None, Window(200, 700, WindowFunction.SIGMOID)),
    ]
    for rendering in renderings * 2:
        for number in range(1, layout.number_of_frames + 1):
            expected = render(io.BytesIO(data), number, rendering, in_memory=True)
            assert render_laid_out(data, layout, number, rendering) == expected
        with pytest.raises(FrameNotFound):
            render_laid_out(data, layout, layout.number_of_frames + 1, rendering)
    with pytest.raises(Undecodable):  # bytes cut short of what the layout says
        render_laid_out(data[: layout.offset + 10], layout, 1, Rendering())


@pytest.mark.parametrize(
    "name", ["JPEG2000.dcm", "emri_small_big_endian.dcm", "OBXXXX1A.dcm", "vlut_04.dcm"]
)
def test_what_the_layout_does_not_cover_is_left_to_pydicom(name) -> None:
    """Compressed or big-endian pixel data, palettes and LUT sequences have no layout:
    those frames are decoded by pydicom as before."""
    assert read_header(Path(get_testdata_file(name))).pixels is None


def test_what_the_layout_would_show_wrongly_is_left_to_pydicom(tmp_path) -> None:
    """RGB with fewer than 8 bits stored, and a stored window that is not a number, get no
    pixel layout: pydicom's path renders them, masking the colour samples and taking the
    window from the pixels, instead of a wrong image or a server error."""
    rgb = dcmread(_variant("RGB, two frames", tmp_path))
    rgb.BitsStored, rgb.HighBit = 6, 5
    grey = dcmread(_variant("unsigned 12 of 16, high bits set", tmp_path))
    grey.add_new(0x00281050, "LO", "abc")  # Window Center, its VR made DS below
    grey.WindowWidth = "400"
    for ds in (rgb, grey):
        path = tmp_path / "changed.dcm"
        ds.save_as(path, enforce_file_format=True)
        path.write_bytes(path.read_bytes().replace(b"\x28\x00\x50\x10LO", b"\x28\x00\x50\x10DS"))
        assert read_header(path).pixels is None
        assert render(io.BytesIO(path.read_bytes()), 1, Rendering(), in_memory=True)


def test_after_a_restart_frames_are_still_read_by_their_layout(
    objects: ObjectStore, index: Index, tmp_path: Path
) -> None:
    """The pixel layout read at ingest is kept in the index, with the window a single-frame
    image's pixels set when it stores none: a process that did not store the instance (the
    archive has restarted since) still reads its frames from the stored bytes by the
    layout, on the event loop (`here`), and they come out as pydicom decodes them. An
    instance without a layout (compressed) is left to a thread."""
    copies = LocalCopies(tmp_path / "copies", limit_bytes=10**8)
    pipeline = IngestPipeline(objects, index, local_copies=copies)
    laid_out = [
        _variant(name, tmp_path)
        for name in (
            "unsigned 12 of 16, high bits set",
            "MONOCHROME1, 8 bits, padded, implicit VR",
            "signed 12 of 16, high bits set",  # stores a window
        )
    ]
    compressed = Path(get_testdata_file("JPEG2000.dcm"))
    try:
        for path in (*laid_out, compressed):
            assert pipeline.store(InstanceToStore(path, Origin("north"))).outcome.ok
    finally:
        pipeline.close()
    renditions = Renditions(objects, local_copies=copies)  # a new process: told of nothing
    try:
        for path in (*laid_out, compressed):
            uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            query = Query(QueryLevel.IMAGE, {"SOPInstanceUID": uid})
            [item] = locate(index, query, Viewer.archive())
            expected = render(io.BytesIO(path.read_bytes()), 1, Rendering(), in_memory=True)
            layout = layout_from_text(item.pixel_layout)
            if path == compressed:
                assert layout is None
                with pytest.raises(NotHere):
                    renditions.rendered(item, 1, Rendering(), here=True)
                assert renditions.rendered(item, 1, Rendering()).data == expected
            else:
                assert layout is not None
                assert (layout.window is None) == (path == laid_out[2])
                rendition = renditions.rendered(item, 1, Rendering(), here=True)
                assert rendition == Rendition(expected, cached=False)
    finally:
        renditions.close()


def test_an_instance_stored_before_layouts_were_kept_gets_one_when_rendered(
    objects: ObjectStore, index: Index, tmp_path: Path
) -> None:
    """An index row without a pixel layout (the instance was stored by an earlier version)
    is rendered through pydicom once; its layout, read from the bytes rendered, is then
    written to the index, the same one ingest records, window included, and the next
    process renders by it. A native object that has no layout (a palette) stays without."""
    copies = LocalCopies(tmp_path / "copies", limit_bytes=10**8)
    pipeline = IngestPipeline(objects, index, local_copies=copies)
    laid_out = _variant("unsigned 12 of 16, high bits set", tmp_path)
    palette = Path(get_testdata_file("OBXXXX1A.dcm"))
    try:
        for path in (laid_out, palette):
            assert pipeline.store(InstanceToStore(path, Origin("north"))).outcome.ok
    finally:
        pipeline.close()

    def located(path: Path) -> Located:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        return locate(index, Query(QueryLevel.IMAGE, {"SOPInstanceUID": uid}), Viewer.archive())[0]

    recorded = located(laid_out).pixel_layout
    assert recorded is not None and located(palette).pixel_layout is None
    with index.engine.begin() as connection:  # as an earlier version left the row
        connection.execute(text("UPDATE instances SET pixel_layout = NULL"))
    renditions = Renditions(objects, local_copies=copies, index=index, quiet_seconds=0)
    try:
        for path in (laid_out, palette):
            expected = render(io.BytesIO(path.read_bytes()), 1, Rendering(), in_memory=True)
            with pytest.raises(NotHere):
                renditions.rendered(located(path), 1, Rendering(), here=True)
            assert renditions.rendered(located(path), 1, Rendering()).data == expected
    finally:
        renditions.close()
    assert located(laid_out).pixel_layout == recorded
    assert located(palette).pixel_layout is None
    again = Renditions(objects, local_copies=copies)
    try:
        expected = render(io.BytesIO(laid_out.read_bytes()), 1, Rendering(), in_memory=True)
        assert again.rendered(located(laid_out), 1, Rendering(), here=True).data == expected
    finally:
        again.close()
    # Text this version cannot read (a newer version's, or damaged) is rendered as if
    # there were none, and left as it is.
    newer = '[2,"written by a later version"]'
    with index.engine.begin() as connection:
        connection.execute(text("UPDATE instances SET pixel_layout = :t"), {"t": newer})
    later = Renditions(objects, local_copies=copies, index=index, quiet_seconds=0)
    try:
        assert later.rendered(located(laid_out), 1, Rendering(quality=50)).data.startswith(
            b"\xff\xd8"
        )
    finally:
        later.close()
    assert located(laid_out).pixel_layout == newer


@pytest.mark.parametrize(
    "damage",
    [
        "not json",
        "[]",
        "[1]",
        '[1,0,4,4,1,16,12,0,1,[[2621444,"CS",["a list"]]],null]',
        "[1,0,4,4,1,16,40,0,1,[],null]",
        "[1,0,-4,4,1,16,12,0,1,[],null]",
        "[1,0,4,4,1,16,12,0,1,[],[5,0]]",
        "[1,0,4,4,1,16,12,0,1,[],[NaN,100]]",
        "[1,0,4,4,1,16,12,0,1,{},null,7]",
    ],
)
def test_layout_text_that_does_not_add_up_is_no_layout(damage: str) -> None:
    """A damaged or hand-written row's layout is not used: the instance renders through
    pydicom instead of an error or a wrong image."""
    assert layout_from_text(damage) is None
    assert layout_from_text("[1,0,4,4,1,16,12,0,1,[],[40.5,100.0]]") is not None


def test_the_lane_and_the_routes_answer_alike(stored, s3_server) -> None:
    """Rendered resources are answered by `RenderedLane`, before FastAPI, and by the
    FastAPI routes that document them when the lane is not in front: the same images
    with the same entity tags, and the same refusals with the same reasons."""
    archive, paths = stored
    index = Index(f"sqlite:///{archive.data_dir / 'index.sqlite3'}")
    services = Services(objects=bucket_of(archive, s3_server), index=index, open_access=True)
    app = create_app(services)
    instance = paths["CT_small.dcm"]
    series = instance.rsplit("/instances/", 1)[0]
    asks = [
        f"{instance}/rendered",
        f"{instance}/rendered?window=40,400&viewport=64,64&quality=70",
        f"{instance}/frames/1/rendered",
        f"{instance}/frames/2/rendered",  # no such frame: 404
        f"{instance}/frames/first/rendered",  # 400
        f"{instance}/rendered?window=40",  # 400
        f"{instance}/thumbnail",
        f"{series}/thumbnail",
        f"{series.rsplit('/series/', 1)[0]}/thumbnail",
        "/dicomweb/studies/1.2.3/thumbnail",  # no such study: 404
        "/dicomweb/studies/not-a-uid/thumbnail",  # 400
    ]

    reached_fastapi: list[str] = []

    async def behind_the_lane(scope, receive, send) -> None:
        reached_fastapi.append(scope["path"])
        await app(scope, receive, send)

    async def answers(application) -> list[httpx.Response]:
        transport = httpx.ASGITransport(application)
        async with httpx.AsyncClient(transport=transport, base_url="http://archive") as client:
            return [await client.get(url, headers={"Accept": "image/png"}) for url in asks]

    try:
        by_lane = asyncio.run(answers(RenderedLane(behind_the_lane, app)))
        assert reached_fastapi == []  # the lane answered every one
        by_routes = asyncio.run(answers(app))
    finally:
        services.renditions.close()
        services.shares.close()
        index.dispose()
    for url, lane, route in zip(asks, by_lane, by_routes, strict=True):
        seen = [
            (r.status_code, r.headers.get("content-type"), r.headers.get("etag"), r.content)
            for r in (lane, route)
        ]
        assert seen[0] == seen[1], url
    assert [r.status_code for r in by_lane] == [
        200,
        200,
        200,
        404,
        400,
        400,
        200,
        200,
        200,
        404,
        400,
    ]


def test_a_new_study_renders_while_the_object_store_hangs(stored, s3_server) -> None:
    """A study just stored is rendered from the archive's local copy of its originals,
    without the object store: with the store's process frozen, its first image still
    arrives at once."""
    archive, _ = stored
    ds = small_ct(number=1, seed="local-copy")
    path = store(archive, ds)
    os.kill(s3_server.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        response = get(archive, path + "/rendered", accept="image/jpeg")
        elapsed = time.monotonic() - started
    finally:
        os.kill(s3_server.process.pid, signal.SIGCONT)
    assert response.status_code == 200, response.text
    assert response.content.startswith(b"\xff\xd8")
    assert elapsed < 5


def test_a_rendering_that_needs_the_object_store_waits_alone(stored, s3_server) -> None:
    """Small images are rendered on the HTTP process's event loop when their original is
    on local disk; one whose original is only in the bucket is rendered in a thread. With
    the object store frozen, such a rendering waits for it, and meanwhile the archive
    goes on rendering others from local copies and answering searches."""
    archive, paths = stored
    digest = hashlib.sha256(Path(get_testdata_file("MR_small.dcm")).read_bytes()).hexdigest()
    removed = [p for p in archive.data_dir.glob(f"copies*/{digest}") if p.unlink() is None]
    assert removed, "the archive kept no local copy of MR_small.dcm"
    waiting: list[httpx.Response] = []
    os.kill(s3_server.process.pid, signal.SIGSTOP)
    try:
        remote = threading.Thread(
            target=lambda: waiting.append(
                get(archive, paths["MR_small.dcm"] + "/rendered", quality="41")
            )
        )
        remote.start()
        time.sleep(0.5)  # its GET is under way, and hangs
        started = time.monotonic()
        local = get(archive, paths["CT_small.dcm"] + "/rendered", quality="41")
        search = httpx.get(f"{archive.http}/dicomweb/studies", timeout=10)
        elapsed = time.monotonic() - started
        assert not waiting, "the bucket's rendering did not wait for the frozen bucket"
    finally:
        os.kill(s3_server.process.pid, signal.SIGCONT)
    remote.join(timeout=60)
    assert local.status_code == 200 and search.status_code == 200
    assert elapsed < 2
    assert waiting and waiting[0].status_code in (200, 503)


def test_a_held_image_is_revalidated_not_sent_again(stored) -> None:
    """An entity tag per rendition: a client that holds the image gets a 304 without it
    (and is still checked and audited); other parameters are another image."""
    archive, paths = stored
    path = paths["MR_small.dcm"] + "/rendered"
    first = get(archive, path, accept="image/jpeg")
    etag = first.headers["etag"]
    assert first.headers["cache-control"] == "private, no-cache"
    again = httpx.get(
        f"{archive.http}{path}",
        headers={"Accept": "image/jpeg", "If-None-Match": etag},
        timeout=60,
    )
    assert again.status_code == 304
    assert again.content == b""
    other = httpx.get(
        f"{archive.http}{path}",
        params={"quality": "50"},
        headers={"Accept": "image/jpeg", "If-None-Match": etag},
        timeout=60,
    )
    assert other.status_code == 200
    assert other.headers["etag"] != etag


def test_renditions_reach_the_bucket_when_requests_pause(objects) -> None:
    """A new rendition is served at once and written to the bucket behind the requests:
    not while they keep coming, and every waiting one when the archive stops (close)."""
    ds = small_ct(number=1, seed="write-behind")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    objects.put_bytes("dicom/write-behind.dcm", data, "application/dicom")
    item = Located(
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        object_key="dicom/write-behind.dcm",
        size=len(data),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    renditions = Renditions(objects, quiet_seconds=60)
    try:
        first = renditions.rendered(item, 1, Rendering())
        assert not first.cached and first.data.startswith(b"\xff\xd8\xff")
        assert renditions.rendered(item, 1, Rendering()) == Rendition(first.data, cached=True)
        time.sleep(0.5)  # the keeper has had time to write, had it not waited
        assert not list(objects.list(RENDERED_PREFIX))
    finally:
        renditions.close()
    kept = [o.key for o in objects.list(RENDERED_PREFIX)]
    assert kept == [rendition_key(item, 1, Rendering())]
    assert objects.get(kept[0]) == first.data
    # A new process (nothing in memory) is served from the bucket without decoding.
    assert Renditions(objects).rendered(item, 1, Rendering()) == Rendition(first.data, True)


def _video(syntax: str, codec: str, container: str, name: str, frames: int = 8) -> Dataset:
    """A Video Photographic Image of `frames` frames, encoded by FFmpeg (PyAV) as
    `syntax` needs: a grey field that brightens by 25 a frame from 20, with a red box.
    Its UIDs are `name`'s."""
    out = io.BytesIO()
    with av.open(out, "w", format=container) as video:
        stream = video.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 176, 144, "yuv420p"
        if codec == "libx265":
            stream.options = {"x265-params": "log-level=error"}
        for number in range(frames):
            picture = np.full((144, 176, 3), 20 + 25 * number, np.uint8)
            picture[10:40, 10:60] = (220, 30, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                video.mux(packet)
        for packet in stream.encode():
            video.mux(packet)
    ds = small_ct(number=1, seed=f"video {name}")
    for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        ds.pop(keyword, None)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = VideoPhotographicImageStorage
    ds.Modality = "XC"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 144, 176, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "YBR_PARTIAL_420"
    ds.PlanarConfiguration, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 0, 8, 8, 7
    ds.PixelRepresentation, ds.FrameTime, ds.CineRate = 0, "40", 25
    ds.FrameIncrementPointer = 0x00181063
    ds.PixelData = encapsulate([out.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


@pytest.mark.parametrize(
    ("syntax", "codec", "container"),
    [
        (MPEG2MPML, "mpeg2video", "mpeg2video"),
        (MPEG2MPMLF, "mpeg2video", "mpeg"),  # a program stream, in fragments
        (MPEG4HP41, "libx264", "h264"),
        (HEVCMP51, "libx265", "hevc"),
    ],
)
def test_video_frames_render(stored, syntax: str, codec: str, container: str) -> None:
    """MPEG-2, H.264 and HEVC video (encoded here by FFmpeg): the frame asked for, in
    colour, with its own brightness; the thumbnail is the middle frame; a frame past the
    end is a 404."""
    archive, _ = stored
    ds = _video(syntax, codec, container, name=syntax)
    if syntax == MPEG2MPMLF:  # a fragmentable syntax: the stream split across items
        stream = b"".join(generate_frames(ds.PixelData, number_of_frames=1))
        ds.PixelData = encapsulate([stream[:1000], stream[1000:3000], stream[3000:]])
    path = store(archive, ds)
    fifth = image(get(archive, path + "/frames/5/rendered"))
    assert abs(float(fifth[60:140, 80:170].mean()) - 120) < 6
    red, green, blue = (float(fifth[15:35, 15:55, c].mean()) for c in range(3))
    assert red > 180 and green < 70 and blue < 70
    middle = image(get(archive, path + "/thumbnail"))  # frame 4 of 8
    assert abs(float(middle[40:90, 60:120].mean()) - 95) < 6
    assert abs(float(image(get(archive, path + "/rendered"))[60:140, 80:170].mean()) - 20) < 6
    past = get(archive, path + "/frames/9/rendered")
    assert past.status_code == 404, past.text


def test_a_damaged_or_short_video_is_a_415_and_the_archive_goes_on(stored) -> None:
    """A stream that is not video, and one that ends before the frame asked for (3 frames
    where 8 are declared): a reason, not a server error."""
    archive, paths = stored
    noise = _video(MPEG4HP41, "libx264", "h264", name="noise")
    noise.PixelData = encapsulate([np.random.default_rng(5).bytes(4000)])
    response = get(archive, store(archive, noise) + "/rendered")
    assert response.status_code == 415, response.text
    assert "video" in response.json()["detail"]
    short = _video(MPEG4HP41, "libx264", "h264", name="short", frames=3)
    short.NumberOfFrames = 8
    path = store(archive, short)
    assert get(archive, path + "/frames/3/rendered").status_code == 200
    response = get(archive, path + "/frames/8/rendered")
    assert response.status_code == 415, response.text
    assert "ends before frame 8" in response.json()["detail"]
    assert get(archive, paths["CT_small.dcm"] + "/rendered").status_code == 200
