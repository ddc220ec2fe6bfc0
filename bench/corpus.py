"""The deterministic ingest corpus: same specification, same bytes, every run.

Every file is a function of its series specification and its index only (seeded NumPy
generator, UIDs derived from names), so the quick corpus is a subset of the full one and a
file is regenerated only when the manifest does not list it with the same size and hash
of the specification (GENERATOR_VERSION changes invalidate everything).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

# Bump whenever anything below changes the bytes written.
GENERATOR_VERSION = 2
SEED = 20240611

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
US_MULTIFRAME_STORAGE = "1.2.840.10008.5.1.4.1.1.3.1"
SC_MULTIFRAME_WORD_STORAGE = "1.2.840.10008.5.1.4.1.1.7.3"

SYNTAX_NAMES = {
    ExplicitVRLittleEndian: "Explicit VR Little Endian",
    RLELossless: "RLE Lossless",
    JPEGLSLossless: "JPEG-LS Lossless",
    JPEG2000Lossless: "JPEG 2000 Lossless",
}


@dataclass(frozen=True)
class SeriesSpec:
    """One series: `full` instances in the full corpus, the first `quick` in the quick one."""

    name: str  # also the folder name
    kind: str  # ct | mr | cr | us
    patient: str
    study: str
    full: int
    quick: int
    syntax: str = ExplicitVRLittleEndian
    frames: int = 1


# About 2,290 instances / 1.1 GB; quick: 199 instances / about 130 MB.
SERIES: tuple[SeriesSpec, ...] = (
    # CT 512x512 16-bit, explicit VR little endian: 4 patients, 2 series of 200 each.
    *(
        SeriesSpec(f"ct-p{p}-s{s}", "ct", f"BENCHCT{p}", f"ct-study-{p}", 200, 15)
        for p in range(4)
        for s in range(2)
    ),
    # MR 256x256 16-bit: 2 patients, 2 series of 80.
    *(
        SeriesSpec(f"mr-p{p}-s{s}", "mr", f"BENCHMR{p}", f"mr-study-{p}", 80, 10)
        for p in range(2)
        for s in range(2)
    ),
    # CR 2500x2048 16-bit (about 10 MB each).
    SeriesSpec("cr-p0-s0", "cr", "BENCHCR0", "cr-study-0", 8, 2),
    # US multi-frame RGB 640x480, 30 frames (about 28 MB each).
    SeriesSpec("us-p0-s0", "us", "BENCHUS0", "us-study-0", 3, 1, frames=30),
    # CT compressed as sent by modalities and PACS.
    SeriesSpec("ct-rle", "ct", "BENCHCTC", "ct-compressed", 120, 12, RLELossless),
    SeriesSpec("ct-jpegls", "ct", "BENCHCTC", "ct-compressed", 120, 12, JPEGLSLossless),
    SeriesSpec("ct-j2k", "ct", "BENCHCTC", "ct-compressed", 120, 12, JPEG2000Lossless),
)


def uid(*parts: object) -> str:
    """A deterministic 2.25 UID from names."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _rng(*parts: object) -> np.random.Generator:
    key = int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big")
    return np.random.default_rng([SEED, key])


def _phantom(rows: int, cols: int, rng: np.random.Generator, z: float) -> np.ndarray:
    """A body-like ellipse with a few round structures that move with z, in CT numbers + 1024."""
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = rows / 2, cols / 2
    body = ((x - cx) / (cols * 0.42)) ** 2 + ((y - cy) / (rows * 0.34)) ** 2 <= 1.0
    image = np.zeros((rows, cols), np.float32)  # air: -1024 HU -> 0
    image[body] = 1024 + 40  # soft tissue
    for k, (dx, dy, r, hu) in enumerate(
        (
            (-0.18, 0.0, 0.11, -800),
            (0.18, 0.0, 0.11, -800),
            (0.0, 0.2, 0.05, 700),
            (0.05, -0.1, 0.06, 60),
        )
    ):
        radius = r * cols * (0.8 + 0.3 * np.sin(z / 17.0 + k))
        mask = (x - cx - dx * cols) ** 2 + (y - cy - dy * rows) ** 2 <= radius**2
        image[mask & body] = 1024 + hu
    noise = rng.normal(0.0, 12.0, (rows, cols)).astype(np.float32)
    image[body] += noise[body]
    return np.clip(image, 0, 4095).astype(np.uint16)


def _base(spec: SeriesSpec, index: int, sop_class: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    sop_uid = uid("instance", spec.name, index)
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "PPBENCH1"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20240611"
    ds.StudyTime = "101500"
    ds.SeriesDate = "20240611"
    ds.ContentDate = "20240611"
    ds.ContentTime = f"1015{index % 60:02d}"
    ds.AccessionNumber = "A" + hashlib.sha256(spec.study.encode()).hexdigest()[:10].upper()
    ds.Modality = {"ct": "CT", "mr": "MR", "cr": "CR", "us": "US"}[spec.kind]
    ds.Manufacturer = "pocketpacs bench"
    ds.InstitutionName = "Bench Hospital"
    ds.ReferringPhysicianName = "Referrer^Bench"
    ds.StudyDescription = f"Bench {spec.study}"
    ds.SeriesDescription = f"Bench {spec.name} {SYNTAX_NAMES[spec.syntax]}"
    ds.PatientName = f"Bench^{spec.patient}"
    ds.PatientID = spec.patient
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = uid("study", spec.study)
    ds.SeriesInstanceUID = uid("series", spec.name)
    ds.StudyID = "1"
    ds.SeriesNumber = SERIES.index(spec) + 1 if spec in SERIES else 99
    ds.InstanceNumber = index + 1
    return ds


def _grey(ds: Dataset, pixels: np.ndarray, bits_stored: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"


def build_instance(spec: SeriesSpec, index: int) -> Dataset:
    rng = _rng(spec.name, index)
    if spec.kind == "ct":
        ds = _base(spec, index, CT_STORAGE)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.FrameOfReferenceUID = uid("for", spec.name)
        ds.SliceThickness = "1.0"
        ds.ImagePositionPatient = [-250, -250, -index * 1.0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = -index * 1.0
        ds.PixelSpacing = [0.976562, 0.976562]
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.KVP = "120"
        _grey(ds, _phantom(512, 512, rng, index), 12)
    elif spec.kind == "mr":
        ds = _base(spec, index, MR_STORAGE)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTime = "20"
        ds.RepetitionTime = "500"
        ds.FrameOfReferenceUID = uid("for", spec.name)
        ds.SliceThickness = "3.0"
        ds.ImagePositionPatient = [-120, -120, index * 3.0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.9375, 0.9375]
        image = (_phantom(256, 256, rng, index).astype(np.uint32) * 3 // 4).astype(np.uint16)
        _grey(ds, image, 12)
    elif spec.kind == "cr":
        ds = _base(spec, index, CR_STORAGE)
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.BodyPartExamined = "CHEST"
        ds.ViewPosition = "PA"
        ds.PixelSpacing = [0.168, 0.168]
        ds.PatientOrientation = ["L", "F"]
        rows, cols = 2500, 2048
        y = np.linspace(0, 1, rows, dtype=np.float32)[:, None]
        x = np.linspace(0, 1, cols, dtype=np.float32)[None, :]
        image = (
            2000 + 1200 * np.sin(3 * x + index) * np.cos(2 * y) + rng.normal(0, 30, (rows, cols))
        )
        _grey(ds, np.clip(image, 0, 16383).astype(np.uint16), 14)
    elif spec.kind == "us":
        ds = _base(spec, index, US_MULTIFRAME_STORAGE)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL"]
        rows, cols = 480, 640
        ds.NumberOfFrames = spec.frames
        ds.FrameTime = "33.3"
        ds.FrameIncrementPointer = 0x00181063
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        y, x = np.mgrid[0:rows, 0:cols]
        cone = (np.abs(x - cols / 2) < (y * 0.7)) & (y > 40)
        frames = np.zeros((spec.frames, rows, cols, 3), np.uint8)
        for f in range(spec.frames):
            speckle = rng.rayleigh(40.0, (rows, cols))
            grey = np.clip(speckle * (0.6 + 0.4 * np.sin((y + 8 * f) / 30.0)), 0, 255).astype(
                np.uint8
            )
            grey[~cone] = 0
            frames[f, ..., 0] = frames[f, ..., 1] = frames[f, ..., 2] = grey
        frames[:, 5:25, 5:200, 1] = 200  # an overlay-like green caption box
        ds.PixelData = frames.tobytes()
        ds["PixelData"].VR = "OB"
    else:
        raise ValueError(spec.kind)
    if spec.syntax != ExplicitVRLittleEndian:
        plugin = {RLELossless: "pylibjpeg", JPEG2000Lossless: "pylibjpeg"}.get(spec.syntax, "")
        ds.compress(spec.syntax, encoding_plugin=plugin, generate_instance_uid=False)
    return ds


def build_large(frames: int = 1000) -> Dataset:
    """One multi-frame instance of frames x 512 KiB (1,000 frames: 524 MB)."""
    spec = SeriesSpec("large-mf", "ct", "BENCHLARGE", "large-study", 1, 1)
    ds = _base(spec, 0, SC_MULTIFRAME_WORD_STORAGE)
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063
    ds.FrameTime = "10"
    rng = _rng("large", frames)
    tiles = [_phantom(512, 512, rng, z) for z in range(16)]
    pixels = np.empty((frames, 512, 512), np.uint16)
    for f in range(frames):
        pixels[f] = tiles[f % len(tiles)]
    _grey(ds, pixels, 12)
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    return ds


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    series: str
    kind: str
    syntax: str
    size: int


def _spec_hash(spec: SeriesSpec) -> str:
    data = json.dumps({"v": GENERATOR_VERSION, "seed": SEED, **asdict(spec)}, sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


class Corpus:
    """Files under `root`, generated on demand and listed in `root/manifest.json`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.manifest_path = root / "manifest.json"
        self.manifest: dict[str, dict] = {}
        if self.manifest_path.exists():
            try:
                self.manifest = json.loads(self.manifest_path.read_text())
            except ValueError:
                self.manifest = {}

    def _save(self) -> None:
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=0, sort_keys=True))
        os.replace(tmp, self.manifest_path)

    def _cached(self, rel: str, spec_hash: str) -> dict | None:
        entry = self.manifest.get(rel)
        path = self.root / rel
        fresh = entry and entry.get("spec") == spec_hash and path.exists()
        if fresh and path.stat().st_size == entry["size"]:
            return entry
        return None

    def _write(self, rel: str, spec_hash: str, ds: Dataset, extra: dict) -> dict:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        entry = {"spec": spec_hash, "size": path.stat().st_size, "sha256": digest.hexdigest()}
        entry.update(extra)
        self.manifest[rel] = entry
        return entry

    def _ensure_spec(
        self, spec: SeriesSpec, count: int, files: list[CorpusFile], generated: int, log
    ) -> int:
        """Append the first `count` files of `spec` to `files`; returns `generated` plus
        the files written now."""
        spec_hash = _spec_hash(spec)
        for index in range(count):
            rel = f"{spec.name}/{index:04d}.dcm"
            entry = self._cached(rel, spec_hash)
            if entry is None:
                ds = build_instance(spec, index)
                entry = self._write(rel, spec_hash, ds, {"syntax": str(spec.syntax)})
                generated += 1
                if generated % 100 == 0:
                    log(f"  corpus: generated {generated} files ...")
                    self._save()
            files.append(
                CorpusFile(self.root / rel, spec.name, spec.kind, str(spec.syntax), entry["size"])
            )
        return generated

    def ensure_series(self, spec: SeriesSpec, log=print) -> list[CorpusFile]:
        """Every file of one series outside SERIES (`spec.full` of them), cached like the
        corpus: for benchmarks that need a series of a given size."""
        files: list[CorpusFile] = []
        if self._ensure_spec(spec, spec.full, files, 0, log):
            self._save()
        return files

    def ensure(self, quick: bool, log=print) -> list[CorpusFile]:
        """Every file of the quick or full corpus, generating what is missing."""
        files: list[CorpusFile] = []
        generated = 0
        for spec in SERIES:
            generated = self._ensure_spec(
                spec, spec.quick if quick else spec.full, files, generated, log
            )
        if generated:
            self._save()
            log(f"  corpus: generated {generated} files, reused {len(files) - generated}")
        else:
            log(f"  corpus: all {len(files)} files cached")
        return files

    def ensure_large(self, frames: int = 1000, log=print) -> CorpusFile:
        rel = f"large/multiframe-{frames}.dcm"
        spec_hash = hashlib.sha256(
            f"large/{GENERATOR_VERSION}/{SEED}/{frames}".encode()
        ).hexdigest()[:16]
        entry = self._cached(rel, spec_hash)
        if entry is None:
            log(f"  corpus: generating the {frames}-frame instance ...")
            entry = self._write(
                rel, spec_hash, build_large(frames), {"syntax": ExplicitVRLittleEndian}
            )
            self._save()
        return CorpusFile(self.root / rel, "large-mf", "sc", ExplicitVRLittleEndian, entry["size"])


def describe(files: list[CorpusFile]) -> list[dict]:
    """Per series: modality, syntax, count, MB."""
    rows: dict[str, dict] = {}
    for f in files:
        row = rows.setdefault(
            f.series,
            {
                "series": f.series,
                "kind": f.kind.upper(),
                "syntax": SYNTAX_NAMES.get(f.syntax, f.syntax),
                "count": 0,
                "bytes": 0,
            },
        )
        row["count"] += 1
        row["bytes"] += f.size
    return list(rows.values())
