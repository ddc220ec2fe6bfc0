"""Rendered images and thumbnails (PS3.18 10.4.1.1.3, 8.3.5): one frame of a stored
instance as JPEG, PNG or WebP (by `Accept`), through `storage.rendering`.

A study or series thumbnail is its representative image: the middle instance of the
study's first series with images (or of the series), and of a multi-frame instance its
middle frame. What may be rendered is what may be retrieved (`visible_instances`).
"""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from storage import metrics
from storage.audit import AuditEntry
from storage.frames import FrameNotFound, frame_number
from storage.objects import ObjectStoreUnavailable
from storage.registry import Caller
from storage.rendering import FORMATS, Rendering, Undecodable, Window, WindowFunction
from storage.renditions import THUMBNAIL, rendition_key, representatives
from viewer_api.deps import ReadCaller, Services, ServicesDep, visible_and_audited
from viewer_api.recent_answers import RecentAnswers

router = APIRouter(prefix="/dicomweb", tags=["DICOMweb rendered"])

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
    renditions = services.renditions
    assert renditions is not None  # Services makes one
    candidates = representatives(located)
    held = request.headers.get("if-none-match", "")
    for position, item in enumerate(candidates):
        etag = (
            f'"{hashlib.sha256(rendition_key(item, frame, rendering).encode()).hexdigest()[:32]}"'
        )
        if etag in held:
            return None, etag, audited
        try:
            rendition = renditions.rendered(item, frame, rendering)
            metrics.RENDITIONS.labels("cached" if rendition.cached else "rendered").inc()
            return rendition.data, etag, audited
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
    access check and the audit run for every view; an image it holds costs a 304)."""
    rendering = rendering_of(request, THUMBNAIL if thumbnail else Rendering())
    body, etag, audited = await run_in_threadpool(
        _rendered, services, caller, request, uids, frame, rendering
    )
    headers = {"Vary": "Accept", "ETag": etag, "Cache-Control": "private, no-cache"}
    if body is None:
        return Response(status_code=304, headers=headers)
    recent: RecentAnswers | None = getattr(request.app.state, "recent_answers", None)
    if recent is not None:
        recent.remember(request, audited, body, rendering.media_type, etag, headers)
    return Response(body, media_type=rendering.media_type, headers=headers)


async def _instance(study: str, series: str, instance: str) -> dict[str, str]:
    """The UIDs of an instance's path (a dependency: FastAPI reads them from the path;
    async, or FastAPI would hand it to a thread)."""
    return {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": instance}


InstanceUids = Annotated[dict[str, str], Depends(_instance)]


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/rendered",
    summary="An instance rendered (its first frame)",
)
async def rendered_instance(
    uids: InstanceUids, request: Request, services: ServicesDep, caller: ReadCaller
) -> Response:
    return await _respond(services, caller, request, uids, 1)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered",
    summary="A frame rendered",
)
async def rendered_frame(
    uids: InstanceUids, frame: str, request: Request, services: ServicesDep, caller: ReadCaller
) -> Response:
    number = frame_number(frame)
    if number is None:
        raise HTTPException(400, "a rendered frame is one frame number, from 1")
    return await _respond(services, caller, request, uids, number)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/thumbnail",
    summary="An instance's thumbnail",
)
async def instance_thumbnail(
    uids: InstanceUids, request: Request, services: ServicesDep, caller: ReadCaller
) -> Response:
    return await _respond(services, caller, request, uids, None, thumbnail=True)


@router.get("/studies/{study}/series/{series}/thumbnail", summary="A series' thumbnail")
async def series_thumbnail(
    study: str, series: str, request: Request, services: ServicesDep, caller: ReadCaller
) -> Response:
    uids = {"StudyInstanceUID": study, "SeriesInstanceUID": series}
    return await _respond(services, caller, request, uids, None, thumbnail=True)


@router.get("/studies/{study}/thumbnail", summary="A study's thumbnail")
async def study_thumbnail(
    study: str, request: Request, services: ServicesDep, caller: ReadCaller
) -> Response:
    uids = {"StudyInstanceUID": study}
    return await _respond(services, caller, request, uids, None, thumbnail=True)
