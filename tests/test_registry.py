"""Institutions, DICOM nodes, API keys and the audit trail: the registry on both databases,
the `pocketpacs` commands that change it, and a running archive that refuses DICOM
callers it does not know."""

from __future__ import annotations

import sqlite3
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep, Verification
from sqlalchemy import select

from pocketpacs.cli import main
from storage.audit import AuditEntry, AuditLog
from storage.index import Index
from storage.models import ApiKey
from storage.registry import Registry, RegistryError
from tests.conftest import RunningArchive, dcmtk_env, s3_env
from tests.dicom_factory import ct_series
from tests.test_cstore import index_rows, run_storescu, wait_drained

# --------------------------------------------------------------------------------------
# the registry itself, on SQLite and PostgreSQL


def test_institutions_and_nodes(index: Index) -> None:
    registry = Registry(index)
    registry.add_institution("north", "North Hospital")
    registry.add_institution("south")
    with pytest.raises(RegistryError, match="exists already"):
        registry.add_institution("north")
    for bad in ("", "has space", "../x", "x" * 65):
        with pytest.raises(RegistryError, match="institution name"):
            registry.add_institution(bad)
    assert registry.institutions() == [("north", "North Hospital"), ("south", "")]

    registry.add_node("CT1", "10.0.0.5", 104, "north")
    registry.add_node(" MR1 ", "mr.south.example", 11112, "south")
    with pytest.raises(RegistryError, match="no institution 'east'"):
        registry.add_node("CT2", "10.0.0.6", 104, "east")
    with pytest.raises(RegistryError, match="exists already"):
        registry.add_node("CT1", "10.0.0.7", 104, "south")
    for title in ("", "X" * 17, "A\\B"):
        with pytest.raises(RegistryError, match="AE title"):
            registry.add_node(title, "h", 104, "north")
    with pytest.raises(RegistryError, match="port"):
        registry.add_node("CT3", "h", 70000, "north")

    assert [n.ae_title for n in registry.nodes()] == ["CT1", "MR1"]
    node = registry.node("MR1")
    assert node is not None
    assert (node.host, node.port, node.institution) == ("mr.south.example", 11112, "south")
    assert registry.remove_node("CT1")
    assert not registry.remove_node("CT1")
    assert registry.node("CT1") is None


def test_keys_authenticate_until_revoked_and_are_stored_hashed(index: Index) -> None:
    registry = Registry(index)
    registry.add_institution("north")
    key = registry.create_key("north", ("read", "share"), label="RIS")
    assert key.token.startswith(f"ppk_{key.key_id}_")
    assert len(key.token.split("_", 2)[2]) >= 43  # 256 random bits, base64

    caller = registry.authenticate(key.token, source="192.0.2.1")
    assert caller is not None
    assert (caller.institution, caller.actor, caller.source) == ("north", key.key_id, "192.0.2.1")
    assert caller.scopes == {"read", "share"}

    secret = key.token.split("_", 2)[2]
    with index.session() as session:
        stored = session.scalars(select(ApiKey)).one()
    assert secret not in (stored.secret_sha256, stored.key_id, stored.label)

    forged = key.token[:-4] + ("AAAA" if not key.token.endswith("AAAA") else "BBBB")
    for token in (forged, "", "ppk", f"ppk_{key.key_id}", "Bearer x", "ppk_nokey_secret"):
        assert registry.authenticate(token) is None, token
    with pytest.raises(RegistryError, match="scopes"):
        registry.create_key("north", ("read", "root"))
    with pytest.raises(RegistryError, match="no institution"):
        registry.create_key("east", ("read",))

    assert registry.revoke_key(key.key_id)
    assert not registry.revoke_key(key.key_id)
    assert registry.authenticate(key.token) is None
    [listed] = registry.keys("north")
    assert listed.revoked_at is not None and listed.label == "RIS"


def test_audit_search_filters_newest_first(index: Index) -> None:
    log = AuditLog(index)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for minute, (actor, institution, action, outcome) in enumerate(
        [
            ("CT1", "north", "store", "ok"),
            ("EVIL", "", "associate", "refused"),
            ("CT1", "north", "store", "partial"),
            ("k1", "south", "key.create", "ok"),
        ]
    ):
        log.record(
            AuditEntry(
                actor=actor,
                institution=institution,
                action=action,
                outcome=outcome,
                at=start + timedelta(minutes=minute),
            )
        )
    assert [e.outcome for e in log.search(actor="CT1")] == ["partial", "ok"]
    assert [e.actor for e in log.search(outcome="refused")] == ["EVIL"]
    assert [e.action for e in log.search(institution="south")] == ["key.create"]
    assert len(log.search(since=start + timedelta(minutes=2))) == 2
    assert len(log.search(limit=3)) == 3
    assert log.search(action="store")[0].at == start + timedelta(minutes=2)


# --------------------------------------------------------------------------------------
# the commands


def test_commands_register_and_show_keys_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    assert main(["institutions", "add", "north", *data]) == 0
    assert main(["nodes", "add", "CT1", "127.0.0.1", "104", "--institution", "north", *data]) == 0
    assert main(["nodes", "add", "CT2", "127.0.0.1", "104", "--institution", "nope", *data]) == 2
    assert "no institution 'nope'" in capsys.readouterr().err

    assert main(["keys", "create", "--institution", "north", "--scope", "read", *data]) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    key_id = token.split("_")[1]
    assert "shown once" in out.err

    assert main(["keys", "list", *data]) == 0
    listing = capsys.readouterr().out
    assert key_id in listing and token.split("_", 2)[2] not in listing
    assert main(["keys", "revoke", key_id, *data]) == 0
    assert main(["keys", "revoke", key_id, *data]) == 1
    capsys.readouterr()

    assert main(["audit", *data]) == 0
    actions = [line.split("\t")[3] for line in capsys.readouterr().out.splitlines()]
    assert actions == ["key.revoke", "key.create", "node.add", "institution.add"]


# --------------------------------------------------------------------------------------
# a running archive without --open


@pytest.fixture
def closed_archive(archive_factory, s3_server) -> RunningArchive:
    archive = archive_factory(s3_env(s3_server))
    archive.extra_args = []
    archive.start()
    return archive


def _audit(archive: RunningArchive) -> list[tuple]:
    connection = sqlite3.connect(f"file:{archive.data_dir / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        return connection.execute(
            "SELECT actor, institution, action, outcome, instances, source FROM audit_events "
            "ORDER BY id"
        ).fetchall()
    finally:
        connection.close()


def test_unknown_callers_are_refused_until_registered(
    closed_archive: RunningArchive, tmp_path: Path
) -> None:
    archive = closed_archive
    path = ct_series(tmp_path / "ct", count=1, seed="registry")[0]

    result = run_storescu(archive, str(path), calling_ae="CT1")
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
    echo = subprocess.run(
        ["echoscu", "-aet", "CT1", "-aec", "POCKETPACS", "127.0.0.1", str(archive.dicom_port)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert echo.returncode != 0
    # An association pynetdicom would serve (another service besides storage) is refused too.
    ae = AE(ae_title="CT1")
    ae.acse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification, ExplicitVRLittleEndian)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", archive.dicom_port, ae_title="POCKETPACS")
    try:
        assert assoc.is_rejected
    finally:
        ae.shutdown()
    assert index_rows(archive.data_dir) == {}

    data = ["--data-dir", str(archive.data_dir)]
    assert main(["institutions", "add", "north", *data]) == 0
    assert main(["nodes", "add", "CT1", "127.0.0.1", "104", "--institution", "north", *data]) == 0
    result = run_storescu(archive, str(path), calling_ae="CT1")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_drained(archive)
    [row] = index_rows(archive.data_dir).values()
    assert row["sop_instance_uid"] == dcmread(path).SOPInstanceUID
    assert row["source_ae"] == "CT1"
    connection = sqlite3.connect(f"file:{archive.data_dir / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        institutions = connection.execute("SELECT source_institution FROM instances").fetchall()
    finally:
        connection.close()
    assert institutions == [("north",)]

    events = _audit(archive)
    refused = [e for e in events if e[3] == "refused"]
    assert len(refused) == 3 and all(e[0] == "CT1" and e[5] == "127.0.0.1" for e in refused)
    stores = [e for e in events if e[2] == "store"]
    assert stores == [("CT1", "north", "store", "ok", 1, "127.0.0.1")]
