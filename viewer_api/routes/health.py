"""`GET /healthz`: can this server store and find an instance right now?"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from storage.index import IndexUnavailable
from storage.objects import ObjectStoreUnavailable
from viewer_api.deps import Services, ServicesDep

router = APIRouter(tags=["operations"])


def _probe(services: Services) -> dict:
    report: dict = {}
    try:
        services.objects.ping()
        report["object_store"] = {"ok": True, "bucket": services.objects.bucket}
    except ObjectStoreUnavailable as exc:
        report["object_store"] = {"ok": False, "error": str(exc)}
    try:
        services.index.ping()
        report["index"] = {"ok": True}
    except IndexUnavailable as exc:
        report["index"] = {"ok": False, "error": str(exc)}
    if services.spool is not None:
        failure = services.spool.failure
        report["ingest_spool"] = {
            "ok": failure is None,
            "pending": services.spool.pending,
            "free_files": services.spool.files.free,
        }
        if failure:
            report["ingest_spool"]["error"] = failure
    return report


@router.get("/healthz", summary="Object store, index and ingest spool status")
async def healthz(services: ServicesDep) -> JSONResponse:
    """200 when every part answers, 503 with the failing part's error otherwise."""
    report = await run_in_threadpool(_probe, services)
    healthy = all(part["ok"] for part in report.values())
    body = {"status": "ok" if healthy else "unavailable", **report}
    return JSONResponse(body, status_code=200 if healthy else 503)
