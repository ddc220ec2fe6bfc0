"""Copies of recently stored and recently read originals on the archive's own disk.

Why: the first rendering of an instance, which is what a patient opening a new pocket
film link or a doctor glancing at a new study waits for, reads the original from the
bucket. A GET from the embedded SeaweedFS takes about 2 ms for a 0.5 MB CT slice and
11 ms for a 10 MB CR, as long as the rendering itself (bench/RESULTS-render.md); the local
disk, mostly its page cache, answers in a tenth of that.

A copy is named by the SHA-256 of its bytes, so it can never be stale: an instance whose
bytes differ has another name. The bucket stays the only place an original is kept: a copy
lost, evicted or never made costs one GET, and the directory can be deleted at any time.
Least recently used copies go first once the copies exceed `limit_bytes`, and none is
made while the disk has less than `limit_bytes` free: the spool, on the same disk, needs
the room more.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)


class LocalCopies:
    """Originals by SHA-256 under `directory`, at most `limit_bytes` in all (0: none kept).

    Each process keeps a directory of its own (it alone adds, counts and evicts there) and
    may read those of the archive's other processes (`others`)."""

    def __init__(self, directory: Path, limit_bytes: int, others: Sequence[Path] = ()) -> None:
        self.directory = directory
        self.limit_bytes = limit_bytes
        self.others = list(others)
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()  # digest -> size, oldest first
        self._total = 0
        if limit_bytes <= 0:
            return
        directory.mkdir(parents=True, exist_ok=True)
        found = []
        for path in directory.iterdir():
            if path.name.startswith("."):  # a copy cut off when the last run stopped
                path.unlink(missing_ok=True)
                continue
            stat = path.stat()
            found.append((stat.st_atime, path.name, stat.st_size))
        for _, digest, size in sorted(found):
            self._sizes[digest] = size
            self._total += size
        self._evict()

    def read(self, sha256: str) -> bytes | None:
        """The original with this digest, or None when there is no copy."""
        with self._lock:
            mine = sha256 in self._sizes
            if mine:
                self._sizes.move_to_end(sha256)
        if mine:
            try:
                return _read(os.path.join(self.directory, sha256))
            except OSError:
                self._forget(sha256)
        for directory in self.others:
            try:
                return _read(os.path.join(directory, sha256))
            except OSError:
                continue  # none there, or evicted by its keeper meanwhile
        return None

    def add_file(self, sha256: str, source: Path) -> None:
        """Keep a copy of the file `source` (its digest `sha256`), if there is room."""
        self._add(sha256, lambda target: shutil.copyfile(source, target))

    def add_bytes(self, sha256: str, data: bytes) -> None:
        """Keep a copy of `data` (its digest `sha256`), if there is room."""
        self._add(sha256, lambda target: Path(target).write_bytes(data))

    def _add(self, sha256: str, write) -> None:
        """Write through a temporary name, so a copy under its digest is always whole. A copy
        that cannot be written (the disk full, say) is only a copy not kept."""
        if self.limit_bytes <= 0:
            return
        with self._lock:
            if sha256 in self._sizes:
                return
        try:
            if shutil.disk_usage(self.directory).free < self.limit_bytes:
                return
        except OSError:
            return
        handle, temporary = tempfile.mkstemp(prefix=".", dir=self.directory)
        os.close(handle)
        try:
            write(temporary)
            size = os.path.getsize(temporary)
            os.replace(temporary, self.directory / sha256)
        except OSError as exc:
            log.debug("no local copy of %s: %s", sha256, exc)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            return
        with self._lock:
            if sha256 not in self._sizes:
                self._sizes[sha256] = size
                self._total += size
        self._evict()

    def _forget(self, sha256: str) -> None:
        with self._lock:
            self._total -= self._sizes.pop(sha256, 0)

    def _evict(self) -> None:
        while True:
            with self._lock:
                if self._total <= self.limit_bytes or not self._sizes:
                    return
                digest, size = self._sizes.popitem(last=False)
                self._total -= size
            (self.directory / digest).unlink(missing_ok=True)


def _read(path: str) -> bytes:
    """A file's bytes, unbuffered: `Path.read_bytes`, with its path object and buffered
    reader, took 190 µs instead of 130 to read a 128 KB copy with the processor's caches
    cold."""
    with open(path, "rb", buffering=0) as handle:
        return handle.readall()
