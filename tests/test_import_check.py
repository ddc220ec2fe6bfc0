"""`pocketpacs import` and `pocketpacs check` run as a user runs them: as processes, against
the session's S3 server, on SQLite and on PostgreSQL."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from pocketpacs.cli import main
from storage import layout
from storage.embedded_s3 import EmbeddedS3
from storage.objects import ObjectStore
from tests.conftest import ROOT, PostgresDatabase, archive_env, make_bucket_store, s3_env
from tests.dicom_factory import ct_series

# pydicom samples with distinct SOP Instance UIDs (the MR_small variants share one).
SAMPLES = [
    "SC_rgb_jpeg_dcmtk.dcm",
    "JPEG-lossy.dcm",
    "JPEG-LL.dcm",
    "MR_small_jp2klossless.dcm",
    "US1_J2KI.dcm",
    "image_dfl.dcm",
]
CT_COUNT = 4

# pydicom warns as it writes and reads the over-long value one test feeds in on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom")


@dataclass
class Cli:
    data_dir: Path
    env: dict[str, str]
    objects: ObjectStore

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        command, *rest = args
        return subprocess.run(
            [sys.executable, "-m", "pocketpacs", command, *rest, "--data-dir", str(self.data_dir)],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    @property
    def sqlite(self) -> Path:
        return self.data_dir / "index.sqlite3"


@pytest.fixture
def cli(s3_server: EmbeddedS3, tmp_path: Path) -> Cli:
    objects = make_bucket_store(s3_server)
    env = archive_env(s3_env(s3_server, objects.bucket))
    return Cli(tmp_path / "data", env, objects)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A folder as a user would bring it: a CT series, compressed samples, a text file and
    a DICOM file cut short by a failed copy."""
    root = tmp_path / "incoming"
    ct_series(root / "ct", count=CT_COUNT)
    samples = root / "samples"
    samples.mkdir()
    for name in SAMPLES:
        (samples / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    (root / "README.txt").write_text("Scans from the clinic, November.\n")
    broken = ct_series(tmp_path / "other", count=1, seed="broken")[0]
    (root / "broken.dcm").write_bytes(broken.read_bytes()[:-4096])
    return root


def instance_keys(objects: ObjectStore) -> list[str]:
    return sorted(info.key for info in objects.list(layout.DICOM_PREFIX))


def key_of(path: Path) -> tuple[str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    uid = ds.SOPInstanceUID
    return uid, layout.instance_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, uid)


def sqlite_rows(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return sorted(row[0] for row in db.execute("SELECT object_key FROM instances"))


STORED = CT_COUNT + len(SAMPLES)


def test_import_folder_then_again_then_check(cli: Cli, folder: Path) -> None:
    result = cli.run("import", str(folder), "-q")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    rejected = {
        line.split(": ", 1)[0].removeprefix("rejected "): line
        for line in lines
        if line.startswith("rejected ")
    }
    assert set(rejected) == {str(folder / "broken.dcm"), str(folder / "README.txt")}, lines
    broken = rejected[str(folder / "broken.dcm")]
    assert broken.startswith(f"rejected {folder / 'broken.dcm'}: truncated: pixel data needs")
    assert broken.endswith("(0xC000)")
    text = rejected[str(folder / "README.txt")]
    assert text.startswith(f"rejected {folder / 'README.txt'}: not a DICOM file")
    assert text.endswith("(0xC000)")
    assert lines[-1] == f"{STORED} stored, 0 duplicate, 2 rejected"

    keys = instance_keys(cli.objects)
    assert len(keys) == STORED
    assert sqlite_rows(cli.sqlite) == keys
    for path in [*sorted((folder / "ct").iterdir()), *sorted((folder / "samples").iterdir())]:
        _uid, key = key_of(path)
        assert cli.objects.get(key) == path.read_bytes(), path.name

    again = cli.run("import", str(folder), "-q")
    assert again.returncode == 1
    assert again.stdout.splitlines()[-1] == f"0 stored, {STORED} duplicate, 2 rejected"
    assert instance_keys(cli.objects) == keys
    assert len(sqlite_rows(cli.sqlite)) == STORED

    check = cli.run("check", "-q")
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.splitlines() == [
        f"{STORED} objects, {STORED} index rows, 0 re-indexed, 0 missing, "
        "0 size mismatches, 0 unusable"
    ]


def test_import_of_a_missing_path(cli: Cli, tmp_path: Path, capsys, monkeypatch) -> None:
    for name, value in cli.env.items():
        monkeypatch.setenv(name, value)
    code = main(["import", str(tmp_path / "nowhere"), "--data-dir", str(cli.data_dir), "-q"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"no such file or folder: {tmp_path / 'nowhere'}" in err
    assert not cli.data_dir.exists()  # refused before anything was started or created


def test_check_repairs_a_lost_row_and_reports_a_lost_object(cli: Cli, folder: Path) -> None:
    assert cli.run("import", str(folder / "ct"), "-q").returncode == 0
    uid, key = key_of(folder / "ct" / "ct0002.dcm")
    with sqlite3.connect(cli.sqlite) as db:
        assert db.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (uid,)).rowcount == 1
    assert key not in sqlite_rows(cli.sqlite)

    # --no-repair reports the object the index lacks and changes nothing.
    report = cli.run("check", "--no-repair", "-q")
    assert report.returncode == 1
    assert f"cannot index {key}: not indexed" in report.stdout.splitlines()
    assert key not in sqlite_rows(cli.sqlite)

    repaired = cli.run("check", "-q")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    lines = repaired.stdout.splitlines()
    assert lines[0] == f"re-indexed {key}"
    assert lines[-1] == (
        f"{CT_COUNT} objects, {CT_COUNT} index rows, 1 re-indexed, 0 missing, "
        "0 size mismatches, 0 unusable"
    )
    with sqlite3.connect(cli.sqlite) as db:
        size, sha = db.execute(
            "SELECT size, sha256 FROM instances WHERE sop_instance_uid = ?", (uid,)
        ).fetchone()
    data = (folder / "ct" / "ct0002.dcm").read_bytes()
    assert (size, sha) == (len(data), hashlib.sha256(data).hexdigest())

    # An object lost from the bucket cannot be repaired from here: it is reported, the row
    # stays for a person to decide. A stray object that is not DICOM is reported too.
    lost_uid, lost_key = key_of(folder / "ct" / "ct0003.dcm")
    cli.objects.delete(lost_key)
    stray = "dicom/1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    cli.objects.put_bytes(stray, b"not dicom at all")
    # And an object overwritten behind the archive's back with other (shorter) bytes.
    changed = folder / "ct" / "ct0004.dcm"
    _changed_uid, changed_key = key_of(changed)
    cli.objects.put_bytes(changed_key, changed.read_bytes()[:1000])
    result = cli.run("check", "-q")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert f"missing object {lost_key} (SOP Instance {lost_uid})" in lines
    assert any(line.startswith(f"cannot index {stray}: not a DICOM file") for line in lines)
    size = changed.stat().st_size
    assert f"size differs {changed_key}: index {size}, bucket 1000" in lines
    assert lines[-1] == (
        f"{CT_COUNT} objects, {CT_COUNT} index rows, 0 re-indexed, 1 missing, "
        "1 size mismatches, 1 unusable"
    )
    assert lost_key in sqlite_rows(cli.sqlite)
    assert stray not in sqlite_rows(cli.sqlite)


@pytest.mark.postgres
def test_import_and_check_on_postgresql(
    cli: Cli, folder: Path, postgres_database: PostgresDatabase
) -> None:
    cli.env["POCKETPACS_DATABASE_URL"] = postgres_database.url
    result = cli.run("import", str(folder / "ct"), str(folder / "samples"), "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rejected " not in result.stdout
    assert result.stdout.splitlines()[-1] == f"{STORED} stored, 0 duplicate, 0 rejected"
    assert not cli.sqlite.exists()  # the index is in PostgreSQL, not beside the data

    admin_url = postgres_database.url.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(admin_url) as db:
        rows = sorted(r[0] for r in db.execute("SELECT object_key FROM instances").fetchall())
        institutions = {r[0] for r in db.execute("SELECT source_institution FROM instances")}
    assert rows == instance_keys(cli.objects)
    assert len(rows) == STORED
    assert institutions == {"default"}

    uid, key = key_of(folder / "ct" / "ct0001.dcm")
    with psycopg.connect(admin_url, autocommit=True) as db:
        db.execute("DELETE FROM instances WHERE sop_instance_uid = %s", (uid,))
    repaired = cli.run("check", "-q")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert f"re-indexed {key}" in repaired.stdout.splitlines()
    with psycopg.connect(admin_url) as db:
        assert db.execute(
            "SELECT count(*) FROM instances WHERE object_key = %s", (key,)
        ).fetchone() == (1,)


@pytest.mark.postgres
def test_import_on_postgresql_with_one_odd_file(
    cli: Cli, folder: Path, postgres_database: PostgresDatabase, tmp_path: Path
) -> None:
    """A folder where one file has an Accession Number over SH's 16 characters: the other
    files are stored, and nothing is reported as an outage (0xA700)."""
    cli.env["POCKETPACS_DATABASE_URL"] = postgres_database.url
    source = ct_series(tmp_path / "odd-source", count=1, seed="odd")[0]
    ds = dcmread(source)
    ds.AccessionNumber = "ACC-2026-11-000042"  # 18 characters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(folder / "ct" / "odd.dcm")
    result = cli.run("import", str(folder / "ct"), "-q")
    assert "(0xA700)" not in result.stdout, result.stdout
    summary = result.stdout.splitlines()[-1]
    assert summary in (
        f"{CT_COUNT + 1} stored, 0 duplicate, 0 rejected",
        f"{CT_COUNT} stored, 0 duplicate, 1 rejected",
    ), result.stdout


def test_import_reports_an_unreachable_index(cli: Cli, folder: Path) -> None:
    cli.env["POCKETPACS_DATABASE_URL"] = (
        "postgresql+psycopg://postgres@127.0.0.1:5432/pocketpacs_no_such_database"
    )
    result = cli.run("import", str(folder / "ct"), "-q")
    assert result.returncode == 2
    assert result.stderr.startswith("pocketpacs: cannot migrate the index"), result.stderr
    assert "pocketpacs_no_such_database" in result.stderr
    assert "Traceback" not in result.stderr
    assert instance_keys(cli.objects) == []
