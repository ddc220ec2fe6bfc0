"""The one ingest pipeline: parse, validate, store the bytes, index. C-STORE, STOW-RS and
`pocketpacs import` all hand it an `InstanceToStore` and get back a `StoreResult`.

The order is fixed (after Orthanc's ServerContext::Store): validate, duplicate check,
write the object, write the index row, remove the object if indexing fails, then notify
listeners, whose errors are logged and never fail the store.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from storage import layout, metrics
from storage.header import InstanceHeader, InvalidInstance, Rejection, read_header
from storage.index import Index, IndexUnavailable, Origin
from storage.objects import ObjectStore, ObjectStoreUnavailable

log = logging.getLogger(__name__)


class StoreOutcome(enum.Enum):
    """What became of one instance, with the status each protocol face reports for it.

    The DIMSE codes are PS3.4 B.2.3 (Storage Service Class); the HTTP codes are what a
    single-instance HTTP request answers, so the two faces never disagree.
    """

    STORED = ("stored", 0x0000, 200)
    DUPLICATE = ("duplicate", 0x0000, 200)
    DOES_NOT_MATCH_SOP_CLASS = ("does not match SOP class", 0xA900, 400)
    CANNOT_UNDERSTAND = ("cannot understand", 0xC000, 400)
    OUT_OF_RESOURCES = ("out of resources", 0xA700, 503)

    def __init__(self, label: str, dimse_status: int, http_status: int) -> None:
        self.label = label
        self.dimse_status = dimse_status
        self.http_status = http_status

    @property
    def ok(self) -> bool:
        return self.dimse_status == 0x0000

    @classmethod
    def rejected(cls, kind: Rejection) -> StoreOutcome:
        return {
            Rejection.CANNOT_UNDERSTAND: cls.CANNOT_UNDERSTAND,
            Rejection.DOES_NOT_MATCH_SOP_CLASS: cls.DOES_NOT_MATCH_SOP_CLASS,
        }[kind]


@dataclass(frozen=True)
class InstanceToStore:
    """A received Part 10 file on local disk and who sent it.

    `expected_*` carry the UIDs a C-STORE request named, which the data set must match.
    """

    path: Path
    origin: Origin
    expected_sop_class_uid: str | None = None
    expected_sop_instance_uid: str | None = None


@dataclass(frozen=True)
class StoreResult:
    outcome: StoreOutcome
    reason: str = ""
    header: InstanceHeader | None = None
    object_key: str = ""
    size: int = 0

    @property
    def sop_instance_uid(self) -> str:
        return self.header.sop_instance_uid if self.header else ""

    @property
    def sop_class_uid(self) -> str:
        return self.header.sop_class_uid if self.header else ""


Listener = Callable[[StoreResult], None]


def sha256_file(path: Path, chunk: int = 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class _KeyedLocks:
    """One lock per key, alive only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


class IngestPipeline:
    """Validate, deduplicate, put the bytes in the bucket and record them in the index."""

    def __init__(self, objects: ObjectStore, index: Index) -> None:
        self.objects = objects
        self.index = index
        self.listeners: list[Listener] = []
        self._same_instance = _KeyedLocks()

    def validate(self, item: InstanceToStore) -> InstanceHeader:
        """Parse and validate the header; raises `InvalidInstance`."""
        return read_header(item.path, item.expected_sop_class_uid, item.expected_sop_instance_uid)

    def store(self, item: InstanceToStore, header: InstanceHeader | None = None) -> StoreResult:
        """Store one instance; success only once the object and the index row are durable."""
        started = time.perf_counter()
        result = self.commit(item, header)
        metrics.observe_store(item.origin.route, result.outcome, result.size, started)
        return result

    def commit(self, item: InstanceToStore, header: InstanceHeader | None = None) -> StoreResult:
        """`store` without counting a reception: the spool counted it when it acknowledged."""
        result = self._store(item, header)
        if result.outcome is StoreOutcome.STORED:
            for listener in self.listeners:
                try:
                    listener(result)
                except Exception:
                    log.exception("store listener %r failed", listener)
        return result

    def _store(self, item: InstanceToStore, header: InstanceHeader | None) -> StoreResult:
        try:
            header = header or self.validate(item)
        except InvalidInstance as exc:
            return StoreResult(StoreOutcome.rejected(exc.kind), exc.reason)
        except OSError as exc:
            return StoreResult(StoreOutcome.OUT_OF_RESOURCES, f"cannot read received data: {exc}")
        key = layout.instance_key(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
        )
        with self._same_instance.hold(header.sop_instance_uid):
            try:
                existing = self.index.find(header.sop_instance_uid)
                if existing is not None:
                    return self._duplicate(item, header, existing.sha256, existing.object_key)
                size = item.path.stat().st_size
                digest = sha256_file(item.path)
                self.objects.put_file(key, item.path)
            except IndexUnavailable as exc:
                return StoreResult(
                    StoreOutcome.OUT_OF_RESOURCES, f"index unavailable: {exc}", header
                )
            except ObjectStoreUnavailable as exc:
                return StoreResult(
                    StoreOutcome.OUT_OF_RESOURCES, f"object store unavailable: {exc}", header
                )
            try:
                inserted = self.index.record(header, item.origin, size, digest, key)
            except IndexUnavailable as exc:
                self._remove_quietly(key)
                return StoreResult(
                    StoreOutcome.OUT_OF_RESOURCES, f"index unavailable: {exc}", header
                )
        if not inserted:
            # Another process indexed the same instance between our check and our insert.
            return StoreResult(StoreOutcome.DUPLICATE, "already stored", header, key, size)
        return StoreResult(StoreOutcome.STORED, "", header, key, size)

    def _duplicate(
        self, item: InstanceToStore, header: InstanceHeader, stored_sha256: str, key: str
    ) -> StoreResult:
        """The first copy of an instance wins, as in Orthanc and dcm4chee by default."""
        size = item.path.stat().st_size
        if sha256_file(item.path) != stored_sha256:
            log.warning(
                "%s sent SOP Instance %s again with different content; the first copy is kept",
                item.origin.calling_ae or item.origin.institution,
                header.sop_instance_uid,
            )
            metrics.DUPLICATES_DIFFERING.inc()
        return StoreResult(StoreOutcome.DUPLICATE, "already stored", header, key, size)

    def _remove_quietly(self, key: str) -> None:
        try:
            self.objects.delete(key)
        except ObjectStoreUnavailable:
            log.warning("could not remove %s after a failed index write; `check` will", key)
