"""`pacs.commands` reads and writes what pynetdicom and pydicom read and write."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, JPEG2000Lossless
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import Verification

from pacs import commands, find

SOP_INSTANCE = "1.2.826.0.1.3680043.8.498.12345678901234567890"


def _command_set(primitive, message) -> bytes:
    message.primitive_to_message(primitive)
    return encode(message.command_set, True, True)


def test_decodes_a_c_store_request_as_pynetdicom_encodes_it() -> None:
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = SOP_INSTANCE
    request.Priority = 0
    request.MoveOriginatorApplicationEntityTitle = "MOVER"
    request.MoveOriginatorMessageID = 3
    request.DataSet = BytesIO(b"")
    command = commands.decode_command(_command_set(request, C_STORE_RQ()))
    assert command == commands.Command(
        command_field=commands.C_STORE_RQ,
        message_id=7,
        has_data_set=True,
        affected_sop_class_uid=CTImageStorage,
        affected_sop_instance_uid=SOP_INSTANCE,
    )


def test_decodes_a_c_echo_request() -> None:
    request = C_ECHO()
    request.MessageID = 65535
    request.AffectedSOPClassUID = Verification
    command = commands.decode_command(_command_set(request, C_ECHO_RQ()))
    assert command.command_field == commands.C_ECHO_RQ
    assert command.message_id == 65535
    assert not command.has_data_set


@pytest.mark.parametrize(
    "data",
    [b"\x00\x00\x00", b"\x08\x00\x16\x00\x02\x00\x00\x00ab", b"\x00\x00\x00\x01\xff\x00\x00\x00"],
    ids=["cut-header", "not-group-0000", "length-past-end"],
)
def test_refuses_what_is_not_a_command_set(data: bytes) -> None:
    with pytest.raises(commands.MalformedCommand):
        commands.decode_command(data)


def test_refuses_a_command_without_command_field() -> None:
    with pytest.raises(commands.MalformedCommand, match="0100"):
        commands.decode_command(b"\x00\x00\x10\x01\x02\x00\x00\x00\x01\x00")


@pytest.mark.parametrize("comment", ["", "truncated: pixel data needs 10 bytes"])
def test_c_store_response_reads_back_with_pydicom(comment: str) -> None:
    raw = commands.encode_response(
        commands.C_STORE_RSP, 9, CTImageStorage, 0xC000, SOP_INSTANCE + "1", comment
    )
    ds = decode(BytesIO(raw), True, True)
    assert ds.CommandGroupLength == len(raw) - 12
    assert ds.CommandField == 0x8001
    assert ds.MessageIDBeingRespondedTo == 9
    assert ds.CommandDataSetType == 0x0101
    assert ds.Status == 0xC000
    assert ds.AffectedSOPClassUID == CTImageStorage
    assert ds.AffectedSOPInstanceUID == SOP_INSTANCE + "1"
    assert ds.get("ErrorComment", "") == comment


def test_file_meta_reads_back_with_pydicom() -> None:
    head = commands.encode_file_meta(
        CTImageStorage, SOP_INSTANCE, JPEG2000Lossless, "1.2.3.4", "POCKET_1"
    )
    # An empty data set after the meta: pydicom reads the file whole.
    ds = dcmread(BytesIO(head))
    meta = ds.file_meta
    assert head[:132] == b"\x00" * 128 + b"DICM"
    assert meta.FileMetaInformationVersion == b"\x00\x01"
    assert meta.MediaStorageSOPClassUID == CTImageStorage
    assert meta.MediaStorageSOPInstanceUID == SOP_INSTANCE
    assert meta.TransferSyntaxUID == JPEG2000Lossless
    assert meta.ImplementationClassUID == "1.2.3.4"
    assert meta.ImplementationVersionName == "POCKET_1"
    assert meta.FileMetaInformationGroupLength == len(head) - 132 - 12


RESPONSE = [
    commands.Element(0x00080005, "CS", "ISO_IR 192"),
    commands.Element(0x00080018, "UI", "1.2.3.45"),  # odd length: padded with NUL
    commands.Element(0x00080052, "CS", "IMAGE"),
    commands.Element(0x00080061, "CS", "CT\\MR"),
    commands.Element(0x00081110, "SQ", None),  # a key the archive does not hold: empty
    commands.Element(0x00100010, "PN", "张^明"),
    commands.Element(0x00100030, "DA", None),
    commands.Element(0x00200013, "IS", 12),
    commands.Element(0x00280010, "US", 512),
]


@pytest.mark.parametrize(
    ("implicit", "little_endian", "deflated"),
    [(True, True, False), (False, True, False), (False, False, False), (False, True, True)],
    ids=["implicit-le", "explicit-le", "explicit-be", "deflated"],
)
def test_encodes_a_c_find_response_as_pydicom_reads_it(
    implicit: bool, little_endian: bool, deflated: bool
) -> None:
    data = commands.encode_identifier(RESPONSE, implicit, little_endian, deflated)
    assert len(data) % 2 == 0
    ds = decode(BytesIO(data), implicit, little_endian, deflated)
    assert ds.SOPInstanceUID == "1.2.3.45"
    assert ds.QueryRetrieveLevel == "IMAGE"
    assert list(ds.ModalitiesInStudy) == ["CT", "MR"]
    assert ds.ReferencedStudySequence == []
    assert str(ds.PatientName) == "张^明"
    assert ds.PatientBirthDate in ("", None)
    assert ds.InstanceNumber == 12
    assert ds.Rows == 512
    if not deflated:
        # Byte for byte what pydicom writes for the same elements.
        expected = encode(find.dataset_of(RESPONSE), implicit, little_endian)
        assert data == expected


def _identifier() -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = "P1"
    ds.PatientName = "Doe^J*"
    ds.StudyDate = "20240101-20241231"
    ds.StudyInstanceUID = "1.2.3\\1.2.4"
    ds.ModalitiesInStudy = ""
    ds.Rows = None
    return ds


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit-le", "explicit-le"])
def test_reads_a_flat_c_find_identifier_as_pydicom_does(implicit: bool) -> None:
    data = encode(_identifier(), implicit, True)
    keys = commands.decode_identifier(data, implicit)
    assert keys == find.requested(decode(BytesIO(data), implicit, True))
    assert [(k.tag, k.VR, k.value) for k in keys] == [
        (0x00080020, "DA", "20240101-20241231"),
        (0x00080052, "CS", "STUDY"),
        (0x00080061, "CS", None),
        (0x00100010, "PN", "Doe^J*"),
        (0x00100020, "LO", "P1"),
        (0x0020000D, "UI", "1.2.3\\1.2.4"),
        (0x00280010, "US", None),
    ]


# An empty element appended after the identifier's last one (PatientID, Rows...).
_ITEM_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_UNKNOWN_VR = b"\x28\x00\x10\x00XX\x00\x00"


@pytest.mark.parametrize(
    "change",
    ["sequence", "utf-8", "iso-2022", "binary value", "truncated", "item", "unknown VR"],
)
def test_leaves_any_other_identifier_to_pydicom(change: str) -> None:
    ds = _identifier()
    if change == "sequence":
        ds.ReferencedStudySequence = [Dataset()]
    elif change == "utf-8":
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "张^*"
    elif change == "iso-2022":
        # Japanese in ISO 2022: every byte is ASCII, escape sequences switch the set.
        ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
        ds.PatientName = "Yamada^Tarou=山田^太郎"
    elif change == "binary value":
        ds.Rows = 512
    data = encode(ds, False, True)
    if change == "truncated":
        data = data[:-3]
    elif change == "item":
        data = data + _ITEM_DELIMITER
    elif change == "unknown VR":
        data = data[: data.index(b"\x28\x00\x10\x00")] + _UNKNOWN_VR
    assert commands.decode_identifier(data, False) is None
    if change in ("sequence", "utf-8", "iso-2022", "binary value"):
        keys = {k.tag: k.value for k in find.requested(decode(BytesIO(data), False, True))}
        assert keys[0x00100020] == "P1"
        assert keys[0x00100010] == str(ds.PatientName)
