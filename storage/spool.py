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

Layout under the spool directory: ``files/`` is the pool data sets are received into
(`SpoolFiles`), ``incoming/`` holds pynetdicom's temporary files for the associations it
serves (never acknowledged, cleared at start), ``ready/`` holds hard links to acknowledged
instances waiting for the bucket, ``rejected/`` keeps files that fail validation on replay.
A ready file's name carries the SOP Instance UID and the origin, so nothing else must be
synced.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import queue
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
# Files created ahead of need in an empty spool (see `SpoolFiles`): a burst of this many
# instances is received without creating a file.
SPARE_FILES = 1024


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


class SpoolFiles:
    """The files data sets are received into, recycled rather than deleted.

    Why: creating a file on ext4 costs from 20 us to about 1 ms of kernel time, more the
    more files were deleted in the last minutes (ext4 reads every recently freed inode it
    passes over to avoid reusing it), and a spool that deletes each file it drains is that
    worst case: at 400 instances/s creating files took a fifth of the archive's CPU. So a
    drained file goes back to this pool and the next data set overwrites it in place, and
    `prepare` creates spare files in the background before the first burst.

    A file here is free only while no other name links to it: once `Spool.accept` links
    it into ``ready/`` it is held until the drain has stored it. A drained file keeps its
    old content, already in the bucket, to be overwritten in place, up to `keep_bytes` in
    all; a file whose data set was refused or cut off is emptied before it is reused.
    """

    def __init__(self, directory: Path, keep_bytes: int) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.keep_bytes = keep_bytes
        self._lock = threading.Lock()
        self._free: dict[Path, int] = {}  # path -> size of its old content
        self._free_bytes = 0
        self._held: set[Path] = set()
        self._next = 0
        for path in directory.iterdir():
            stat = path.stat()
            with contextlib.suppress(ValueError):
                self._next = max(self._next, int(path.stem) + 1)
            if stat.st_nlink > 1:
                # Held by a ready/ or rejected/ entry when the last run stopped: that name
                # keeps the data; this one is dropped so the file can never be overwritten.
                path.unlink()
            else:
                # Perhaps a data set cut off when the last run stopped: emptied, not kept.
                os.truncate(path, 0)
                self._keep(path, 0)

    def __contains__(self, path: Path) -> bool:
        return path.parent == self.directory

    @property
    def free(self) -> int:
        return len(self._free)

    def _keep(self, path: Path, size: int) -> None:
        """Put a file in the free pool, or delete it past `keep_bytes`; lock held or unshared."""
        if self._free_bytes + size > self.keep_bytes:
            path.unlink(missing_ok=True)
            return
        self._free[path] = size
        self._free_bytes += size

    def _create(self) -> Path:
        with self._lock:
            path = self.directory / f"{self._next:08d}.dcm"
            self._next += 1
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return path

    def take(self) -> Path:
        """A file to receive into: a free one, or a new one when none is free."""
        with self._lock:
            if self._free:
                path, size = self._free.popitem()
                self._free_bytes -= size
                return path
        return self._create()

    def give_back(self, path: Path) -> None:
        """Return a file `take` gave out, emptied; a file the spool holds stays held."""
        with self._lock:
            if path in self._held:
                return
        os.truncate(path, 0)
        with self._lock:
            self._keep(path, 0)

    def hold(self, path: Path) -> None:
        """The spool linked this file into ``ready/``: not free until `release`."""
        with self._lock:
            self._held.add(path)

    def release(self, path: Path, size: int, keep: bool = True) -> None:
        """The spool is done with a held file; with `keep` False its name is removed too
        (another name, in ``rejected/``, still holds the data)."""
        with self._lock:
            self._held.discard(path)
            if keep:
                self._keep(path, size)
            else:
                path.unlink(missing_ok=True)

    def prepare(self, count: int) -> None:
        """Create empty files until `count` are free (run in the background)."""
        while self.free < count:
            path = self._create()
            with self._lock:
                self._keep(path, 0)


class IncomingFile:
    """A data set being received, by any route (C-STORE, STOW-RS): written as it arrives
    into a file of the spool's pool, then offered to `Spool.accept` by its path, then
    discarded (the spool keeps the file if it accepted it)."""

    def __init__(self, files: SpoolFiles) -> None:
        self._files = files
        self.path = files.take()
        self._fd = os.open(self.path, os.O_WRONLY)
        self._size = 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        self._size += len(view)
        while view:
            view = view[os.write(self._fd, view) :]

    def write_many(self, chunks: list[memoryview]) -> None:
        """Write consecutive chunks with as few system calls as the kernel allows."""
        total = sum(len(chunk) for chunk in chunks)
        written = os.writev(self._fd, chunks)
        self._size += written
        if written < total:
            self.write(b"".join(chunks)[written:])

    def close(self) -> None:
        """Finish the file: a recycled file is cut to what this data set wrote."""
        if self._fd >= 0:
            try:
                os.ftruncate(self._fd, self._size)
            finally:
                os.close(self._fd)
                self._fd = -1

    def discard(self) -> None:
        self.close()
        self._files.give_back(self.path)


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
    slot: Path | None = None  # the file of `files` linked to `path`, if any


class Spool:
    """Durable acceptance now, storage in the bucket and index moments later."""

    def __init__(
        self,
        directory: Path,
        pipeline: IngestPipeline,
        workers: int = 2,
        limit_bytes: int = 20 * 1024**3,
        defer_seconds: float = 30.0,
        spare_files: int = SPARE_FILES,
    ) -> None:
        self.directory = directory
        self.incoming = directory / "incoming"
        self.ready = directory / "ready"
        self.rejected = directory / "rejected"
        for folder in (self.incoming, self.ready, self.rejected):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock_file = self._take_ownership(directory / ".lock")
        self.files = SpoolFiles(directory / "files", keep_bytes=limit_bytes // 4)
        self.pipeline = pipeline
        self.workers = workers
        self.limit_bytes = limit_bytes
        self.defer_seconds = defer_seconds
        self.spare_files = spare_files
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

    def health(self) -> dict:
        """What /healthz reports of this spool: ok while draining works, the instances
        waiting, the spare files ready for new ones, and why draining fails if it does."""
        report: dict = {"ok": self._failure is None, "pending": self.pending}
        report["free_files"] = self.files.free
        if self._failure:
            report["error"] = self._failure
        return report

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
        slot = item.path if item.path in self.files else None
        if slot is not None:
            self.files.hold(slot)
        self._queue.put(_Pending(uid, target, item.origin, header, size, time.monotonic(), slot))
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
        threading.Thread(target=self._prepare_files, name="spool-files", daemon=True).start()
        for number in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"spool-drain-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _prepare_files(self) -> None:
        """Create spare files at the lowest CPU priority, so receiving never waits on it."""
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            self.files.prepare(self.spare_files)
        except OSError as exc:
            log.warning("cannot prepare spool files: %s", exc)

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
                    if pending.slot is not None:
                        self.files.release(pending.slot, pending.size)
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
        if pending.slot is not None:
            self.files.release(pending.slot, pending.size, keep=False)
        destination.with_suffix(".reason.txt").write_text(reason + "\n")
        log.error("spooled file %s set aside: %s", pending.path.name, reason)
