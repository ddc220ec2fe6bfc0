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
