"""The association limit (issue 6): one limit over every kind of association, the next caller
rejected at once and cleanly (A-ASSOCIATE-RJ, transient, local limit exceeded), and each
slot back when its association ends."""

from __future__ import annotations

import subprocess
import time

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove, Verification

from tests.conftest import dcmtk_env, s3_env

LIMIT = 3


def _hold(port: int, abstract_syntax: str) -> Association:
    ae = AE(ae_title="HOLDER")
    ae.acse_timeout = ae.network_timeout = 30
    ae.add_requested_context(abstract_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="POCKETPACS")
    assert assoc.is_established
    return assoc


def _echoscu(port: int) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run(
        ["echoscu", "-aec", "POCKETPACS", "127.0.0.1", str(port)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, time.monotonic() - started


def test_the_caller_beyond_the_limit_is_rejected_at_once(archive_factory, s3_server) -> None:
    archive = archive_factory({**s3_env(s3_server), "POCKETPACS_MAX_ASSOCIATIONS": str(LIMIT)})
    archive.start()
    port = archive.dicom_port
    # Two served by the lean acceptor (verification), one by pynetdicom (retrieval).
    held = [_hold(port, Verification), _hold(port, Verification)]
    held.append(_hold(port, StudyRootQueryRetrieveInformationModelMove))
    try:
        result, seconds = _echoscu(port)
        assert result.returncode != 0
        assert "Local Limit Exceeded" in result.stdout + result.stderr
        assert seconds < 5  # rejected, not left waiting
        # A slot freed by pynetdicom's association is a slot again.
        held.pop().release()
        deadline = time.monotonic() + 10
        while (answer := _echoscu(port)[0]).returncode != 0:
            assert time.monotonic() < deadline, answer.stdout + answer.stderr
            time.sleep(0.2)
    finally:
        for assoc in held:
            assoc.release()
    # Every slot comes back: the limit's worth of associations at once, twice over.
    for _ in range(2):
        again = [_hold(port, StudyRootQueryRetrieveInformationModelMove) for _ in range(LIMIT)]
        for assoc in again:
            assoc.release()
        time.sleep(0.5)
    assert _echoscu(port)[0].returncode == 0
