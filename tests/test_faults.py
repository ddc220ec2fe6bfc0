"""Real faults under a push (issue 6): the database cutting every connection of the archive
during a push and searches; the object store's process frozen (SIGSTOP: it hangs
with its sockets open) or killed (SIGKILL, then started again on its ports) in the middle of
a C-STORE push. Every instance answered success must end up in the bucket, its data set as
sent, and in the index; every other answer is 0xA700 and the modality's resend succeeds; no
C-STORE waits without an answer."""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from storage.embedded_s3 import EmbeddedS3
from tests.conftest import POSTGRES_ADMIN, bucket_of, s3_env
from tests.dicom_factory import ct_series
from tests.test_cstore import dataset_bytes, wait_drained
from tests.test_serve import healthz, metric_samples, sqlite_row, value, wait_for
from tests.test_tls import start_tls_archive

COUNT = 150
DOWN_SECONDS = 12


def _push(port: int, paths: list[Path], results: list[tuple[str, int, float]]) -> None:
    """One association, one instance after another: (SOPInstanceUID, status, seconds)."""
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="POCKETPACS")
    assert assoc.is_established
    try:
        for path in paths:
            ds = dcmread(path)
            started = time.monotonic()
            status = assoc.send_c_store(ds)
            code = int(status.Status) if status else -1
            results.append((str(ds.SOPInstanceUID), code, time.monotonic() - started))
    finally:
        assoc.release()


@pytest.mark.parametrize("fault", ["frozen", "killed"])
def test_object_store_fails_mid_push(archive_factory, tmp_path: Path, fault: str) -> None:
    store = EmbeddedS3(tmp_path / "s3", volume_size_limit_mb=64)
    store.start()
    try:
        archive = archive_factory(s3_env(store))
        archive.start()
        paths = ct_series(tmp_path / "ct", count=COUNT, seed="failing-store")
        later = ct_series(tmp_path / "later", count=5, seed="failing-store-later")
        originals = {
            str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths + later
        }
        results: list[tuple[str, int, float]] = []
        pusher = threading.Thread(target=_push, args=(archive.dicom_port, paths, results))
        pusher.start()
        while len(results) < 30:
            time.sleep(0.05)
        assert store.process is not None
        if fault == "frozen":  # hangs with its sockets open, then goes on
            os.kill(store.process.pid, signal.SIGSTOP)
            try:
                time.sleep(DOWN_SECONDS)
            finally:
                os.kill(store.process.pid, signal.SIGCONT)
            pusher.join(timeout=600)
        else:  # gone: the spool finds out, the next instances are refused, then it is back
            os.kill(store.process.pid, signal.SIGKILL)
            store.process.wait()
            pusher.join(timeout=600)
            spool = wait_for(
                lambda: (body := healthz(archive).json()["ingest_spool"])["ok"] is False and body,
                120,
                "the spool to find the object store gone",
            )
            assert "object store unavailable" in spool["error"]
            before = metric_samples(archive)
            _push(archive.dicom_port, later, results)
            assert [code for _, code, _ in results[-len(later) :]] == [0xA700] * len(later)
            # Counted where Prometheus looks: /metrics, though the HTTP server runs in a
            # process of its own and the refusals happen in the DICOM side's.
            failures = "pocketpacs_store_failures_total"
            counted = value(metric_samples(archive), failures, status="0xA700")
            assert counted - value(before, failures, status="0xA700") == len(later)
            store.start()  # as an operator or a supervisor would, on the same ports
        assert not pusher.is_alive(), "the push never finished"
        assert len(results) == COUNT + (len(later) if fault == "killed" else 0)

        statuses = {code for _, code, _ in results}
        assert statuses <= {0x0000, 0xA700}, statuses
        assert max(seconds for _, _, seconds in results) < 90  # answered, never hung
        wait_drained(archive, timeout=300)
        bucket = bucket_of(archive, store)
        stored = [uid for uid, code, _ in results if code == 0x0000]
        for uid in stored:  # every acknowledged instance, its data set as sent
            row = sqlite_row(archive.data_dir, uid)
            assert row is not None, uid
            assert dataset_bytes(bucket.get(row[0])) == dataset_bytes(originals[uid].read_bytes())

        refused = [uid for uid, code, _ in results if code == 0xA700]
        retried: list[tuple[str, int, float]] = []
        _push(archive.dicom_port, [originals[uid] for uid in refused], retried)
        assert {code for _, code, _ in retried} <= {0x0000}  # the modality's retry succeeds
        wait_drained(archive, timeout=120)
        for uid in refused:
            assert sqlite_row(archive.data_dir, uid) is not None
    finally:
        store.stop()


def _terminate_connections(database: str) -> int:
    """Cut every connection the archive holds to its database, as a failover or an
    administrator's restart does (the shared cluster itself keeps running)."""
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchall()
    return len(rows)


def test_database_connections_cut_during_a_push_and_queries(
    archive_factory, s3_server, postgres_database, tmp_path: Path
) -> None:
    """PostgreSQL drops every connection of the archive, five times, while instances
    arrive and QIDO-RS searches run: nothing acknowledged is lost, every answer is a
    success or a clear failure, and the pool recovers without a restart."""
    archive = archive_factory(
        {**s3_env(s3_server), "POCKETPACS_DATABASE_URL": postgres_database.url}
    )
    archive.start()
    paths = ct_series(tmp_path / "ct", count=COUNT, seed="cut-database")
    originals = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}
    results: list[tuple[str, int, float]] = []
    pusher = threading.Thread(target=_push, args=(archive.dicom_port, paths, results))
    searches: list[int] = []
    stop = threading.Event()

    def search() -> None:
        with httpx.Client(base_url=archive.http, timeout=60) as client:
            while not stop.is_set():
                searches.append(client.get("/dicomweb/studies").status_code)

    searcher = threading.Thread(target=search)
    pusher.start()
    searcher.start()
    cuts = 0
    try:
        for _ in range(5):  # each time the archive has connected again, cut it off
            time.sleep(0.3)
            deadline = time.monotonic() + 30
            while not (cut := _terminate_connections(postgres_database.name)):
                assert time.monotonic() < deadline, "the archive never reconnected"
                time.sleep(0.05)
            cuts += cut
        pusher.join(timeout=600)
    finally:
        stop.set()
        searcher.join(timeout=60)
    assert cuts >= 5  # connections were really there to cut
    assert not pusher.is_alive() and len(results) == COUNT
    assert {code for _, code, _ in results} <= {0x0000, 0xA700}
    assert set(searches) <= {200, 503}, set(searches)
    wait_drained(archive, timeout=300)
    url = postgres_database.url.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(url) as db:
        stored = {row[0] for row in db.execute("SELECT sop_instance_uid FROM instances")}
    acknowledged = {uid for uid, code, _ in results if code == 0x0000}
    assert acknowledged <= stored
    resend = [originals[uid] for uid, code, _ in results if code != 0x0000]
    retried: list[tuple[str, int, float]] = []
    _push(archive.dicom_port, resend, retried)
    assert {code for _, code, _ in retried} <= {0x0000}
    # The pool recovered: the same process answers searches and health checks.
    assert httpx.get(f"{archive.http}/dicomweb/studies", timeout=30).status_code == 200
    assert healthz(archive).json()["index"] == {"ok": True}
    assert "audit event lost" not in archive.log_path.read_text()  # written on a new one


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MB tmpfs of its own for the data directory (root only: mount(8)). Asked for
    before `archive_factory`, so the archive is stopped before its disk is unmounted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_data_disk_full(small_disk: Path, archive_factory, s3_server, tmp_path: Path) -> None:
    """The data directory's disk fills up under a push: clear refusals (0xA700), no crash,
    nothing acknowledged lost or damaged, and storing resumes once there is room."""
    archive = archive_factory(s3_env(s3_server), data_dir=small_disk / "data")
    archive.start()
    filler = small_disk / "filler"
    free = shutil.disk_usage(small_disk).free
    with filler.open("wb") as out:  # leave room for about four 0.5 MB instances
        out.write(b"\0" * (free - 2_200_000))
    paths = ct_series(tmp_path / "ct", count=20, seed="full-disk")
    originals = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}
    results: list[tuple[str, int, float]] = []
    _push(archive.dicom_port, paths, results)
    codes = [code for _, code, _ in results]
    assert set(codes) <= {0x0000, 0xA700} and 0xA700 in codes
    assert archive.process is not None and archive.process.poll() is None  # still serving
    filler.unlink()
    wait_drained(archive, timeout=120)
    bucket = bucket_of(archive, s3_server)
    for uid, code, _ in results:
        if code == 0x0000:
            row = sqlite_row(archive.data_dir, uid)
            assert row is not None, uid
            assert dataset_bytes(bucket.get(row[0])) == dataset_bytes(originals[uid].read_bytes())
    retried: list[tuple[str, int, float]] = []
    _push(archive.dicom_port, [originals[uid] for uid, code, _ in results if code], retried)
    assert {code for _, code, _ in retried} == {0x0000}


def _push_tls(port: int, pki: dict[str, Path], paths: list[Path]) -> list[tuple[str, int, str]]:
    """One DICOM TLS association as MODALITY, with its client certificate, one instance after
    another: (SOPInstanceUID, status, Error Comment). Ends with a C-ECHO on the same
    association, which must still be up."""
    tls = ssl.create_default_context(cafile=pki["ca.crt"])
    tls.load_cert_chain(pki["client.crt"], pki["client.key"])
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="POCKETPACS", tls_args=(tls, "127.0.0.1"))
    assert assoc.is_established
    results: list[tuple[str, int, str]] = []
    try:
        for path in paths:
            ds = dcmread(path)
            answer = assoc.send_c_store(ds)
            code = int(answer.Status) if answer else -1
            results.append((str(ds.SOPInstanceUID), code, str(answer.get("ErrorComment", ""))))
        echo = assoc.send_c_echo()
        assert echo and echo.Status == 0x0000, "the association did not go on"
    finally:
        assoc.release()
    return results


def test_data_disk_full_on_the_tls_port(
    small_disk: Path, archive_factory, s3_server, tmp_path: Path
) -> None:
    """The data disk fills up under a push on the DICOM TLS port, where pynetdicom receives
    the data sets (not the lean acceptor): the same promises as `test_data_disk_full`, and
    what was stored before the disk filled is left as it was."""
    archive, tls_port, pki = start_tls_archive(
        archive_factory, s3_server, tmp_path, data_dir=small_disk / "data"
    )
    paths = ct_series(tmp_path / "ct", count=23, seed="full-disk-tls")
    originals = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}
    earlier, paths = paths[:3], paths[3:]
    assert {code for _, code, _ in _push_tls(tls_port, pki, earlier)} == {0x0000}
    wait_drained(archive)
    bucket = bucket_of(archive, s3_server)
    held = {}
    for path in earlier:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        row = sqlite_row(archive.data_dir, uid)
        assert row is not None, uid
        held[uid] = (row, bucket.get(row[0]))

    filler = small_disk / "filler"
    free = shutil.disk_usage(small_disk).free
    with filler.open("wb") as out:  # leave room for about four 0.5 MB instances
        out.write(b"\0" * (free - 2_200_000))
    results = _push_tls(tls_port, pki, paths)
    assert len(results) == len(paths)  # every C-STORE answered
    codes = [code for _, code, _ in results]
    assert set(codes) <= {0x0000, 0xA700} and 0xA700 in codes, codes
    for _, code, comment in results:
        if code == 0xA700:
            assert "No space left on device" in comment, comment
    assert archive.process is not None and archive.process.poll() is None  # still serving

    filler.unlink()
    wait_drained(archive, timeout=120)
    for uid, (row, stored) in held.items():  # what was there before is as it was
        assert sqlite_row(archive.data_dir, uid) == row
        assert bucket.get(row[0]) == stored
    for uid, code, _ in results:
        if code == 0x0000:
            row = sqlite_row(archive.data_dir, uid)
            assert row is not None, uid
            assert dataset_bytes(bucket.get(row[0])) == dataset_bytes(originals[uid].read_bytes())
    refused = [originals[uid] for uid, code, _ in results if code]
    assert {code for _, code, _ in _push_tls(tls_port, pki, refused)} == {0x0000}
    wait_drained(archive, timeout=120)
    for path in refused:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert sqlite_row(archive.data_dir, uid) is not None, uid


def test_embedded_object_store_comes_back(archive_factory, tmp_path: Path) -> None:
    """`serve` with its own SeaweedFS: killed under it, the server is started again on its
    ports by the archive itself, and storing goes on without an operator."""
    archive = archive_factory()  # no S3 settings: the embedded server
    archive.start()
    pid_file = archive.data_dir / "s3" / "weed.pid"
    first = int(pid_file.read_text())
    (before, after) = ct_series(tmp_path / "ct", count=2, seed="embedded-comes-back")
    stored: list[tuple[str, int, float]] = []
    _push(archive.dicom_port, [before], stored)
    os.kill(first, signal.SIGKILL)
    wait_for(
        lambda: pid_file.exists() and int(pid_file.read_text()) != first,
        60,
        "the embedded S3 server to be started again",
    )
    wait_for(lambda: healthz(archive).status_code == 200, 60, "healthz to recover")
    _push(archive.dicom_port, [after], stored)
    assert [code for _, code, _ in stored] == [0x0000, 0x0000]
    wait_drained(archive, timeout=120)
    for path in (before, after):
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert sqlite_row(archive.data_dir, uid) is not None
    assert "starting it again" in archive.log_path.read_text()
