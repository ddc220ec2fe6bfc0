"""The ingest pipeline and the spool in front of it, on a real S3 bucket and both databases."""

from __future__ import annotations

import hashlib
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from sqlalchemy import select

from storage import layout
from storage.embedded_s3 import EmbeddedS3
from storage.index import Index, Origin
from storage.ingest import IngestPipeline, InstanceToStore, StoreOutcome
from storage.models import Instance
from storage.objects import ObjectStore
from storage.spool import IncomingFile, Spool, SpoolBusy, _encode_origin
from tests.conftest import POSTGRES_ADMIN, PostgresDatabase, free_port, spool_files_holding
from tests.dicom_factory import COMPRESSED_SAMPLES, compressed_samples, ct_series

ORIGIN = Origin(institution="north", calling_ae="CT1", route="import")

# pydicom warns as it reads the invalid values these tests feed the pipeline on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom")


def item(path: Path, origin: Origin = ORIGIN) -> InstanceToStore:
    return InstanceToStore(path=path, origin=origin)


@pytest.fixture
def make_pipeline() -> Iterator[Callable[[ObjectStore, Index], IngestPipeline]]:
    """IngestPipelines over other stores or indexes, their upload threads stopped after."""
    made: list[IngestPipeline] = []

    def make(objects: ObjectStore, index: Index) -> IngestPipeline:
        made.append(IngestPipeline(objects, index))
        return made[-1]

    yield make
    for pipeline in made:
        pipeline.close()


def keys(objects: ObjectStore) -> list[str]:
    return sorted(info.key for info in objects.list())


def variant(source: Path, target: Path, **changes: object) -> Path:
    """A copy of `source` with attributes changed (None deletes one)."""
    ds = dcmread(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values we want
        for keyword, value in changes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
                if keyword == "SOPInstanceUID":
                    ds.file_meta.MediaStorageSOPInstanceUID = value
        ds.save_as(target)
    return target


def assert_nothing_stored(objects: ObjectStore, index: Index) -> None:
    assert keys(objects) == []
    assert index.counts() == {"patients": 0, "studies": 0, "series": 0, "instances": 0}


def transfer_syntax_in_index(index: Index, sop_instance_uid: str) -> str:
    with index.session() as session:
        return session.execute(
            select(Instance.transfer_syntax_uid).where(
                Instance.sop_instance_uid == sop_instance_uid
            )
        ).scalar_one()


def test_store_ct_instance(pipeline: IngestPipeline, tmp_path: Path) -> None:
    path = ct_series(tmp_path / "ct", count=1)[0]
    ds = dcmread(path, stop_before_pixels=True)
    result = pipeline.store(item(path))

    assert result.outcome is StoreOutcome.STORED
    assert (result.outcome.dimse_status, result.outcome.http_status) == (0x0000, 200)
    expected_key = f"dicom/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
    assert result.object_key == expected_key
    assert result.size == path.stat().st_size
    assert keys(pipeline.objects) == [expected_key]
    assert pipeline.objects.get(expected_key) == path.read_bytes()

    row = pipeline.index.find(ds.SOPInstanceUID)
    assert row is not None
    assert row.object_key == expected_key
    assert row.size == path.stat().st_size
    assert row.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (row.study_instance_uid, row.series_instance_uid) == (
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
    )
    assert transfer_syntax_in_index(pipeline.index, ds.SOPInstanceUID) == "1.2.840.10008.1.2.1"


def test_same_file_twice_is_a_duplicate(pipeline: IngestPipeline, tmp_path: Path) -> None:
    path = ct_series(tmp_path / "ct", count=1)[0]
    assert pipeline.store(item(path)).outcome is StoreOutcome.STORED
    again = pipeline.store(item(path))
    assert again.outcome is StoreOutcome.DUPLICATE
    assert again.outcome.dimse_status == 0x0000  # a sender retrying is told all is well
    assert len(keys(pipeline.objects)) == 1
    assert pipeline.index.counts()["instances"] == 1


def test_same_uid_other_bytes_keeps_the_first_copy(
    pipeline: IngestPipeline, tmp_path: Path
) -> None:
    first = ct_series(tmp_path / "ct", count=1)[0]
    second = variant(first, tmp_path / "changed.dcm", PatientName="Other^Name")
    assert first.read_bytes() != second.read_bytes()
    uid = dcmread(first, stop_before_pixels=True).SOPInstanceUID

    assert pipeline.store(item(first)).outcome is StoreOutcome.STORED
    result = pipeline.store(item(second))
    assert result.outcome is StoreOutcome.DUPLICATE
    [key] = keys(pipeline.objects)
    assert pipeline.objects.get(key) == first.read_bytes()
    row = pipeline.index.find(uid)
    assert row is not None
    assert row.sha256 == hashlib.sha256(first.read_bytes()).hexdigest()
    assert pipeline.index.counts()["instances"] == 1


def test_compressed_transfer_syntaxes_are_stored_as_sent(
    pipeline: IngestPipeline, tmp_path: Path
) -> None:
    """Every sample is stored byte for byte; the five MR_small variants share one SOP
    Instance UID, so the first (JPEG-LS) is kept and the other four are duplicates."""
    samples = compressed_samples(tmp_path / "samples")
    outcomes = {label: pipeline.store(item(path)).outcome for label, path in samples.items()}
    same_uid = {
        "JPEG 2000 Lossless",
        "RLE Lossless",
        "Explicit VR Big Endian",
        "Implicit VR Little Endian",
    }
    assert outcomes == {
        label: StoreOutcome.DUPLICATE if label in same_uid else StoreOutcome.STORED
        for label in COMPRESSED_SAMPLES
    }
    assert pipeline.index.counts()["instances"] == 6
    for label, path in samples.items():
        if label in same_uid:
            continue
        ds = dcmread(path, stop_before_pixels=True)
        key = layout.instance_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert pipeline.objects.get(key) == path.read_bytes(), label
        assert transfer_syntax_in_index(pipeline.index, ds.SOPInstanceUID) == str(
            ds.file_meta.TransferSyntaxUID
        )


def _not_dicom(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("this is a radiology report, not a DICOM file\n" * 20)
    return path


def _truncated_native(tmp_path: Path) -> Path:
    source = ct_series(tmp_path / "ct", count=1)[0]
    path = tmp_path / "cut.dcm"
    path.write_bytes(source.read_bytes()[:-1000])
    return path


def _truncated_encapsulated(tmp_path: Path) -> Path:
    data = Path(get_testdata_file("MR_small_jp2klossless.dcm")).read_bytes()
    path = tmp_path / "cut_j2k.dcm"
    path.write_bytes(data[: len(data) - 700])
    return path


def _encapsulated_without_delimiter(tmp_path: Path) -> Path:
    data = Path(get_testdata_file("MR_small_jp2klossless.dcm")).read_bytes()
    path = tmp_path / "no_delimiter.dcm"
    # Every fragment is whole; the file ends where the sequence delimiter item should be.
    path.write_bytes(data[: data.rindex(b"\xfe\xff\xdd\xe0")])
    return path


def _with(**changes: object):
    def make(tmp_path: Path) -> Path:
        source = ct_series(tmp_path / "ct", count=1)[0]
        return variant(source, tmp_path / "variant.dcm", **changes)

    return make


BAD_INPUT = {
    "not DICOM": (_not_dicom, StoreOutcome.CANNOT_UNDERSTAND, "not a DICOM file"),
    "truncated pixel data": (_truncated_native, StoreOutcome.CANNOT_UNDERSTAND, "truncated"),
    "truncated encapsulated pixel data": (
        _truncated_encapsulated,
        StoreOutcome.CANNOT_UNDERSTAND,
        "truncated",
    ),
    "encapsulated pixel data without delimiter": (
        _encapsulated_without_delimiter,
        StoreOutcome.CANNOT_UNDERSTAND,
        "no sequence delimiter",
    ),
    "path traversal UID": (
        _with(SOPInstanceUID="../x"),
        StoreOutcome.DOES_NOT_MATCH_SOP_CLASS,
        "invalid SOPInstanceUID",
    ),
    "65-character UID": (
        _with(SOPInstanceUID="1." + "2" * 63),
        StoreOutcome.DOES_NOT_MATCH_SOP_CLASS,
        "invalid SOPInstanceUID",
    ),
    "UID with letters": (
        _with(StudyInstanceUID="1.2.abc.4"),
        StoreOutcome.DOES_NOT_MATCH_SOP_CLASS,
        "invalid StudyInstanceUID",
    ),
    "missing SeriesInstanceUID": (
        _with(SeriesInstanceUID=None),
        StoreOutcome.DOES_NOT_MATCH_SOP_CLASS,
        "missing SeriesInstanceUID",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_refused_and_nothing_written(
    pipeline: IngestPipeline, tmp_path: Path, case: str
) -> None:
    make, outcome, reason = BAD_INPUT[case]
    path = make(tmp_path)
    result = pipeline.store(item(path))
    assert result.outcome is outcome
    assert result.outcome.dimse_status in (0xA900, 0xC000)
    assert result.outcome.http_status == 400
    assert reason in result.reason
    assert_nothing_stored(pipeline.objects, pipeline.index)


def test_overlong_attribute_is_not_an_outage(pipeline: IngestPipeline, tmp_path: Path) -> None:
    """An Accession Number longer than SH's 16 characters (common from real modalities) is
    a property of the data set. It must never be answered 0xA700 "out of resources", which
    tells the sender to retry the same instance forever."""
    source = ct_series(tmp_path / "ct", count=1)[0]
    path = variant(source, tmp_path / "long.dcm", AccessionNumber="A" * 20)
    result = pipeline.store(item(path))
    assert result.outcome is not StoreOutcome.OUT_OF_RESOURCES, result.reason
    assert result.outcome in (StoreOutcome.STORED, StoreOutcome.DOES_NOT_MATCH_SOP_CLASS)


# batches -------------------------------------------------------------------------------


def test_batch_results_in_order_and_bad_files_alone_refused(
    pipeline: IngestPipeline, tmp_path: Path
) -> None:
    ct = ct_series(tmp_path / "ct", count=4)
    bad = _not_dicom(tmp_path)
    repeat = tmp_path / "repeat.dcm"
    repeat.write_bytes(ct[1].read_bytes())
    items = [item(p) for p in (ct[0], bad, ct[1], repeat, ct[2], ct[3])]
    results = pipeline.store_many(items)
    assert [r.outcome for r in results] == [
        StoreOutcome.STORED,
        StoreOutcome.CANNOT_UNDERSTAND,
        StoreOutcome.STORED,
        StoreOutcome.DUPLICATE,  # the same instance twice in one batch: stored once
        StoreOutcome.STORED,
        StoreOutcome.STORED,
    ]
    for path, result in zip(
        (ct[0], ct[1], ct[2], ct[3]), (results[0], results[2], results[4], results[5]), strict=True
    ):
        assert result.sop_instance_uid == dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert pipeline.objects.get(result.object_key) == path.read_bytes()
    assert results[3].object_key == results[2].object_key
    assert pipeline.index.counts() == {"patients": 1, "studies": 1, "series": 1, "instances": 4}
    assert len(keys(pipeline.objects)) == 4


def test_one_odd_instance_does_not_fail_its_batch(pipeline: IngestPipeline, tmp_path: Path) -> None:
    """Instances are indexed in one transaction per batch (`pocketpacs import` sends 32 at a
    time, the spool up to 32): one instance the index cannot take must not turn its valid
    neighbours into 0xA700 failures."""
    ct = ct_series(tmp_path / "ct", count=3)
    odd = variant(
        ct_series(tmp_path / "other", count=1, seed="odd")[0],
        tmp_path / "odd.dcm",
        AccessionNumber="A" * 20,
    )
    results = pipeline.store_many([item(ct[0]), item(odd), item(ct[1]), item(ct[2])])
    outcomes = [r.outcome for r in results]
    assert outcomes[0] is outcomes[2] is outcomes[3] is StoreOutcome.STORED, [
        (r.outcome.name, r.reason[:80]) for r in results
    ]
    assert pipeline.index.counts()["instances"] >= 3


# outages -------------------------------------------------------------------------------


def test_object_store_unreachable(
    objects: ObjectStore, index: Index, s3_server: EmbeddedS3, tmp_path: Path, make_pipeline
) -> None:
    path = ct_series(tmp_path / "ct", count=1)[0]
    down = ObjectStore(
        f"127.0.0.1:{free_port()}",
        s3_server.credentials.access_key,
        s3_server.credentials.secret_key,
        bucket=objects.bucket,
    )
    started = time.monotonic()
    result = make_pipeline(down, index).store(item(path))
    assert time.monotonic() - started < 15  # a failure status, not a hung association
    assert result.outcome is StoreOutcome.OUT_OF_RESOURCES
    assert (result.outcome.dimse_status, result.outcome.http_status) == (0xA700, 503)
    assert "object store unavailable" in result.reason
    assert_nothing_stored(objects, index)

    # The store is back: the same instance is stored, not reported as a duplicate.
    assert make_pipeline(objects, index).store(item(path)).outcome is StoreOutcome.STORED
    assert index.counts()["instances"] == 1


def test_bucket_missing(
    objects: ObjectStore, index: Index, s3_server: EmbeddedS3, tmp_path: Path, make_pipeline
) -> None:
    path = ct_series(tmp_path / "ct", count=1)[0]
    missing = ObjectStore(
        s3_server.endpoint,
        s3_server.credentials.access_key,
        s3_server.credentials.secret_key,
        bucket=f"missing-{uuid.uuid4().hex[:12]}",
    )
    result = make_pipeline(missing, index).store(item(path))
    assert result.outcome is StoreOutcome.OUT_OF_RESOURCES
    assert result.outcome.dimse_status == 0xA700
    assert "object store unavailable" in result.reason
    assert_nothing_stored(objects, index)
    assert make_pipeline(objects, index).store(item(path)).outcome is StoreOutcome.STORED


@pytest.mark.parametrize(
    "url",
    [
        pytest.param(
            "postgresql+psycopg://postgres@127.0.0.1:5432/pocketpacs_no_such_database",
            id="no-such-database",
        ),
        pytest.param("closed-port", id="closed-port"),
    ],
)
def test_index_unreachable(
    objects: ObjectStore, index: Index, tmp_path: Path, url: str, make_pipeline
) -> None:
    if url == "closed-port":
        url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/pocketpacs"
    path = ct_series(tmp_path / "ct", count=1)[0]
    down = Index(url)
    try:
        result = make_pipeline(objects, down).store(item(path))
    finally:
        down.dispose()
    assert result.outcome is StoreOutcome.OUT_OF_RESOURCES
    assert (result.outcome.dimse_status, result.outcome.http_status) == (0xA700, 503)
    assert "index unavailable" in result.reason
    assert_nothing_stored(objects, index)

    assert make_pipeline(objects, index).store(item(path)).outcome is StoreOutcome.STORED
    assert len(keys(objects)) == 1


@pytest.mark.postgres
def test_index_refusing_writes_leaves_no_object(
    objects: ObjectStore, postgres_database: PostgresDatabase, tmp_path: Path, make_pipeline
) -> None:
    """The index answers reads but refuses the write (a read-only replica after a failover):
    the object already put in the bucket is removed again."""
    index = Index(postgres_database.url)
    index.migrate()
    index.dispose()
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(
            f'ALTER DATABASE "{postgres_database.name}" SET default_transaction_read_only = on'
        )
    path = ct_series(tmp_path / "ct", count=1)[0]
    try:
        result = make_pipeline(objects, index).store(item(path))
        assert result.outcome is StoreOutcome.OUT_OF_RESOURCES
        assert "index unavailable" in result.reason
        assert "read-only" in result.reason
        assert keys(objects) == []
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
            admin.execute(
                f'ALTER DATABASE "{postgres_database.name}" RESET default_transaction_read_only'
            )
        index.dispose()
    try:
        assert make_pipeline(objects, index).store(item(path)).outcome is StoreOutcome.STORED
        assert index.counts()["instances"] == 1
        assert len(keys(objects)) == 1
    finally:
        index.dispose()


# the spool -----------------------------------------------------------------------------


def wait_for(condition, timeout: float = 20.0, message: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting: {message}")
        time.sleep(0.05)


def test_spool_accepts_then_drains(pipeline: IngestPipeline, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", pipeline, workers=2)
    path = ct_series(tmp_path / "ct", count=1)[0]
    uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID

    result = spool.accept(item(path))
    assert result.outcome is StoreOutcome.STORED
    # Acknowledged: on local disk in ready/, not yet in the bucket or the index.
    [spooled] = list(spool.ready.iterdir())
    assert spooled.name.startswith(f"{uid}~")
    assert spooled.read_bytes() == path.read_bytes()
    assert spool.pending == 1
    assert keys(pipeline.objects) == []
    assert pipeline.index.find(uid) is None
    # The same instance again while it waits: a duplicate, not a second copy.
    assert spool.accept(item(path)).outcome is StoreOutcome.DUPLICATE
    assert len(list(spool.ready.iterdir())) == 1

    spool.start()
    try:
        assert spool.wait_idle(timeout=30)
        assert list(spool.ready.iterdir()) == []
        assert spool.pending == 0
        row = pipeline.index.find(uid)
        assert row is not None
        assert pipeline.objects.get(row.object_key) == path.read_bytes()
        with pipeline.index.session() as session:
            source_ae = session.execute(
                select(Instance.source_ae).where(Instance.sop_instance_uid == uid)
            ).scalar_one()
        assert source_ae == "CT1"
    finally:
        spool.close()


def test_spool_drain_waits_for_a_pause_in_sending_but_no_longer_than_its_bound(
    pipeline: IngestPipeline, tmp_path: Path
) -> None:
    """While a sender keeps sending, acknowledged instances wait in the spool, but never
    longer than `defer_seconds`; once the sender pauses, everything is drained."""
    spool = Spool(tmp_path / "spool", pipeline, workers=1, defer_seconds=2.0)
    paths = ct_series(tmp_path / "ct", count=40)
    uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    spool.start()
    try:
        started = time.monotonic()
        drained_at: float | None = None
        checked_early = False
        for number, path in enumerate(paths):  # one instance every 0.1 s for 4 s
            assert spool.accept(item(path)).outcome is StoreOutcome.STORED
            elapsed = time.monotonic() - started
            if 1.0 <= elapsed < 1.8 and not checked_early:
                # Still sending, well within the bound: nothing has been drained yet.
                assert pipeline.index.find(uids[0]) is None
                assert spool.pending == number + 1
                checked_early = True
            if drained_at is None and pipeline.index.find(uids[0]) is not None:
                drained_at = elapsed
            time.sleep(max(0.0, 0.1 * (number + 1) - (time.monotonic() - started)))
        assert checked_early
        # The first instance reached the index while the sender was still sending,
        # after the bound (2 s) and well before the sending stopped (4 s).
        assert drained_at is not None, "nothing drained while the sender kept sending"
        assert 1.9 <= drained_at < 3.9, drained_at
        assert spool.wait_idle(timeout=30)
        assert all(pipeline.index.find(uid) is not None for uid in uids)
    finally:
        spool.close()


def _receive(spool: Spool, source: Path) -> IncomingFile:
    """What the C-STORE and STOW-RS routes do: write a data set into a spool file."""
    incoming = IncomingFile(spool.files)
    incoming.write(source.read_bytes())
    incoming.close()
    return incoming


def test_spool_files_are_reused_and_never_overwritten_while_waiting(
    pipeline: IngestPipeline, tmp_path: Path
) -> None:
    """A drained file receives the next data set; one still waiting for the bucket is never
    handed out, and a refused data set leaves nothing of itself behind."""
    spool = Spool(tmp_path / "spool", pipeline, workers=1, spare_files=0)
    first, second = (
        ct_series(tmp_path / "a", count=2),
        ct_series(tmp_path / "b", count=2, seed="again"),
    )
    try:
        waiting = [_receive(spool, path) for path in first]
        for incoming in waiting:
            assert spool.accept(item(incoming.path)).outcome is StoreOutcome.STORED
            incoming.discard()
        # Not drained yet: the next data sets go to other files, and the waiting ones keep
        # their bytes.
        refused = IncomingFile(spool.files)
        refused.write(b"REFUSED-PART" * 100)
        refused.close()
        assert spool.accept(item(refused.path)).outcome is StoreOutcome.CANNOT_UNDERSTAND
        refused.discard()
        assert refused.path not in {incoming.path for incoming in waiting}
        assert not spool_files_holding(tmp_path, b"REFUSED-PART")
        for incoming, path in zip(waiting, first, strict=True):
            assert incoming.path.read_bytes() == path.read_bytes()
        spool.start()
        assert spool.wait_idle(timeout=30)
        files_before = {path.name for path in spool.files.directory.iterdir()}
        again = [_receive(spool, path) for path in second]
        assert {incoming.path.name for incoming in again} <= files_before
        for incoming in again:
            assert spool.accept(item(incoming.path)).outcome is StoreOutcome.STORED
            incoming.discard()
        assert spool.wait_idle(timeout=30)
        for path in first + second:
            uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            row = pipeline.index.find(uid)
            assert row is not None
            assert pipeline.objects.get(row.object_key) == path.read_bytes()
    finally:
        spool.close()


def test_spool_refuses_invalid_data_at_once(pipeline: IngestPipeline, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", pipeline, workers=1)
    result = spool.accept(item(_truncated_native(tmp_path)))
    assert result.outcome is StoreOutcome.CANNOT_UNDERSTAND
    assert "truncated" in result.reason
    assert list(spool.ready.iterdir()) == []
    assert spool.pending == 0


def test_one_process_per_spool(pipeline: IngestPipeline, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", pipeline)
    try:
        with pytest.raises(SpoolBusy, match="another pocketpacs process is using"):
            Spool(tmp_path / "spool", pipeline)
    finally:
        spool.close()
    Spool(tmp_path / "spool", pipeline).close()  # released on close


def test_spool_limit(pipeline: IngestPipeline, tmp_path: Path) -> None:
    first, second = ct_series(tmp_path / "ct", count=2)
    spool = Spool(tmp_path / "spool", pipeline, workers=1, limit_bytes=first.stat().st_size + 10)
    assert spool.accept(item(first)).outcome is StoreOutcome.STORED
    full = spool.accept(item(second))
    assert full.outcome is StoreOutcome.OUT_OF_RESOURCES
    assert "full" in full.reason
    spool.start()
    try:
        assert spool.wait_idle(timeout=30)
        assert spool.accept(item(second)).outcome is StoreOutcome.STORED
        assert spool.wait_idle(timeout=30)
        assert pipeline.index.counts()["instances"] == 2
    finally:
        spool.close()


def test_spool_replay_after_restart(pipeline: IngestPipeline, tmp_path: Path) -> None:
    """What an earlier run acknowledged but did not store is stored at the next start."""
    good, other = ct_series(tmp_path / "ct", count=2)
    uid = dcmread(good, stop_before_pixels=True).SOPInstanceUID
    received = datetime(2026, 11, 2, 8, 30, tzinfo=UTC)
    origin = Origin(institution="east", calling_ae="MR7", route="cstore")
    ready = tmp_path / "spool" / "ready"
    incoming = tmp_path / "spool" / "incoming"
    ready.mkdir(parents=True)
    incoming.mkdir()
    (ready / f"{uid}~{_encode_origin(origin, received)}.dcm").write_bytes(good.read_bytes())
    broken_uid = dcmread(other, stop_before_pixels=True).SOPInstanceUID
    broken = ready / f"{broken_uid}~{_encode_origin(origin, received)}.dcm"
    broken.write_bytes(other.read_bytes()[:-5000])
    (incoming / "partial-upload").write_bytes(b"never acknowledged")

    spool = Spool(tmp_path / "spool", pipeline, workers=2)
    try:
        assert spool.replay() == 2
        row = pipeline.index.find(uid)
        assert row is not None
        assert pipeline.objects.get(row.object_key) == good.read_bytes()
        with pipeline.index.session() as session:
            stored = session.execute(
                select(Instance).where(Instance.sop_instance_uid == uid)
            ).scalar_one()
            assert (stored.source_institution, stored.source_ae) == ("east", "MR7")
            assert stored.received_at.replace(tzinfo=stored.received_at.tzinfo or UTC) == received
        assert list(spool.ready.iterdir()) == []
        assert list(spool.incoming.iterdir()) == []
        # The file that fails validation is kept aside with the reason, not lost or retried.
        assert (spool.rejected / broken.name).exists()
        reason = (spool.rejected / broken.name).with_suffix(".reason.txt").read_text()
        assert "truncated" in reason
        assert pipeline.index.find(broken_uid) is None
    finally:
        spool.close()


def test_spool_replay_while_the_store_is_down(
    objects: ObjectStore, index: Index, s3_server: EmbeddedS3, tmp_path: Path, make_pipeline
) -> None:
    """A start while the bucket is down does not hang in replay: the spooled instance stays
    in ready/, new instances are refused, and it is stored once the bucket is back."""
    path = ct_series(tmp_path / "ct", count=1)[0]
    uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
    ready = tmp_path / "spool" / "ready"
    ready.mkdir(parents=True)
    name = f"{uid}~{_encode_origin(ORIGIN, datetime.now(UTC))}.dcm"
    (ready / name).write_bytes(path.read_bytes())
    down = ObjectStore(
        f"127.0.0.1:{free_port()}",
        s3_server.credentials.access_key,
        s3_server.credentials.secret_key,
        bucket=objects.bucket,
    )
    spool = Spool(tmp_path / "spool", make_pipeline(down, index), workers=1)
    try:
        started = time.monotonic()
        assert spool.replay() == 1
        assert time.monotonic() - started < 20
        assert spool.failure is not None
        assert [p.name for p in spool.ready.iterdir()] == [name]
        other = ct_series(tmp_path / "more", count=1, seed="more")[0]
        assert spool.accept(item(other)).outcome is StoreOutcome.OUT_OF_RESOURCES

        spool.pipeline.objects = objects
        assert spool.wait_idle(timeout=30)
        assert list(spool.ready.iterdir()) == []
        row = index.find(uid)
        assert row is not None
        assert objects.get(row.object_key) == path.read_bytes()
    finally:
        spool.pipeline.objects = objects
        spool.close()


def test_spool_refuses_while_the_store_fails_and_recovers(
    objects: ObjectStore, index: Index, s3_server: EmbeddedS3, tmp_path: Path, make_pipeline
) -> None:
    first, second, third = ct_series(tmp_path / "ct", count=3)
    down = ObjectStore(
        f"127.0.0.1:{free_port()}",
        s3_server.credentials.access_key,
        s3_server.credentials.secret_key,
        bucket=objects.bucket,
    )
    spool = Spool(tmp_path / "spool", make_pipeline(down, index), workers=2)
    spool.start()
    try:
        # Nothing has failed yet: the instance is acknowledged from the spool.
        assert spool.accept(item(first)).outcome is StoreOutcome.STORED
        wait_for(lambda: spool.failure is not None, message="the drain to fail")
        assert "object store unavailable" in (spool.failure or "")

        refused = spool.accept(item(second))
        assert refused.outcome is StoreOutcome.OUT_OF_RESOURCES
        assert refused.outcome.dimse_status == 0xA700
        assert "storage unavailable" in refused.reason
        assert len(list(spool.ready.iterdir())) == 1  # the acknowledged one is kept
        assert not spool.wait_idle(timeout=0.5)

        spool.pipeline.objects = objects  # the store is back
        assert spool.wait_idle(timeout=30)
        assert spool.failure is None
        assert list(spool.ready.iterdir()) == []
        assert spool.accept(item(second)).outcome is StoreOutcome.STORED
        assert spool.accept(item(third)).outcome is StoreOutcome.STORED
        assert spool.wait_idle(timeout=30)
        assert index.counts()["instances"] == 3
        assert len(keys(objects)) == 3
    finally:
        spool.pipeline.objects = objects
        spool.close()


def test_spool_is_not_jammed_by_one_unindexable_instance(
    pipeline: IngestPipeline, tmp_path: Path
) -> None:
    """One instance the index cannot take must not block every later instance: the spool
    retries 0xA700 outcomes forever and refuses all new instances meanwhile."""
    first, second = ct_series(tmp_path / "ct", count=2)
    odd = variant(first, tmp_path / "long.dcm", AccessionNumber="A" * 20)
    spool = Spool(tmp_path / "spool", pipeline, workers=1)
    spool.start()
    fallback: Index | None = None
    try:
        assert spool.accept(item(odd)).outcome is StoreOutcome.STORED
        drained = spool.wait_idle(timeout=5)
        failure = spool.failure
        later = spool.accept(item(second))
        assert drained and failure is None, f"spool stuck: {failure}"
        assert later.outcome is StoreOutcome.STORED, later.reason
    finally:
        if not spool.wait_idle(timeout=0.1):
            # Let the stuck worker finish on a database that takes the row, then stop it.
            fallback = Index(f"sqlite:///{tmp_path / 'fallback.sqlite3'}")
            fallback.migrate()
            spool.pipeline.index = fallback
        spool.close()
        if fallback is not None:
            fallback.dispose()
