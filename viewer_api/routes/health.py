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
    spools = [services.spool.health()] if services.spool is not None else []
    if services.dicom_side is not None:
        try:
            spools.append(services.dicom_side.spool_health())
        except OSError as exc:
            spools.append({"ok": False, "pending": 0, "error": f"DICOM side: {exc}"})
    if spools:
        report["ingest_spool"] = _together(spools)
    return report


def _together(spools: list[dict]) -> dict:
    """The spools of the DICOM side and of STOW-RS as one: ok when both are, the pending
    instances of both, the fewer spare files."""
    together: dict = {
        "ok": all(s["ok"] for s in spools),
        "pending": sum(s["pending"] for s in spools),
    }
    free = [s["free_files"] for s in spools if "free_files" in s]
    if free:
        together["free_files"] = min(free)
    errors = [s["error"] for s in spools if s.get("error")]
    if errors:
        together["error"] = "; ".join(errors)
    return together


@router.get("/healthz", summary="Object store, index and ingest spool status")
async def healthz(services: ServicesDep) -> JSONResponse:
    """200 when every part answers, 503 with the failing part's error otherwise."""
    report = await run_in_threadpool(_probe, services)
    healthy = all(part["ok"] for part in report.values())
    body = {"status": "ok" if healthy else "unavailable", **report}
    return JSONResponse(body, status_code=200 if healthy else 503)
