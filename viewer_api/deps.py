"""Typed dependencies, so a route names what it needs and a test overrides one provider."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Protocol

from fastapi import Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from storage import audit
from storage.audit import AuditEntry, AuditLog
from storage.header import valid_uid
from storage.index import Index, IndexUnavailable
from storage.objects import ObjectStore
from storage.query import Located, Query, QueryLevel, Viewer, locate
from storage.registry import DEFAULT_INSTITUTION, SCOPES, Caller, Registry
from storage.renditions import Renditions
from storage.shares import Shares
from storage.spool import Spool

log = logging.getLogger("pocketpacs.http")


class DicomSide(Protocol):
    """The archive process that receives DICOM, seen from an HTTP server running in a
    process of its own (`pocketpacs.http_process`): its spool and counters are part of
    what /healthz and /metrics report."""

    def spool_health(self) -> dict: ...

    def metrics(self) -> str: ...


@dataclass(frozen=True)
class Services:
    """The core objects the HTTP face works with, built once by the command line."""

    objects: ObjectStore
    index: Index
    spool: Spool | None = None
    registry: Registry | None = None
    audit: AuditLog | None = None
    renditions: Renditions | None = None
    shares: Shares | None = None
    open_access: bool = False
    regional_issuer: str = ""
    public_url: str = ""  # where share links point; empty: the address a request came to
    dicom_side: DicomSide | None = None  # when the DICOM side runs in another process

    def __post_init__(self) -> None:
        if self.renditions is None:  # one per archive: it holds a cache and writer threads
            object.__setattr__(self, "renditions", Renditions(self.objects))
        if self.shares is None:
            object.__setattr__(self, "shares", Shares(self.index))

    def link_base(self, request: Request) -> str:
        """Where share links point: the public URL, else the address this request came to."""
        return self.public_url or str(request.base_url).rstrip("/")

    def viewer(self, caller: Caller) -> Viewer:
        """Whose access rules apply to this caller's queries and retrievals."""
        return Viewer(caller.institution, self.regional_issuer)


async def get_services(request: Request) -> Services:
    """Async, though it never waits: FastAPI runs a plain function dependency in its thread
    pool, a thread hand-off per request for an attribute lookup."""
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def record(services: Services, entry: AuditEntry) -> None:
    """Audit an HTTP request; a lost audit event is logged, never a failed request.

    A successful access is queued for the audit writer (written within 50 ms, with
    others): on the request's path, an SQLite write waits its turn behind ingest, and under
    load that wait was most of a phone's (docs/reliability.md). A refusal or a failure is
    written before the answer."""
    if services.audit is None:
        return
    if entry.outcome == audit.OK and services.audit.record_soon(entry):
        return
    try:
        services.audit.record(entry)
    except IndexUnavailable:
        log.exception("audit event lost: %s", entry)


def record_for(
    services: Services, caller: Caller, action: str, outcome: str, **details: str | int
) -> AuditEntry:
    """The audit event `event_for` makes (`details`: its resource, instances, detail),
    recorded; and the event."""
    entry = event_for(caller, action, outcome, **details)  # type: ignore[arg-type]
    record(services, entry)
    return entry


def event_for(
    caller: Caller,
    action: str,
    outcome: str,
    *,
    resource: str = "",
    instances: int = 0,
    detail: str = "",
) -> AuditEntry:
    """An audit event for something an authenticated HTTP caller did."""
    return AuditEntry(
        actor=caller.actor,
        institution=caller.institution,
        action=action,
        outcome=outcome,
        resource=resource[:200],
        source=caller.source,
        instances=instances,
        detail=detail,
    )


async def index_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """Any route whose database did not answer: a 503 to retry, not a 500 (app handler)."""
    log.warning("%s %s: index unavailable: %s", request.method, request.url.path, exc)
    return JSONResponse(
        {"detail": "the index is unavailable for a moment; try again"},
        status_code=503,
        headers={"Retry-After": "5"},
    )


def path_uids(uids: dict[str, str]) -> dict[str, str]:
    """UIDs taken from a URL path: each must be a valid UID, or the request is a 400."""
    for keyword, uid in uids.items():
        if not valid_uid(uid):
            raise HTTPException(400, f"{keyword} in the path is not a valid UID")
    return uids


def _refuse(services: Services, request: Request, status: int, reason: str, actor: str) -> None:
    source = request.client.host if request.client else ""
    record(
        services,
        AuditEntry(
            actor=actor,
            action="http",
            outcome=audit.REFUSED,
            resource=f"{request.method} {request.url.path}"[:200],
            source=source,
            detail=reason,
        ),
    )
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    raise HTTPException(status_code=status, detail=reason, headers=headers)


async def authenticated(request: Request, services: Services, scope: str) -> Caller:
    """The caller of `request`, who must hold `scope`: `Authorization: Bearer <key>`;
    without a key, only an `--open` archive answers (as its one default institution,
    every scope). A refusal is audited, then raised as a 401 or 403."""
    source = request.client.host if request.client else ""
    header = request.headers.get("authorization", "")
    if not header:
        if services.open_access:
            return Caller(DEFAULT_INSTITUTION, "open", frozenset(SCOPES), source)
        await run_in_threadpool(
            _refuse, services, request, 401, "an API key is required", "anonymous"
        )
    kind, _, token = header.partition(" ")
    found = None
    if kind.lower() == "bearer" and services.registry is not None:
        found = await run_in_threadpool(services.registry.authenticate, token.strip(), source)
    if found is None:
        await run_in_threadpool(
            _refuse, services, request, 401, "unknown or revoked API key", "anonymous"
        )
    if scope not in found.scopes:
        await run_in_threadpool(
            _refuse, services, request, 403, f"this key lacks the {scope!r} scope", found.actor
        )
    return found


def requires(scope: str) -> Callable:
    """A dependency giving the authenticated `Caller`, who must hold `scope`
    (`authenticated`)."""
    if scope not in SCOPES:
        raise ValueError(scope)

    async def caller(request: Request, services: ServicesDep) -> Caller:
        return await authenticated(request, services, scope)

    return caller


ReadCaller = Annotated[Caller, Depends(requires("read"))]
IngestCaller = Annotated[Caller, Depends(requires("ingest"))]


_IDENTIFIER_PARAMETERS = ("PatientID", "IssuerOfPatientID")


def visible_instances(
    services: Services, caller: Caller, request: Request, uids: dict[str, str]
) -> list[Located]:
    """The stored instances a study, series or instance path names, as `storage.query.locate`
    finds them for this caller (the rule C-MOVE and C-GET use): another institution's study
    needs the patient identifier, given as the query parameters `PatientID` and
    `IssuerOfPatientID`. None visible is a 404, exactly as if none existed. Audited."""
    return visible_and_audited(services, caller, request, uids)[0]


def visible_and_audited(
    services: Services, caller: Caller, request: Request, uids: dict[str, str]
) -> tuple[list[Located], AuditEntry]:
    """`visible_instances`, and the audit event it recorded."""
    found, level = visible(services, caller, request, uids)
    if found:
        entry = retrieval_event(caller, request, found)
        record(services, entry)
        return found, entry
    record_for(services, caller, "retrieve", audit.FAILED, resource=f"WADO {request.url.path}")
    raise HTTPException(404, f"no such {level.name.lower()} visible to this key")


def visible(
    services: Services, caller: Caller, request: Request, uids: dict[str, str]
) -> tuple[list[Located], QueryLevel]:
    """What `visible_instances` finds, and at which level, before any audit: a caller
    that finds something records `retrieval_event`."""
    path_uids(uids)
    keys = dict(uids)
    for name in _IDENTIFIER_PARAMETERS:
        if name in request.query_params:
            keys[name] = request.query_params[name]
    level = (
        QueryLevel.IMAGE
        if "SOPInstanceUID" in uids
        else QueryLevel.SERIES
        if "SeriesInstanceUID" in uids
        else QueryLevel.STUDY
    )
    return locate(services.index, Query(level, keys), services.viewer(caller)), level


def retrieval_event(caller: Caller, request: Request, found: list[Located]) -> AuditEntry:
    """The audit event of a successful `visible_and_audited`. The path as the request
    gave it (its UIDs are valid, so it needs no escaping): `request.url` parses the
    whole address, 70 µs with the processor's caches cold."""
    path = request.scope["path"]
    return event_for(caller, "retrieve", audit.OK, resource=f"WADO {path}", instances=len(found))
