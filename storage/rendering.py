"""Rendering one frame of a stored image for display: the pixel pipeline of PS3.3 C.11
and PS3.18 8.3.5 (rendered resources), protocol-free.

For each frame: only that frame is decoded (pydicom's `pixel_array(..., index=)` reads the
header and the frame's bytes, not the whole object); pixel padding is masked; the
Modality LUT applies (Rescale Slope and Intercept, or a Modality LUT Sequence, taken from
the frame's functional groups in enhanced objects); then the VOI: the requested window,
else the VOI LUT Sequence, else the first stored window, else a window over the 0.5th to
99.5th percentile of the non-padding pixels; MONOCHROME1 is inverted; PALETTE COLOR goes
through its LUT; YBR is converted to RGB once, by the decoder. Overlays are left off.
A video (MPEG-2, H.264, HEVC) is the exception to "only that frame": FFmpeg decodes its
stream from the start to the frame, as each frame is made from those before it.
"""

from __future__ import annotations

import enum
import functools
import io
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import imagecodecs
import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames, get_frame
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    get_decoder,
    pixel_array,
)
from pydicom.tag import Tag
from pydicom.uid import (
    JPEG2000MC,
    DeflatedExplicitVRLittleEndian,
    JPEG2000MCLossless,
    MPEGTransferSyntaxes,
)

from storage.frames import FrameNotFound, number_of_frames
from storage.header import DISPLAY_KEYWORDS, PixelLayout, display_attributes

log = logging.getLogger(__name__)

# Instances in a syntax pydicom has no decoder for (`_DECODED_HERE`) are read whole to
# render a frame (a video is decoded from its start): larger ones are refused with a
# reason rather than held in the HTTP process's memory.
READ_WHOLE_AT_MOST = 512 * 1024 * 1024
# Encodings a rendered resource can be asked for (PS3.18 8.7.4), by media type.
FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
DEFAULT_QUALITY = 90
# The percentiles of the non-padding pixels that bound the window when the object has none.
ROBUST_PERCENTILES = (0.5, 99.5)
# Those percentiles are taken over a regular grid of at least this many pixels (every
# pixel of a 512 x 512 CT, every 4th row and column of a 2500 x 2048 CR): a histogram of
# all 5 million took 14 ms, and the window moves by less than a grey level (a quarter as
# many moved it by 1.6, tests/test_rendered.py).
WINDOW_SAMPLES = 262144


class Undecodable(ValueError):
    """The frame's pixel data cannot be decoded (no codec, corrupt stream): a 415-class
    answer with this reason, never a server error."""


class WindowFunction(enum.Enum):
    """VOI LUT Function (PS3.3 C.11.2.1.3)."""

    LINEAR = "LINEAR"
    LINEAR_EXACT = "LINEAR_EXACT"
    SIGMOID = "SIGMOID"


@dataclass(frozen=True)
class Window:
    """A VOI window on the Modality LUT's output (Hounsfield units for CT)."""

    center: float
    width: float
    function: WindowFunction = WindowFunction.LINEAR

    def __post_init__(self) -> None:
        if not (math.isfinite(self.center) and math.isfinite(self.width)):
            raise ValueError("window center and width must be finite numbers")
        if self.width <= 0 or (self.function is WindowFunction.LINEAR and self.width < 1):
            raise ValueError(f"window width {self.width} is not positive (at least 1 if linear)")

    def to_grey(self, values: np.ndarray) -> np.ndarray:
        """Values mapped to 0..255 (PS3.3 C.11.2.1.2 and C.11.2.1.3), as floats."""
        c, w = self.center, self.width
        if self.function is WindowFunction.SIGMOID:
            return 255.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
        if self.function is WindowFunction.LINEAR_EXACT:
            scaled = (values - c) / w + 0.5
        elif w == 1:
            scaled = (values > c - 0.5).astype(np.float64)
        else:
            scaled = (values - (c - 0.5)) / (w - 1) + 0.5
        return np.clip(scaled, 0.0, 1.0) * 255.0


@dataclass(frozen=True)
class Rendering:
    """How a frame is to be rendered: output format, largest size (aspect kept), window."""

    media_type: str = "image/jpeg"
    viewport: tuple[int, int] | None = None
    window: Window | None = None
    quality: int = DEFAULT_QUALITY


def render(
    source: BinaryIO, number: int | None, rendering: Rendering, in_memory: bool = False
) -> bytes:
    """Frame `number` (1-based; None: the middle one, a thumbnail's) of the Part 10 object
    in `source` (seekable), rendered. `in_memory`: `source` holds the whole object, so it
    is parsed once, whole; otherwise the header is read, then only the frame's bytes.

    FrameNotFound: no image, or no such frame. Undecodable: the frame cannot be decoded."""
    deflated = False
    try:
        if in_memory:
            header = dcmread(source)
        else:
            header = dcmread(source, stop_before_pixels=True)
            deflated = header.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    except Exception as exc:  # pydicom raises what the damage provokes
        raise Undecodable(f"the instance cannot be read: {exc}") from exc
    if "Rows" not in header or "PhotometricInterpretation" not in header:
        raise FrameNotFound("the instance holds no image")
    number = _frame_in_range(number, number_of_frames(header))
    syntax = header.file_meta.get("TransferSyntaxUID", "unknown")
    decode = _DECODED_HERE.get(syntax)
    if decode is not None:  # syntaxes pydicom has no decoder for
        if not in_memory:
            size = source.seek(0, io.SEEK_END)
            if size > READ_WHOLE_AT_MOST:
                raise Undecodable(
                    f"an instance of {size >> 20} MB in {syntax}: more than the"
                    f" {READ_WHOLE_AT_MOST >> 20} MB rendered (it is decoded in memory)"
                )
            source.seek(0)
        pixels = decode(header if in_memory else _whole(source), number)
        return _shown(header, pixels, number, rendering)
    try:
        if in_memory or deflated:  # deflated: one stream, inflated whole by pydicom
            if not in_memory:
                source.seek(0)
            whole = header if in_memory else dcmread(source)
            decoder = get_decoder(whole.file_meta.TransferSyntaxUID)
            pixels, _ = decoder.as_array(whole, index=number - 1, as_rgb=True)
        else:
            source.seek(0)
            pixels = pixel_array(source, index=number - 1, raw=False)
    except Exception as exc:  # every codec failure is the same answer: cannot decode
        raise Undecodable(f"frame {number} ({syntax}) cannot be decoded: {exc}") from exc
    return _shown(header, pixels, number, rendering)


def _whole(source: BinaryIO) -> Dataset:
    """The whole object in `source`, pixel data included."""
    try:
        return dcmread(source)
    except Exception as exc:
        raise Undecodable(f"the instance cannot be read: {exc}") from exc


def _video_frame(ds: Dataset, number: int) -> np.ndarray:
    """Frame `number` of a video object as RGB: its pixel data is one MPEG-2, H.264 or HEVC
    stream (in one item, or split across several), decoded by FFmpeg through PyAV from its
    start, as a video's frames are made from the ones before them."""
    import av  # here: FFmpeg's libraries add 17 MB to a process, and video is rare

    syntax = ds.file_meta.TransferSyntaxUID
    try:
        stream = b"".join(generate_frames(ds.PixelData, number_of_frames=1))
        with av.open(io.BytesIO(stream)) as container:
            for position, frame in enumerate(container.decode(video=0), start=1):
                if position == number:
                    return frame.to_ndarray(format="rgb24")
    except Exception as exc:  # FFmpeg's errors, or items that do not parse
        reason = f"frame {number} of the video ({syntax}) cannot be decoded: {exc}"
        raise Undecodable(reason) from exc
    raise Undecodable(f"the video ({syntax}) ends before frame {number}")


def _jpeg_2000_part_2_frame(ds: Dataset, number: int) -> np.ndarray:
    """Frame `number` of a JPEG 2000 Part 2 (multi-component) object, by OpenJPEG through
    imagecodecs, which applies the codestream's component transform."""
    try:
        frame = get_frame(ds.PixelData, number - 1, number_of_frames=number_of_frames(ds))
        pixels = imagecodecs.jpeg2k_decode(frame)
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        if pixels.dtype.kind == "u" and signed:  # encoders get the codestream's sign wrong
            bits = int(ds.BitsStored)
            wide = pixels.astype(np.int32)
            return np.where(wide >= 1 << (bits - 1), wide - (1 << bits), wide)
        return pixels
    except Exception as exc:  # OpenJPEG's errors, or items that do not parse
        syntax = ds.file_meta.TransferSyntaxUID
        raise Undecodable(f"frame {number} ({syntax}) cannot be decoded: {exc}") from exc


# Decoders of syntaxes pydicom has none for, by transfer syntax: video (PS3.5 8.2.5 to
# 8.2.7, 8.2.14) and JPEG 2000 Part 2 (8.2.4).
_DECODED_HERE: dict[str, Callable[[Dataset, int], np.ndarray]] = {
    **dict.fromkeys(MPEGTransferSyntaxes, _video_frame),
    JPEG2000MC: _jpeg_2000_part_2_frame,
    JPEG2000MCLossless: _jpeg_2000_part_2_frame,
}


def render_laid_out(
    data: bytes, layout: PixelLayout, number: int | None, rendering: Rendering
) -> bytes:
    """What `render` gives for frame `number` of the stored object `data`, whose frames
    `layout` (read at ingest) locates: no parsing, the frame's samples read in place, and
    a grey frame shown through a table kept for its display attributes (`_table`)."""
    number = _frame_in_range(number, layout.number_of_frames)
    try:
        samples = np.frombuffer(
            data,
            np.dtype(f"<u{layout.bits_allocated // 8}"),
            layout.rows * layout.columns * layout.samples_per_pixel,
            layout.offset + (number - 1) * layout.frame_bytes,
        )
    except ValueError as exc:  # bytes shorter than the layout says
        raise Undecodable(f"frame {number} cannot be read: {exc}") from exc
    shape = (layout.rows, layout.columns)
    try:
        attributes = _display_attributes(layout.display)
    except Exception as exc:  # a value pydicom refuses
        raise Undecodable(f"frame {number} cannot be rendered: {exc}") from exc
    if layout.samples_per_pixel == 3:  # 8 of 8 bits, unsigned (`pixel_layout`)
        return _shown(attributes, samples.reshape(*shape, 3), number, rendering)
    if layout.bits_stored <= TABLE_BITS_AT_MOST:
        patterns = _patterns(layout, samples.reshape(shape))
        try:
            grey = _laid_out_grey(layout, patterns, rendering.window)
        except Exception as exc:  # attributes the pipeline needs are malformed
            raise Undecodable(f"frame {number} cannot be rendered: {exc}") from exc
        return encode(grey, rendering)
    pixels = samples.reshape(shape)
    if layout.signed:  # the sign is bit BitsStored - 1 (PS3.5 8.1.1)
        unused = layout.bits_allocated - layout.bits_stored
        pixels = pixels.view(pixels.dtype.str.replace("u", "i"))
        if unused:
            pixels = (pixels << unused) >> unused
    else:
        pixels = _patterns(layout, pixels)
    return _shown(attributes, pixels, number, rendering)


# A layout's display attributes as a data set, made once for each distinct set (a series'
# instances share theirs, `PixelLayout.shared`). Read, never changed.
_display_attributes = functools.lru_cache(maxsize=1024)(display_attributes)


@dataclass(frozen=True, eq=False)
class _StoredValues:
    """Every value a laid-out grey sample can hold, by bit pattern (the sample masked to
    Bits Stored bits, read unsigned), with what the pipeline makes of each: a frame's
    samples then index tables over these patterns, with no arithmetic per pixel."""

    frame: Dataset  # the display attributes
    stored: np.ndarray  # the stored value of each pattern, its sign applied
    modality: np.ndarray  # the Modality LUT of each, as floats
    padding: np.ndarray | None  # which patterns are padding
    monochrome1: bool
    window_from_pixels: bool  # no stored window nor VOI LUT: a frame's own pixels set it

    @functools.cached_property
    def order(self) -> np.ndarray | None:
        """The patterns in ascending order of `modality`, for the percentiles of a window
        from pixels; None when that is their own order (unsigned, slope positive)."""
        if np.all(self.modality[1:] >= self.modality[:-1]):
            return None
        return np.argsort(self.modality, kind="stable")

    @functools.cached_property
    def ascending(self) -> np.ndarray:
        """`modality` in that order."""
        return self.modality if self.order is None else self.modality[self.order]


@functools.lru_cache(maxsize=16)
def _stored_values(display: tuple, signed: bool, bits_stored: int) -> _StoredValues:
    frame = _display_attributes(display)
    patterns = np.arange(1 << bits_stored)
    stored = patterns - (patterns >> (bits_stored - 1) << bits_stored) if signed else patterns
    padding = _padding_range(frame)
    return _StoredValues(
        frame=frame,
        stored=stored,
        modality=apply_modality_lut(stored, frame).astype(np.float64),
        padding=None if padding is None else (stored >= padding[0]) & (stored <= padding[1]),
        monochrome1=str(frame.PhotometricInterpretation).strip() == "MONOCHROME1",
        window_from_pixels=not frame.get("VOILUTSequence") and _stored_window(frame) is None,
    )


# Tables kept, by display attributes and window: up to 16 KB each.
TABLES_KEPT = 128
# Grey samples of at most this many bits go through tables over every stored value (a CR's
# 14 bits: 0.5 MB of arrays for each set of display attributes, 16 sets kept); wider ones
# (65,536 values, 2 MB a set, and PET gives each slice a slope of its own) through
# `displayed`, over the values present.
TABLE_BITS_AT_MOST = 14


def _table(display: tuple, signed: bool, bits_stored: int, window: Window | None) -> np.ndarray:
    """The 8-bit grey of every bit pattern through `window`, or through what the attributes
    hold when None: what `displayed` gives each value, padding black."""
    values = _stored_values(display, signed, bits_stored)
    table = _grey(values.frame, values.stored, window, None, values.monochrome1)
    if values.padding is not None:
        table[values.padding] = 0
    table.flags.writeable = False  # shared by every rendering that uses it
    return table


# Tables kept: of windows that do not come from a frame's pixels, and, apart, so that they
# do not push those out, of the latest windows from pixels (neighbouring slices often
# share theirs).
_kept_table = functools.lru_cache(maxsize=TABLES_KEPT)(_table)
_pixels_table = functools.lru_cache(maxsize=32)(_table)


def _patterns(layout: PixelLayout, samples: np.ndarray) -> np.ndarray:
    """A grey frame's samples as bit patterns: the bits above Bits Stored are not the
    value, and are cleared."""
    if layout.bits_allocated == layout.bits_stored:
        return samples
    return samples & ((1 << layout.bits_stored) - 1)


def _laid_out_grey(layout: PixelLayout, patterns: np.ndarray, window: Window | None) -> np.ndarray:
    """A laid-out grey frame's samples (bit patterns) as 8-bit grey, as `displayed` shows
    them: a window from the pixels is the one `_robust_window` takes from the same
    (sub-sampled) histogram, or was taken at ingest (`PixelLayout.window`)."""
    key = (layout.display, layout.signed, layout.bits_stored)
    values = _stored_values(*key)
    if window is None and values.window_from_pixels:
        if layout.window is not None:
            window = Window(*layout.window)
        else:
            window = _pixels_window(values, patterns)
        table = _pixels_table(*key, window)
    else:
        table = _kept_table(*key, window)
    return np.take(table, patterns, mode="clip")


def _pixels_window(values: _StoredValues, patterns: np.ndarray) -> Window:
    """The window a frame's own bit patterns set: over the bulk of its non-padding values."""
    step = max(1, math.isqrt(patterns.size // WINDOW_SAMPLES))
    counts = np.bincount(patterns[::step, ::step].ravel(), minlength=values.stored.size)
    if values.padding is not None:
        counts[values.padding] = 0
    if values.order is not None:
        counts = counts[values.order]
    return _robust_window(values.ascending, counts, ordered=True)


def with_pixels_window(layout: PixelLayout, source: Path | bytes) -> PixelLayout:
    """`layout` with the window its instance's pixels set (`PixelLayout.window`), read from
    `source` (the stored bytes, or the file holding them), for a single-frame grey image
    that stores no window nor VOI LUT; `layout` itself for any other, or when the bytes
    cannot say."""
    if (
        layout.window is not None
        or layout.samples_per_pixel != 1
        or layout.number_of_frames != 1
        or layout.bits_stored > TABLE_BITS_AT_MOST
    ):
        return layout
    try:
        values = _stored_values(layout.display, layout.signed, layout.bits_stored)
        if not values.window_from_pixels:
            return layout
        dtype = np.dtype(f"<u{layout.bits_allocated // 8}")
        shape = (layout.rows, layout.columns)
        step = max(1, math.isqrt(layout.rows * layout.columns // WINDOW_SAMPLES))
        if isinstance(source, bytes):
            count = shape[0] * shape[1]
            frame = np.frombuffer(source, dtype, count, layout.offset).reshape(shape)
            sampled = frame[::step, ::step]
        elif step == 1:  # every sample counts: one read
            with source.open("rb", buffering=0) as handle:
                data = os.pread(handle.fileno(), layout.frame_bytes, layout.offset)
            sampled = np.frombuffer(data, dtype, shape[0] * shape[1]).reshape(shape)
        else:  # mapped: only the rows sampled are read, not a large frame's every row
            samples = np.memmap(source, dtype, "r", layout.offset, shape)
            sampled = np.array(samples[::step, ::step])  # what `_pixels_window` samples
        window = _pixels_window(values, _patterns(layout, sampled))
    except Exception:  # a short file, odd attributes: the window is only a saving
        log.debug("no window found at ingest", exc_info=True)
        return layout
    return replace(layout, window=(window.center, window.width))


def _frame_in_range(number: int | None, count: int) -> int:
    """The frame asked for, None meaning the middle one; FrameNotFound outside 1..count."""
    if number is None:
        number = (count + 1) // 2
    if not 1 <= number <= count:
        raise FrameNotFound(f"frame {number} is outside 1..{count}")
    return number


def _shown(ds: Dataset, pixels: np.ndarray, number: int, rendering: Rendering) -> bytes:
    """A decoded frame through the display pipeline, encoded."""
    try:
        image = displayed(ds, pixels, number - 1, rendering.window)
    except Exception as exc:  # attributes the pipeline needs are missing or malformed
        raise Undecodable(f"frame {number} cannot be rendered: {exc}") from exc
    return encode(image, rendering)


def displayed(
    ds: Dataset, pixels: np.ndarray, index: int, window: Window | None = None
) -> np.ndarray:
    """A decoded frame as 8-bit grey (rows, columns) or RGB (rows, columns, 3)."""
    photometric = str(ds.PhotometricInterpretation).strip()
    if photometric == "PALETTE COLOR":
        colours = apply_color_lut(pixels, ds)
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor") or [0, 0, 8]
        return _to_8_bits(colours, int(descriptor[2] or 8))
    if pixels.ndim == 3:  # RGB, and YBR the decoder already converted
        return _to_8_bits(pixels, int(ds.get("BitsStored", 8) or 8))
    frame = frame_attributes(ds, index)
    padding = _padding_range(frame)
    monochrome1 = photometric == "MONOCHROME1"
    if pixels.dtype.kind in "iu" and pixels.size:
        # Through a lookup table over the stored values present: the pipeline runs once per
        # value instead of once per pixel (4 times less work on a 512 x 512 CT, 60 on a CR),
        # and a window from the pixels comes from their histogram, not a sort.
        low, high = int(pixels.min()), int(pixels.max())
        if high - low < pixels.size:
            offsets = _offsets(pixels, low)
            stored = np.arange(low, high + 1)
            shown = np.ones(stored.size, dtype=bool)
            if padding is not None:
                shown[max(padding[0] - low, 0) : max(padding[1] - low + 1, 0)] = False

            def histogram() -> np.ndarray:
                step = max(1, math.isqrt(pixels.size // WINDOW_SAMPLES))
                counts = np.bincount(offsets[::step, ::step].ravel(), minlength=stored.size)
                counts[~shown] = 0
                return counts

            table = _grey(frame, stored, window, histogram, monochrome1)
            table[~shown] = 0
            return np.take(table, offsets)
    mask = (
        np.zeros(pixels.shape, dtype=bool)
        if padding is None
        else (pixels >= padding[0]) & (pixels <= padding[1])
    )
    grey = _grey(frame, pixels[~mask] if mask.any() else pixels.ravel(), window, None, monochrome1)
    out = np.zeros(pixels.shape, dtype=np.uint8)
    out[~mask] = grey
    return out


def _offsets(pixels: np.ndarray, low: int) -> np.ndarray:
    """`pixels - low`, exactly, in an unsigned type of the pixels' own size: the difference
    lies in 0..max-min, which that type holds, so wrap-around arithmetic gives it without
    widening every pixel to 64 bits."""
    unsigned = np.dtype(f"u{pixels.dtype.itemsize}")
    return pixels.view(unsigned) - unsigned.type(low % (1 << (8 * pixels.dtype.itemsize)))


def _grey(
    frame: Dataset,
    stored: np.ndarray,
    window: Window | None,
    histogram: Callable[[], np.ndarray] | None,
    monochrome1: bool,
) -> np.ndarray:
    """Stored values to 8-bit grey: Modality LUT, VOI, MONOCHROME1 inversion. A window
    from the pixels, when one is needed, is over `stored` weighted by `histogram()` (each
    value's count of non-padding pixels), or over `stored` itself when there is none."""
    modality = apply_modality_lut(stored, frame)
    values = modality.astype(np.float64)
    if window is not None:
        grey = window.to_grey(values)
    elif frame.get("VOILUTSequence"):
        lut_output = apply_voi_lut(modality, frame).astype(np.float64)
        bits = int(frame.VOILUTSequence[0].LUTDescriptor[2] or 16)
        grey = np.clip(lut_output / float((1 << bits) - 1), 0.0, 1.0) * 255.0
    else:
        grey = _stored_or_robust_window(frame, values, histogram).to_grey(values)
    if monochrome1:
        grey = 255.0 - grey
    return np.rint(grey).astype(np.uint8)


# What `frame_attributes` takes from the top level, by tag (a keyword costs a lookup).
_FRAME_TAGS = [Tag(keyword) for keyword in DISPLAY_KEYWORDS]


def frame_attributes(ds: Dataset, index: int) -> Dataset:
    """The attributes the pipeline reads, for frame `index`: the top level, overridden by
    the shared and then the frame's own functional groups of an enhanced object."""
    frame = Dataset()
    if hasattr(ds, "file_meta"):
        frame.file_meta = ds.file_meta  # LUT Data (OW) needs the byte order
    for tag in _FRAME_TAGS:
        if tag in ds:
            frame[tag] = ds[tag]  # read, never changed: an override below is a new element
    groups = []
    for sequence in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        items = ds.get(sequence) or []
        position = 0 if sequence.startswith("Shared") else index
        if len(items) > position:
            groups.append(items[position])
    for group in groups:
        for macro in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            for item in group.get(macro) or []:
                for element in item:
                    setattr(frame, element.keyword, element.value)
    return frame


def _padding_range(frame: Dataset) -> tuple[int, int] | None:
    """The stored values that are padding (PS3.3 C.7.5.1.1.2), lowest and highest."""
    if "PixelPaddingValue" not in frame:
        return None
    low = int(frame.PixelPaddingValue)
    high = int(frame.get("PixelPaddingRangeLimit", low))
    return min(low, high), max(low, high)


def _first(value: object) -> float:
    """The first of a multi-valued element's values (several windows may be stored)."""
    return float(value[0] if isinstance(value, MultiValue | list | tuple) else value)


def _stored_or_robust_window(
    frame: Dataset, values: np.ndarray, histogram: Callable[[], np.ndarray] | None
) -> Window:
    """The first stored window, else one over the bulk of the non-padding pixels: `values`
    (Modality LUT output) each as often as `histogram()` counts it, or each once."""
    stored = _stored_window(frame)
    if stored is not None:
        return stored
    return _robust_window(values, None if histogram is None else histogram())


def _stored_window(frame: Dataset) -> Window | None:
    """The first stored window, None when there is none or it is malformed."""
    if "WindowCenter" not in frame or "WindowWidth" not in frame:
        return None
    function = str(frame.get("VOILUTFunction", "LINEAR") or "LINEAR").strip()
    try:
        known = function in WindowFunction.__members__
        return Window(
            _first(frame.WindowCenter),
            _first(frame.WindowWidth),
            WindowFunction(function) if known else WindowFunction.LINEAR,
        )
    except (TypeError, ValueError):
        return None  # a malformed stored window: the pixels set it


def _robust_window(values: np.ndarray, counts: np.ndarray | None, ordered: bool = False) -> Window:
    """A window over the 0.5th to 99.5th percentile of `values`, each as often as `counts`
    says (each once when None). `ordered`: `values` ascend already, `counts` in their order."""
    if counts is None:
        if values.size == 0:
            return Window(0.0, 1.0)
        low, high = np.percentile(values, ROBUST_PERCENTILES)
    else:
        if not counts.any():
            return Window(0.0, 1.0)
        if not ordered:
            order = np.argsort(values, kind="stable")
            values, counts = values[order], counts[order]
        low, high = _weighted_percentiles(values, counts, ROBUST_PERCENTILES)
    if high <= low:
        return Window(float(low), 1.0)
    return Window((low + high) / 2.0 + 0.5, float(high - low) + 1.0)


def _weighted_percentiles(
    ascending: np.ndarray, counts: np.ndarray, percentiles: tuple[float, ...]
) -> list[float]:
    """What `np.percentile` (linear method) gives for the array holding each of
    `ascending` `counts` times, without making that array: from the cumulative counts,
    interpolated as numpy does (from the upper value when nearer it)."""
    cumulative = np.cumsum(counts)
    last = int(cumulative[-1]) - 1
    ranks = [percentile / 100.0 * last for percentile in percentiles]
    bounds = [bound(rank) for rank in ranks for bound in (math.floor, math.ceil)]
    at = ascending[np.searchsorted(cumulative, bounds, side="right")].tolist()
    found = []
    for rank, at_below, at_above in zip(ranks, at[::2], at[1::2], strict=True):
        fraction = rank - math.floor(rank)
        if fraction >= 0.5:
            found.append(at_above - (at_above - at_below) * (1 - fraction))
        else:
            found.append(at_below + (at_above - at_below) * fraction)
    return found


def _to_8_bits(image: np.ndarray, bits: int) -> np.ndarray:
    """Colour samples of `bits` bits to 8."""
    if bits > 8:
        return (image.astype(np.uint32) >> (bits - 8)).astype(np.uint8)
    return image.astype(np.uint8)


def encode(image: np.ndarray, rendering: Rendering) -> bytes:
    """The 8-bit image in the requested format, shrunk to fit the viewport (aspect kept).

    JPEG by imagecodecs: the same libjpeg-turbo call as Pillow's, the same bytes, without
    Pillow's per-image work (a third of encoding a 256 x 256 MR slice)."""
    if rendering.viewport is not None:
        picture = Image.fromarray(image)
        picture.thumbnail(rendering.viewport, Image.Resampling.LANCZOS)
        image = np.asarray(picture)
    fmt = FORMATS[rendering.media_type]
    if fmt == "JPEG":
        return bytes(imagecodecs.jpeg8_encode(image, level=rendering.quality))
    out = io.BytesIO()
    if fmt == "PNG":
        Image.fromarray(image).save(out, fmt)
    else:
        Image.fromarray(image).save(out, fmt, quality=rendering.quality)
    return out.getvalue()
