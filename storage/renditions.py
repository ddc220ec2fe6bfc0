"""Rendered frames kept as derived objects in the bucket (SPEC 4), and the worker that
makes series and study thumbnails after ingest.

A rendition's key names the instance, the SHA-256 of its stored bytes, the frame and every
rendering parameter: the same request is served from the bucket without decoding again,
and an instance whose bytes change never meets a rendition of the old ones. Everything
under `derived/rendered/` can be deleted at any time; it is made again when asked for.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from storage import layout, metrics
from storage.frames import FrameNotFound
from storage.header import LAID_OUT_SYNTAXES, layout_from_text, layout_of
from storage.index import Index, IndexUnavailable
from storage.ingest import StoreResult
from storage.local_copies import LocalCopies
from storage.objects import ObjectNotFound, ObjectStore, ObjectStoreUnavailable
from storage.query import Located, Query, QueryLevel, Viewer, locate
from storage.rendering import Rendering, render, render_laid_out, with_pixels_window

log = logging.getLogger(__name__)

RENDERED_PREFIX = f"{layout.DERIVED_PREFIX}rendered/"
# What a thumbnail is when nothing else is asked: what the worker makes ahead of time.
THUMBNAIL = Rendering("image/jpeg", viewport=(256, 256))
_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}
# Objects up to this size are fetched whole to render (one GET, one parse); larger ones,
# multi-frame mostly, by the ranges the header and the frame need.
WHOLE_OBJECT_BYTES = 16 * 1024 * 1024
# Part of every rendition key: raise it when the pipeline renders differently, and
# renditions made before are no longer served.
PIPELINE_VERSION = 1
# Renditions waiting to be written to the bucket: from this many, or this many bytes, they
# are written at once, busy or not; from twice as many, new ones are not kept.
KEEPING_AT_MOST = 256
KEEPING_BYTES = 32 * 1024 * 1024
# Renditions go to the bucket once no rendered image has been asked for this long: a
# bucket write costs the object store's CPU, which a phone swiping through a series would
# otherwise wait for on its next slice.
QUIET_SECONDS = 0.25
# Instances stored through this process whose renditions it keeps track of (see
# `Renditions.stored`), most recent first.
TRACKING_AT_MOST = 100_000
# The largest object rendered for a caller that must not wait (`Renditions.rendered`,
# `here`), read whole from its local copy: a 512 x 512 CT slice is 0.5 MB and renders as a
# JPEG in about a millisecond. PNG and WebP take 5 to 20 times as long: not here.
HERE_OBJECT_BYTES = 2 * 1024 * 1024


def rendition_key(item: Located, frame: int | None, rendering: Rendering) -> str:
    """Where the rendition of frame `frame` (None: the middle one) is kept."""
    parameters = f"v{PIPELINE_VERSION}|"
    parameters += repr((rendering.media_type, rendering.viewport, rendering.window))
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


class NotHere(Exception):
    """This rendition cannot be made without waiting (for the bucket) or without long
    work; nothing was done: ask again from a thread."""


@dataclass(frozen=True)
class Rendition:
    data: bytes
    cached: bool  # kept from before, not decoded now


class Renditions:
    """Rendered frames: from memory or the bucket when made before, else rendered and
    kept in both. Memory holds the most recently used, up to `memory_bytes`; the bucket
    receives new ones behind the requests, when they pause (write-behind). Originals are
    read from `local_copies` when they are there.

    The bucket is not asked for a rendition this process did not write there when the
    instance was stored by this archive (`stored` tells of it) or its original is on local
    disk: rendering from the local copy is about as quick as a GET, and a GET that finds
    nothing costs about 1 ms of a 3 ms first rendering, or hangs with the store. A
    rendition made by another archive process on the same bucket, or by this one before a
    restart, is then made again: the same bytes, a rendering's time.

    An instance stored before the index kept pixel layouts gets its layout read from the
    bytes it is first rendered from, and written to `index` by the same writer thread: its
    later renderings read frames by it."""

    def __init__(
        self,
        objects: ObjectStore,
        memory_bytes: int = 64 * 1024 * 1024,
        quiet_seconds: float = QUIET_SECONDS,
        local_copies: LocalCopies | None = None,
        index: Index | None = None,
    ) -> None:
        self.objects = objects
        self.quiet_seconds = quiet_seconds
        self.local_copies = local_copies
        self.index = index
        # Layouts found, for `index`: SOP Instance UID -> (SHA-256 of the bytes, text).
        self._layouts_found: dict[str, tuple[str, str]] = {}
        self._without_layout: OrderedDict[str, None] = OrderedDict()  # UIDs, looked at
        self._stored_here: OrderedDict[str, None] = OrderedDict()  # SHA-256s, see above
        self._written: OrderedDict[str, None] = OrderedDict()  # keys put in the bucket
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._memory_bytes = memory_bytes
        self._held = 0
        self._lock = threading.Lock()
        self._waiting: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self._waiting_bytes = 0
        self._asked_at = 0.0
        self._closing = False
        self._wake = threading.Condition(self._lock)
        self._keeper: threading.Thread | None = None  # started with the first rendition

    def rendered(
        self,
        item: Located,
        frame: int | None,
        rendering: Rendering,
        here: bool = False,
        key: str | None = None,
    ) -> Rendition:
        """Frame `frame` (1-based; None: the middle one) of `item`, rendered. `here`: only
        from memory, or as a JPEG from a local copy of at most `HERE_OBJECT_BYTES` whose
        pixel layout the index holds (for an event loop, which must not wait). `key`: its
        `rendition_key`, when the caller has it.

        FrameNotFound, Undecodable (storage.rendering), ObjectStoreUnavailable; NotHere."""
        key = key or rendition_key(item, frame, rendering)
        self._asked_at = time.monotonic()
        data = self._recall(key)
        if data is not None:
            return Rendition(data, cached=True)
        whole = item.size <= WHOLE_OBJECT_BYTES
        with self._lock:
            written = key in self._written
            stored_here = item.sha256 in self._stored_here
            found = self._layouts_found.get(item.sop_instance_uid)
        pixel_layout = layout_from_text(item.pixel_layout)
        if pixel_layout is None and found is not None and found[0] == item.sha256:
            pixel_layout = layout_from_text(found[1])
        if here and (
            written
            or pixel_layout is None
            or item.size > HERE_OBJECT_BYTES
            or rendering.media_type != "image/jpeg"
        ):
            raise NotHere(key)
        copy = None
        if whole and not written and self.local_copies is not None:
            copy = self.local_copies.read(item.sha256)
        if here and copy is None:
            raise NotHere(key)
        if written or (copy is None and not stored_here):  # the bucket may hold it
            try:
                data = self.objects.get(key)
                self._remember(key, data)
                return Rendition(data, cached=True)
            except ObjectNotFound:
                pass
        if whole:  # one read, one parse (none with the layout)
            if written and self.local_copies is not None:  # not read above
                copy = self.local_copies.read(item.sha256)
            original = copy if copy is not None else self._original(item)
            if pixel_layout is not None and len(original) == item.size:
                data = render_laid_out(original, pixel_layout, frame, rendering)
            else:  # no layout, or bytes other than those indexed: parsed, not trusted
                data = render(io.BytesIO(original), frame, rendering, in_memory=True)
                self._find_layout(item, original)
        else:  # only the header's and the frame's ranges
            with self.objects.open(item.object_key, item.size) as source:
                data = render(source, frame, rendering)
        self._remember(key, data)
        self._keep(key, data, rendering.media_type)
        return Rendition(data, cached=False)

    def stored(self, result: StoreResult) -> None:
        """An instance stored by this archive (pipeline listener): it has no rendition in
        the bucket but those this process writes."""
        if result.sha256:
            with self._lock:
                _remember_bounded(self._stored_here, result.sha256)

    def _original(self, item: Located) -> bytes:
        """The stored bytes, from the bucket (and copied, where this process keeps the
        copies)."""
        data = self.objects.get(item.object_key)
        if self.local_copies is not None:
            self.local_copies.add_bytes(item.sha256, data)
        return data

    def _keep(self, key: str, data: bytes, media_type: str) -> None:
        """Queued for the bucket: the caller has its image already, and a rendition lost
        (the archive stopped, the bucket down) is only made again when asked for."""
        with self._lock:
            if self._closing or key in self._waiting:
                return
            _remember_bounded(self._written, key)  # from now on, perhaps in the bucket
            if self._backlog(2):
                log.warning("rendition not kept, %d waiting: %s", len(self._waiting), key)
                return
            self._waiting[key] = (data, media_type)
            self._waiting_bytes += len(data)
            self._start_keeper()
            # Woken only when it has to act sooner than it will wake by itself: a thread
            # woken per rendition took the interpreter from the request that made it.
            if len(self._waiting) == 1 or self._backlog():
                self._wake.notify()

    def _find_layout(self, item: Located, original: bytes) -> None:
        """Queue for the index the pixel layout of an instance stored before the index
        kept layouts, read from its bytes (once: one without a layout is remembered)."""
        if (
            self.index is None
            or item.pixel_layout  # one this version cannot read: a newer one wrote it
            or item.transfer_syntax_uid not in LAID_OUT_SYNTAXES
            or len(original) != item.size
        ):
            return
        with self._lock:
            if item.sop_instance_uid in self._without_layout:
                return
        found = layout_of(original)
        text = None if found is None else with_pixels_window(found, original).to_text()
        with self._lock:
            if text is None:
                _remember_bounded(self._without_layout, item.sop_instance_uid)
                return
            if self._closing:
                return
            self._layouts_found[item.sop_instance_uid] = (item.sha256, text)
            self._start_keeper()
            if len(self._layouts_found) == 1:
                self._wake.notify()

    def _start_keeper(self) -> None:
        """The writer thread, started with the first thing to write (the lock held)."""
        if self._keeper is None:
            self._keeper = threading.Thread(
                target=self._write_behind, name="renditions", daemon=True
            )
            self._keeper.start()

    def _backlog(self, factor: int = 1) -> bool:
        """Renditions waiting reach `factor` times the bounds (the lock held)."""
        return (
            len(self._waiting) >= factor * KEEPING_AT_MOST
            or self._waiting_bytes >= factor * KEEPING_BYTES
        )

    def _write_behind(self) -> None:
        """Write waiting renditions one at a time, and the layouts found since the last
        write all at once, each once requests have paused for `quiet_seconds` (at once
        when `KEEPING_AT_MOST` wait, or when closing)."""
        while True:
            with self._lock:
                while not self._waiting and not self._layouts_found and not self._closing:
                    self._wake.wait()
                if not self._waiting and not self._layouts_found:
                    return
                quiet_for = time.monotonic() - self._asked_at
                if quiet_for < self.quiet_seconds and not self._backlog() and not self._closing:
                    self._wake.wait(self.quiet_seconds - quiet_for)
                    continue
                layouts = self._layouts_found
                self._layouts_found = {}
                waiting = self._waiting.popitem(last=False) if self._waiting else None
                if waiting is not None:
                    self._waiting_bytes -= len(waiting[1][0])
            if layouts:
                self._write_layouts(layouts)
            if waiting is None:
                continue
            key, (data, media_type) = waiting
            try:
                self.objects.put_bytes(key, data, media_type)
            except ObjectStoreUnavailable as exc:
                log.warning("rendition not kept (%s): %s", key, exc)
            except Exception:
                log.exception("rendition not kept: %s", key)

    def _write_layouts(self, layouts: dict[str, tuple[str, str]]) -> None:
        """Layouts found, into the index; lost ones are found again at a next rendering."""
        assert self.index is not None  # only queued with an index
        try:
            self.index.add_pixel_layouts(layouts)
        except IndexUnavailable as exc:
            log.warning("%d pixel layouts not kept: %s", len(layouts), exc)
        except Exception:
            log.exception("%d pixel layouts not kept", len(layouts))

    def close(self) -> None:
        """Write the renditions and layouts still waiting, then stop."""
        with self._lock:
            self._closing = True
            self._wake.notify()
            keeper = self._keeper
        if keeper is not None:
            keeper.join()

    def _recall(self, key: str) -> bytes | None:
        with self._lock:
            data = self._memory.get(key)
            if data is not None:
                self._memory.move_to_end(key)
                return data
            waiting = self._waiting.get(key)  # dropped from memory, not written yet
            return waiting[0] if waiting else None

    def _remember(self, key: str, data: bytes) -> None:
        with self._lock:
            if key in self._memory:
                return
            self._memory[key] = data
            self._held += len(data)
            while self._held > self._memory_bytes and self._memory:
                _, dropped = self._memory.popitem(last=False)
                self._held -= len(dropped)


def _remember_bounded(keys: OrderedDict, key: str) -> None:
    keys[key] = None
    keys.move_to_end(key)
    if len(keys) > TRACKING_AT_MOST:
        keys.popitem(last=False)


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
                if self._stopping:
                    return
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
