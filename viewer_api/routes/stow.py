"""STOW-RS (PS3.18 10.5): `POST /dicomweb/studies` with a multipart/related body of
application/dicom parts, parsed as it streams in; each part goes to disk as it arrives and
then through the ingest spool, exactly as a C-STORE data set does.

The answer lists every instance (PS3.18 Table 10.5.3-1): stored ones in
ReferencedSOPSequence with their RetrieveURL, refused ones in FailedSOPSequence with the
DIMSE status as FailureReason and the reason as TextValue. 200 when all were stored, 202
when some were, 409 when none was (503 when none could be, for want of resources).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydicom import dcmread
from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header

from storage import audit
from storage.index import Origin
from storage.ingest import InstanceToStore, StoreOutcome, StoreResult
from storage.registry import Caller
from storage.spool import IncomingFile, SpoolFiles
from viewer_api.deps import IngestCaller, Services, ServicesDep, path_uids, record_for

router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"])

DICOM = b"application/dicom"
PROCESSING_FAILURE = 0x0110


class _Part(IncomingFile):
    """One body part being received: its headers, and the file its bytes go to."""

    def __init__(self, files: SpoolFiles) -> None:
        super().__init__(files)
        self.headers: dict[str, str] = {}
        self.name = b""
        self.value = b""


@dataclass(frozen=True)
class _Outcome:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    status: int
    reason: str
    stored: bool
    out_of_resources: bool = False


def _uids_of(path: Path) -> tuple[str, str]:
    """SOP Class and Instance UIDs of a refused part, as far as they can be read."""
    try:
        ds = dcmread(path, stop_before_pixels=True, force=True)
        return str(ds.get("SOPClassUID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")
    except Exception:  # a refused part may be anything
        return "", ""


def _store(services: Services, caller: Caller, part: _Part, study: str | None) -> _Outcome:
    """One finished part through the ingest spool, as a C-STORE data set goes."""
    content_type, _ = parse_options_header(part.headers.get("content-type", "application/dicom"))
    if content_type != DICOM:
        return _Outcome(
            *_uids_of(part.path),
            "",
            PROCESSING_FAILURE,
            f"part is {content_type.decode(errors='replace')!r}; only application/dicom is stored",
            False,
        )
    item = InstanceToStore(
        path=part.path,
        origin=Origin(institution=caller.institution, calling_ae=caller.actor, route="stow"),
        expected_study_instance_uid=study,
    )
    assert services.spool is not None
    result: StoreResult = services.spool.accept(item)
    header = result.header
    if header is not None:
        uids = (header.sop_class_uid, header.sop_instance_uid, header.study_instance_uid)
    else:
        uids = (*_uids_of(part.path), "")
    return _Outcome(
        *uids,
        result.outcome.dimse_status,
        result.reason,
        result.outcome.ok,
        result.outcome is StoreOutcome.OUT_OF_RESOURCES,
    )


def _element(vr: str, value: object) -> dict:
    return {"vr": vr, "Value": [value]}


def _answer(request: Request, outcomes: list[_Outcome]) -> JSONResponse:
    base = str(request.base_url).rstrip("/") + "/dicomweb/studies"
    referenced, failed = [], []
    for o in outcomes:
        item = {
            "00081150": _element("UI", o.sop_class_uid) if o.sop_class_uid else {"vr": "UI"},
            "00081155": _element("UI", o.sop_instance_uid) if o.sop_instance_uid else {"vr": "UI"},
        }
        if o.stored:
            item["00081190"] = _element("UR", f"{base}/{o.study_instance_uid}")
            referenced.append(item)
        else:
            item["00081197"] = _element("US", o.status)
            item["0040A160"] = _element("UT", o.reason)
            failed.append(item)
    body: dict = {}
    studies = {o.study_instance_uid for o in outcomes if o.stored}
    if len(studies) == 1:
        body["00081190"] = _element("UR", f"{base}/{studies.pop()}")
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    if referenced and failed:
        status = 202
    elif referenced:
        status = 200
    elif outcomes and all(o.out_of_resources for o in outcomes):
        status = 503
    else:
        status = 409
    return JSONResponse(body, status_code=status, media_type="application/dicom+json")


@router.post("/studies", summary="Store instances (multipart/related application/dicom)")
async def store_instances(
    request: Request,
    services: ServicesDep,
    caller: IngestCaller,
) -> JSONResponse:
    return await _stow(request, services, caller, None)


@router.post("/studies/{study}", summary="Store instances of one study")
async def store_study_instances(
    study: str,
    request: Request,
    services: ServicesDep,
    caller: IngestCaller,
) -> JSONResponse:
    """Instances of another study are refused (0xA900) and listed as failed."""
    path_uids({"StudyInstanceUID": study})
    return await _stow(request, services, caller, study)


async def _stow(
    request: Request, services: Services, caller: Caller, study: str | None
) -> JSONResponse:
    content_type, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/related" or not boundary:
        raise HTTPException(
            415, 'the body must be multipart/related; type="application/dicom" with a boundary'
        )
    part_type = options.get(b"type", DICOM)
    if part_type != DICOM:
        raise HTTPException(415, f"type={part_type.decode(errors='replace')!r} is not stored")
    if services.spool is None:
        raise HTTPException(503, "this server does not ingest")
    files = services.spool.files
    finished: list[_Part] = []
    current: list[_Part] = []

    def begin() -> None:
        current.append(_Part(files))

    def header_field(data: bytes, start: int, end: int) -> None:
        current[-1].name += data[start:end]

    def header_value(data: bytes, start: int, end: int) -> None:
        current[-1].value += data[start:end]

    def header_end() -> None:
        part = current[-1]
        part.headers[part.name.decode("latin-1").strip().lower()] = part.value.decode("latin-1")
        part.name, part.value = b"", b""

    def data(chunk: bytes, start: int, end: int) -> None:
        current[-1].write(chunk[start:end])

    def end() -> None:
        part = current.pop()
        part.close()
        finished.append(part)

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": begin,
            "on_header_field": header_field,
            "on_header_value": header_value,
            "on_header_end": header_end,
            "on_part_data": data,
            "on_part_end": end,
        },
    )
    outcomes: list[_Outcome] = []
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            while finished:
                part = finished.pop(0)
                try:
                    outcomes.append(await run_in_threadpool(_store, services, caller, part, study))
                finally:
                    part.discard()
        parser.finalize()
    except Exception as exc:
        for part in current + finished:
            part.discard()
        if isinstance(exc, HTTPException):
            raise
        raise HTTPException(400, f"malformed multipart body: {exc}") from exc
    for part in current:
        part.discard()
    if not outcomes:
        raise HTTPException(400, "the body holds no part")
    stored = sum(1 for o in outcomes if o.stored)
    result = audit.OK if stored == len(outcomes) else audit.PARTIAL if stored else audit.FAILED
    await run_in_threadpool(
        record_for,
        services,
        caller,
        "store",
        result,
        resource="STOW-RS",
        instances=stored,
        detail=f"{stored} of {len(outcomes)} parts stored",
    )
    return _answer(request, outcomes)
