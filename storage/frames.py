"""Single frames of a stored instance, as stored (WADO-RS `/frames`, and the renderer).

Only the bytes a frame needs are fetched: the header from the object's first blocks, then
the frame itself (native pixel data: one range at a computed offset; encapsulated: the
offset table and the frame's fragments, through pydicom's `get_frame`). A deflated data
set is one compressed stream and is read whole.
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from storage.objects import ObjectStore
from storage.query import Located


class FrameNotFound(LookupError):
    """No such frame (out of range), or the instance holds no pixel data."""


# Number of Frames is an IS: at most 2**31 - 1. A longer number in a request is no frame.
LARGEST_FRAME = 2**31 - 1


def frame_number(text: str) -> int | None:
    """A frame number as a request writes it (ASCII digits, from 1); None otherwise."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        return None
    number = int(text)
    return number if 1 <= number <= LARGEST_FRAME else None


def number_of_frames(ds: Dataset) -> int:
    """NumberOfFrames, 1 when absent or malformed."""
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _frame_size(ds: Dataset) -> int:
    bits = int(ds.BitsAllocated)
    pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
    if bits == 1:
        raise FrameNotFound("1-bit frames are not byte-aligned; retrieve the instance")
    return pixels * bits // 8


def _pixel_value_offset(handle: BinaryIO, syntax: UID) -> int:
    """Where the pixel data value starts, from the element header at the current position
    (PS3.5 7.1)."""
    head = handle.read(8)
    if len(head) < 8:
        raise FrameNotFound("the instance holds no pixel data")
    endian = "<" if syntax.is_little_endian else ">"
    group, element = struct.unpack(endian + "HH", head[:4])
    if (group, element) != (0x7FE0, 0x0010):
        raise FrameNotFound("the instance holds no pixel data")
    if not syntax.is_implicit_VR:
        handle.read(4)  # VR OB/OW, two reserved bytes, then a 4-byte length
    return handle.tell()


def read_frames(objects: ObjectStore, item: Located, numbers: list[int]) -> list[bytes]:
    """Frames `numbers` (1-based) of a stored instance, each as stored."""
    syntax = UID(item.transfer_syntax_uid)
    if syntax == DeflatedExplicitVRLittleEndian:
        ds = dcmread(BytesIO(objects.get(item.object_key)))
        if "PixelData" not in ds:
            raise FrameNotFound("the instance holds no pixel data")
        count = number_of_frames(ds)
        size = _frame_size(ds)
        _check(numbers, count)
        return [ds.PixelData[(n - 1) * size : n * size] for n in numbers]

    with objects.open(item.object_key, item.size) as handle:
        ds = dcmread(handle, stop_before_pixels=True)
        if "Rows" not in ds or "BitsAllocated" not in ds:
            raise FrameNotFound("the instance holds no image")
        count = number_of_frames(ds)
        _check(numbers, count)
        start = _pixel_value_offset(handle, syntax)
        if not syntax.is_encapsulated:
            size = _frame_size(ds)
            frames = []
            for n in numbers:
                handle.seek(start + (n - 1) * size)
                frames.append(handle.read(size))
            return frames
        extended = None
        if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
            extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
        frames = []
        for n in numbers:
            handle.seek(start)
            frames.append(
                get_frame(handle, n - 1, extended_offsets=extended, number_of_frames=count)
            )
        return frames


def _check(numbers: list[int], count: int) -> None:
    outside = [n for n in numbers if not 1 <= n <= count]
    if outside:
        raise FrameNotFound(f"frame {outside[0]} is outside 1..{count}")
