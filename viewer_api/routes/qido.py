"""QIDO-RS (PS3.18 10.6): search for studies, series and instances, answered as DICOM JSON
(PS3.18 F.2) from the same index search, and the same access rule, as C-FIND."""

from __future__ import annotations

from datetime import date

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from storage import audit
from storage.query import (
    ATTRIBUTES,
    COMPUTED,
    InvalidQuery,
    Kind,
    Query,
    QueryLevel,
    search,
)
from storage.registry import Caller
from viewer_api.deps import ReadCaller, Services, ServicesDep, path_uids, record_for

router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"])

# What each level returns without includefield (PS3.18 Tables 10.6.3-3 to 10.6.3-5).
STUDY_KEYS = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_KEYS = (
    "StudyInstanceUID",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "SeriesInstanceUID",
    "BodyPartExamined",
    "NumberOfSeriesRelatedInstances",
)
INSTANCE_KEYS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "NumberOfFrames",
)
DEFAULTS = {
    QueryLevel.STUDY: STUDY_KEYS,
    QueryLevel.SERIES: SERIES_KEYS,
    QueryLevel.IMAGE: INSTANCE_KEYS,
}
CONTROL = {"limit", "offset", "includefield", "fuzzymatching"}
LARGEST_PAGE = 10_000
JSON = "application/dicom+json"


def _keyword(name: str) -> str:
    """A query parameter's attribute, given as keyword or as tag (``00100020``)."""
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        keyword = keyword_for_tag(int(name, 16))
    else:
        keyword = name if tag_for_keyword(name) is not None else ""
    if keyword not in ATTRIBUTES and keyword not in COMPUTED:
        raise HTTPException(400, f"{name!r} is not an attribute this archive can search on")
    return keyword


def _number(request: Request, name: str, default: int | None) -> int | None:
    text = request.query_params.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or len(text) > 9:
        raise HTTPException(400, f"{name} must be a whole number below a billion")
    return int(text)


def _query(request: Request, level: QueryLevel, fixed: dict[str, str]) -> Query:
    keys: dict[str, str] = dict.fromkeys(DEFAULTS[level], "")
    everything = False
    for value in request.query_params.getlist("includefield"):
        for name in value.split(","):
            if name.strip() == "all":
                everything = True
            elif name.strip():
                keys.setdefault(_keyword(name.strip()), "")
    if everything:
        for keyword, attribute in ATTRIBUTES.items():
            if attribute.level <= level:
                keys.setdefault(keyword, "")
    fuzzy = request.query_params.get("fuzzymatching", "false").lower() == "true"
    for name, value in request.query_params.multi_items():
        if name in CONTROL:
            continue
        keyword = _keyword(name)
        if fuzzy and keyword in ATTRIBUTES and ATTRIBUTES[keyword].kind is Kind.NAME:
            value = f"*{value.strip('*')}*" if value else value
        keys[keyword] = value
    keys.update(path_uids(fixed))
    limit = _number(request, "limit", None)
    if limit is not None:
        limit = min(limit, LARGEST_PAGE)
    return Query(level, keys, limit=limit, offset=_number(request, "offset", 0) or 0)


def _element(vr: str, value: object) -> dict:
    """One attribute's DICOM JSON (PS3.18 F.2.2)."""
    if value in (None, "", []):
        return {"vr": vr}
    values = value if isinstance(value, list) else [value]
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": str(v)} for v in values]}
    if isinstance(values[0], date):
        return {"vr": vr, "Value": [v.strftime("%Y%m%d") for v in values]}
    if vr in ("IS", "US", "UL", "SL", "SS"):
        return {"vr": vr, "Value": [int(v) for v in values]}
    return {"vr": vr, "Value": [str(v) for v in values]}


def _answer(services: Services, caller: Caller, request: Request, query: Query) -> JSONResponse:
    try:
        matches = search(services.index, query, services.viewer(caller))
    except InvalidQuery as exc:
        raise HTTPException(400, str(exc)) from exc
    # Tag and VR looked up once per key, not per match; keys in tag order, as F.2 wants.
    wanted = sorted(
        (f"{tag_for_keyword(k):08X}", dictionary_VR(k), k)
        for k in query.keys
        if k in ATTRIBUTES or k in COMPUTED
    )
    body = [{tag: _element(vr, m.get(k)) for tag, vr, k in wanted} for m in matches]
    record_for(
        services,
        caller,
        "query",
        audit.OK,
        resource=f"QIDO {request.url.path} {request.url.query}",
        instances=len(matches),
    )
    return JSONResponse(body, media_type=JSON)


async def _qido(
    services: Services,
    caller: Caller,
    request: Request,
    level: QueryLevel,
    fixed: dict[str, str],
) -> JSONResponse:
    query = _query(request, level, fixed)
    return await run_in_threadpool(_answer, services, caller, request, query)


@router.get("/studies", summary="Search for studies")
async def studies(request: Request, services: ServicesDep, caller: ReadCaller) -> JSONResponse:
    return await _qido(services, caller, request, QueryLevel.STUDY, {})


@router.get("/series", summary="Search for series")
async def all_series(request: Request, services: ServicesDep, caller: ReadCaller) -> JSONResponse:
    return await _qido(services, caller, request, QueryLevel.SERIES, {})


@router.get("/instances", summary="Search for instances")
async def all_instances(
    request: Request, services: ServicesDep, caller: ReadCaller
) -> JSONResponse:
    return await _qido(services, caller, request, QueryLevel.IMAGE, {})


@router.get("/studies/{study}/series", summary="Search for a study's series")
async def study_series(
    study: str, request: Request, services: ServicesDep, caller: ReadCaller
) -> JSONResponse:
    return await _qido(services, caller, request, QueryLevel.SERIES, {"StudyInstanceUID": study})


@router.get("/studies/{study}/instances", summary="Search for a study's instances")
async def study_instances(
    study: str, request: Request, services: ServicesDep, caller: ReadCaller
) -> JSONResponse:
    return await _qido(services, caller, request, QueryLevel.IMAGE, {"StudyInstanceUID": study})


@router.get("/studies/{study}/series/{series}/instances", summary="Search for a series' instances")
async def series_instances(
    study: str, series: str, request: Request, services: ServicesDep, caller: ReadCaller
) -> JSONResponse:
    fixed = {"StudyInstanceUID": study, "SeriesInstanceUID": series}
    return await _qido(services, caller, request, QueryLevel.IMAGE, fixed)
