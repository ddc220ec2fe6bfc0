"""C-STORE into a running `pocketpacs serve`: DCMTK and pynetdicom senders, every transfer
syntax sent unchanged, duplicates, refused input, verification and the association log.

Everything is real: the archive is a subprocess on SQLite with a SeaweedFS bucket of its
own, the senders are Debian's DCMTK tools and pynetdicom. What a test compares is what a
user would: the bytes that come back out of the bucket, the index rows, the DIMSE statuses
and the log.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from storage import layout
from tests.conftest import (
    RunningArchive,
    bucket_of,
    dcmtk_env,
    started_archive,
)
from tests.dicom_factory import (
    compressed_samples,
    ct_series,
    large_cr,
    mr_image,
    multiframe_rgb,
    study_ids,
    transfer_syntax_of,
)

# --------------------------------------------------------------------------------------
# helpers shared with test_crash.py


def dataset_bytes(part10: bytes) -> bytes:
    """Everything after the file meta group of a Part 10 file.

    The archive writes its own file meta; the data set after it must be what was sent.
    The end of the meta group is found from (0002,0000) File Meta Information Group Length.
    """
    assert part10[128:132] == b"DICM", "no DICM prefix"
    tag, vr, length = struct.unpack("<4s2sH", part10[132:140])
    assert (tag, vr, length) == (b"\x02\x00\x00\x00", b"UL", 4), "no (0002,0000) first"
    (group_length,) = struct.unpack("<L", part10[140:144])
    end = 144 + group_length
    if end < len(part10):
        (group,) = struct.unpack("<H", part10[end : end + 2])
        assert group != 0x0002, "(0002,0000) does not cover the whole meta group"
    return part10[end:]


def meta_transfer_syntax(part10: bytes) -> str:
    """(0002,0010) of a Part 10 file, read from its bytes."""
    return str(dcmread(BytesIO(part10), stop_before_pixels=True).file_meta.TransferSyntaxUID)


def object_key(study: str, series: str, sop: str) -> str:
    return f"dicom/{study}/{series}/{sop}.dcm"


def key_of(path: Path) -> str:
    ds = dcmread(path, stop_before_pixels=True)
    return object_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


def health(archive: RunningArchive) -> dict:
    return httpx.get(f"{archive.http}/healthz", timeout=10, verify=archive.trust).json()


def wait_drained(archive: RunningArchive, timeout: float = 90.0) -> dict:
    """Wait until every acknowledged instance has left the spool for the bucket and index."""
    deadline = time.monotonic() + timeout
    while True:
        report = health(archive)
        if report["ingest_spool"]["pending"] == 0:
            return report
        assert time.monotonic() < deadline, f"spool never drained: {report}"
        time.sleep(0.1)


INDEX_QUERY = """
SELECT i.sop_instance_uid, i.sop_class_uid, st.study_instance_uid, se.series_instance_uid,
       p.patient_id, se.modality, i.transfer_syntax_uid, i.size, i.sha256, i.source_ae,
       i.object_key, i.number_of_frames, i.rows, i.columns
FROM instances i
JOIN series se ON i.series_pk = se.id
JOIN studies st ON se.study_pk = st.id
JOIN patients p ON st.patient_pk = p.id
"""


def index_rows(data_dir: Path) -> dict[str, dict]:
    """Instance rows of the archive's SQLite index, with their study, series and patient."""
    connection = sqlite3.connect(f"file:{data_dir / 'index.sqlite3'}?mode=ro", uri=True)
    connection.row_factory = sqlite3.Row
    try:
        rows = connection.execute(INDEX_QUERY).fetchall()
    finally:
        connection.close()
    return {row["sop_instance_uid"]: dict(row) for row in rows}


def bucket_contents(archive: RunningArchive, s3_server) -> dict[str, bytes]:
    """Every original in the archive's bucket, by key (derived objects, thumbnails made
    after ingest among them, come and go under their own prefix)."""
    store = bucket_of(archive, s3_server)
    return {info.key: store.get(info.key) for info in store.list(layout.DICOM_PREFIX)}


def run_storescu(
    archive: RunningArchive, *args: str, calling_ae: str = "STORESCU", called_ae: str = ""
) -> subprocess.CompletedProcess:
    command = [
        "storescu",
        "-aet",
        calling_ae,
        "-aec",
        called_ae or archive.ae_title,
        "127.0.0.1",
        str(archive.dicom_port),
        *args,
    ]
    return subprocess.run(command, env=dcmtk_env(), capture_output=True, text=True, timeout=180)


@contextmanager
def associated(
    archive: RunningArchive,
    contexts: list[tuple[str, str]],
    calling_ae: str = "PYNETDICOM",
    called_ae: str = "",
) -> Iterator[Association]:
    """A pynetdicom association proposing (SOP class, transfer syntax) pairs, one each."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class, syntax in dict.fromkeys(contexts):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", archive.dicom_port, ae_title=called_ae or archive.ae_title)
    try:
        assert assoc.is_established, "association refused"
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


@pytest.fixture
def send_raw(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom sends a file's data set bytes as they are on disk, never re-encoded."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.fixture(scope="module")
def shared_archive(s3_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningArchive]:
    """One archive for the tests that can tell their own instances apart (by calling AE
    title and by comparing the bucket before and after): starting `serve` costs seconds."""
    running = started_archive(s3_server, tmp_path_factory.mktemp("shared-archive"))
    yield running
    if running.process is not None:
        running.stop()


class Snapshot:
    """What the bucket (its originals) and the index hold now, to see what a test added."""

    def __init__(self, archive: RunningArchive, s3_server) -> None:
        self.archive = archive
        self.s3_server = s3_server
        wait_drained(archive)
        self.keys = {info.key for info in bucket_of(archive, s3_server).list(layout.DICOM_PREFIX)}
        self.uids = set(index_rows(archive.data_dir))

    def added(self) -> tuple[dict[str, bytes], dict[str, dict]]:
        """Objects and index rows that appeared since, once the spool has drained."""
        wait_drained(self.archive)
        store = bucket_of(self.archive, self.s3_server)
        objects = {
            info.key: store.get(info.key)
            for info in store.list(layout.DICOM_PREFIX)
            if info.key not in self.keys
        }
        rows = {
            uid: row
            for uid, row in index_rows(self.archive.data_dir).items()
            if uid not in self.uids
        }
        return objects, rows


def contexts_of(paths: list[Path]) -> list[tuple[str, str]]:
    """Each file's own SOP class and transfer syntax, as a presentation context to propose."""
    found = []
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        found.append((str(ds.file_meta.MediaStorageSOPClassUID), transfer_syntax_of(path)))
    return found


def with_unique_uid(source: Path, target: Path, as_dcmtk_sends_it: bool = False) -> Path:
    """A copy of a sample with a SOP Instance UID of its own (several pydicom samples share
    one), still in the sample's transfer syntax.

    `as_dcmtk_sends_it`: storescu re-encodes the data set it sends: encapsulated pixel data
    becomes OB (PS3.5 A.4) and (FFFC,FFFC) Data Set Trailing Padding is dropped. Writing the
    copy that way makes what storescu sends exactly the file's data set.
    """
    ds = dcmread(source)
    uid = generate_uid(entropy_srcs=["unique", str(target)])
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    if as_dcmtk_sends_it:
        if ds.file_meta.TransferSyntaxUID.is_encapsulated:
            ds["PixelData"].VR = "OB"
        if 0xFFFCFFFC in ds:
            del ds[0xFFFCFFFC]
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    assert transfer_syntax_of(target) == transfer_syntax_of(source)
    return target


def wait_for_log(archive: RunningArchive, pattern: str, timeout: float = 15.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(pattern, archive.log())
        if found:
            return found
        assert time.monotonic() < deadline, f"no log line matching {pattern!r}:\n{archive.log()}"
        time.sleep(0.1)


def assert_stored_unchanged(
    sent: list[Path], stored: dict[str, bytes], rows: dict[str, dict], source_ae: str
) -> None:
    """Each sent file is in the bucket with its data set bytes and transfer syntax, and indexed
    with the right UIDs, patient, modality, size, SHA-256 and calling AE."""
    for path in sent:
        ds = dcmread(path, stop_before_pixels=True)
        key = object_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert key in stored, f"{path.name} is not in the bucket"
        data = stored[key]
        assert dataset_bytes(data) == dataset_bytes(path.read_bytes()), f"{path.name} changed"
        syntax = transfer_syntax_of(path)
        assert meta_transfer_syntax(data) == syntax, f"{path.name} was transcoded"
        row = rows[ds.SOPInstanceUID]
        assert row["study_instance_uid"] == ds.StudyInstanceUID
        assert row["series_instance_uid"] == ds.SeriesInstanceUID
        assert row["sop_class_uid"] == ds.SOPClassUID
        assert row["patient_id"] == ds.PatientID
        assert row["modality"] == ds.Modality
        assert row["transfer_syntax_uid"] == syntax
        assert row["object_key"] == key
        assert row["size"] == len(data)
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert row["source_ae"] == source_ae


# --------------------------------------------------------------------------------------
# 1. DCMTK storescu pushes generated objects of several modalities


def test_storescu_push_is_stored_byte_identical_and_indexed(
    archive: RunningArchive, s3_server, tmp_path: Path
) -> None:
    folder = tmp_path / "push"
    sent = [
        *ct_series(folder, count=20),
        mr_image(folder),
        large_cr(folder),
        multiframe_rgb(folder),
    ]
    assert len({p.name for p in sent}) == len(sent) == 23

    result = run_storescu(archive, "+sd", str(folder))
    assert result.returncode == 0, result.stdout + result.stderr

    wait_drained(archive)
    stored = bucket_contents(archive, s3_server)
    rows = index_rows(archive.data_dir)
    assert sorted(stored) == sorted(key_of(p) for p in sent)
    assert len(rows) == 23
    assert_stored_unchanged(sent, stored, rows, source_ae="STORESCU")

    # Attributes a viewer reads from the index, not from the object.
    rgb = rows[dcmread(sent[-1], stop_before_pixels=True).SOPInstanceUID]
    assert (rgb["number_of_frames"], rgb["rows"], rgb["columns"]) == (20, 256, 256)
    cr = rows[dcmread(sent[-2], stop_before_pixels=True).SOPInstanceUID]
    assert (cr["rows"], cr["columns"]) == (2500, 2048)

    # 6. One log line for the association: who sent what, and how much.
    megabytes = sum(len(data) for data in stored.values()) / 1e6
    line = wait_for_log(archive, r"association from 'STORESCU' at 127\.0\.0\.1: [^\n]*")
    assert f"23 stored, {megabytes:.1f} MB in" in line.group(0), line.group(0)
    assert len(re.findall("association from 'STORESCU'", archive.log())) == 1


# --------------------------------------------------------------------------------------
# 2. Compressed and other transfer syntaxes arrive and are kept as sent


def test_pynetdicom_sends_every_transfer_syntax_unchanged(
    shared_archive: RunningArchive, s3_server, tmp_path: Path, send_raw: None
) -> None:
    samples = compressed_samples(tmp_path / "samples")
    sent = [with_unique_uid(path, tmp_path / "sent" / path.name) for path in samples.values()]
    syntaxes = {transfer_syntax_of(p) for p in sent}
    assert len(syntaxes) == len(sent) == 10  # one file per transfer syntax
    before = Snapshot(shared_archive, s3_server)

    with associated(shared_archive, contexts_of(sent), calling_ae="PYNETSCU") as assoc:
        for label, path in zip(samples, sent, strict=True):
            status = assoc.send_c_store(path)
            assert status.Status == 0x0000, f"{label}: {status}"

    stored, rows = before.added()
    assert sorted(stored) == sorted(key_of(p) for p in sent)
    assert len(rows) == len(sent)
    assert_stored_unchanged(sent, stored, rows, source_ae="PYNETSCU")


def test_acceptor_keeps_the_senders_encoding_and_never_picks_lossy(
    shared_archive: RunningArchive, s3_server, tmp_path: Path, send_raw: None
) -> None:
    """A sender offering several syntaxes in one context gets the one that keeps its bytes:
    Explicit VR over Implicit VR, its lossless compression over decompression, and never a
    lossy syntax while it offers anything else."""
    explicit_ct = ct_series(tmp_path / "ct", count=1, seed="preference")[0]
    j2k = with_unique_uid(
        compressed_samples(tmp_path / "samples")["JPEG 2000 Lossless"], tmp_path / "j2k.dcm"
    )
    mr_class = dcmread(j2k, stop_before_pixels=True).SOPClassUID
    ae = AE(ae_title="PREFSCU")
    ae.add_requested_context(CTImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage, [JPEGBaseline8Bit, ExplicitVRLittleEndian])
    ae.add_requested_context(
        mr_class, [ImplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless]
    )
    assoc = ae.associate("127.0.0.1", shared_archive.dicom_port, ae_title="POCKETPACS")
    assert assoc.is_established
    try:
        accepted = sorted(
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
        )
        assert accepted == sorted(
            [
                (CTImageStorage, ExplicitVRLittleEndian),
                (CTImageStorage, ExplicitVRLittleEndian),
                (mr_class, JPEG2000Lossless),
            ]
        )
        before = Snapshot(shared_archive, s3_server)
        for path in (explicit_ct, j2k):
            assert assoc.send_c_store(path).Status == 0x0000
    finally:
        assoc.release()
        ae.shutdown()
    stored, rows = before.added()
    assert_stored_unchanged([explicit_ct, j2k], stored, rows, source_ae="PREFSCU")


def test_storescu_sends_compressed_files_without_transcoding(
    shared_archive: RunningArchive, s3_server, tmp_path: Path
) -> None:
    samples = compressed_samples(tmp_path / "samples")
    jpeg_ls = with_unique_uid(
        samples["JPEG-LS Lossless"], tmp_path / "jls" / "jls.dcm", as_dcmtk_sends_it=True
    )
    j2k = with_unique_uid(
        samples["JPEG 2000 Lossless"], tmp_path / "j2k" / "j2k.dcm", as_dcmtk_sends_it=True
    )
    assert transfer_syntax_of(jpeg_ls) == JPEGLSLossless
    assert transfer_syntax_of(j2k) == JPEG2000Lossless
    before = Snapshot(shared_archive, s3_server)

    # -R: only the files' SOP classes; -xt / -xv: JPEG-LS / JPEG 2000 lossless first.
    for option, path in (("-xt", jpeg_ls), ("-xv", j2k)):
        result = run_storescu(shared_archive, "-R", option, str(path), calling_ae="STORESCUJ")
        assert result.returncode == 0, result.stdout + result.stderr

    stored, rows = before.added()
    assert sorted(stored) == sorted(key_of(p) for p in (jpeg_ls, j2k))
    assert len(rows) == 2
    assert_stored_unchanged([jpeg_ls, j2k], stored, rows, source_ae="STORESCUJ")


# --------------------------------------------------------------------------------------
# 3. The same instance twice


def test_same_instance_twice_is_stored_once(
    shared_archive: RunningArchive, s3_server, tmp_path: Path, send_raw: None
) -> None:
    (first,) = ct_series(tmp_path / "first", count=1, seed="dup")
    # The same SOP Instance UID with other pixel values: the first copy must win.
    other = dcmread(first)
    other.PixelData = bytes(len(other.PixelData))
    altered = tmp_path / "altered.dcm"
    other.save_as(altered, enforce_file_format=True)
    contexts = contexts_of([first])
    before = Snapshot(shared_archive, s3_server)

    # Twice on one association: the second arrives while the first may still be spooled.
    with associated(shared_archive, contexts, calling_ae="DUPSCU") as assoc:
        assert assoc.send_c_store(first).Status == 0x0000
        assert assoc.send_c_store(first).Status == 0x0000
    wait_drained(shared_archive)
    # Then again on new associations, once the first copy is in the bucket and index.
    with associated(shared_archive, contexts, calling_ae="DUPSCU") as assoc:
        assert assoc.send_c_store(first).Status == 0x0000
    with associated(shared_archive, contexts, calling_ae="DUPSCU") as assoc:
        assert assoc.send_c_store(altered).Status == 0x0000

    stored, rows = before.added()
    assert list(stored) == [key_of(first)]
    assert list(rows) == [dcmread(first, stop_before_pixels=True).SOPInstanceUID]
    assert_stored_unchanged([first], stored, rows, source_ae="DUPSCU")


# --------------------------------------------------------------------------------------
# 4. Refused input: a failure status with a reason, nothing stored, the association goes on


def small_ct(number: int = 1, seed: str = "bad") -> Dataset:
    """A valid 64x64 CT image with its file meta (Explicit VR Little Endian)."""
    ids = study_ids(seed)
    ds = Dataset()
    uid = generate_uid(entropy_srcs=[seed, str(number)])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = ids.study
    ds.SeriesInstanceUID = ids.series
    ds.PatientName = "Bad^Input"
    ds.PatientID = ids.patient_id
    ds.Modality = "CT"
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = np.arange(64 * 64, dtype=np.int16).tobytes()
    return ds


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _set_both_sop_uids(ds: Dataset, uid: str) -> Dataset:
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid  # the C-STORE request carries it too
    return ds


def _pixel_data_offset(data: bytes) -> int:
    offset = data.find(b"\xe0\x7f\x10\x00OW")
    assert offset > 0
    return offset


@dataclass(frozen=True)
class BadInput:
    build: Callable[[Path], Path]
    status: tuple[int, ...]
    comment: str  # what the Error Comment must mention


def _sop_uid_path(folder: Path) -> Path:
    return write(_set_both_sop_uids(small_ct(seed=str(folder)), "../x"), folder / "bad.dcm")


def _uid_65_characters(folder: Path) -> Path:
    ds = small_ct(seed=str(folder))
    ds.StudyInstanceUID = "1.2." + "3" * 61
    assert len(ds.StudyInstanceUID) == 65
    return write(ds, folder / "bad.dcm")


def _uid_with_letters(folder: Path) -> Path:
    return write(
        _set_both_sop_uids(small_ct(seed=str(folder)), "1.2.840.10008.abc.7"), folder / "bad.dcm"
    )


def _missing_study_uid(folder: Path) -> Path:
    ds = small_ct(seed=str(folder))
    del ds.StudyInstanceUID
    return write(ds, folder / "bad.dcm")


def _uid_differs_from_request(folder: Path) -> Path:
    """The request (from the file meta) names one valid UID, the data set another."""
    ds = small_ct(seed=str(folder))
    data = write(ds, folder / "whole.dcm").read_bytes()
    uid = ds.SOPInstanceUID.encode()
    other = uid[:-1] + (b"1" if uid[-1:] != b"1" else b"2")
    body = dataset_bytes(data)
    assert body.count(uid) == 1
    path = folder / "bad.dcm"
    path.write_bytes(data[: len(data) - len(body)] + body.replace(uid, other))
    meta = dcmread(path, stop_before_pixels=True)
    assert meta.file_meta.MediaStorageSOPInstanceUID == uid.decode()
    assert meta.SOPInstanceUID == other.decode()
    return path


def _pixel_data_cut_short(folder: Path) -> Path:
    data = write(small_ct(seed=str(folder)), folder / "whole.dcm").read_bytes()
    path = folder / "bad.dcm"
    path.write_bytes(data[:-1000])
    return path


def _cut_inside_pixel_data_header(folder: Path) -> Path:
    """The data set ends 6 bytes into the (7FE0,0010) element: tag and VR, no length."""
    data = write(small_ct(seed=str(folder)), folder / "whole.dcm").read_bytes()
    path = folder / "bad.dcm"
    path.write_bytes(data[: _pixel_data_offset(data) + 6])
    return path


def _cut_inside_series_uid(folder: Path) -> Path:
    """The data set ends half-way through the Series Instance UID's value."""
    ds = small_ct(seed=str(folder))
    data = write(ds, folder / "whole.dcm").read_bytes()
    value = ds.SeriesInstanceUID.encode()
    offset = data.index(b"\x20\x00\x0e\x00UI") + 8
    assert data[offset : offset + len(value)] == value
    path = folder / "bad.dcm"
    path.write_bytes(data[: offset + len(value) // 2])
    return path


def _garbage_after_meta(folder: Path) -> Path:
    data = write(small_ct(seed=str(folder)), folder / "whole.dcm").read_bytes()
    meta_length = len(data) - len(dataset_bytes(data))
    path = folder / "bad.dcm"
    path.write_bytes(data[:meta_length] + bytes(range(256)) * 16)
    return path


BAD_INPUTS = {
    "sop-uid-dotdot-slash-x": BadInput(_sop_uid_path, (0xA900,), "invalid SOPInstanceUID"),
    "uid-65-characters": BadInput(_uid_65_characters, (0xA900,), "invalid StudyInstanceUID"),
    "uid-with-letters": BadInput(_uid_with_letters, (0xA900,), "invalid SOPInstanceUID"),
    "missing-study-uid": BadInput(_missing_study_uid, (0xA900,), "missing StudyInstanceUID"),
    "uid-differs-from-request": BadInput(
        _uid_differs_from_request, (0xA900,), "differs from the C-STORE request"
    ),
    "pixel-data-cut-short": BadInput(_pixel_data_cut_short, (0xC000,), "truncated"),
    "cut-inside-pixel-data-header": BadInput(_cut_inside_pixel_data_header, (0xC000,), "truncated"),
    "cut-inside-series-uid": BadInput(_cut_inside_series_uid, (0xC000,), "truncated"),
    # Noise after the meta group parses as unknown elements until one runs past the end.
    "garbage-data-set": BadInput(_garbage_after_meta, (0xC000,), "truncated"),
}


# pydicom warns when it writes the invalid UIDs these cases are made of.
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_instance_is_refused_and_the_association_goes_on(
    case: BadInput, shared_archive: RunningArchive, s3_server, tmp_path: Path, send_raw: None
) -> None:
    archive = shared_archive
    folder = tmp_path / "bad"
    folder.mkdir()
    bad = case.build(folder)
    good = write(small_ct(number=2, seed=f"good-{tmp_path.name}"), tmp_path / "good.dcm")
    contexts = [(CTImageStorage, ExplicitVRLittleEndian), (Verification, ExplicitVRLittleEndian)]
    calling_ae = f"BAD{list(BAD_INPUTS.values()).index(case)}"
    before = Snapshot(archive, s3_server)

    with associated(archive, contexts, calling_ae=calling_ae) as assoc:
        status = assoc.send_c_store(bad)
        assert status.Status in case.status, f"0x{status.Status:04X} {status}"
        assert case.comment in str(status.get("ErrorComment", "")), status
        # The same association carries on: a valid instance and a C-ECHO both succeed.
        assert assoc.is_established
        assert assoc.send_c_store(good).Status == 0x0000
        assert assoc.send_c_echo().Status == 0x0000
    with associated(archive, [(Verification, ExplicitVRLittleEndian)]) as assoc:
        assert assoc.send_c_echo().Status == 0x0000

    stored, rows = before.added()
    assert list(stored) == [key_of(good)], "something besides the valid instance was stored"
    assert list(rows) == [str(dcmread(good).SOPInstanceUID)]
    assert_stored_unchanged([good], stored, rows, source_ae=calling_ae)
    spool = archive.data_dir / "spool"
    assert not any((spool / "ready").iterdir())
    assert not any((spool / "rejected").iterdir())

    # The association's log line counts the refusal and says why.
    line = wait_for_log(archive, rf"association from '{calling_ae}'[^\n]*").group(0)
    assert "1 stored" in line, line
    assert f"last failure: {status.ErrorComment}"[:60] in line, line


# --------------------------------------------------------------------------------------
# 5. Verification, and the called AE title


def test_c_echo_answers_pynetdicom_and_echoscu(shared_archive: RunningArchive) -> None:
    with associated(shared_archive, [(Verification, ExplicitVRLittleEndian)]) as assoc:
        assert assoc.send_c_echo().Status == 0x0000
    result = subprocess.run(
        ["echoscu", "-aec", "POCKETPACS", "127.0.0.1", str(shared_archive.dicom_port)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_wrong_called_ae_title_is_rejected(
    shared_archive: RunningArchive, s3_server, tmp_path: Path
) -> None:
    archive = shared_archive
    before = Snapshot(archive, s3_server)
    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", archive.dicom_port, ae_title="NOTPOCKETPACS")
    try:
        assert assoc.is_rejected
        assert not assoc.is_established
    finally:
        ae.shutdown()

    result = subprocess.run(
        ["echoscu", "-aec", "NOTPOCKETPACS", "127.0.0.1", str(archive.dicom_port)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr

    (path,) = ct_series(tmp_path / "ct", count=1, seed="wrong-ae")
    result = run_storescu(archive, str(path), called_ae="NOTPOCKETPACS")
    assert result.returncode != 0
    # Nothing was stored, and the archive still answers its own title.
    assert before.added() == ({}, {})
    with associated(archive, [(Verification, ExplicitVRLittleEndian)]) as assoc:
        assert assoc.send_c_echo().Status == 0x0000
