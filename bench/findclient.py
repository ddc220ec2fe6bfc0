"""A lean C-FIND SCU for the query benchmark: one association on a plain socket, kept open.

Why not pynetdicom's SCU: on this machine it takes about 1.4 ms per response on the
client side (its reactor reads 4 KiB at a time and hands each event between threads that
poll), so 100 matches took some 150 ms whichever server answered, Orthanc and a bare
pynetdicom SCP included, and a single match 6 to 10 ms. That measured the client. This
one sends the request and reads the responses with a few system calls, so what is left is
the server's time.

Only what C-FIND needs of PS3.7 and PS3.8: A-ASSOCIATE (encoded and decoded by
pynetdicom's PDU classes), P-DATA-TF both ways, the C-FIND-RQ command set encoded here
(independent of pocketpacs' own `pacs.commands`), identifiers encoded and decoded by
pynetdicom's `dsutils`, A-RELEASE.
"""

from __future__ import annotations

import socket
import struct

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID
from pynetdicom._globals import APPLICATION_CONTEXT_NAME
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

PDU_HEADER = struct.Struct(">BxL")
PDV_HEADER = struct.Struct(">LBB")
ELEMENT = struct.Struct("<HHL")
PENDING = (0xFF00, 0xFF01)
MAXIMUM_PDU = 256 * 1024


class FindError(RuntimeError):
    """The association or a C-FIND failed."""


def _element(element: int, value: bytes) -> bytes:
    return ELEMENT.pack(0x0000, element, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\x00" if len(raw) % 2 else raw


def find_request(message_id: int, sop_class_uid: str) -> bytes:
    """A C-FIND-RQ command set (PS3.7 9.3.2.1), Implicit VR Little Endian."""
    body = _element(0x0002, _uid(sop_class_uid))
    body += _element(0x0100, struct.pack("<H", 0x0020))
    body += _element(0x0110, struct.pack("<H", message_id))
    body += _element(0x0700, struct.pack("<H", 0))  # priority: medium
    body += _element(0x0800, struct.pack("<H", 0x0001))  # a data set follows
    return _element(0x0000, struct.pack("<L", len(body))) + body


def response_fields(command: bytes) -> tuple[int, bool]:
    """(Status, whether a data set follows) of a response command set."""
    values: dict[int, bytes] = {}
    position = 0
    while position + 8 <= len(command):
        _, element, length = ELEMENT.unpack_from(command, position)
        values[element] = command[position + 8 : position + 8 + length]
        position += 8 + length
    if 0x0900 not in values or 0x0800 not in values:
        raise FindError("a response command set without Status or Command Data Set Type")
    (status,) = struct.unpack("<H", values[0x0900][:2])
    (data_set_type,) = struct.unpack("<H", values[0x0800][:2])
    return status, data_set_type != 0x0101


class LeanFindClient:
    """One Study Root C-FIND association to a server, for as many queries as asked."""

    def __init__(self, port: int, called_ae: str, calling_ae: str, timeout: float = 60) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        self.message_id = 0
        request = A_ASSOCIATE()
        request.application_context_name = APPLICATION_CONTEXT_NAME
        request.calling_ae_title = calling_ae
        request.called_ae_title = called_ae
        context = build_context(
            StudyRootQueryRetrieveInformationModelFind,
            [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
        )
        context.context_id = 1
        request.presentation_context_definition_list = [context]
        maximum = MaximumLengthNotification()
        maximum.maximum_length_received = MAXIMUM_PDU
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
        request.user_information = [maximum, implementation]
        pdu = A_ASSOCIATE_RQ()
        pdu.from_primitive(request)
        self.sock.sendall(pdu.encode())
        pdu_type, raw = self._pdu()
        if pdu_type != 0x02:
            raise FindError(f"{called_ae}@{port} did not accept (PDU type 0x{pdu_type:02X})")
        answer = A_ASSOCIATE_AC()
        answer.decode(raw)
        accepted = answer.to_primitive()
        results = [
            cx for cx in accepted.presentation_context_definition_results_list if cx.result == 0
        ]
        if not results:
            raise FindError(f"{called_ae} accepted no Study Root FIND context")
        self.context_id = results[0].context_id
        syntax = UID(results[0].transfer_syntax[0])
        self.encoding = (syntax.is_implicit_VR, syntax.is_little_endian)
        self.peer_maximum = accepted.maximum_length_received or 0

    def _read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            chunk = self.sock.recv(max(size - len(self.buffer), 65536))
            if not chunk:
                raise FindError("the server closed the connection")
            self.buffer += chunk
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def _pdu(self) -> tuple[int, bytes]:
        """The next PDU: its type and its whole bytes, header included."""
        header = self._read(PDU_HEADER.size)
        pdu_type, length = PDU_HEADER.unpack(header)
        return pdu_type, header + self._read(length)

    def _send(self, command: bytes, data: bytes) -> None:
        largest = self.peer_maximum - PDV_HEADER.size if self.peer_maximum else 0
        out = bytearray()
        for value, flag in ((command, 0x01), (data, 0x00)):
            step = largest if largest > 0 else len(value)
            for start in range(0, len(value), step):
                fragment = value[start : start + step]
                control = flag | (0x02 if start + step >= len(value) else 0x00)
                out += PDU_HEADER.pack(0x04, PDV_HEADER.size + len(fragment))
                out += PDV_HEADER.pack(len(fragment) + 2, self.context_id, control) + fragment
        self.sock.sendall(out)

    def find(self, identifier: Dataset) -> int:
        """Matches received; raises on any final status but success."""
        self.message_id = self.message_id % 0xFFFF + 1
        data = encode(identifier, *self.encoding)
        if data is None:
            raise FindError("the identifier cannot be encoded")
        self._send(find_request(self.message_id, StudyRootQueryRetrieveInformationModelFind), data)
        matches = 0
        command = bytearray()
        expecting_data = False
        while True:
            pdu_type, raw = self._pdu()
            if pdu_type != 0x04:
                raise FindError(f"PDU type 0x{pdu_type:02X} during a C-FIND")
            position = PDU_HEADER.size
            while position < len(raw):
                length, _, control = PDV_HEADER.unpack_from(raw, position)
                fragment = raw[position + PDV_HEADER.size : position + 4 + length]
                position += 4 + length
                last = bool(control & 0x02)
                if control & 0x01:
                    command += fragment
                    if not last:
                        continue
                    status, has_data = response_fields(bytes(command))
                    command.clear()
                    if status in PENDING:
                        matches += 1
                        expecting_data = has_data
                    elif status == 0x0000:
                        return matches
                    else:
                        raise FindError(f"C-FIND failed with status 0x{status:04X}")
                elif not expecting_data:
                    raise FindError("a data fragment without a pending response")
                elif last:
                    expecting_data = False

    def close(self) -> None:
        try:
            self.sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-RELEASE-RQ
            self._pdu()
        except (OSError, FindError):
            pass
        finally:
            self.sock.close()
