"""schemathesis against the running archive's own OpenAPI schema (issue 6): generated and
mutated requests for every operation, with real study, series, instance and share values
in the paths so the handlers behind the 404s are reached too. No response may be a 5xx
and the server log may hold no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
from pydicom import dcmread
from pydicom.data import get_testdata_file

from tests.conftest import started_archive
from tests.test_cstore import wait_drained
from tests.test_rendered import _stow


def test_no_generated_request_gets_a_server_error(s3_server, tmp_path: Path) -> None:
    archive = started_archive(s3_server, tmp_path)
    try:
        source = get_testdata_file("CT_small.dcm")
        _stow(archive, [Path(source).read_bytes()])
        wait_drained(archive)
        ds = dcmread(source, stop_before_pixels=True)
        made = httpx.post(
            f"{archive.http}/api/shares", json={"study_uid": str(ds.StudyInstanceUID)}
        )
        assert made.status_code == 201
        config = tmp_path / "schemathesis.toml"
        config.write_text(
            "[parameters]\n"
            f'"path.study" = "{ds.StudyInstanceUID}"\n'
            f'"path.series" = "{ds.SeriesInstanceUID}"\n'
            f'"path.instance" = "{ds.SOPInstanceUID}"\n'
            f'"path.share_id" = {made.json()["id"]}\n'
        )
        result = subprocess.run(
            [
                str(Path(sys.executable).with_name("schemathesis")),
                "--config-file",
                str(config),
                "run",
                f"{archive.http}/openapi.json",
                "--checks",
                "not_a_server_error",
                "--max-examples",
                "40",
                "--seed",
                "20261203",
                "--report-dir",
                str(tmp_path / "report"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
        summary = result.stdout[-3000:]
        assert result.returncode == 0, summary
        schema = httpx.get(f"{archive.http}/openapi.json").json()
        operations = sum(len(methods) for methods in schema["paths"].values())
        assert f"Tested: {operations}" in summary  # every operation, none skipped
        assert "Traceback" not in archive.log_path.read_text()
    finally:
        archive.stop()
