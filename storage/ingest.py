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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from storage import layout, metrics
from storage.header import InstanceHeader, InvalidInstance, Rejection, read_header
from storage.index import Index, IndexEntry, IndexRejected, IndexUnavailable, Origin
from storage.local_copies import LocalCopies
from storage.objects import ObjectStore, ObjectStoreUnavailable
from storage.rendering import with_pixels_window

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

    `expected_*` carry the UIDs the request named (a C-STORE request's SOP Class and
    Instance, a STOW-RS request's study), which the data set must match.
    """

    path: Path
    origin: Origin
    expected_sop_class_uid: str | None = None
    expected_sop_instance_uid: str | None = None
    expected_study_instance_uid: str | None = None


@dataclass(frozen=True)
class StoreResult:
    outcome: StoreOutcome
    reason: str = ""
    header: InstanceHeader | None = None
    object_key: str = ""
    size: int = 0
    sha256: str = ""  # of the stored bytes

    @property
    def sop_instance_uid(self) -> str:
        return self.header.sop_instance_uid if self.header else ""


Listener = Callable[[StoreResult], None]


def sha256_file(path: Path, chunk: int = 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class _InFlight:
    """SOP Instance UIDs being stored right now in this process.

    A batch waits until none of its UIDs is in another batch, so two copies of one
    instance never race for the same object key.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._uids: set[str] = set()

    @contextmanager
    def hold(self, uids: set[str]) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not uids & self._uids)
            self._uids |= uids
        try:
            yield
        finally:
            with self._changed:
                self._uids -= uids
                self._changed.notify_all()


class IngestPipeline:
    """Validate, deduplicate, put the bytes in the bucket and record them in the index.

    Work is done in batches: one duplicate query, the uploads in parallel, one index
    transaction. `store` is a batch of one.
    """

    def __init__(
        self,
        objects: ObjectStore,
        index: Index,
        upload_workers: int = 8,
        local_copies: LocalCopies | None = None,
    ) -> None:
        self.objects = objects
        self.index = index
        self.local_copies = local_copies  # a copy of each stored original kept on local disk
        self.listeners: list[Listener] = []
        self._in_flight = _InFlight()
        self._uploads = ThreadPoolExecutor(upload_workers, thread_name_prefix="upload")

    def close(self) -> None:
        """Wait for uploads under way and stop the upload threads."""
        self._uploads.shutdown(wait=True)

    def validate(self, item: InstanceToStore) -> InstanceHeader:
        """Parse and validate the header; raises `InvalidInstance`."""
        header = read_header(item.path, item.expected_sop_class_uid, item.expected_sop_instance_uid)
        expected_study = item.expected_study_instance_uid
        if expected_study and header.study_instance_uid != expected_study:
            raise InvalidInstance(
                "Study Instance UID differs from the request",
                Rejection.DOES_NOT_MATCH_SOP_CLASS,
            )
        return header

    def store(self, item: InstanceToStore, header: InstanceHeader | None = None) -> StoreResult:
        """Store one instance; success only once the object and the index row are durable."""
        return self.store_many([item], [header])[0]

    def store_many(
        self, items: Sequence[InstanceToStore], headers: Sequence[InstanceHeader | None] = ()
    ) -> list[StoreResult]:
        """Store instances, one result each in the same order, and count them as received."""
        started = time.perf_counter()
        results = self.commit_many(items, headers)
        for item, result in zip(items, results, strict=True):
            metrics.observe_store(item.origin.route, result.outcome, result.size, started)
        return results

    def commit_many(
        self, items: Sequence[InstanceToStore], headers: Sequence[InstanceHeader | None] = ()
    ) -> list[StoreResult]:
        """`store_many` without counting receptions: the spool counted them when it acknowledged."""
        known = list(headers) or [None] * len(items)
        results: list[StoreResult | None] = [None] * len(items)
        parsed: list[InstanceHeader | None] = [None] * len(items)
        first_of: dict[str, int] = {}
        repeats: list[tuple[int, int]] = []
        for position, (item, header) in enumerate(zip(items, known, strict=True)):
            try:
                header = header or self.validate(item)
            except InvalidInstance as exc:
                results[position] = StoreResult(StoreOutcome.rejected(exc.kind), exc.reason)
                continue
            except OSError as exc:
                reason = f"cannot read received data: {exc.strerror}"
                results[position] = StoreResult(StoreOutcome.OUT_OF_RESOURCES, reason)
                continue
            parsed[position] = header
            uid = header.sop_instance_uid
            if uid in first_of:
                repeats.append((position, first_of[uid]))
            else:
                first_of[uid] = position
        with self._in_flight.hold(set(first_of)):
            self._store_new({p: (items[p], parsed[p]) for p in first_of.values()}, results)
        for position, first in repeats:
            original = results[first]
            assert original is not None
            if original.outcome.ok:
                results[position] = StoreResult(
                    StoreOutcome.DUPLICATE,
                    "already stored",
                    parsed[position],
                    original.object_key,
                    original.size,
                )
            else:
                results[position] = original
        done = [result for result in results if result is not None]
        assert len(done) == len(items)
        for result in done:
            if result.outcome is StoreOutcome.STORED:
                for listener in self.listeners:
                    try:
                        listener(result)
                    except Exception:
                        log.exception("store listener %r failed", listener)
        return done

    def _store_new(
        self,
        todo: dict[int, tuple[InstanceToStore, InstanceHeader]],
        results: list[StoreResult | None],
    ) -> None:
        """Duplicate check, uploads, one index transaction; fills `results` at each position."""
        if not todo:
            return
        try:
            existing = self.index.find_many(h.sop_instance_uid for _, h in todo.values())
        except IndexUnavailable as exc:
            for position, (_, header) in todo.items():
                reason = f"index unavailable: {exc}"
                results[position] = StoreResult(StoreOutcome.OUT_OF_RESOURCES, reason, header)
            return
        uploads: dict[int, Future[IndexEntry]] = {}
        for position, (item, header) in todo.items():
            stored = existing.get(header.sop_instance_uid)
            if stored is not None:
                results[position] = self._duplicate(item, header, stored.sha256, stored.object_key)
            else:
                uploads[position] = self._uploads.submit(self._upload, item, header)
        entries: dict[int, IndexEntry] = {}
        for position, future in uploads.items():
            header = todo[position][1]
            try:
                entries[position] = future.result()
            except ObjectStoreUnavailable as exc:
                reason = f"object store unavailable: {exc}"
                results[position] = StoreResult(StoreOutcome.OUT_OF_RESOURCES, reason, header)
            except OSError as exc:
                reason = f"cannot read received data: {exc.strerror}"
                results[position] = StoreResult(StoreOutcome.OUT_OF_RESOURCES, reason, header)
        if not entries:
            return
        try:
            inserted = self.index.record_many(list(entries.values()))
        except IndexRejected:
            # One data set holds a value the database refuses: record them one by one, so
            # only that one is refused and the rest of the batch is stored.
            inserted = set()
            for position, entry in list(entries.items()):
                try:
                    inserted |= self.index.record_many([entry])
                except (IndexRejected, IndexUnavailable) as exc:
                    self._remove_quietly(entry.object_key)
                    outcome = (
                        StoreOutcome.CANNOT_UNDERSTAND
                        if isinstance(exc, IndexRejected)
                        else StoreOutcome.OUT_OF_RESOURCES
                    )
                    results[position] = StoreResult(outcome, f"index: {exc}"[:200], entry.header)
                    del entries[position]
        except IndexUnavailable as exc:
            for position, entry in entries.items():
                self._remove_quietly(entry.object_key)
                reason = f"index unavailable: {exc}"
                results[position] = StoreResult(StoreOutcome.OUT_OF_RESOURCES, reason, entry.header)
            return
        for position, entry in entries.items():
            if entry.header.sop_instance_uid in inserted:
                outcome, reason = StoreOutcome.STORED, ""
            else:
                # Another process indexed the same instance between our check and our insert.
                outcome, reason = StoreOutcome.DUPLICATE, "already stored"
            results[position] = StoreResult(
                outcome, reason, entry.header, entry.object_key, entry.size, entry.sha256
            )

    def _upload(self, item: InstanceToStore, header: InstanceHeader) -> IndexEntry:
        key = layout.instance_key(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
        )
        size = item.path.stat().st_size
        digest = sha256_file(item.path)
        self.objects.put_file(key, item.path)
        if self.local_copies is not None:
            self.local_copies.add_file(digest, item.path)
        if header.pixels is not None:  # here, beside the upload, not before the answer
            header = replace(header, pixels=with_pixels_window(header.pixels, item.path))
        return IndexEntry(header, item.origin, size, digest, key)

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
