"""Rendered frames kept as derived objects in the bucket (SPEC 4), and the worker that
makes series and study thumbnails after ingest.

A rendition's key names the instance, the SHA-256 of its stored bytes, the frame and every
rendering parameter: the same request is served from the bucket without decoding again,
and an instance whose bytes change never meets a rendition of the old ones. Everything
under `derived/rendered/` can be deleted at any time; it is made again when asked for.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO

from pydicom import dcmread

from storage import layout, metrics
from storage.frames import FrameNotFound
from storage.index import Index
from storage.ingest import StoreResult
from storage.objects import ObjectNotFound, ObjectStore, ObjectStoreUnavailable
from storage.query import Located, Query, QueryLevel, Viewer, locate
from storage.rendering import Rendering, number_of_frames, render

log = logging.getLogger(__name__)

RENDERED_PREFIX = f"{layout.DERIVED_PREFIX}rendered/"
# What a thumbnail is when nothing else is asked: what the worker makes ahead of time.
THUMBNAIL = Rendering("image/jpeg", viewport=(256, 256))
_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}


def rendition_key(item: Located, frame: int | None, rendering: Rendering) -> str:
    """Where the rendition of frame `frame` (None: the middle one) is kept."""
    parameters = repr((rendering.media_type, rendering.viewport, rendering.window))
    parameters += f"|{rendering.quality}"
    digest = hashlib.sha256(parameters.encode()).hexdigest()[:16]
    return (
        f"{RENDERED_PREFIX}{item.study_instance_uid}/{item.series_instance_uid}/"
        f"{item.sop_instance_uid}/{item.sha256[:16]}/{frame or 'middle'}-{digest}."
        f"{_EXTENSIONS[rendering.media_type]}"
    )


def representatives(located: list[Located]) -> list[Located]:
    """The middle instance of each series, in series order (`locate` gives instances in
    series and instance number order): a series' representative image, and, the first
    that holds an image, its study's."""
    series: dict[str, list[Located]] = {}
    for item in located:
        series.setdefault(item.series_instance_uid, []).append(item)
    return [items[(len(items) - 1) // 2] for items in series.values()]


def _middle_frame(source: BinaryIO) -> int:
    header = dcmread(source, stop_before_pixels=True)
    source.seek(0)
    return (number_of_frames(header) + 1) // 2


@dataclass(frozen=True)
class Rendition:
    data: bytes
    cached: bool  # kept from before, not decoded now


class Renditions:
    """Rendered frames: from the bucket when made before, else rendered and kept."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects

    def rendered(self, item: Located, frame: int | None, rendering: Rendering) -> Rendition:
        """Frame `frame` (1-based; None: the middle one) of `item`, rendered.

        FrameNotFound, Undecodable (storage.rendering), ObjectStoreUnavailable."""
        key = rendition_key(item, frame, rendering)
        try:
            return Rendition(self.objects.get(key), cached=True)
        except ObjectNotFound:
            pass
        with self.objects.open(item.object_key, item.size) as source:
            number = _middle_frame(source) if frame is None else frame
            data = render(source, number, rendering)
        try:
            self.objects.put_bytes(key, data, rendering.media_type)
        except ObjectStoreUnavailable as exc:
            log.warning("rendition not kept (%s): %s", key, exc)
        return Rendition(data, cached=False)


class ThumbnailWorker:
    """Makes the thumbnail of every series that received instances, once it has been
    quiet for `quiet_seconds` (its middle slice moves while slices arrive), in a thread of
    its own: a store never waits for it. Bound to the ingest pipeline as a listener; a
    thumbnail not made yet is rendered when asked for, so a lost one costs only time."""

    def __init__(self, index: Index, renditions: Renditions, quiet_seconds: float = 2.0) -> None:
        self.index = index
        self.renditions = renditions
        self.quiet_seconds = quiet_seconds
        self._changed: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="thumbnails", daemon=True)

    def __call__(self, result: StoreResult) -> None:
        """A stored instance (pipeline listener): its series is due for a thumbnail."""
        header = result.header
        if header is None:
            return
        with self._lock:
            self._changed[(header.study_instance_uid, header.series_instance_uid)] = (
                time.monotonic()
            )
        self._wake.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)

    def idle(self) -> bool:
        """No series waiting for its thumbnail (tests, and /healthz one day)."""
        with self._lock:
            return not self._changed

    def _due(self) -> tuple[list[tuple[str, str]], float | None]:
        """Series quiet long enough, and how long until the next one is."""
        now = time.monotonic()
        with self._lock:
            due = [s for s, at in self._changed.items() if now - at >= self.quiet_seconds]
            waits = [self.quiet_seconds - (now - at) for at in self._changed.values()]
        return due, min((w for w in waits if w > 0), default=None)

    def _run(self) -> None:
        while not self._stopping:
            due, wait = self._due()
            for key in due:
                started = time.monotonic()
                self._make(*key)
                with self._lock:
                    if self._changed.get(key, started) <= started:  # nothing new meanwhile
                        self._changed.pop(key, None)
            if not due:
                self._wake.wait(timeout=wait)
                self._wake.clear()

    def _make(self, study: str, series: str) -> None:
        query = Query(QueryLevel.SERIES, {"StudyInstanceUID": study, "SeriesInstanceUID": series})
        try:
            located = locate(self.index, query, Viewer.archive())
            for item in representatives(located):
                if not self.renditions.rendered(item, None, THUMBNAIL).cached:
                    metrics.THUMBNAILS_MADE.inc()
        except FrameNotFound:
            pass  # a series without images (reports, documents) has no thumbnail
        except Exception:
            log.exception("thumbnail of series %s not made", series)
