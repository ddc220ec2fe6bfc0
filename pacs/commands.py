"""The few DIMSE command sets the lean acceptor reads and writes, the File Meta
Information it puts in front of each received data set, and C-FIND response
identifiers, encoded directly.

Why not pydicom datasets: building, validating and encoding a `Dataset` for each command,
answer and file meta took about 40% of the receiving thread's CPU (py-spy). These are
fixed, tiny structures: a command set is group 0000 in Implicit VR Little Endian (PS3.7
6.3.1, E.1); the File Meta Information is group 0002 in Explicit VR Little Endian (PS3.10
7.1); a C-FIND response is a flat list of text and US elements from the index, for which
pydicom's data set and writer took 0.35 ms per response (100 matches: 35 ms). A C-FIND
request's identifier is read here too when it is the usual flat list of ASCII text
elements (pydicom's reading and converting took a third of a C-FIND's time); anything
else in it, and every stored data set, is left to pydicom.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR

# Command Field values (PS3.7 E.1).
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
C_FIND_RQ = 0x0020
C_FIND_RSP = 0x8020
C_CANCEL_RQ = 0x0FFF
# Command Data Set Type: no data set follows; any other value says one does.
NO_DATA_SET = 0x0101
DATA_SET = 0x0001

_ELEMENT_HEADER = struct.Struct("<HHL")
_US = struct.Struct("<H")


class MalformedCommand(ValueError):
    """The bytes are not a command set this module can read."""


@dataclass(frozen=True)
class Command:
    """A received request command set: only what the acceptor acts on."""

    command_field: int
    message_id: int  # for a C-CANCEL-RQ, the Message ID Being Responded To
    has_data_set: bool
    affected_sop_class_uid: str
    affected_sop_instance_uid: str


def _text(value: bytes) -> str:
    return value.rstrip(b"\x00 ").decode("ascii", "replace")


def decode_command(data: bytes) -> Command:
    """Read a request's command set (Implicit VR Little Endian, group 0000 only)."""
    values: dict[int, bytes] = {}
    position = 0
    while position < len(data):
        if position + 8 > len(data):
            raise MalformedCommand("command set ends inside an element header")
        group, element, length = _ELEMENT_HEADER.unpack_from(data, position)
        position += 8
        if group != 0x0000 or position + length > len(data):
            raise MalformedCommand(f"not a command element: ({group:04X},{element:04X})")
        values[element] = data[position : position + length]
        position += length

    def us(element: int) -> int:
        value = values.get(element)
        if value is None or len(value) != 2:
            raise MalformedCommand(f"(0000,{element:04X}) missing or not US")
        return _US.unpack(value)[0]

    command_field = us(0x0100)
    return Command(
        command_field=command_field,
        message_id=us(0x0120 if command_field == C_CANCEL_RQ else 0x0110),
        has_data_set=us(0x0800) != NO_DATA_SET,
        affected_sop_class_uid=_text(values.get(0x0002, b"")),
        affected_sop_instance_uid=_text(values.get(0x1000, b"")),
    )


def _padded(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def _implicit(element: int, value: bytes) -> bytes:
    return _ELEMENT_HEADER.pack(0x0000, element, len(value)) + value


def encode_response(
    command_field: int,
    message_id: int,
    sop_class_uid: str,
    status: int,
    sop_instance_uid: str = "",
    error_comment: str = "",
    has_data_set: bool = False,
) -> bytes:
    """A C-STORE-RSP, C-FIND-RSP or C-ECHO-RSP command set (PS3.7 9.3.1.2, 9.1.2.2,
    9.3.5.2), elements in tag order."""
    body = _implicit(0x0002, _padded(sop_class_uid, b"\x00"))
    body += _implicit(0x0100, _US.pack(command_field))
    body += _implicit(0x0120, _US.pack(message_id))
    body += _implicit(0x0800, _US.pack(DATA_SET if has_data_set else NO_DATA_SET))
    body += _implicit(0x0900, _US.pack(status))
    if error_comment:
        body += _implicit(0x0902, _padded(error_comment, b" "))
    if sop_instance_uid:
        body += _implicit(0x1000, _padded(sop_instance_uid, b"\x00"))
    return _implicit(0x0000, struct.pack("<L", len(body))) + body


def _explicit(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHL", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def encode_file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    implementation_class_uid: str,
    implementation_version_name: str,
) -> bytes:
    """Preamble, "DICM" and File Meta Information (PS3.10 7.1) for a received data set."""
    body = _explicit(0x0001, b"OB", b"\x00\x01")
    body += _explicit(0x0002, b"UI", _padded(sop_class_uid, b"\x00"))
    body += _explicit(0x0003, b"UI", _padded(sop_instance_uid, b"\x00"))
    body += _explicit(0x0010, b"UI", _padded(transfer_syntax_uid, b"\x00"))
    body += _explicit(0x0012, b"UI", _padded(implementation_class_uid, b"\x00"))
    body += _explicit(0x0013, b"SH", _padded(implementation_version_name, b" "))
    group_length = _explicit(0x0000, b"UL", struct.pack("<L", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body


# PS3.5 7.1.2: VRs whose explicit-VR header has 2 reserved bytes and a 4-byte length.
_LONG_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)


@dataclass(frozen=True)
class Element:
    """One element of a response identifier: text (several values joined by a backslash),
    an int for US, or None for an empty element."""

    tag: int
    VR: str
    value: str | int | None


def _value_bytes(element: Element, little_endian: bool, utf8: bool) -> bytes:
    value = element.value
    if value is None:
        return b""
    if element.VR == "US":
        return struct.pack("<H" if little_endian else ">H", int(value))
    raw = str(value).encode("utf-8" if utf8 else "ascii", "replace")
    if len(raw) % 2:
        raw += b"\x00" if element.VR == "UI" else b" "
    return raw


def encode_identifier(
    elements: list[Element], implicit: bool, little_endian: bool, deflated: bool = False
) -> bytes:
    """A data set of `elements` (in tag order) in the given transfer syntax (PS3.5 7.1)."""
    utf8 = any(e.tag == 0x00080005 and e.value == "ISO_IR 192" for e in elements)
    order = "<" if little_endian else ">"
    out = bytearray()
    for element in elements:
        value = _value_bytes(element, little_endian, utf8)
        group, number = element.tag >> 16, element.tag & 0xFFFF
        if implicit:
            out += struct.pack(order + "HHL", group, number, len(value))
        elif element.VR in _LONG_VRS:
            out += struct.pack(order + "HH2sHL", group, number, element.VR.encode(), 0, len(value))
        else:
            out += struct.pack(order + "HH2sH", group, number, element.VR.encode(), len(value))
        out += value
    if deflated:
        compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        out = bytearray(compressor.compress(bytes(out)) + compressor.flush())
        if len(out) % 2:
            out += b"\x00"
    return bytes(out)


# PS3.5 6.2: VRs whose value is text.
TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI"}
    | {"UR", "UT"}
)
# PS3.5 6.2: every VR (an implicit VR identifier's dictionary may give "US or SS" and
# the like, which only pydicom resolves).
_KNOWN_VRS = TEXT_VRS | _LONG_VRS | {"AT", "FD", "FL", "SL", "SS", "UL", "US"}
_TAG = struct.Struct("<HH")
_UL = struct.Struct("<L")


def dictionary_vr(tag: int) -> str:
    """The VR the data dictionary gives `tag`; UN for tags it does not know (private)."""
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def plain_text(value: bytes) -> str | None:
    """The value as text, padding stripped, when it is ASCII without escape sequences:
    text that reads the same in every character set (ISO 2022 encodings are ASCII bytes
    too, with ESC switching to other sets); else None."""
    if not value.isascii() or b"\x1b" in value:
        return None
    return value.decode("ascii").rstrip(" \x00")


def decode_identifier(data: bytes, implicit: bool) -> list[Element] | None:
    """A Little Endian identifier's elements, values as text, when it is flat plain text
    (empty elements of any VR included); None when it holds anything else (a sequence,
    an item, a binary value, another character set, an unknown VR, elements out of tag
    order), which the caller reads with pydicom."""
    elements = []
    position, end, previous = 0, len(data), -1
    while position < end:
        if position + 8 > end:
            return None
        group, number = _TAG.unpack_from(data, position)
        tag = group << 16 | number
        if implicit:
            vr = dictionary_vr(tag)
            (length,) = _UL.unpack_from(data, position + 4)
            position += 8
        else:
            vr = data[position + 4 : position + 6].decode("ascii", "replace")
            if vr in _LONG_VRS:
                if position + 12 > end:
                    return None
                (length,) = _UL.unpack_from(data, position + 8)
                position += 12
            else:
                (length,) = _US.unpack_from(data, position + 6)
                position += 8
        if length == 0xFFFFFFFF or position + length > end:
            return None
        if tag <= previous or group == 0xFFFE or vr not in _KNOWN_VRS:
            return None
        previous = tag
        value = data[position : position + length]
        position += length
        if number == 0x0000:
            continue  # a group length: says nothing about the query
        text = plain_text(value) if vr in TEXT_VRS else None
        if not value and vr != "SQ":
            elements.append(Element(tag, vr, None))
        elif text is not None:
            elements.append(Element(tag, vr, text))
        else:
            return None
    return elements
