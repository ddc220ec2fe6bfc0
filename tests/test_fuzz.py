"""Mutated input (issue 6): C-STORE data sets and STOW-RS bodies changed by hypothesis
(bytes flipped, cut, repeated, inserted), thousands of them, at a running archive. Every
C-STORE gets a response on a live association, never "internal error"; every STOW-RS
request a 2xx or 4xx with a reason, or 409; the archive keeps serving, writes no traceback,
and what it held before is unchanged. `bench/fuzz.py` runs the long version.

Each mutated data set keeps the file meta of a valid CT (so it is offered as one) and the
data set after it is mutated: the archive cannot tell it from a modality's bug."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage

from tests.conftest import RunningArchive, started_archive
from tests.test_cstore import dataset_bytes, small_ct, wait_drained
from tests.test_rendered import BOUNDARY, _stow

EXAMPLES = int(os.environ.get("POCKETPACS_FUZZ_EXAMPLES", "600"))
# What a C-STORE of a damaged data set may be answered: stored (the damage was in the
# pixels), a duplicate warning, does not match its SOP class, cannot understand, and
# out of resources for a data set too big for what is left.
STORE_STATUSES = {0x0000, 0xB000, 0xB007, 0xA900, 0xC000, 0xA700}
STOW_STATUSES = {200, 202, 400, 409, 413, 415}


def _part10(seed: str) -> bytes:
    out = io.BytesIO()
    small_ct(seed=seed).save_as(out, enforce_file_format=True)
    return out.getvalue()


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """`original` with a few random edits to its data set (the file meta kept)."""
    body = bytearray(dataset_bytes(original))
    head = original[: len(original) - len(body)]
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, max(0, len(body) - 1)))
        kind = draw(st.sampled_from(["flip", "cut", "repeat", "insert", "truncate"]))
        if kind == "flip" and body:
            body[where] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del body[where : where + draw(st.integers(1, 64))]
        elif kind == "repeat":
            body[where:where] = body[where : where + draw(st.integers(1, 64))]
        elif kind == "insert":
            body[where:where] = draw(st.binary(min_size=1, max_size=16))
        else:
            del body[where:]
    return bytes(head + body)


@pytest.fixture(scope="module")
def fuzzed(s3_server, tmp_path_factory) -> Iterator[tuple[RunningArchive, Path, list]]:
    folder = tmp_path_factory.mktemp("fuzz")
    archive = started_archive(s3_server, folder)
    _stow(archive, [_part10("fuzz-kept")])  # held before: must come through unchanged
    wait_drained(archive)
    before = httpx.get(f"{archive.http}/dicomweb/instances").json()
    yield archive, folder, before
    archive.stop()


def _unchanged(archive: RunningArchive, before: list) -> None:
    after = httpx.get(f"{archive.http}/dicomweb/instances", params={"limit": 1000}).json()
    kept = {item["00080018"]["Value"][0] for item in before}
    assert kept <= {item["00080018"]["Value"][0] for item in after}
    assert archive.process is not None and archive.process.poll() is None
    log = archive.log_path.read_text()
    assert "Traceback" not in log and "internal error" not in log


def test_mutated_c_store_data_sets(fuzzed, monkeypatch: pytest.MonkeyPatch) -> None:
    archive, folder, before = fuzzed
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # bytes as they are
    original = _part10("fuzz-store")
    path = folder / "mutated.dcm"
    ae = AE(ae_title="FUZZER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", archive.dicom_port, ae_title="POCKETPACS")
    assert assoc.is_established
    seen: dict[int, int] = {}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(mutated(original))
    def send(data: bytes) -> None:
        path.write_bytes(data)
        status = assoc.send_c_store(path)
        assert status, "no C-STORE response"
        code = int(status.Status)
        seen[code] = seen.get(code, 0) + 1
        assert code in STORE_STATUSES, hex(code)

    try:
        send()
        assert assoc.is_established  # one association took every mutated data set
    finally:
        assoc.release()
    assert sum(seen.values()) >= EXAMPLES // 2
    _unchanged(archive, before)


def test_mutated_stow_bodies(fuzzed) -> None:
    archive, _, before = fuzzed
    part = _part10("fuzz-stow")
    body = (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + part
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}
    seen: dict[int, int] = {}
    with httpx.Client(base_url=archive.http, timeout=60) as client:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(st.data())
        def post(data: st.DataObject) -> None:
            whole = bytearray(body)
            for _ in range(data.draw(st.integers(1, 4))):  # anywhere: boundary, headers, data
                where = data.draw(st.integers(0, len(whole) - 1))
                choice = data.draw(st.sampled_from(["flip", "cut", "insert"]))
                if choice == "flip":
                    whole[where] ^= 1 << data.draw(st.integers(0, 7))
                elif choice == "cut":
                    del whole[where : where + data.draw(st.integers(1, 128))]
                else:
                    whole[where:where] = data.draw(st.binary(min_size=1, max_size=32))
            response = client.post("/dicomweb/studies", content=bytes(whole), headers=headers)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code in STOW_STATUSES, (response.status_code, response.text)

        post()
    assert sum(seen.values()) >= EXAMPLES // 2
    _unchanged(archive, before)
