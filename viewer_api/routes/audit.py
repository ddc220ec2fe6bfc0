"""`GET /api/audit`: the audit trail of the caller's institution, newest first (admin)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.concurrency import run_in_threadpool

from storage.registry import Caller
from viewer_api.deps import ServicesDep, requires

router = APIRouter(prefix="/api", tags=["administration"])

AdminCaller = Annotated[Caller, Depends(requires("admin"))]


@router.get("/audit", summary="Audit events of the caller's institution")
async def audit_events(
    services: ServicesDep,
    caller: AdminCaller,
    action: str | None = None,
    actor: str | None = None,
    outcome: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> list[dict]:
    """An institution's administrator sees its own events; `pocketpacs audit` sees all."""
    if services.audit is None:
        return []
    entries = await run_in_threadpool(
        services.audit.search,
        institution=caller.institution,
        action=action,
        actor=actor,
        outcome=outcome,
        since=since,
        until=until,
        limit=limit,
    )
    return [
        {
            "at": e.at.isoformat(),
            "actor": e.actor,
            "institution": e.institution,
            "action": e.action,
            "resource": e.resource,
            "source": e.source,
            "outcome": e.outcome,
            "instances": e.instances,
            "detail": e.detail,
        }
        for e in entries
    ]
