"""`pocketpacs check`: make the index and the bucket agree (SPEC 4).

A crash can leave an object that no index row names (the process died between the PUT
and the commit): it is read back, validated and indexed. An index row whose object is
gone cannot be repaired from here and is reported. The two lists are merged in key order
as they stream, so a million instances need no more memory than a thousand.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from storage import layout
from storage.header import InvalidInstance, read_header
from storage.index import Index, Origin, StoredInstance
from storage.ingest import sha256_file
from storage.objects import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)


@dataclass
class CheckReport:
    objects: int = 0
    rows: int = 0
    reindexed: list[str] = field(default_factory=list)
    missing_objects: list[StoredInstance] = field(default_factory=list)
    size_mismatches: list[tuple[StoredInstance, int]] = field(default_factory=list)
    unusable_objects: list[tuple[str, str]] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        """True when nothing is left for a person to look at."""
        return not (self.missing_objects or self.size_mismatches or self.unusable_objects)


def _merge(
    objects: Iterator[ObjectInfo], rows: Iterator[StoredInstance]
) -> Iterator[tuple[ObjectInfo | None, StoredInstance | None]]:
    """Pair objects and rows with the same key; either side is None where the other lacks it."""
    obj, row = next(objects, None), next(rows, None)
    while obj is not None or row is not None:
        if row is None or (obj is not None and obj.key < row.object_key):
            yield obj, None
            obj = next(objects, None)
        elif obj is None or row.object_key < obj.key:
            yield None, row
            row = next(rows, None)
        else:
            yield obj, row
            obj, row = next(objects, None), next(rows, None)


def _reindex(objects: ObjectStore, index: Index, info: ObjectInfo, scratch: Path) -> str | None:
    """Index an object the index lacks; return why it cannot be, or None when done."""
    path = scratch / "object.dcm"
    with path.open("wb") as handle:
        for chunk in objects.stream(info.key):
            handle.write(chunk)
    try:
        header = read_header(path)
    except InvalidInstance as exc:
        return exc.reason
    expected = layout.instance_key(
        header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
    )
    if expected != info.key:
        return f"its UIDs belong under {expected}"
    index.record(
        header, Origin(institution="", route="check"), info.size, sha256_file(path), info.key
    )
    return None


def check(
    objects: ObjectStore,
    index: Index,
    repair: bool = True,
    progress: Callable[[int], None] | None = None,
) -> CheckReport:
    """Compare the bucket's ``dicom/`` objects with the index; re-index what the index lacks."""
    report = CheckReport()
    with tempfile.TemporaryDirectory(prefix="pocketpacs-check-") as scratch:
        for obj, row in _merge(objects.list(layout.DICOM_PREFIX), index.iter_by_key()):
            if progress is not None:
                progress(1)
            report.objects += obj is not None
            report.rows += row is not None
            if obj is not None and row is None:
                if layout.parse_instance_key(obj.key) is None:
                    report.unusable_objects.append((obj.key, "not an instance key"))
                elif repair:
                    problem = _reindex(objects, index, obj, Path(scratch))
                    if problem:
                        report.unusable_objects.append((obj.key, problem))
                    else:
                        report.reindexed.append(obj.key)
                        report.rows += 1
                else:
                    report.unusable_objects.append((obj.key, "not indexed"))
            elif row is not None and obj is None:
                report.missing_objects.append(row)
            elif obj is not None and row is not None and obj.size != row.size:
                report.size_mismatches.append((row, obj.size))
    return report
