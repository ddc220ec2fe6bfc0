"""Deterministic DICOM test data: generated CT/MR/CR/RGB objects and pydicom's sample files
in compressed transfer syntaxes. Everything is written as Part 10 files to a folder."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    generate_uid,
)

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")

# pydicom (and pydicom-data) sample files, one per transfer syntax family that matters.
COMPRESSED_SAMPLES = {
    "JPEG Baseline (YBR_FULL_422)": "SC_rgb_jpeg_dcmtk.dcm",
    "JPEG Extended 12-bit": "JPEG-lossy.dcm",
    "JPEG Lossless SV1": "JPEG-LL.dcm",
    "JPEG-LS Lossless": "MR_small_jpeg_ls_lossless.dcm",
    "JPEG 2000 Lossless": "MR_small_jp2klossless.dcm",
    "JPEG 2000": "US1_J2KI.dcm",
    "RLE Lossless": "MR_small_RLE.dcm",
    "Deflated Explicit VR": "image_dfl.dcm",
    "Explicit VR Big Endian": "MR_small_bigendian.dcm",
    "Implicit VR Little Endian": "MR_small_implicit.dcm",
}


@dataclass(frozen=True)
class StudyIds:
    study: str
    series: str
    patient_id: str


def _base(
    sop_class: str, modality: str, ids: StudyIds, number: int, patient_name: str = "Doe^Jane"
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    uid = generate_uid(entropy_srcs=[ids.series, str(number)])
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = ids.study
    ds.SeriesInstanceUID = ids.series
    ds.PatientName = patient_name
    ds.PatientID = ids.patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = "20261101"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC" + ids.patient_id[-6:]
    ds.StudyDescription = f"{modality} test study"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.InstitutionName = "Test Hospital"
    return ds


def study_ids(seed: str) -> StudyIds:
    return StudyIds(
        study=generate_uid(entropy_srcs=[seed, "study"]),
        series=generate_uid(entropy_srcs=[seed, "series"]),
        patient_id=f"PID{zlib.crc32(seed.encode()) % 10**6:06d}",
    )


def _monochrome(ds: Dataset, pixels: np.ndarray) -> Dataset:
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if pixels.dtype == np.int16 else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.PixelData = pixels.tobytes()
    return ds


def ct_series(folder: Path, count: int = 10, seed: str = "ct") -> list[Path]:
    """A CT series of 512x512 16-bit signed slices with rescale to Hounsfield units."""
    ids = study_ids(seed)
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(1, count + 1):
        ds = _base(CTImageStorage, "CT", ids, number)
        ds.RescaleSlope = 1
        ds.RescaleIntercept = -1024
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.SliceThickness = 1.0
        ds.ImagePositionPatient = [0, 0, float(number)]
        _monochrome(ds, rng.integers(-1000, 3000, (512, 512), dtype=np.int16))
        path = folder / f"ct{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def mr_image(folder: Path, seed: str = "mr") -> Path:
    ids = study_ids(seed)
    ds = _base(MRImageStorage, "MR", ids, 1)
    rng = np.random.default_rng(1)
    _monochrome(ds, rng.integers(0, 4095, (256, 256), dtype=np.uint16))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def large_cr(folder: Path, seed: str = "cr") -> Path:
    """A 2500x2048 12-bit computed radiograph (about 10 MB)."""
    ids = study_ids(seed)
    ds = _base(CR_IMAGE_STORAGE, "CR", ids, 1)
    ds.PhotometricInterpretation = "MONOCHROME1"
    rng = np.random.default_rng(2)
    _monochrome(ds, rng.integers(0, 4095, (2500, 2048), dtype=np.uint16))
    ds.PhotometricInterpretation = "MONOCHROME1"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def multiframe_rgb(folder: Path, frames: int = 20, size: int = 256, seed: str = "rgb") -> Path:
    """A multi-frame true-colour secondary capture, `frames` frames of size x size RGB."""
    ids = study_ids(seed)
    ds = _base(MultiFrameTrueColorSecondaryCaptureImageStorage, "OT", ids, 1)
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8)
    ds.NumberOfFrames = frames
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "rgb_multiframe.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def compressed_samples(folder: Path) -> dict[str, Path]:
    """Copies of pydicom's sample files, one per transfer syntax, keyed by description."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = {}
    for label, name in COMPRESSED_SAMPLES.items():
        source = Path(get_testdata_file(name))
        target = folder / name
        target.write_bytes(source.read_bytes())
        copies[label] = target
    return copies


def transfer_syntax_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
