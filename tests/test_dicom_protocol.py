"""The DICOM upper layer as a peer sees it: associations that mix storage with other
services, peers that break PS3.8, and senders that vanish half way through a data set.

Store-only associations are served by pocketpacs' lean acceptor, everything else by
pynetdicom; both must store the same way, and a broken peer must cost nothing but its own
association.
"""

from __future__ import annotations

import socket
import struct
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import ModalityPerformedProcedureStep, Verification

from tests.conftest import RunningArchive, spool_files_holding
from tests.test_cstore import (
    Snapshot,
    assert_stored_unchanged,
    associated,
    dataset_bytes,
    key_of,
    run_storescu,
    shared_archive,  # noqa: F401  (the module's archive)
    small_ct,
    wait_for_log,
    write,
)

CT_CONTEXT = [(CTImageStorage, ExplicitVRLittleEndian)]


def test_storage_beside_another_service_is_stored_the_same_way(
    shared_archive: RunningArchive,  # noqa: F811
    s3_server,
    tmp_path: Path,
) -> None:
    """An association that also proposes a non-storage service is served by pynetdicom."""
    archive = shared_archive
    path = write(small_ct(seed="mixed"), tmp_path / "mixed.dcm")
    before = Snapshot(archive, s3_server)
    ae = AE(ae_title="MIXED")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", archive.dicom_port, ae_title=archive.ae_title)
    try:
        assert assoc.is_established
        assert assoc.send_c_store(path).Status == 0x0000
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        ae.shutdown()

    stored, rows = before.added()
    assert list(stored) == [key_of(path)]
    assert_stored_unchanged([path], stored, rows, source_ae="MIXED")
    assert "1 stored" in wait_for_log(archive, r"association from 'MIXED'[^\n]*").group(0)


def _p_data(context_id: int, control: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU holding one PDV (PS3.8 9.3.5)."""
    pdv = struct.pack(">LBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BxL", 0x04, len(pdv)) + pdv


def _wait_aborted(assoc: Association, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not assoc.is_aborted:
        assert time.monotonic() < deadline, "the archive did not abort the association"
        time.sleep(0.05)


VIOLATIONS = {
    # A PDV on a presentation context that was never accepted.
    "unknown-context": _p_data(99, 0x03, b"\x00" * 8),
    # PDU type 0x09 does not exist.
    "unknown-pdu-type": b"\x09\x00\x00\x00\x00\x02\x00\x00",
    # A PDV claiming more bytes than its P-DATA-TF holds.
    "pdv-past-its-pdu": struct.pack(">BxL", 0x04, 8) + struct.pack(">LBB", 100, 1, 0x03) + b"xx",
    # A command set that is not a DICOM data set.
    "garbage-command": _p_data(1, 0x03, b"\xff" * 40),
}


def test_a_peer_breaking_the_protocol_is_aborted_and_the_archive_goes_on(
    shared_archive: RunningArchive,  # noqa: F811
    s3_server,
    tmp_path: Path,
) -> None:
    archive = shared_archive
    before = Snapshot(archive, s3_server)
    for number, (name, pdu) in enumerate(VIOLATIONS.items()):
        calling_ae = f"BROKEN{number}"
        with associated(archive, CT_CONTEXT, calling_ae=calling_ae) as assoc:
            assoc.dul.socket.socket.sendall(pdu)
            _wait_aborted(assoc)
        line = wait_for_log(archive, rf"association from '{calling_ae}'[^\n]*").group(0)
        assert "association aborted" in line, f"{name}: {line}"

    assert before.added() == ({}, {})
    path = write(small_ct(seed="after-violations"), tmp_path / "after.dcm")
    result = run_storescu(archive, str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    stored, _ = before.added()
    assert list(stored) == [key_of(path)]


def _store_request_pdus(path: Path, context_id: int, maximum_pdu: int) -> list[bytes]:
    """The P-DATA-TF PDUs of a C-STORE request for the file at `path`."""
    ds = dcmread(path)
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 0
    request.DataSet = BytesIO(dataset_bytes(path.read_bytes()))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    pdus = []
    for primitive in message.encode_msg(context_id, maximum_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(pdu.encode())
    return pdus


def test_a_sender_vanishing_mid_data_set_leaves_nothing_behind(
    shared_archive: RunningArchive,  # noqa: F811
    s3_server,
    tmp_path: Path,
) -> None:
    archive = shared_archive
    path = write(small_ct(seed="vanishing"), tmp_path / "vanishing.dcm")
    uid = str(dcmread(path).SOPInstanceUID).encode()
    before = Snapshot(archive, s3_server)
    for calling_ae, goodbye in (("VANISH", "close"), ("ABORTS", "abort")):
        with associated(archive, CT_CONTEXT, calling_ae=calling_ae) as assoc:
            context_id = assoc.accepted_contexts[0].context_id
            pdus = _store_request_pdus(path, context_id, 4096)
            assert len(pdus) > 2
            raw = assoc.dul.socket.socket
            raw.sendall(b"".join(pdus[: len(pdus) // 2]))
            # The partial data set is on the archive's disk now, not yet answered.
            deadline = time.monotonic() + 10
            while not spool_files_holding(archive.data_dir, uid):
                assert time.monotonic() < deadline, "no data set being received"
                time.sleep(0.02)
            if goodbye == "abort":
                assoc.abort()
            else:
                raw.shutdown(socket.SHUT_RDWR)
        line = wait_for_log(archive, rf"association from '{calling_ae}'[^\n]*").group(0)
        assert "nothing stored" in line, line

    assert not spool_files_holding(archive.data_dir, uid), "a partial data set was left on disk"
    assert before.added() == ({}, {})
    # The same instance, sent whole, is stored.
    with associated(archive, CT_CONTEXT) as assoc:
        assert assoc.send_c_store(path).Status == 0x0000
    stored, _ = before.added()
    assert list(stored) == [key_of(path)]


@pytest.mark.parametrize(
    "contexts",
    [CT_CONTEXT, [*CT_CONTEXT, (ModalityPerformedProcedureStep, ExplicitVRLittleEndian)]],
    ids=["lean-acceptor", "pynetdicom"],
)
def test_a_data_set_on_another_sop_class_context_is_refused(
    shared_archive: RunningArchive,  # noqa: F811
    s3_server,
    tmp_path: Path,
    contexts: list[tuple[str, str]],
) -> None:
    """An MR image sent on the presentation context negotiated for CT gets 0xA900 saying
    so, and is not stored; the association goes on."""
    archive = shared_archive
    ds = small_ct(seed="wrong-context")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    path = write(ds, tmp_path / "mr-on-ct.dcm")
    before = Snapshot(archive, s3_server)
    with associated(archive, contexts, calling_ae="WRONGCX") as assoc:
        [ct_context] = [c for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage]
        # Pause pynetdicom's reactor, as its own send_c_* methods do, so the response
        # waits for us.
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.001)
        try:
            for pdu in _store_request_pdus(path, ct_context.context_id, 16_384):
                assoc.dul.socket.socket.sendall(pdu)
            _, response = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        assert response.Status == 0xA900
        assert response.ErrorComment.startswith(f"presentation context is for {CTImageStorage}")
        # The same association still stores what belongs on the context.
        right = write(small_ct(seed=f"right-context-{len(contexts)}"), tmp_path / "ct.dcm")
        assert assoc.send_c_store(right).Status == 0x0000
    stored, _ = before.added()
    assert len(stored) == 1
