"""Where things live in the bucket (SPEC 4).

Original Part 10 bytes sit under ``dicom/``, named only by validated UIDs, so no value
from a data set can steer a key. Derived objects (renderings, per-series metadata) sit
under ``derived/`` and can be rebuilt at any time.
"""

from __future__ import annotations

DICOM_PREFIX = "dicom/"
DERIVED_PREFIX = "derived/"


def instance_key(study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str) -> str:
    """The object key of an instance's original bytes; the UIDs must already be validated."""
    return f"{DICOM_PREFIX}{study_instance_uid}/{series_instance_uid}/{sop_instance_uid}.dcm"


def parse_instance_key(key: str) -> tuple[str, str, str] | None:
    """(study, series, SOP instance) UIDs of an instance key, or None for any other key."""
    if not key.startswith(DICOM_PREFIX) or not key.endswith(".dcm"):
        return None
    parts = key[len(DICOM_PREFIX) : -len(".dcm")].split("/")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 else None
