"""Read and validate a Part 10 file's header: the boundary where bad input is stopped.

Validation happens here, once, before anything is written (PS3.10 7.1 file meta, PS3.5 9.1
UID syntax). Pixel data is never loaded: its element is only checked to be complete, so a
500 MB multi-frame instance is validated in constant memory.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import io
import json
import math
import os
import re
import struct
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

# PS3.5 6.2: VRs whose explicit-VR header has a 4-byte length after 2 reserved bytes.
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
_ITEM = 0xFFFEE000
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_UNDEFINED_LENGTH = 0xFFFFFFFF
# Bytes read at once to parse a header from memory (see `_parse`).
HEADER_PREFIX = 64 * 1024


class Rejection(enum.Enum):
    """Why an instance is refused; each maps to one PS3.4 B.2.3 failure status."""

    CANNOT_UNDERSTAND = "cannot understand"  # 0xC000: not parseable
    DOES_NOT_MATCH_SOP_CLASS = "does not match SOP class"  # 0xA900: required attribute wrong


class InvalidInstance(ValueError):
    """The data set is refused at the boundary; `reason` is the Error Comment."""

    def __init__(self, reason: str, kind: Rejection) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


# The attributes the renderer reads to display a frame (storage.rendering), by keyword.
DISPLAY_KEYWORDS = (
    "PhotometricInterpretation",
    "BitsStored",
    "PixelRepresentation",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
)
# Any of these present, a frame goes through pydicom's decoding and LUT functions instead.
_NOT_PLAIN = (
    "ModalityLUTSequence",
    "VOILUTSequence",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
)


@dataclass(frozen=True, slots=True)
class PixelLayout:
    """Where an instance's frames lie in its stored bytes, and the attributes that display
    them, read at ingest while the header is parsed anyway: the renderer then reads a
    frame straight from the bytes, with no parsing (which was half of rendering a CT
    slice, `bench/RESULTS-render.md`).

    Only for the plain and common case: native little-endian pixel data, grey samples of
    8 or 16 bits or interleaved 8-bit RGB, without LUT sequences or functional groups."""

    offset: int  # of the first frame's first byte, in the stored object
    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    number_of_frames: int
    display: tuple[tuple[int, str, str | int], ...]  # (tag, VR, value) of DISPLAY_KEYWORDS
    # The window (center, width) the renderer takes from the pixels of a single-frame grey
    # instance that stores none, found at ingest (`storage.rendering.with_pixels_window`):
    # a first rendering then skips the histogram, a third of its pixel work.
    window: tuple[float, float] | None = None

    @property
    def frame_bytes(self) -> int:
        return self.rows * self.columns * self.samples_per_pixel * self.bits_allocated // 8

    def shared(self) -> PixelLayout:
        """This layout, with the display attributes of an equal one met before: those of
        a series' instances are mostly the same, and a process holds layouts by the
        thousand (each unpickled copy took 1.7 KB, shared 0.35)."""
        return replace(self, display=_one_of(self.display))

    def to_text(self) -> str:
        """The layout as the index keeps it (`layout_from_text` reads it back): compact
        JSON, about 150 bytes for a CT slice."""
        fields = [
            LAYOUT_TEXT_VERSION,
            self.offset,
            self.rows,
            self.columns,
            self.samples_per_pixel,
            self.bits_allocated,
            self.bits_stored,
            int(self.signed),
            self.number_of_frames,
            [list(element) for element in self.display],
            None if self.window is None else list(self.window),
        ]
        return json.dumps(fields, separators=(",", ":"))


# Raised when `PixelLayout.to_text` changes: text of another version is not read.
LAYOUT_TEXT_VERSION = 1


@functools.lru_cache(maxsize=4096)
def layout_from_text(text: str | None) -> PixelLayout | None:
    """The layout `PixelLayout.to_text` wrote; None for none, or for text this version
    does not read or that does not add up (the instance is then rendered through pydicom,
    as before layouts). Kept by text: a series' instances mostly share theirs."""
    if not text:
        return None
    try:
        fields = json.loads(text)
        if fields[0] != LAYOUT_TEXT_VERSION:
            return None
        _, offset, rows, columns, samples, allocated, stored, signed, frames, display, window = (
            fields
        )
        layout = PixelLayout(
            offset=int(offset),
            rows=int(rows),
            columns=int(columns),
            samples_per_pixel=int(samples),
            bits_allocated=int(allocated),
            bits_stored=int(stored),
            signed=bool(signed),
            number_of_frames=int(frames),
            display=tuple((int(tag), str(vr), _text_or_int(value)) for tag, vr, value in display),
            window=None if window is None else (float(window[0]), float(window[1])),
        )
        if not _adds_up(layout):
            return None
        return layout.shared()
    except Exception:  # a row written by hand, or damaged: rendered as if it had none
        return None


def _text_or_int(value: object) -> str | int:
    if type(value) not in (str, int):
        raise TypeError(f"not a display value: {value!r}")
    return value  # type: ignore[return-value]


def _adds_up(layout: PixelLayout) -> bool:
    """What `pixel_layout` makes: sizes it covers, a finite window of width 1 or more."""
    return (
        layout.bits_allocated in (8, 16)
        and 1 <= layout.bits_stored <= layout.bits_allocated
        and layout.samples_per_pixel in (1, 3)
        and min(layout.rows, layout.columns, layout.number_of_frames) > 0
        and layout.offset >= 0
        and (
            layout.window is None
            or (all(map(math.isfinite, layout.window)) and layout.window[1] >= 1)
        )
    )


def display_attributes(display: tuple[tuple[int, str, str | int], ...]) -> Dataset:
    """A layout's display attributes (`PixelLayout.display`) as a data set."""
    ds = Dataset()
    for tag, vr, value in display:
        ds.add_new(tag, vr, value)
    return ds


@functools.lru_cache(maxsize=4096)
def _one_of(display: tuple[tuple[int, str, str | int], ...]) -> tuple:
    return display


def _plain(value: object) -> str | int:
    """An element's value as its text (numbers as written, several joined by a
    backslash), or an integer: a layout crosses to the HTTP process and waits there by
    the thousand, and pydicom's number objects took four times the room."""
    if type(value) in (str, int):
        return value  # type: ignore[return-value]
    if isinstance(value, str | int | float):  # pydicom's IS, DSfloat: their text
        return str(value)
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    raise TypeError(f"not a plain value: {type(value).__name__}")


# The transfer syntaxes whose frames a `PixelLayout` can locate: native, little endian.
LAID_OUT_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def pixel_layout(ds: Dataset, span: tuple[int, int] | None) -> PixelLayout | None:
    """The layout of `ds`'s frames, whose native pixel data value lies at `span` (start,
    length) of the file; None when the instance is not the plain case `PixelLayout`
    covers, or its attributes do not add up."""
    if span is None or ds.file_meta.get("TransferSyntaxUID") not in LAID_OUT_SYNTAXES:
        return None
    if any(keyword in ds for keyword in _NOT_PLAIN):
        return None
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        allocated = int(ds.BitsAllocated)
        stored = int(ds.get("BitsStored", allocated) or allocated)
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        photometric = str(ds.PhotometricInterpretation).strip()
        planar = int(ds.get("PlanarConfiguration", 0) or 0)
        display = tuple(
            (int(element.tag), element.VR, _plain(element.value))
            for element in (ds[keyword] for keyword in DISPLAY_KEYWORDS if keyword in ds)
        )
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    grey = samples == 1 and photometric in ("MONOCHROME1", "MONOCHROME2") and allocated in (8, 16)
    colour = samples == 3 and photometric == "RGB" and allocated == stored == 8 and planar == 0
    if not (grey or colour) or not (1 <= stored <= allocated and rows > 0 and columns > 0):
        return None
    if colour and signed:
        return None
    try:  # as the renderer will build them: a value pydicom refuses leaves it to pydicom
        display_attributes(display)
    except (TypeError, ValueError, OverflowError):
        return None
    layout = PixelLayout(
        offset=span[0],
        rows=rows,
        columns=columns,
        samples_per_pixel=samples,
        bits_allocated=allocated,
        bits_stored=stored,
        signed=signed,
        number_of_frames=max(1, _int(ds, "NumberOfFrames") or 1),
        display=display,
    )
    if layout.number_of_frames * layout.frame_bytes > span[1]:
        return None
    return layout.shared()  # headers wait by the thousand in the spool, too


def layout_of(data: bytes) -> PixelLayout | None:
    """The pixel layout of the stored Part 10 object `data`, as ingest reads it; None when
    it has none, or does not parse. For instances stored before the index kept layouts
    (`storage.renditions` fills theirs in as they are rendered)."""
    try:
        ds, span = _parse_complete(io.BytesIO(data), len(data))
        return pixel_layout(ds, span)
    except Exception:  # pydicom raises what the damage provokes; it was stored regardless
        return None


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes the index records for one instance, with validated UIDs, and where
    its pixels lie."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    patient_birth_date: date | None
    patient_sex: str
    study_date: date | None
    study_time: str
    accession_number: str
    study_id: str
    study_description: str
    referring_physician_name: str
    institution_name: str
    modality: str
    series_number: int | None
    series_description: str
    body_part_examined: str
    series_date: date | None
    series_time: str
    instance_number: int | None
    number_of_frames: int | None
    rows: int | None
    columns: int | None
    specific_character_set: str
    pixels: PixelLayout | None = None  # for the renderer (indexed as text)


# PS3.5 9.1: components of digits separated by dots, none with a leading zero.
_UID_SYNTAX = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def valid_uid(value: object) -> bool:
    """PS3.5 9.1: digits and dots, no leading zero in a component, at most 64 characters.
    One match of our own: pydicom's `UID(value).is_valid` checked it three times, a third
    of a lookup by UIDs."""
    return isinstance(value, str) and len(value) <= 64 and _UID_SYNTAX.fullmatch(value) is not None


def _text(ds: Dataset, keyword: str) -> str:
    """A value as text; NUL characters (which PostgreSQL refuses in text) are dropped."""
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    return text.replace("\x00", "").strip()


# Keywords with a VR of the default character repertoire (PS3.5 6.1.2.3: UI, DA, TM, CS,
# IS): their raw bytes are their text, so they skip pydicom's value conversion and
# validation, which were half the CPU time of reading a header.
_ASCII_TAGS = {
    keyword: tag_for_keyword(keyword)
    for keyword in (
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "Modality",
        "SeriesNumber",
        "BodyPartExamined",
        "SeriesDate",
        "SeriesTime",
        "InstanceNumber",
        "NumberOfFrames",
    )
}


def _ascii(ds: Dataset, keyword: str) -> str:
    """A single value of a keyword in `_ASCII_TAGS`, as text, read from its raw bytes."""
    element = ds.get_item(_ASCII_TAGS[keyword])
    if element is None:
        return ""
    if isinstance(element.value, bytes):
        return element.value.decode("latin-1").replace("\x00", "").strip()
    return _text(ds, keyword)


# IS values are 32-bit signed (PS3.5 6.2); anything outside is not a number we can use.
_INT_RANGE = range(-(2**31), 2**31)


def _int(ds: Dataset, keyword: str) -> int | None:
    value = _ascii(ds, keyword) if keyword in _ASCII_TAGS else ds.get(keyword)
    try:
        number = int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return number if number is None or number in _INT_RANGE else None


def _date(ds: Dataset, keyword: str) -> date | None:
    """A DA value as a date, or None when absent or not a real date (never a rejection)."""
    raw = _ascii(ds, keyword)
    if len(raw) != 8 or not raw.isdigit():
        return None
    try:
        return date(int(raw[:4]), int(raw[4:6]), int(raw[6:]))
    except ValueError:
        return None


def _check_ends_cleanly(ds: Dataset, handle: BinaryIO, size: int) -> None:
    """With no pixel data, the last element must end exactly at the end of the file.

    pydicom stops without a word at a short read, so a data set cut inside an element's
    header or value would otherwise look like a complete, header-only object.
    """
    keywords = list(ds.keys())
    if not keywords:
        return
    last = ds.get_item(keywords[-1])
    value_tell = getattr(last, "value_tell", None)
    if value_tell is None:
        return
    if last.length == _UNDEFINED_LENGTH:
        handle.seek(max(size - 8, 0))
        tail = handle.read(8)
        if tail != b"\xfe\xff\xdd\xe0\x00\x00\x00\x00":
            raise InvalidInstance(
                "truncated: a sequence is not closed at the end of the data set",
                Rejection.CANNOT_UNDERSTAND,
            )
        return
    if len(last.value or b"") != last.length or value_tell + last.length != size:
        raise InvalidInstance(
            f"truncated data set: it ends inside element {last.tag}", Rejection.CANNOT_UNDERSTAND
        )


def _check_pixel_data_complete(
    handle: BinaryIO, size: int, big_endian: bool, implicit: bool
) -> tuple[int, int] | None:
    """Raise unless the element at the handle's position (pixel data) ends inside the file.
    Native pixel data (a defined length): where its value starts, and its length."""
    start = handle.tell()
    endian = ">" if big_endian else "<"
    head = handle.read(8)
    if len(head) < 8:
        raise InvalidInstance("truncated at the pixel data element", Rejection.CANNOT_UNDERSTAND)
    group, element = struct.unpack(endian + "HH", head[:4])
    if implicit:
        (length,) = struct.unpack(endian + "L", head[4:])
        value_start = start + 8
    elif head[4:6] in _LONG_VRS:
        extra = handle.read(4)
        if len(extra) < 4:
            raise InvalidInstance(
                "truncated at the pixel data element", Rejection.CANNOT_UNDERSTAND
            )
        (length,) = struct.unpack(endian + "L", extra)
        value_start = start + 12
    else:
        (length,) = struct.unpack(endian + "H", head[6:])
        value_start = start + 8
    if (group, element) not in ((0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)):
        return None
    if length != _UNDEFINED_LENGTH:
        if value_start + length > size:
            raise InvalidInstance(
                f"truncated: pixel data needs {length} bytes, file has {size - value_start}",
                Rejection.CANNOT_UNDERSTAND,
            )
        return (value_start, length) if (group, element) == (0x7FE0, 0x0010) else None
    # Encapsulated (PS3.5 A.4): items up to a sequence delimiter, walked by their headers only.
    position = value_start
    while True:
        handle.seek(position)
        item = handle.read(8)
        if len(item) < 8:
            raise InvalidInstance(
                "truncated: encapsulated pixel data has no sequence delimiter",
                Rejection.CANNOT_UNDERSTAND,
            )
        tag_group, tag_element, item_length = struct.unpack("<HHL", item)
        tag = (tag_group << 16) | tag_element
        if tag == _SEQUENCE_DELIMITER:
            return None
        if tag != _ITEM or item_length == _UNDEFINED_LENGTH:
            raise InvalidInstance(
                f"malformed encapsulated pixel data at byte {position}", Rejection.CANNOT_UNDERSTAND
            )
        position += 8 + item_length
        if position > size:
            raise InvalidInstance(
                "truncated: an encapsulated pixel data fragment runs past the end of the file",
                Rejection.CANNOT_UNDERSTAND,
            )


# Where native pixel data's value lies in the file: its first byte, and its length.
_Span = tuple[int, int] | None


def _parse(path: Path) -> tuple[Dataset, _Span]:
    """The data set up to its pixel data, checked to be complete to the end of the file,
    and where native pixel data lies.

    Why the prefix: parsed from the file, pydicom makes some sixty seek and read calls
    for a CT header, each of which releases the GIL, and with several associations in one
    process that hand-off costs more than the parsing. Almost every header fits in
    `HEADER_PREFIX` bytes, which are read once and parsed in memory; a header that does
    not is parsed from the file.
    """
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(HEADER_PREFIX)
        if len(prefix) == size:
            return _parse_complete(io.BytesIO(prefix), size)
        with contextlib.suppress(Exception):  # anything amiss: parse the file instead
            in_memory = io.BytesIO(prefix)
            ds = dcmread(in_memory, stop_before_pixels=True)
            position = in_memory.tell()
            transfer_syntax = ds.file_meta.get("TransferSyntaxUID", "")
            if transfer_syntax != DeflatedExplicitVRLittleEndian and _at_pixel_data(
                prefix, position, ds
            ):
                handle.seek(position)
                return ds, _check_pixel_data(handle, size, ds)
        handle.seek(0)
        return _parse_complete(handle, size)


def _at_pixel_data(data: bytes, position: int, ds: Dataset) -> bool:
    """Whether `data` holds a whole pixel data element header at `position`."""
    if position + 12 > len(data):
        return False
    _, little_endian = ds.original_encoding
    group, element = struct.unpack_from("<HH" if little_endian else ">HH", data, position)
    return group == 0x7FE0 and element in (0x0008, 0x0009, 0x0010)


def _check_pixel_data(handle: BinaryIO, size: int, ds: Dataset) -> _Span:
    implicit, little_endian = ds.original_encoding
    return _check_pixel_data_complete(
        handle, size, big_endian=little_endian is False, implicit=bool(implicit)
    )


def _parse_complete(handle: BinaryIO, size: int) -> tuple[Dataset, _Span]:
    """Parse from `handle` and prove the data set is whole (see `_parse`)."""
    ds = dcmread(handle, stop_before_pixels=True)
    transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        # The whole data set is one deflate stream: parse it all to prove it is whole.
        handle.seek(0)
        dcmread(handle)
        return ds, None  # its pixel data lies in the stream, not at an offset of the file
    if handle.tell() >= size:
        _check_ends_cleanly(ds, handle, size)  # no pixel data: a header-only object
        return ds, None
    return ds, _check_pixel_data(handle, size, ds)


def read_header(
    path: Path,
    expected_sop_class_uid: str | None = None,
    expected_sop_instance_uid: str | None = None,
) -> InstanceHeader:
    """Parse and validate a Part 10 file without loading its pixel data.

    `expected_*` are the UIDs a C-STORE request named; the data set must agree with them.
    Raises `InvalidInstance` with the reason a modality's operator would need.
    """
    try:
        ds, pixel_data = _parse(path)
    except InvalidInstance:
        raise
    except InvalidDicomError as exc:
        raise InvalidInstance(f"not a DICOM file: {exc}", Rejection.CANNOT_UNDERSTAND) from exc
    except (EOFError, struct.error) as exc:
        raise InvalidInstance("truncated data set", Rejection.CANNOT_UNDERSTAND) from exc
    except Exception as exc:  # pydicom raises many types for malformed input
        raise InvalidInstance(
            f"unparsable data set: {type(exc).__name__}: {exc}"[:200], Rejection.CANNOT_UNDERSTAND
        ) from exc
    transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", "") or "")

    if not transfer_syntax:
        raise InvalidInstance(
            "no Transfer Syntax UID in the file meta", Rejection.CANNOT_UNDERSTAND
        )
    if not valid_uid(transfer_syntax):
        raise InvalidInstance("invalid Transfer Syntax UID", Rejection.CANNOT_UNDERSTAND)

    uids: dict[str, str] = {}
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        try:
            value = _ascii(ds, keyword)
        except Exception as exc:
            raise InvalidInstance(f"unreadable {keyword}", Rejection.CANNOT_UNDERSTAND) from exc
        if value in (None, ""):
            raise InvalidInstance(f"missing {keyword}", Rejection.DOES_NOT_MATCH_SOP_CLASS)
        if not valid_uid(str(value)):
            raise InvalidInstance(
                f"invalid {keyword}: {str(value)[:32]!r}", Rejection.DOES_NOT_MATCH_SOP_CLASS
            )
        uids[keyword] = str(value)

    if expected_sop_class_uid and uids["SOPClassUID"] != expected_sop_class_uid:
        raise InvalidInstance(
            "SOP Class UID differs from the C-STORE request", Rejection.DOES_NOT_MATCH_SOP_CLASS
        )
    if expected_sop_instance_uid and uids["SOPInstanceUID"] != expected_sop_instance_uid:
        raise InvalidInstance(
            "SOP Instance UID differs from the C-STORE request", Rejection.DOES_NOT_MATCH_SOP_CLASS
        )

    try:
        return InstanceHeader(
            sop_class_uid=uids["SOPClassUID"],
            sop_instance_uid=uids["SOPInstanceUID"],
            study_instance_uid=uids["StudyInstanceUID"],
            series_instance_uid=uids["SeriesInstanceUID"],
            transfer_syntax_uid=transfer_syntax,
            patient_id=_text(ds, "PatientID"),
            issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
            patient_name=_text(ds, "PatientName"),
            patient_birth_date=_date(ds, "PatientBirthDate"),
            patient_sex=_ascii(ds, "PatientSex"),
            study_date=_date(ds, "StudyDate"),
            study_time=_ascii(ds, "StudyTime"),
            accession_number=_text(ds, "AccessionNumber"),
            study_id=_text(ds, "StudyID"),
            study_description=_text(ds, "StudyDescription"),
            referring_physician_name=_text(ds, "ReferringPhysicianName"),
            institution_name=_text(ds, "InstitutionName"),
            modality=_ascii(ds, "Modality"),
            series_number=_int(ds, "SeriesNumber"),
            series_description=_text(ds, "SeriesDescription"),
            body_part_examined=_ascii(ds, "BodyPartExamined"),
            series_date=_date(ds, "SeriesDate"),
            series_time=_ascii(ds, "SeriesTime"),
            instance_number=_int(ds, "InstanceNumber"),
            number_of_frames=_int(ds, "NumberOfFrames"),
            rows=_int(ds, "Rows"),
            columns=_int(ds, "Columns"),
            specific_character_set=_text(ds, "SpecificCharacterSet"),
            pixels=pixel_layout(ds, pixel_data),
        )
    except Exception as exc:  # an attribute whose value cannot be decoded
        raise InvalidInstance(
            f"undecodable attribute: {type(exc).__name__}: {exc}"[:200], Rejection.CANNOT_UNDERSTAND
        ) from exc
