"""Per-series metadata for WADO-RS `/metadata` (PS3.18 F.2): each instance's attributes
without pixel data, as DICOM JSON.

Why a cache: a viewer opening a 1,000-slice series asks for its metadata first, and
reading 1,000 headers from the bucket takes seconds. The series' JSON is built once and
kept as a derived object (``derived/metadata/{study}/{series}.json``) with a fingerprint
of the series' instances (UIDs and sizes from the index); a series that gained or changed
an instance gets a new fingerprint, and its JSON is rebuilt on the next request.
"""

from __future__ import annotations

import hashlib
import json
from io import BytesIO

from pydicom import dcmread

from storage import layout
from storage.objects import ObjectNotFound, ObjectStore
from storage.query import Located

# A header nearly always fits in the first 1 MiB; pixel data is never needed.
HEADER_BYTES = 1024 * 1024
_PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00")


def metadata_key(study_instance_uid: str, series_instance_uid: str) -> str:
    return f"{layout.DERIVED_PREFIX}metadata/{study_instance_uid}/{series_instance_uid}.json"


def fingerprint(instances: list[Located]) -> str:
    text = "\n".join(sorted(f"{i.sop_instance_uid}:{i.size}" for i in instances))
    return hashlib.sha256(text.encode()).hexdigest()


def instance_metadata(objects: ObjectStore, item: Located) -> dict:
    """One instance's DICOM JSON, pixel data left out, read from its first bytes."""
    data = objects.head(item.object_key, HEADER_BYTES)
    if len(data) < item.size and not any(tag in data for tag in _PIXEL_DATA_TAGS):
        data = objects.get(item.object_key)  # a header longer than HEADER_BYTES
    ds = dcmread(BytesIO(data), stop_before_pixels=True)
    body = ds.to_json_dict(bulk_data_threshold=1024 * 1024, bulk_data_element_handler=None)
    meta = ds.file_meta
    body["00020010"] = {"vr": "UI", "Value": [str(meta.TransferSyntaxUID)]}
    return body


def series_metadata(
    objects: ObjectStore, study_instance_uid: str, series_instance_uid: str, series: list[Located]
) -> list[dict]:
    """Every instance of one series, from the cache when it is current."""
    key = metadata_key(study_instance_uid, series_instance_uid)
    current = fingerprint(series)
    try:
        cached = json.loads(objects.get(key))
        if cached.get("fingerprint") == current:
            return cached["instances"]
    except (ObjectNotFound, ValueError):
        pass
    instances = [instance_metadata(objects, item) for item in series]
    document = {"fingerprint": current, "instances": instances}
    objects.put_bytes(key, json.dumps(document).encode(), "application/json")
    return instances
