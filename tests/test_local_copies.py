"""The local copies of recent originals (storage.local_copies): bounded, whole, and
found again after a restart."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from storage.local_copies import LocalCopies


def _blob(number: int, size: int = 1000) -> tuple[str, bytes]:
    data = bytes([number % 256]) * size
    return hashlib.sha256(data).hexdigest(), data


def test_copies_stay_within_their_bound_least_recently_used_first(tmp_path: Path) -> None:
    copies = LocalCopies(tmp_path / "copies", limit_bytes=3500)
    blobs = [_blob(n) for n in range(5)]
    for digest, data in blobs[:3]:
        copies.add_bytes(digest, data)
    assert copies.read(blobs[0][0]) == blobs[0][1]  # now the most recently used
    source = tmp_path / "received.dcm"
    source.write_bytes(blobs[3][1])
    copies.add_file(blobs[3][0], source)
    on_disk = sorted(p.name for p in (tmp_path / "copies").iterdir())
    assert sum((tmp_path / "copies" / name).stat().st_size for name in on_disk) <= 3500
    assert copies.read(blobs[1][0]) is None  # the least recently used went
    assert copies.read(blobs[0][0]) == blobs[0][1]
    assert copies.read(blobs[3][0]) == blobs[3][1]


def test_a_restart_finds_the_copies_and_drops_cut_off_ones(tmp_path: Path) -> None:
    directory = tmp_path / "copies"
    first = LocalCopies(directory, limit_bytes=10_000)
    digest, data = _blob(1)
    first.add_bytes(digest, data)
    (directory / ".tmp-cut-off").write_bytes(b"half a copy")
    again = LocalCopies(directory, limit_bytes=10_000)
    assert again.read(digest) == data
    assert not (directory / ".tmp-cut-off").exists()
    smaller = LocalCopies(directory, limit_bytes=10)  # a lower bound set since
    assert smaller.read(digest) is None
    assert list(directory.iterdir()) == []


def test_no_copies_when_turned_off(tmp_path: Path) -> None:
    copies = LocalCopies(tmp_path / "copies", limit_bytes=0)
    digest, data = _blob(2)
    copies.add_bytes(digest, data)
    assert copies.read(digest) is None
    assert not (tmp_path / "copies").exists()


def test_no_copies_while_the_disk_is_short_of_room(tmp_path: Path) -> None:
    """The spool shares the disk: copies are made only while it keeps `limit_bytes` free."""
    free = shutil.disk_usage(tmp_path).free
    copies = LocalCopies(tmp_path / "copies", limit_bytes=free + 1024**3)
    digest, data = _blob(3)
    copies.add_bytes(digest, data)
    assert copies.read(digest) is None
    assert list((tmp_path / "copies").iterdir()) == []


def test_another_process_reads_the_copies_it_does_not_keep(tmp_path: Path) -> None:
    """The HTTP process reads the copies the archive process keeps from C-STORE, and keeps
    its own elsewhere: what either adds, the HTTP side finds; the keeper alone evicts."""
    dicom = LocalCopies(tmp_path / "copies", limit_bytes=2500)
    http = LocalCopies(tmp_path / "copies-http", limit_bytes=2500, others=[tmp_path / "copies"])
    stored, posted, evicted = _blob(1), _blob(2), _blob(3)
    dicom.add_bytes(*stored)  # added after the reader started: found all the same
    http.add_bytes(*posted)
    assert http.read(stored[0]) == stored[1]
    assert http.read(posted[0]) == posted[1]
    assert dicom.read(posted[0]) is None  # the archive process does not read the HTTP side's
    dicom.add_bytes(*evicted)
    dicom.add_bytes(*_blob(4))  # over the bound: the least recently used copy goes
    assert http.read(stored[0]) is None
    assert sorted(p.name for p in (tmp_path / "copies-http").iterdir()) == [posted[0]]
