"""Share links, as hospital staff make, list and revoke them (scope `share`). The patient's
side of a link is `routes/pocket.py`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, Field

from storage import audit
from storage.header import valid_uid
from storage.query import Query, QueryLevel, locate
from storage.registry import Caller
from storage.shares import DEFAULT_DAYS, LONGEST_DAYS, ShareLink, Shares
from viewer_api.deps import Services, ServicesDep, record_for, requires

router = APIRouter(prefix="/api/shares", tags=["share links"])

ShareCaller = Annotated[Caller, Depends(requires("share"))]


class NewShareRequest(BaseModel):
    study_uid: str = Field(description="StudyInstanceUID of the study to share")
    expires_in_days: int = Field(DEFAULT_DAYS, ge=1, le=LONGEST_DAYS)
    access_code: bool = Field(False, description="demand a 6-digit code, returned once")
    allow_download: bool = Field(False, description="offer the original DICOM as a ZIP")


class ShareOut(BaseModel):
    id: int
    study_uid: str
    state: str  # active, expired, revoked
    created_by: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    access_code_required: bool
    allow_download: bool
    views: int
    last_view_at: datetime | None


class ShareDetailOut(ShareOut):
    views_by_day: dict[str, int] = Field(description="views per UTC day, ISO dates")


class NewShareOut(ShareOut):
    url: str
    qr_png_url: str
    qr_svg_url: str
    access_code: str | None = Field(None, description="shown this once; give it to the patient")


def _out(link: ShareLink) -> dict:
    return {
        "id": link.id,
        "study_uid": link.study_instance_uid,
        "state": link.state,
        "created_by": link.created_by,
        "created_at": link.created_at,
        "expires_at": link.expires_at,
        "revoked_at": link.revoked_at,
        "access_code_required": link.has_access_code,
        "allow_download": link.allow_download,
        "views": link.views,
        "last_view_at": link.last_view_at,
    }


def _shares(services: Services) -> Shares:
    assert services.shares is not None  # Services makes one
    return services.shares


def _create(services: Services, caller: Caller, body: NewShareRequest, base: str) -> dict:
    if not valid_uid(body.study_uid):
        raise HTTPException(400, "study_uid is not a valid UID")
    query = Query(QueryLevel.STUDY, {"StudyInstanceUID": body.study_uid})
    if not locate(services.index, query, services.viewer(caller)):
        record_for(services, caller, "share", audit.FAILED, resource=body.study_uid)
        raise HTTPException(404, "no such study visible to this key")
    made = _shares(services).create(
        body.study_uid,
        caller.institution,
        caller.actor,
        expires_in_days=body.expires_in_days,
        access_code=body.access_code,
        allow_download=body.allow_download,
    )
    record_for(
        services,
        caller,
        "share",
        audit.OK,
        resource=body.study_uid,
        detail=f"link {made.link.id}, {body.expires_in_days} days"
        + (", access code" if body.access_code else "")
        + (", download" if body.allow_download else ""),
    )
    url = f"{base}/s/{made.token}"
    return {
        **_out(made.link),
        "url": url,
        "qr_png_url": f"{url}/qr.png",
        "qr_svg_url": f"{url}/qr.svg",
        "access_code": made.access_code,
    }


@router.post("", status_code=201, response_model=NewShareOut, summary="Make a share link")
async def create_share(
    body: NewShareRequest, request: Request, services: ServicesDep, caller: ShareCaller
) -> dict:
    return await run_in_threadpool(_create, services, caller, body, services.link_base(request))


@router.get("", response_model=list[ShareOut], summary="This institution's share links")
async def list_shares(services: ServicesDep, caller: ShareCaller) -> list[dict]:
    links = await run_in_threadpool(_shares(services).list, caller.institution)
    return [_out(link) for link in links]


def _detail(services: Services, caller: Caller, share_id: int) -> dict:
    link = next((k for k in _shares(services).list(caller.institution) if k.id == share_id), None)
    if link is None:
        raise HTTPException(404, "no such share link for this institution")
    days = _shares(services).views_by_day(share_id)
    return {**_out(link), "views_by_day": {d.isoformat(): n for d, n in sorted(days.items())}}


@router.get("/{share_id}", response_model=ShareDetailOut, summary="A share link and its views")
async def share_detail(share_id: int, services: ServicesDep, caller: ShareCaller) -> dict:
    return await run_in_threadpool(_detail, services, caller, share_id)


def _revoke(services: Services, caller: Caller, share_id: int) -> None:
    link = _shares(services).revoke(share_id, caller.institution)
    if link is None:
        raise HTTPException(404, "no such share link for this institution")
    record_for(
        services,
        caller,
        "revoke",
        audit.OK,
        resource=link.study_instance_uid,
        detail=f"link {link.id}",
    )


@router.delete("/{share_id}", status_code=204, summary="Revoke a share link at once")
async def revoke_share(share_id: int, services: ServicesDep, caller: ShareCaller) -> Response:
    await run_in_threadpool(_revoke, services, caller, share_id)
    return Response(status_code=204)
