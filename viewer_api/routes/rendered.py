"""Rendered images and thumbnails (PS3.18 10.4.1.1.3, 8.3.5): one frame of a stored
instance as JPEG, PNG or WebP (by `Accept`), through `storage.rendering`.

A study or series thumbnail is its representative image: the middle instance of the
study's first series with images (or of the series), and of a multi-frame instance its
middle frame. What may be rendered is what may be retrieved (`visible_instances`).

`RenderedLane` answers these URLs before FastAPI routes the request; the routes below
document them in the OpenAPI schema and answer when the lane is not in front. Both call
`_respond`, so they answer alike.
"""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import Response
from sqlalchemy.exc import SQLAlchemyError
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from storage import metrics
from storage.audit import AuditEntry
from storage.frames import FrameNotFound, frame_number
from storage.index import IndexUnavailable
from storage.objects import ObjectStoreUnavailable
from storage.query import Located
from storage.registry import Caller
from storage.rendering import FORMATS, Rendering, Undecodable, Window, WindowFunction
from storage.renditions import THUMBNAIL, NotHere, rendition_key, representatives
from viewer_api.deps import (
    ReadCaller,
    Services,
    ServicesDep,
    authenticated,
    index_unavailable,
    retrieval_event,
    visible,
    visible_and_audited,
)
from viewer_api.recent_answers import RecentAnswers

PREFIX = "/dicomweb"
router = APIRouter(prefix=PREFIX, tags=["DICOMweb rendered"])

# The rendered resources' paths (under PREFIX), for the routes and for `RenderedLane`.
INSTANCE_RENDERED = "/studies/{study}/series/{series}/instances/{instance}/rendered"
FRAME_RENDERED = "/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered"
INSTANCE_THUMBNAIL = "/studies/{study}/series/{series}/instances/{instance}/thumbnail"
SERIES_THUMBNAIL = "/studies/{study}/series/{series}/thumbnail"
STUDY_THUMBNAIL = "/studies/{study}/thumbnail"

LARGEST_VIEWPORT = 8192


def media_type_of(accept: str, default: str = "image/jpeg") -> str:
    """The acceptable rendered format the client prefers (RFC 9110 12.5.1): by quality
    value, then the more specific range, then order; a format given `q=0` is refused even
    where a wildcard would take it; `default` first among those a wildcard takes. 406
    when none is acceptable."""
    if not accept.strip():
        return default
    weights: dict[str, tuple[float, int, int]] = {}  # format -> (weight, specificity, order)
    for position, part in enumerate(accept.split(",")):
        media, *parameters = (p.strip() for p in part.split(";"))
        media = media.lower()
        weight = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        if media in FORMATS:
            covered, specificity = [media], 2
        elif media in ("*/*", "image/*"):
            covered = [default, *(f for f in FORMATS if f != default)]
            specificity = 1 if media == "image/*" else 0
        else:
            continue
        for rank, name in enumerate(covered):
            found = weights.get(name)
            if found is None or specificity > found[1]:
                weights[name] = (weight, specificity, position * 10 + rank)
    acceptable = [(-w, order, name) for name, (w, _, order) in weights.items() if w > 0]
    if not acceptable:
        raise HTTPException(406, f"rendered images are {', '.join(FORMATS)}; Accept: {accept}")
    return min(acceptable)[2]


def _numbers(text: str, name: str, count: int) -> list[float]:
    parts = text.split(",")
    try:
        values = [float(p) for p in parts[:count]]
    except ValueError as exc:
        raise HTTPException(400, f"{name}: {text!r} is not {count} numbers") from exc
    if len(values) != count:
        raise HTTPException(400, f"{name}: {text!r} is not {count} numbers")
    return values


def rendering_of(request: Request, default: Rendering) -> Rendering:
    """`default` with what the request asks instead: the query parameters `viewport` (w,h),
    `window` (center,width[,function]) and `quality` (1-100), and the Accept header,
    checked: a 400 names what is wrong."""
    parameters = request.query_params
    viewport = default.viewport
    if "viewport" in parameters:
        width, height = _numbers(parameters["viewport"], "viewport", 2)
        if not (1 <= width <= LARGEST_VIEWPORT and 1 <= height <= LARGEST_VIEWPORT):
            raise HTTPException(400, f"viewport: each side from 1 to {LARGEST_VIEWPORT}")
        viewport = (int(width), int(height))
    window = None
    if "window" in parameters:
        text = parameters["window"]
        center, width = _numbers(text, "window", 2)
        parts = text.split(",")
        name = parts[2].strip().upper().replace("-", "_") if len(parts) > 2 else "LINEAR"
        if name not in WindowFunction.__members__:
            raise HTTPException(400, "window: the function is linear, linear-exact or sigmoid")
        try:
            window = Window(center, width, WindowFunction[name])
        except ValueError as exc:
            raise HTTPException(400, f"window: {exc}") from exc
    quality = default.quality
    if "quality" in parameters:
        text = parameters["quality"]
        if not (text.isascii() and text.isdigit()) or len(text) > 3 or not 1 <= int(text) <= 100:
            raise HTTPException(400, "quality: a whole number from 1 to 100")
        quality = int(text)
    media_type = media_type_of(request.headers.get("accept", ""), default.media_type)
    return Rendering(media_type, viewport, window, quality)


def _rendered(
    services: Services,
    caller: Caller,
    request: Request,
    uids: dict[str, str],
    frame: int | None,
    rendering: Rendering,
) -> tuple[bytes | None, str, AuditEntry]:
    """The rendered image, its entity tag and the audit event recorded; None for the
    image when the client holds it already (If-None-Match)."""
    located, audited = visible_and_audited(services, caller, request, uids)
    return *_image(services, request, representatives(located), frame, rendering), audited


def _located_here(
    services: Services, caller: Caller, request: Request, uids: dict[str, str]
) -> tuple[list[Located], AuditEntry] | None:
    """What `visible_and_audited` gives, found and audited on the event loop where that
    waits for nothing: the index reads locally (`Index.reads_locally`), something is
    found, and its audit event is queued. None, with nothing done, otherwise."""
    if not services.index.reads_locally():
        return None
    found, _ = visible(services, caller, request, uids)
    if not found:
        return None  # the failure's audit event is written before the answer
    audited = retrieval_event(caller, request, found)
    if services.audit is not None and not services.audit.record_soon(audited):
        return None  # the audit trail is backed up: a thread waits for it
    return representatives(found), audited


def _image(
    services: Services,
    request: Request,
    candidates: list[Located],
    frame: int | None,
    rendering: Rendering,
    here: bool = False,
) -> tuple[bytes | None, str]:
    """The first of `candidates` with an image, rendered, and its entity tag; None for
    the image when the client holds it already (If-None-Match). `here`: see
    `Renditions.rendered`."""
    renditions = services.renditions
    assert renditions is not None  # Services makes one
    held = request.headers.get("if-none-match", "")
    for position, item in enumerate(candidates):
        key = rendition_key(item, frame, rendering)
        etag = f'"{hashlib.sha256(key.encode()).hexdigest()[:32]}"'
        if etag in held:
            return None, etag
        try:
            rendition = renditions.rendered(item, frame, rendering, here, key)
            metrics.RENDITIONS.labels("cached" if rendition.cached else "rendered").inc()
            return rendition.data, etag
        except FrameNotFound as exc:
            if position + 1 < len(candidates) and "no image" in str(exc):
                continue  # a study thumbnail: this series holds no images, try the next
            raise HTTPException(404, str(exc)) from exc
        except Undecodable as exc:
            raise HTTPException(415, str(exc)[:300]) from exc
        except ObjectStoreUnavailable as exc:
            raise HTTPException(503, f"object store unavailable: {exc}") from exc
    raise AssertionError("visible_instances returns at least one instance")


async def _respond(
    services: Services,
    caller: Caller,
    request: Request,
    uids: dict[str, str],
    frame: int | None,
    thumbnail: bool = False,
) -> Response:
    """The image, with an entity tag a phone or browser revalidates with (no-cache: the
    access check and the audit run for every view; an image it holds costs a 304).

    An image in memory, or a small one rendered from a local copy, is answered on the event
    loop (`_located_here`, `Renditions.rendered`): the two thread hand-offs cost a fifth
    of such an answer with the processor's caches cold, as they are between a viewer's
    requests (bench/README.md, "Rendering latency"). The rest is done in a thread."""
    rendering = rendering_of(request, THUMBNAIL if thumbnail else Rendering())
    located = _located_here(services, caller, request, uids)
    if located is None:
        body, etag, audited = await run_in_threadpool(
            _rendered, services, caller, request, uids, frame, rendering
        )
    else:
        candidates, audited = located
        try:
            body, etag = _image(services, request, candidates, frame, rendering, here=True)
        except NotHere:
            body, etag = await run_in_threadpool(
                _image, services, request, candidates, frame, rendering
            )
    headers = {"Vary": "Accept", "ETag": etag, "Cache-Control": "private, no-cache"}
    if body is None:
        return Response(status_code=304, headers=headers)
    recent: RecentAnswers | None = getattr(request.app.state, "recent_answers", None)
    if recent is not None:
        recent.remember(request, audited, body, rendering.media_type, etag, headers)
    return Response(body, media_type=rendering.media_type, headers=headers)


def _uids(parameters: dict[str, str]) -> dict[str, str]:
    """The UIDs a rendered resource's path names, by keyword."""
    keywords = {
        "study": "StudyInstanceUID",
        "series": "SeriesInstanceUID",
        "instance": "SOPInstanceUID",
    }
    return {keywords[name]: value for name, value in parameters.items() if name in keywords}


def _frame(text: str) -> int:
    number = frame_number(text)
    if number is None:
        raise HTTPException(400, "a rendered frame is one frame number, from 1")
    return number


async def _instance(study: str, series: str, instance: str) -> dict[str, str]:
    """The UIDs of an instance's path (a dependency: FastAPI reads them from the path;
    async, or FastAPI would hand it to a thread)."""
    return _uids({"study": study, "series": series, "instance": instance})


InstanceUids = Annotated[dict[str, str], Depends(_instance)]


@router.get(INSTANCE_RENDERED, summary="An instance rendered (its first frame)")
async def rendered_instance(
    uids: InstanceUids, request: Request, services: ServicesDep, caller: ReadCaller
) -> Response:
    return await _respond(services, caller, request, uids, 1)


@router.get(FRAME_RENDERED, summary="A frame rendered")
async def rendered_frame(
    uids: InstanceUids, frame: str, request: Request, services: ServicesDep, caller: ReadCaller
) -> Response:
    return await _respond(services, caller, request, uids, _frame(frame))


@router.get(INSTANCE_THUMBNAIL, summary="An instance's thumbnail")
async def instance_thumbnail(
    uids: InstanceUids, request: Request, services: ServicesDep, caller: ReadCaller
) -> Response:
    return await _respond(services, caller, request, uids, None, thumbnail=True)


@router.get(SERIES_THUMBNAIL, summary="A series' thumbnail")
async def series_thumbnail(
    study: str, series: str, request: Request, services: ServicesDep, caller: ReadCaller
) -> Response:
    uids = _uids({"study": study, "series": series})
    return await _respond(services, caller, request, uids, None, thumbnail=True)


@router.get(STUDY_THUMBNAIL, summary="A study's thumbnail")
async def study_thumbnail(
    study: str, request: Request, services: ServicesDep, caller: ReadCaller
) -> Response:
    return await _respond(services, caller, request, _uids({"study": study}), None, True)


# The lane's paths: (pattern, whether the frame is in the path, whether a thumbnail).
_LANE = tuple(
    (compile_path(PREFIX + path)[0], path == FRAME_RENDERED, "thumbnail" in path)
    for path in (
        INSTANCE_RENDERED,
        FRAME_RENDERED,
        INSTANCE_THUMBNAIL,
        SERIES_THUMBNAIL,
        STUDY_THUMBNAIL,
    )
)


class RenderedLane:
    """ASGI middleware: a GET of a rendered resource is answered here, by `_respond` as
    the routes above answer it, without FastAPI's middleware, routing and dependency
    resolution: they cost 0.4 to 0.6 ms of a first rendering's 3 to 5 ms with the
    processor's caches cold, as they are between a viewer's requests
    (bench/README.md, "Rendering latency"). Errors are answered by the handlers FastAPI
    would use (its own for HTTPException, `index_unavailable` for the index)."""

    def __init__(self, app: ASGIApp, api: FastAPI) -> None:
        self.app = app
        self.api = api  # the FastAPI application: its services and state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = None
        if scope["type"] == "http" and scope["method"] == "GET":
            path = scope["path"]
            found = next(((m, f, t) for pattern, f, t in _LANE if (m := pattern.match(path))), None)
        if found is None:
            await self.app(scope, receive, send)
            return
        match, in_path, thumbnail = found
        scope["app"] = self.api
        request = Request(scope, receive)
        services: Services = self.api.state.services
        try:
            caller = await authenticated(request, services, "read")
            parameters = match.groupdict()
            frame = _frame(parameters["frame"]) if in_path else None if thumbnail else 1
            response = await _respond(
                services, caller, request, _uids(parameters), frame, thumbnail
            )
        except HTTPException as exc:
            response = await http_exception_handler(request, exc)
        except (IndexUnavailable, SQLAlchemyError) as exc:
            response = await index_unavailable(request, exc)
        await response(scope, receive, send)
