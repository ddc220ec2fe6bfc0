"""A fsynced write-ahead spool in front of the ingest pipeline.

Why: a SeaweedFS or MinIO PUT takes 10 to 20 ms, and a C-STORE sender waits for each
answer before sending the next instance, so storing synchronously would cap one
association at 50 to 80 instances/s. The spool answers success once the validated file
is fsynced on local disk (a few ms) and workers move it into the bucket and the index
with the same `IngestPipeline.store` every other route uses.

Rules that keep it honest:
- an instance is acknowledged only after its file and its directory entry are fsynced;
- at start the spool is replayed before the DICOM listener opens;
- while the bucket or the index fails, new instances get 0xA700, so the spool absorbs
  a short burst, never an outage;
- the spool is bounded (`limit_bytes`); past it senders get 0xA700 too.

While senders are active the drain stands back: on a small machine the PUTs, the index
writes and the S3 server take as much CPU and disk as receiving does, and draining at the
same time halves the rate every sender sees (bench/RESULTS.md). An acknowledged instance
is already durable here, so the drain waits for a pause of `QUIET_SECONDS`, within
bounds: never once the oldest waiting instance has waited `defer_seconds` (so under a
steady stream instances still reach the index that much later at most), nor once the
spool holds half its limit.

Layout under the spool directory: ``incoming/`` receives data as it arrives (pynetdicom's
temporary files; never acknowledged, cleared at start), ``ready/`` holds acknowledged
instances waiting for the bucket, ``rejected/`` keeps files that fail validation on replay.
The file name carries the SOP Instance UID and the origin, so nothing else must be synced.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from storage import metrics
from storage.header import InstanceHeader, InvalidInstance
from storage.index import Origin
from storage.ingest import IngestPipeline, InstanceToStore, StoreOutcome, StoreResult

log = logging.getLogger(__name__)

RETRY_SECONDS = 2.0
# A pause in receiving this long lets the drain run (see the module docstring).
QUIET_SECONDS = 0.3
# A drain batch: this many instances or this many bytes, whichever comes first.
BATCH_INSTANCES = 32
BATCH_BYTES = 256 * 1024 * 1024


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode_origin(origin: Origin, received_at: datetime) -> str:
    data = {
        "i": origin.institution,
        "a": origin.calling_ae,
        "r": origin.route,
        "t": received_at.timestamp(),
    }
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_origin(text: str) -> Origin:
    data = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    return Origin(
        institution=data["i"],
        calling_ae=data["a"],
        route=data["r"],
        received_at=datetime.fromtimestamp(data["t"], UTC),
    )


class IncomingFile:
    """A data set being received into ``incoming/``, by any route (C-STORE, STOW-RS):
    written as it arrives, then offered to `Spool.accept` by its path, then discarded (the
    spool keeps its own hard link to what it accepted)."""

    def __init__(self, directory: Path) -> None:
        self._fd, name = tempfile.mkstemp(suffix=".dcm", dir=directory)
        self.path = Path(name)

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


class SpoolBusy(RuntimeError):
    """The spool directory belongs to another running process."""


@dataclass(frozen=True)
class _Pending:
    uid: str  # SOP Instance UID
    path: Path
    origin: Origin
    header: InstanceHeader | None
    size: int
    accepted_at: float = 0.0  # time.monotonic() when acknowledged; 0 for replayed files


class Spool:
    """Durable acceptance now, storage in the bucket and index moments later."""

    def __init__(
        self,
        directory: Path,
        pipeline: IngestPipeline,
        workers: int = 2,
        limit_bytes: int = 20 * 1024**3,
        defer_seconds: float = 30.0,
    ) -> None:
        self.directory = directory
        self.incoming = directory / "incoming"
        self.ready = directory / "ready"
        self.rejected = directory / "rejected"
        for folder in (self.incoming, self.ready, self.rejected):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock_file = self._take_ownership(directory / ".lock")
        self.pipeline = pipeline
        self.workers = workers
        self.limit_bytes = limit_bytes
        self.defer_seconds = defer_seconds
        self._last_accept = 0.0
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending_bytes = 0
        self._pending_uids: set[str] = set()
        self._idle = threading.Condition(self._lock)
        self._failure: str | None = None
        self._threads: list[threading.Thread] = []

    @staticmethod
    def _take_ownership(path: Path) -> int:
        """One process per spool: a second would discard the first one's incoming data."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolBusy(
                f"another pocketpacs process is using {path.parent}; "
                "give each one its own data directory"
            ) from None
        return fd

    def close(self) -> None:
        """Stop the workers (after draining) and release the spool to another process."""
        self.stop()
        if self._lock_file >= 0:
            os.close(self._lock_file)
            self._lock_file = -1

    # acceptance -------------------------------------------------------------------------

    @property
    def failure(self) -> str | None:
        """Why the last drain attempt failed, while the bucket or index is failing."""
        return self._failure

    @property
    def pending(self) -> int:
        return len(self._pending_uids)

    def accept(self, item: InstanceToStore) -> StoreResult:
        """Validate, fsync into ``ready/`` and answer; the file is hard-linked there, not copied."""
        started = time.perf_counter()
        self._last_accept = time.monotonic()
        result = self._accept(item)
        metrics.observe_store(item.origin.route, result.outcome, result.size, started)
        return result

    def _accept(self, item: InstanceToStore) -> StoreResult:
        try:
            header = self.pipeline.validate(item)
        except InvalidInstance as exc:
            return StoreResult(StoreOutcome.rejected(exc.kind), exc.reason)
        uid = header.sop_instance_uid
        size = item.path.stat().st_size
        with self._lock:
            if self._failure is not None:
                reason = f"storage unavailable: {self._failure}"[:200]
                return StoreResult(StoreOutcome.OUT_OF_RESOURCES, reason, header)
            if uid in self._pending_uids:
                # The same instance is already acknowledged and on its way to the bucket.
                return StoreResult(StoreOutcome.DUPLICATE, "already received", header, size=size)
            if self._pending_bytes + size > self.limit_bytes:
                return StoreResult(StoreOutcome.OUT_OF_RESOURCES, "ingest spool is full", header)
            self._reserve(uid, size)
        target = self.ready / f"{uid}~{_encode_origin(item.origin, datetime.now(UTC))}.dcm"
        try:
            fd = os.open(item.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.link(item.path, target)
            _fsync_dir(self.ready)
        except OSError as exc:
            target.unlink(missing_ok=True)
            self._release(uid, size)
            reason = f"cannot write the ingest spool: {exc.strerror}"
            return StoreResult(StoreOutcome.OUT_OF_RESOURCES, reason, header)
        self._queue.put(_Pending(uid, target, item.origin, header, size, time.monotonic()))
        return StoreResult(StoreOutcome.STORED, "", header, size=size)

    def _reserve(self, uid: str, size: int) -> None:
        """Count an instance as pending; the caller holds the lock."""
        self._pending_uids.add(uid)
        self._pending_bytes += size
        metrics.SPOOL_PENDING.set(len(self._pending_uids))

    def _release(self, uid: str, size: int) -> None:
        with self._idle:
            self._pending_uids.discard(uid)
            self._pending_bytes -= size
            metrics.SPOOL_PENDING.set(len(self._pending_uids))
            if not self._pending_uids:
                self._idle.notify_all()

    # draining -------------------------------------------------------------------------

    def replay(self) -> int:
        """Store what an earlier run acknowledged but did not finish; call before listening.

        Returns how many instances were replayed. Anything that cannot be stored now stays
        queued for the workers.
        """
        for leftover in self.incoming.iterdir():
            leftover.unlink(missing_ok=True)  # never acknowledged: the sender saw no success
        found = sorted(self.ready.glob("*.dcm"))
        if not found:
            return 0
        log.info("replaying %d spooled instances", len(found))
        for path in found:
            try:
                origin = _decode_origin(path.stem.split("~", 1)[1])
            except (IndexError, ValueError, KeyError):
                origin = Origin(institution="", route="cstore")
            size = path.stat().st_size
            uid = path.name.split("~", 1)[0]
            with self._lock:
                self._reserve(uid, size)
            self._queue.put(_Pending(uid, path, origin, None, size))
        self.start()
        while not self.wait_idle(timeout=1.0):
            if self._failure is not None:
                log.error(
                    "replay paused, storage unavailable (%s): %d instances stay spooled and are "
                    "stored when it returns; new instances get 0xA700 until then",
                    self._failure,
                    self.pending,
                )
                break
        return len(found)

    def start(self) -> None:
        if self._threads:
            return
        for number in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"spool-drain-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued (within `timeout`), then stop the workers."""
        self.wait_idle(timeout=timeout)
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()

    def wait_idle(self, timeout: float | None = 30.0) -> bool:
        """Block until every acknowledged instance is in the bucket and index, or time out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._pending_uids:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(remaining if remaining is not None else 1.0)
        return True

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            self._stand_back(first)
            batch = [first]
            size = first.size
            while len(batch) < BATCH_INSTANCES and size < BATCH_BYTES:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # leave the stop signal for this worker's next turn
                    break
                batch.append(more)
                size += more.size
            self._drain(batch)

    def _stand_back(self, oldest: _Pending) -> None:
        """Wait while senders are active, within the bounds of the module docstring."""
        while True:
            now = time.monotonic()
            quiet = now - self._last_accept
            waited = now - oldest.accepted_at
            if (
                quiet >= QUIET_SECONDS
                or waited >= self.defer_seconds
                or self._pending_bytes * 2 >= self.limit_bytes
            ):
                return
            time.sleep(min(QUIET_SECONDS - quiet, self.defer_seconds - waited))

    def _drain(self, batch: list[_Pending]) -> None:
        """Store a batch through the pipeline, retrying what fails for want of resources."""
        while batch:
            items = [InstanceToStore(p.path, p.origin) for p in batch]
            results = self.pipeline.commit_many(items, [p.header for p in batch])
            retry = []
            for pending, result in zip(batch, results, strict=True):
                if result.outcome is StoreOutcome.OUT_OF_RESOURCES:
                    retry.append(pending)
                    continue
                if result.outcome.ok:
                    pending.path.unlink(missing_ok=True)
                    metrics.SPOOL_DRAINED.inc()
                else:
                    self._set_aside(pending, result.reason)
                self._release(pending.uid, pending.size)
            if retry:
                reason = next(
                    r.reason for r in results if r.outcome is StoreOutcome.OUT_OF_RESOURCES
                )
                if self._failure is None:
                    log.error("ingest spool cannot drain: %s; refusing new instances", reason)
                self._failure = reason
                metrics.SPOOL_RETRIES.inc()
                time.sleep(RETRY_SECONDS)
            elif self._failure is not None:
                log.info("ingest spool drains again")
                self._failure = None
            batch = retry

    def _set_aside(self, pending: _Pending, reason: str) -> None:
        """Keep a spooled file that fails validation on replay, with the reason beside it."""
        destination = self.rejected / pending.path.name
        os.replace(pending.path, destination)
        destination.with_suffix(".reason.txt").write_text(reason + "\n")
        log.error("spooled file %s set aside: %s", pending.path.name, reason)
