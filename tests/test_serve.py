"""`pocketpacs serve` as a process: embedded SeaweedFS on loopback only, clean SIGTERM,
restarts that keep data, /healthz, /metrics, and PostgreSQL as the index."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from io import BytesIO
from pathlib import Path

import httpx
import psycopg
import pytest
from minio import Minio
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from storage import embedded_s3, layout
from storage.embedded_s3 import EmbeddedS3
from storage.objects import ObjectStore
from tests.conftest import (
    PostgresDatabase,
    RunningArchive,
    bucket_of,
    free_port,
    make_bucket_store,
)
from tests.dicom_factory import ct_series

# Ports `weed mini` uses when it is not told otherwise (S3, master, filer, volume, admin).
WEED_DEFAULT_PORTS = (8333, 9333, 8888, 8080, 23646)


# helpers -------------------------------------------------------------------------------


def c_store(archive: RunningArchive, dataset: Dataset) -> Dataset:
    """Send one data set with a C-STORE; the response status data set."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, str(dataset.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", archive.dicom_port, ae_title=archive.ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(dataset)
    finally:
        assoc.release()
    assert status, "no C-STORE response"
    return status


def wait_for(condition, timeout: float = 30.0, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(0.1)


def sqlite_row(data_dir: Path, uid: str) -> tuple | None:
    path = data_dir / "index.sqlite3"
    if not path.exists():
        return None
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT object_key, size, source_ae FROM instances WHERE sop_instance_uid = ?", (uid,)
        ).fetchone()


def _decode_address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_address)
    # /proc/net/tcp{,6} print each 32-bit word in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket the process is listening on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                address, port = local.split(":")
                found.append((str(_decode_address(address)), int(port, 16)))
    return sorted(found)


def http_process_pid(serve_pid: int) -> int:
    """The HTTP server's process, a child `serve` spawned."""
    for task in Path(f"/proc/{serve_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    raise AssertionError(f"no HTTP process under {serve_pid}")


def weed_pid(data_dir: Path) -> int:
    return int((data_dir / "s3" / "weed.pid").read_text().strip())


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def process_gone(pid: int) -> bool:
    """Gone and reaped: a zombie left behind still counts as not cleaned up."""
    return not Path(f"/proc/{pid}").exists()


def healthz(archive: RunningArchive) -> httpx.Response:
    return httpx.get(f"{archive.http}/healthz", timeout=10)


def metric_samples(archive: RunningArchive) -> dict[tuple[str, frozenset], float]:
    response = httpx.get(f"{archive.http}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# embedded SeaweedFS --------------------------------------------------------------------


def test_a_restart_does_not_adopt_an_s3_server_that_is_stopping(tmp_path: Path) -> None:
    """Started again at once, the archive finds the old `weed` still alive but no longer
    listening: it waits for it to exit and starts its own, rather than using a dead port."""
    root = tmp_path / "data"
    first = EmbeddedS3(root)
    first.start()
    old_pid = first.process.pid
    with socket.socket() as probe:  # a port nothing listens on: the stopping server's
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    log_path = root / "s3" / "weed.log"
    log_path.write_text(f"S3 Endpoint: http://127.0.0.1:{closed_port}\n")
    stopper = threading.Timer(1.0, first.stop)
    stopper.start()
    second = EmbeddedS3(root)
    try:
        endpoint = second.start()
        assert second.process is not None and second.process.pid != old_pid
        assert not Path(f"/proc/{old_pid}").exists()
        port = int(endpoint.rsplit(":", 1)[1])
        assert port != closed_port
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        stopper.join()
        second.stop()


def test_serve_with_embedded_s3(archive_factory, tmp_path: Path) -> None:
    archive: RunningArchive = archive_factory()  # no POCKETPACS_ settings at all
    archive.start()
    data = archive.data_dir

    body = healthz(archive).json()
    assert body["status"] == "ok"
    assert body["object_store"] == {"ok": True, "bucket": "pocketpacs"}
    assert body["index"] == {"ok": True}
    assert body["ingest_spool"]["ok"] is True

    # A `weed` child of serve holds the data in the data directory, on loopback only.
    pid = weed_pid(data)
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[0].endswith(b"weed") and b"mini" in cmdline
    assert parent_of(pid) == archive.process.pid
    weed_sockets = listening_sockets(pid)
    assert weed_sockets, "weed listens on nothing"
    assert {address for address, _port in weed_sockets} == {"127.0.0.1"}, weed_sockets
    serve_sockets = listening_sockets(archive.process.pid)
    http_sockets = listening_sockets(http_process_pid(archive.process.pid))
    assert ("127.0.0.1", archive.dicom_port) in serve_sockets
    assert http_sockets == [("127.0.0.1", archive.http_port)]  # the HTTP process's alone
    assert {address for address, _port in serve_sockets} == {"127.0.0.1"}, serve_sockets

    credentials_path = data / "s3-credentials.json"
    assert stat.S_IMODE(credentials_path.stat().st_mode) == 0o600
    credentials = credentials_path.read_bytes()
    assert set(json.loads(credentials)) == {"access_key", "secret_key"}

    # Store an instance, then stop with SIGTERM: exit 0, weed gone, nothing lost.
    path = ct_series(tmp_path / "ct", count=1)[0]
    dataset = dcmread(path)
    uid = dataset.SOPInstanceUID
    assert c_store(archive, dataset).Status == 0x0000
    serve_pid = archive.process.pid
    assert archive.stop() == 0, archive.log()
    assert not Path(f"/proc/{serve_pid}").exists()
    wait_for(lambda: process_gone(pid), 15, "the weed process to go")
    row = sqlite_row(data, uid)
    assert row is not None, "the acknowledged instance is not in the index after SIGTERM"
    key = layout.instance_key(dataset.StudyInstanceUID, dataset.SeriesInstanceUID, uid)
    assert row[0] == key
    assert row[2] == "TESTSCU"

    # Restart on the same data directory: same credentials, the instance is still there.
    archive.start()
    assert healthz(archive).json()["status"] == "ok"
    assert credentials_path.read_bytes() == credentials
    assert stat.S_IMODE(credentials_path.stat().st_mode) == 0o600
    new_pid = weed_pid(data)
    assert new_pid != pid
    assert {address for address, _port in listening_sockets(new_pid)} == {"127.0.0.1"}
    assert sqlite_row(data, uid) == row

    # Read the bytes back through the running embedded server (attaching, as the CLI does).
    embedded = EmbeddedS3(data)
    endpoint = embedded.start()
    try:
        store = ObjectStore(
            endpoint,
            embedded.credentials.access_key,
            embedded.credentials.secret_key,
            "pocketpacs",
        )
        stored = store.get(key)
        assert len(stored) == row[1]
        assert dcmread(BytesIO(stored)).PixelData == dataset.PixelData
    finally:
        embedded.stop()  # only detaches: serve's weed keeps running
    assert healthz(archive).json()["object_store"]["ok"] is True

    # `pocketpacs import` beside the running archive shares its S3 server and index.
    imported = ct_series(tmp_path / "import", count=1, seed="imported")[0]
    command = [sys.executable, "-m", "pocketpacs"]
    run = subprocess.run(
        [*command, "import", str(imported), "--data-dir", str(data), "-q"],
        env=archive.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines()[-1] == "1 stored, 0 duplicate, 0 rejected"
    assert sqlite_row(data, dcmread(imported, stop_before_pixels=True).SOPInstanceUID)

    # A second `serve` on the same data directory is refused, and leaves the first alone.
    second = subprocess.run(
        [
            *command,
            "serve",
            "--data-dir",
            str(data),
            "--dicom-port",
            str(free_port()),
            "--http-port",
            str(free_port()),
        ],
        env=archive.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 2, second.stdout + second.stderr
    assert "another pocketpacs process is using" in second.stderr
    assert weed_pid(data) == new_pid and not process_gone(new_pid)
    assert healthz(archive).json()["status"] == "ok"

    assert archive.stop() == 0, archive.log()
    wait_for(lambda: process_gone(new_pid), 15, "the weed process to go")


def test_serve_starts_when_weeds_default_ports_are_taken(archive_factory, tmp_path) -> None:
    with ExitStack() as stack:
        for port in WEED_DEFAULT_PORTS:
            listener = stack.enter_context(socket.socket())
            try:
                listener.bind(("127.0.0.1", port))
            except OSError:
                continue  # already taken by someone else: just as good
            listener.listen()
        assert not _port_free(8333)  # by us, or already by someone else

        archive: RunningArchive = archive_factory()
        archive.start()
        body = healthz(archive).json()
        assert body["status"] == "ok", body
        pid = weed_pid(archive.data_dir)
        ports = {port for _address, port in listening_sockets(pid)}
        assert not ports & set(WEED_DEFAULT_PORTS)

        path = ct_series(tmp_path / "ct", count=1)[0]
        dataset = dcmread(path)
        assert c_store(archive, dataset).Status == 0x0000
        wait_for(lambda: sqlite_row(archive.data_dir, dataset.SOPInstanceUID), 30, "the row")
        assert archive.stop() == 0, archive.log()


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# metrics -------------------------------------------------------------------------------


# the HTTP process -----------------------------------------------------------------------


def test_sigterm_lets_the_http_process_write_what_it_holds(
    archive: RunningArchive, tmp_path: Path
) -> None:
    """Share link views are written in batches (within 1 s) by the HTTP process; SIGTERM
    to `serve` stops that process cleanly, and the last view is counted."""
    dataset = dcmread(ct_series(tmp_path / "ct", count=1, seed="views")[0])
    assert c_store(archive, dataset).Status == 0x0000
    wait_for(lambda: sqlite_row(archive.data_dir, dataset.SOPInstanceUID), 30, "the row")
    made = httpx.post(
        f"{archive.http}/api/shares", json={"study_uid": dataset.StudyInstanceUID}, timeout=10
    )
    assert made.status_code == 201, made.text
    http_pid = http_process_pid(archive.process.pid)
    # The study summary a phone's page asks for: one view.
    assert httpx.get(made.json()["url"] + "/study", timeout=10).status_code == 200
    assert archive.stop() == 0, archive.log()  # at once: the view is still in memory
    assert process_gone(http_pid)
    with sqlite3.connect(archive.data_dir / "index.sqlite3") as db:
        assert db.execute("SELECT views FROM shares").fetchall() == [(1,)], archive.log()


def test_the_archive_stops_when_its_http_process_dies(archive: RunningArchive) -> None:
    """An HTTP process killed leaves no archive answering DICOM alone, unnoticed: `serve`
    stops (exit 1, for its supervisor to start it again), its S3 server and DICOM port
    with it."""
    os.kill(http_process_pid(archive.process.pid), signal.SIGKILL)
    assert archive.process.wait(60) == 1, archive.log()
    archive.process = None
    assert "the HTTP process exited" in archive.log()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", archive.dicom_port), timeout=2).close()


def test_the_http_process_stops_when_serve_is_killed(archive: RunningArchive) -> None:
    """kill -9 of `serve`: its HTTP process notices (its pipe closes), stops, and frees the
    port, so the archive starts again on the same ports."""
    http_pid = http_process_pid(archive.process.pid)
    archive.kill()
    wait_for(lambda: process_gone(http_pid), 30, "the HTTP process to go")
    archive.start()
    assert healthz(archive).status_code == 200


def test_metrics_count_receptions_and_failures(archive: RunningArchive, tmp_path: Path) -> None:
    before = metric_samples(archive)

    good, other = ct_series(tmp_path / "ct", count=2)
    dataset = dcmread(good)
    assert c_store(archive, dataset).Status == 0x0000
    broken = dcmread(other)
    del broken.SeriesInstanceUID
    refused = c_store(archive, broken)
    assert refused.Status == 0xA900
    assert "SeriesInstanceUID" in refused.ErrorComment

    row = wait_for(lambda: sqlite_row(archive.data_dir, dataset.SOPInstanceUID), 30, "the row")
    after = metric_samples(archive)
    exposition = httpx.get(f"{archive.http}/metrics", timeout=10).text
    types = {
        family.name.removesuffix("_total"): family.type
        for family in text_string_to_metric_families(exposition)
    }
    assert types["pocketpacs_instances_received"] == "counter"
    assert types["pocketpacs_bytes_received"] == "counter"
    assert types["pocketpacs_store_failures"] == "counter"
    assert types["pocketpacs_store_seconds"] == "histogram"

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # Counted once when the spool acknowledged it, not again when it drained.
    assert delta("pocketpacs_instances_received_total", route="cstore", outcome="stored") == 1
    assert (
        delta(
            "pocketpacs_instances_received_total",
            route="cstore",
            outcome="does_not_match_sop_class",
        )
        == 1
    )
    assert delta("pocketpacs_bytes_received_total", route="cstore") == row[1]
    assert delta("pocketpacs_store_failures_total", status="0xA900") == 1
    assert delta("pocketpacs_store_failures_total", status="0xA700") == 0
    assert delta("pocketpacs_store_seconds_count", route="cstore") == 2
    assert delta("pocketpacs_store_seconds_bucket", route="cstore", le="+Inf") == 2
    assert delta("pocketpacs_store_seconds_sum", route="cstore") > 0


# an outage while serving ----------------------------------------------------------------


def test_bucket_outage_while_serving(
    archive: RunningArchive, s3_server: EmbeddedS3, tmp_path: Path
) -> None:
    """The bucket disappears under a running archive: /healthz says so at once, and an
    instance acknowledged meanwhile is not lost. Where it goes depends on the S3 server:
    MinIO refuses writes to a missing bucket, and the spool keeps the instance until the
    bucket is back (test_faults covers a store that refuses); SeaweedFS makes the bucket
    again on the first write. Either way it ends up stored, once."""
    admin = Minio(
        s3_server.endpoint,
        access_key=s3_server.credentials.access_key,
        secret_key=s3_server.credentials.secret_key,
        secure=False,
    )
    first, second = (dcmread(p) for p in ct_series(tmp_path / "ct", count=2, seed="outage"))
    admin.remove_bucket(archive.bucket)
    try:
        down = healthz(archive)
        assert down.status_code == 503
        assert down.json()["status"] == "unavailable"
        assert down.json()["object_store"]["ok"] is False
        assert down.json()["index"] == {"ok": True}
        assert c_store(archive, first).Status == 0x0000
    finally:
        time.sleep(1)  # the spool's first drain attempt
        if not admin.bucket_exists(archive.bucket):
            admin.make_bucket(archive.bucket)

    wait_for(lambda: healthz(archive).status_code == 200, 30, "healthz to recover")
    wait_for(lambda: healthz(archive).json()["ingest_spool"]["pending"] == 0, 60, "the drain")
    assert healthz(archive).json()["ingest_spool"]["ok"] is True
    row = wait_for(lambda: sqlite_row(archive.data_dir, first.SOPInstanceUID), 30, "the row")
    assert bucket_of(archive, s3_server).stat(row[0]).size == row[1]
    assert c_store(archive, second).Status == 0x0000


# PostgreSQL ----------------------------------------------------------------------------


def test_serve_on_postgresql(
    archive_factory, s3_server: EmbeddedS3, postgres_database: PostgresDatabase, tmp_path: Path
) -> None:
    bucket = make_bucket_store(s3_server).bucket
    archive: RunningArchive = archive_factory(
        {
            "POCKETPACS_S3_ENDPOINT": s3_server.endpoint,
            "POCKETPACS_S3_ACCESS_KEY": s3_server.credentials.access_key,
            "POCKETPACS_S3_SECRET_KEY": s3_server.credentials.secret_key,
            "POCKETPACS_S3_BUCKET": bucket,
            "POCKETPACS_DATABASE_URL": postgres_database.url,
        }
    )
    archive.start()
    body = healthz(archive).json()
    assert body["status"] == "ok"
    assert body["index"] == {"ok": True}
    assert body["object_store"] == {"ok": True, "bucket": bucket}

    path = ct_series(tmp_path / "ct", count=1)[0]
    dataset = dcmread(path)
    assert c_store(archive, dataset).Status == 0x0000

    url = postgres_database.url.replace("postgresql+psycopg", "postgresql")

    def row() -> tuple | None:
        with psycopg.connect(url) as db:
            return db.execute(
                "SELECT object_key, size FROM instances WHERE sop_instance_uid = %s",
                (dataset.SOPInstanceUID,),
            ).fetchone()

    key, size = wait_for(row, 30, "the row in PostgreSQL")
    assert key == layout.instance_key(
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID
    )
    assert len(bucket_of(archive, s3_server).get(key)) == size
    assert not (archive.data_dir / "index.sqlite3").exists()
    assert archive.stop() == 0, archive.log()


def test_embedded_s3_starts_on_other_ports_when_one_is_taken(tmp_path, monkeypatch) -> None:
    """Another process may take a port between its choosing and SeaweedFS binding it (seen
    once in the suite, the filer's): the server starts on newly chosen ports instead of
    failing."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    real = embedded_s3._free_port_pairs
    choices: list[list[int]] = []

    def choose(count: int) -> list[int]:
        ports = real(count)
        if not choices:  # the filer's port, taken meanwhile
            ports[embedded_s3._COMPONENTS.index("filer")] = taken.getsockname()[1]
        choices.append(ports)
        return ports

    monkeypatch.setattr(embedded_s3, "_free_port_pairs", choose)
    store = EmbeddedS3(tmp_path / "s3")
    try:
        assert store.start()
        assert len(choices) == 2
        assert taken.getsockname()[1] not in store._ports.values()
    finally:
        store.stop()
        taken.close()
