"""Shared fixtures: real servers only. One SeaweedFS S3 server for the session, a fresh
bucket per test, SQLite and PostgreSQL indexes, and `pocketpacs serve` run as a process."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest

from storage.embedded_s3 import EmbeddedS3
from storage.index import Index
from storage.ingest import IngestPipeline
from storage.objects import ObjectStore

POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedS3]:
    """A real SeaweedFS S3 server shared by the session (started the way `serve` does)."""
    # One bucket per test, each at least one SeaweedFS volume: at its default 1 GiB size
    # weed makes only as many volumes as the free disk holds (74 on a 75 GB disk).
    server = EmbeddedS3(tmp_path_factory.mktemp("s3-session"), volume_size_limit_mb=64)
    server.start()
    yield server
    server.stop()


def make_bucket_store(s3_server: EmbeddedS3) -> ObjectStore:
    store = ObjectStore(
        s3_server.endpoint,
        s3_server.credentials.access_key,
        s3_server.credentials.secret_key,
        bucket=f"t-{uuid.uuid4().hex[:16]}",
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            store.ensure_bucket()
            return store
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@pytest.fixture
def objects(s3_server: EmbeddedS3) -> ObjectStore:
    """An empty bucket of its own for each test."""
    return make_bucket_store(s3_server)


@dataclass
class PostgresDatabase:
    name: str

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.name}"


@pytest.fixture
def postgres_database() -> Iterator[PostgresDatabase]:
    """A new, empty PostgreSQL database, dropped afterwards."""
    database = PostgresDatabase(f"pocketpacs_test_{uuid.uuid4().hex[:12]}")
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database.name}"')
    yield database
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{database.name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same tests run on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.sqlite3'}"
    return request.getfixturevalue("postgres_database").url


@pytest.fixture
def index(index_url: str) -> Iterator[Index]:
    index = Index(index_url)
    index.migrate()
    yield index
    index.dispose()


@pytest.fixture
def pipeline(objects: ObjectStore, index: Index) -> IngestPipeline:
    return IngestPipeline(objects, index)


@dataclass
class RunningArchive:
    """A `pocketpacs serve` process and how to reach it."""

    data_dir: Path
    dicom_port: int
    http_port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None
    ae_title: str = "POCKETPACS"
    # Tests push with many calling AE titles; the node registry's own tests start without.
    extra_args: list[str] = field(default_factory=lambda: ["--open"])
    # What httpx trusts for an HTTPS archive: a context holding the CA that signed it.
    trust: ssl.SSLContext | bool = True

    @property
    def http(self) -> str:
        scheme = "https" if "POCKETPACS_TLS_CERT" in self.env else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60.0) -> None:
        command = [
            sys.executable,
            "-m",
            "pocketpacs",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--dicom-port",
            str(self.dicom_port),
            "--http-port",
            str(self.http_port),
            *self.extra_args,
        ]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited early:\n{self.log()}")
            try:
                healthz = httpx.get(f"{self.http}/healthz", timeout=2, verify=self.trust)
                if healthz.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"serve did not become healthy:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(timeout)
        self.process = None
        return code

    def kill(self) -> None:
        """kill -9: no clean-up of any kind."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def archive_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POCKETPACS_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@pytest.fixture
def archive_factory(tmp_path: Path) -> Iterator:
    """Build `RunningArchive`s; every one still running at the end is stopped."""
    started: list[RunningArchive] = []

    def make(env: dict[str, str] | None = None, data_dir: Path | None = None) -> RunningArchive:
        archive = RunningArchive(
            data_dir=data_dir or tmp_path / f"data-{len(started)}",
            dicom_port=free_port(),
            http_port=free_port(),
            env=archive_env(env),
            log_path=tmp_path / f"serve-{len(started)}.log",
        )
        started.append(archive)
        return archive

    yield make
    for archive in started:
        if archive.process is not None:
            archive.stop()


@pytest.fixture
def archive(archive_factory, s3_server: EmbeddedS3) -> RunningArchive:
    """`pocketpacs serve` on SQLite, using the session's S3 server with a bucket of its own."""
    bucket = make_bucket_store(s3_server).bucket
    running = archive_factory(s3_env(s3_server, bucket))
    running.start()
    running.bucket = bucket
    return running


def s3_env(s3_server: EmbeddedS3, bucket: str | None = None) -> dict[str, str]:
    """An archive's environment for the session's S3 server, in a bucket of its own (a new
    one unless `bucket` is given)."""
    return {
        "POCKETPACS_S3_ENDPOINT": s3_server.endpoint,
        "POCKETPACS_S3_ACCESS_KEY": s3_server.credentials.access_key,
        "POCKETPACS_S3_SECRET_KEY": s3_server.credentials.secret_key,
        "POCKETPACS_S3_BUCKET": bucket or make_bucket_store(s3_server).bucket,
    }


def bucket_of(archive: RunningArchive, s3_server: EmbeddedS3) -> ObjectStore:
    """The object store a running archive writes to, for reading back what it stored."""
    return ObjectStore(
        s3_server.endpoint,
        s3_server.credentials.access_key,
        s3_server.credentials.secret_key,
        bucket=archive.env["POCKETPACS_S3_BUCKET"],
    )


def spool_files_holding(data_dir: Path, needle: bytes) -> list[Path]:
    """Files under the archive's spool whose bytes contain `needle` (a UID, say)."""
    return [
        path
        for path in (data_dir / "spool").rglob("*")
        if path.is_file() and needle in path.read_bytes()
    ]


def dcmtk_env() -> dict[str, str]:
    """DCMTK leaves Nagle on unless told: without this, ~40 ms per DIMSE response."""
    return {**os.environ, "TCP_NODELAY": "1"}


# Issuer of the regional patient identifier in `region`.
REGION = "REGION"


@pytest.fixture
def region(archive_factory, s3_server, tmp_path: Path) -> tuple[RunningArchive, dict[str, str]]:
    """North sent study A (patient P1, 3 images) and B (patient Z9); south sent study C
    (patient P1 too). Returns the archive and the study UIDs by letter; the files sent are
    `tmp_path/{letter}{number}.dcm`."""
    from pocketpacs.cli import main
    from tests.test_cstore import run_storescu, small_ct, wait_drained, write

    archive = archive_factory(s3_env(s3_server))
    archive.extra_args = []
    data = ["--data-dir", str(archive.data_dir)]
    for name in ("north", "south"):
        assert main(["institutions", "add", name, *data]) == 0
    assert main(["nodes", "add", "NORTHCT", "127.0.0.1", "1", "--institution", "north", *data]) == 0
    assert main(["nodes", "add", "SOUTHCT", "127.0.0.1", "1", "--institution", "south", *data]) == 0
    archive.start()

    studies = {}
    for letter, patient_id, name, sender, count in (
        ("A", "P1", "Doe^Jane", "NORTHCT", 3),
        ("B", "Z9", "Zhang^Ming", "NORTHCT", 1),
        ("C", "P1", "Doe^Jane", "SOUTHCT", 1),
    ):
        paths = []
        for number in range(1, count + 1):
            ds = small_ct(number=number, seed=f"find-{letter}")
            ds.PatientID = patient_id
            ds.IssuerOfPatientID = REGION
            ds.StudyDate = "20261101"
            ds.PatientName = name
            paths.append(write(ds, tmp_path / f"{letter}{number}.dcm"))
        studies[letter] = str(ds.StudyInstanceUID)
        result = run_storescu(archive, *map(str, paths), calling_ae=sender)
        assert result.returncode == 0, result.stdout + result.stderr
    wait_drained(archive)
    return archive, studies


def started_archive(s3_server: EmbeddedS3, folder: Path) -> RunningArchive:
    """`pocketpacs serve --open` on SQLite in `folder`, with a bucket of its own, running."""
    running = RunningArchive(
        data_dir=folder / "data",
        dicom_port=free_port(),
        http_port=free_port(),
        env=archive_env(s3_env(s3_server)),
        log_path=folder / "serve.log",
    )
    running.start()
    return running
