"""Transport security (issue 6): HTTPS, and DICOM over TLS with client certificates,
tested with DCMTK's storescu. Certificates are made with openssl for each run."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from pocketpacs.cli import main
from tests.conftest import RunningArchive, dcmtk_env, free_port, s3_env
from tests.dicom_factory import ct_series
from tests.test_cstore import wait_drained
from tests.test_serve import sqlite_row


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA, the archive's certificate for 127.0.0.1 and a modality's, both signed by it."""
    folder.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=pocketpacs test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        cwd=folder,
    )
    for name, cn in (("server", "127.0.0.1"), ("client", "MODALITY")):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={cn}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=folder,
        )
        (folder / f"{name}.ext").write_text(
            "subjectAltName=IP:127.0.0.1\n" if name == "server" else "extendedKeyUsage=clientAuth\n"
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.crt",
            cwd=folder,
        )
    return {p.stem + p.suffix: p for p in folder.iterdir()}


def _storescu(
    port: int, path: Path, *tls: str, calling: str = "MODALITY"
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "storescu",
            *tls,
            "-aet",
            calling,
            "-aec",
            "POCKETPACS",
            "127.0.0.1",
            str(port),
            str(path),
        ],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def tls_env(certificates: dict[str, Path], tls_port: int) -> dict[str, str]:
    """Settings for HTTPS and DICOM TLS on `tls_port`, callers needing a certificate."""
    return {
        "POCKETPACS_TLS_CERT": str(certificates["server.crt"]),
        "POCKETPACS_TLS_KEY": str(certificates["server.key"]),
        "POCKETPACS_TLS_CLIENT_CA": str(certificates["ca.crt"]),
        "POCKETPACS_DICOM_TLS_PORT": str(tls_port),
    }


def start_tls_archive(
    archive_factory, s3_server, tmp_path: Path, data_dir: Path | None = None
) -> tuple[RunningArchive, int, dict[str, Path]]:
    """An archive with HTTPS, DICOM TLS requiring client certificates, and one registered
    node, MODALITY (no --open: callers are checked against the registry), running; with
    its TLS port and the certificates."""
    certificates = make_certificates(tmp_path / "pki")
    tls_port = free_port()
    archive = archive_factory(
        {**s3_env(s3_server), **tls_env(certificates, tls_port)}, data_dir=data_dir
    )
    archive.trust = ssl.create_default_context(cafile=certificates["ca.crt"])
    archive.extra_args = []
    data = ["--data-dir", str(archive.data_dir)]
    assert main(["institutions", "add", "north", *data]) == 0
    assert (
        main(["nodes", "add", "MODALITY", "127.0.0.1", "1", "--institution", "north", *data]) == 0
    )
    archive.start()
    return archive, tls_port, certificates


@pytest.fixture
def tls_archive(archive_factory, s3_server, tmp_path: Path):
    return start_tls_archive(archive_factory, s3_server, tmp_path)


def test_https_only(tls_archive) -> None:
    archive, _, _ = tls_archive
    assert archive.http.startswith("https://")
    answer = httpx.get(f"{archive.http}/healthz", verify=archive.trust)
    assert answer.status_code == 200
    with pytest.raises(httpx.HTTPError):  # nothing answers in clear text on that port
        httpx.get(archive.http.replace("https://", "http://") + "/healthz", timeout=5)


def test_dicom_over_tls_needs_a_trusted_client(tls_archive, tmp_path: Path) -> None:
    archive, tls_port, pki = tls_archive
    (path,) = ct_series(tmp_path / "ct", count=1, seed="tls")
    trusted = ("+tls", str(pki["client.key"]), str(pki["client.crt"]), "+cf", str(pki["ca.crt"]))
    sent = _storescu(tls_port, path, *trusted)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    # Without a client certificate, or without TLS at all, nothing gets through.
    anonymous = _storescu(tls_port, path, "+tla", "+cf", str(pki["ca.crt"]))
    assert anonymous.returncode != 0
    plain = _storescu(tls_port, path)
    assert plain.returncode != 0
    # A trusted certificate does not make an unregistered AE title welcome.
    stranger = _storescu(tls_port, path, *trusted, calling="STRANGER")
    assert stranger.returncode != 0
    wait_drained(archive)
    uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    assert sqlite_row(archive.data_dir, uid) is not None  # stored, for north
    # The plain port goes on serving those who cannot do TLS.
    assert _storescu(archive.dicom_port, path).returncode == 0
