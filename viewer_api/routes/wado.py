"""WADO-RS (PS3.18 10.4): a study, series or instance as multipart/related application/dicom,
streamed from the bucket as stored; `/metadata` as DICOM JSON from the per-series cache.

What may be retrieved is decided by `viewer_api.deps.visible_instances`, the rule C-MOVE
and C-GET use.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Iterator
from itertools import groupby

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from storage.frames import FrameNotFound, frame_number, read_frames
from storage.metadata import series_metadata
from storage.objects import ObjectStore, ObjectStoreUnavailable
from storage.query import Located
from storage.registry import Caller
from viewer_api.deps import ReadCaller, Services, ServicesDep, path_uids, visible_instances

router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"])


def _part_head(boundary: str, content_type: str, length: int) -> bytes:
    """A body part's boundary and headers (RFC 2387)."""
    return (
        f"--{boundary}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def _multipart(objects: ObjectStore, located: list[Located], boundary: str) -> Iterator[bytes]:
    """Each instance as one part, its bytes streamed from the bucket as they come."""
    for item in located:
        part_type = f"application/dicom; transfer-syntax={item.transfer_syntax_uid}"
        yield _part_head(boundary, part_type, item.size)
        yield from objects.stream(item.object_key)
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


async def _retrieve(
    services: Services, caller: Caller, request: Request, uids: dict[str, str]
) -> StreamingResponse:
    located = await run_in_threadpool(visible_instances, services, caller, request, uids)
    boundary = secrets.token_hex(16)
    media_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return StreamingResponse(_multipart(services.objects, located, boundary), media_type=media_type)


def _metadata(
    services: Services, caller: Caller, request: Request, uids: dict[str, str]
) -> list[dict]:
    """From each series' cache; for one instance, its series' cache filtered to it."""
    if "SOPInstanceUID" in uids:
        # One instance: its series, found and audited once, filtered to it.
        wanted = {path_uids(uids)["SOPInstanceUID"]}
        series_uids = {k: v for k, v in uids.items() if k != "SOPInstanceUID"}
        located = visible_instances(services, caller, request, series_uids)
        if not any(item.sop_instance_uid in wanted for item in located):
            raise HTTPException(404, "no such image visible to this key")
    else:
        located = visible_instances(services, caller, request, uids)
        wanted = {item.sop_instance_uid for item in located}
    body: list[dict] = []
    for (study, series), items in groupby(located, key=_series_of):
        instances = series_metadata(services.objects, study, series, list(items))
        body += [m for m in instances if m["00080018"]["Value"][0] in wanted]
    return body


def _series_of(item: Located) -> tuple[str, str]:
    return item.study_instance_uid, item.series_instance_uid


async def _metadata_response(
    services: Services, caller: Caller, request: Request, uids: dict[str, str]
) -> JSONResponse:
    body = await run_in_threadpool(_metadata, services, caller, request, uids)
    return JSONResponse(body, media_type="application/dicom+json")


@router.get("/studies/{study}", summary="Retrieve a study")
async def retrieve_study(
    study: str, request: Request, services: ServicesDep, caller: ReadCaller
) -> StreamingResponse:
    return await _retrieve(services, caller, request, {"StudyInstanceUID": study})


@router.get("/studies/{study}/series/{series}", summary="Retrieve a series")
async def retrieve_series(
    study: str, series: str, request: Request, services: ServicesDep, caller: ReadCaller
) -> StreamingResponse:
    uids = {"StudyInstanceUID": study, "SeriesInstanceUID": series}
    return await _retrieve(services, caller, request, uids)


@router.get("/studies/{study}/series/{series}/instances/{instance}", summary="Retrieve an instance")
async def retrieve_instance(
    study: str,
    series: str,
    instance: str,
    request: Request,
    services: ServicesDep,
    caller: ReadCaller,
) -> StreamingResponse:
    uids = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": instance}
    return await _retrieve(services, caller, request, uids)


def _frames(
    services: Services, caller: Caller, request: Request, uids: dict[str, str], numbers: list[int]
) -> tuple[Located, list[bytes]]:
    [item] = visible_instances(services, caller, request, uids)
    try:
        return item, read_frames(services.objects, item, numbers)
    except FrameNotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    except ObjectStoreUnavailable as exc:
        raise HTTPException(503, f"object store unavailable: {exc}") from exc
    except (ValueError, KeyError, AttributeError, EOFError, struct.error) as exc:
        # A damaged pixel data element or offset table: the frame cannot be cut out.
        raise HTTPException(415, f"cannot extract the frame: {exc}"[:300]) from exc


def _frame_numbers(text: str) -> list[int]:
    numbers = [frame_number(part) for part in text.split(",")]
    if not all(numbers):
        raise HTTPException(400, "frames are a comma-separated list of numbers from 1")
    return [n for n in numbers if n is not None]


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
    summary="Frames of an instance, as stored",
)
async def retrieve_frames(
    study: str,
    series: str,
    instance: str,
    frames: str,
    request: Request,
    services: ServicesDep,
    caller: ReadCaller,
) -> Response:
    numbers = _frame_numbers(frames)
    uids = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": instance}
    item, found = await run_in_threadpool(_frames, services, caller, request, uids, numbers)
    boundary = secrets.token_hex(16)
    part_type = f"application/octet-stream; transfer-syntax={item.transfer_syntax_uid}"
    body = b"".join(_part_head(boundary, part_type, len(f)) + f + b"\r\n" for f in found)
    body += f"--{boundary}--\r\n".encode()
    media_type = f'multipart/related; type="application/octet-stream"; boundary={boundary}'
    return Response(body, media_type=media_type)


@router.get("/studies/{study}/metadata", summary="A study's metadata")
async def study_metadata(
    study: str, request: Request, services: ServicesDep, caller: ReadCaller
) -> JSONResponse:
    return await _metadata_response(services, caller, request, {"StudyInstanceUID": study})


@router.get("/studies/{study}/series/{series}/metadata", summary="A series' metadata")
async def series_metadata_route(
    study: str, series: str, request: Request, services: ServicesDep, caller: ReadCaller
) -> JSONResponse:
    uids = {"StudyInstanceUID": study, "SeriesInstanceUID": series}
    return await _metadata_response(services, caller, request, uids)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/metadata",
    summary="An instance's metadata",
)
async def instance_metadata_route(
    study: str,
    series: str,
    instance: str,
    request: Request,
    services: ServicesDep,
    caller: ReadCaller,
) -> JSONResponse:
    uids = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": instance}
    return await _metadata_response(services, caller, request, uids)
