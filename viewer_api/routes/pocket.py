"""The pocket film: the page a patient opens from a share link, and everything it loads,
all under `/s/{token}/` and all reaching that link's one study only (SPEC 5, 6).

Inside a link, series and images are named by their position in the study, never by UID:
no identifier of the patient or the study appears in any URL. The page is served whole
by pocketpacs (`viewer_api/pocket/`: one HTML shell, one script, one style sheet), so it
works on a closed hospital network.
"""

from __future__ import annotations

import html
import io
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydicom import dcmread

from storage import audit
from storage.audit import AuditEntry
from storage.frames import FrameNotFound
from storage.objects import ObjectStoreUnavailable
from storage.rendering import Rendering, Undecodable, Window
from storage.renditions import THUMBNAIL, Renditions, representatives
from storage.shares import (
    ENCAPSULATED_PDF,
    PocketStudy,
    ShareGone,
    ShareLink,
    ShareLocked,
    ShareNotFound,
    Shares,
    WrongCode,
    masked_token,
    qr_code,
    session_cookie,
)
from viewer_api.deps import Services, ServicesDep, record

router = APIRouter(prefix="/s/{token}", tags=["pocket film"], include_in_schema=False)

ASSETS = Path(__file__).resolve().parent.parent / "pocket"
COOKIE = "pocketfilm"
SESSION_SECONDS = 12 * 3600
# Sizes a phone may ask for (the longer side): few, so renditions are shared between phones.
SIZES = (256, 512, 768, 1024)
QUALITY = 80
# CT window presets (center, width in HU), rendered by the server.
PRESETS = {
    "lung": Window(-600, 1500),
    "mediastinum": Window(50, 350),
    "bone": Window(400, 1800),
    "brain": Window(40, 80),
}
SECURITY_HEADERS = [
    (b"cache-control", b"private, no-cache"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
        b"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
]
_SHARE_PATH = re.compile(r"/s/([A-Za-z0-9_-]{6})[A-Za-z0-9_-]*")


def masked_path(path: str) -> str:
    """A path with any share token cut to its first characters, for logs and audit rows."""
    return _SHARE_PATH.sub(r"/s/\1…", path)


class PocketHeaders:
    """ASGI middleware: every response under `/s/` is private, sends no referrer and runs
    no script or style but the page's own. Pure ASGI: the rest of the API pays nothing."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/s/"):
            await self.app(scope, receive, send)
            return

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in SECURITY_HEADERS}
                kept = [(n, v) for n, v in message.get("headers", []) if n.lower() not in names]
                message = {**message, "headers": kept + SECURITY_HEADERS}
            await send(message)

        await self.app(scope, receive, sending)


# Opening a link: every route below depends on it.


@dataclass(frozen=True)
class Opened:
    link: ShareLink
    token: str
    code_sha256: str | None
    source: str

    @property
    def unlocked_cookie(self) -> str | None:
        return session_cookie(self.code_sha256) if self.code_sha256 else None


def _shares(services: Services) -> Shares:
    assert services.shares is not None
    return services.shares


def _audit(
    services: Services,
    request: Request,
    action: str,
    outcome: str,
    link: ShareLink | None,
    detail: str = "",
    instances: int = 0,
) -> None:
    record(
        services,
        AuditEntry(
            actor=f"link {link.id}" if link else "anonymous",
            institution=link.institution if link else "",
            action=action,
            outcome=outcome,
            resource=masked_path(f"{request.method} {request.url.path}")[:200],
            source=request.client.host if request.client else "",
            instances=instances,
            detail=detail,
        ),
    )


def _english(request: Request) -> bool:
    """Chinese for a browser that puts Chinese first, English otherwise."""
    return not request.headers.get("accept-language", "").lower().lstrip().startswith("zh")


def _page(request: Request, status: int, exc: Exception) -> HTMLResponse:
    """What a phone shows for a link that does not open, in its language."""
    english = _english(request)
    if isinstance(exc, ShareGone):
        ask = html.escape(exc.institution)
        if english:
            title = (
                "This link has expired" if exc.reason == "expired" else "This link was withdrawn"
            )
            body = f"Please ask the hospital that gave it to you ({ask}) for a new link."
        else:
            title = "此链接已过期" if exc.reason == "expired" else "此链接已被撤销"
            body = f"请联系给您此链接的医院（{ask}）获取新的链接。"
    elif isinstance(exc, ShareLocked):
        minutes = exc.retry_after // 60 + 1
        title = "Too many attempts" if english else "尝试次数过多"
        body = (
            f"Please try again in {minutes} minutes." if english else f"请在 {minutes} 分钟后重试。"
        )
    else:
        title = "No such link" if english else "链接不存在"
        body = (
            "Check that the whole link was copied, or ask the hospital for a new one."
            if english
            else "请确认链接完整，或联系医院获取新的链接。"
        )
    lang = "en" if english else "zh"
    page = (
        f'<!doctype html><html lang="{lang}"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{title}</title></head><body><h1>{title}</h1><p>{body}</p></body></html>"
    )
    return HTMLResponse(page, status_code=status)


def _open(services: Services, request: Request, token: str) -> Opened:
    source = request.client.host if request.client else ""
    try:
        link, code = _shares(services).open(token, source)
    except ShareLocked as exc:
        _audit(services, request, "share-view", audit.REFUSED, None, detail=str(exc))
        raise PageError(429, exc, {"Retry-After": str(exc.retry_after)}) from exc
    except ShareGone as exc:
        _audit(services, request, "share-view", audit.REFUSED, None, detail=str(exc))
        raise PageError(410, exc) from exc
    except ShareNotFound as exc:
        _audit(services, request, "share-view", audit.REFUSED, None, detail="no such link")
        raise PageError(404, exc) from exc
    return Opened(link, token, code, source)


class PageError(Exception):
    """A link that does not open: a page for the browser, a reason for the script."""

    def __init__(self, status: int, cause: Exception, headers: dict[str, str] | None = None):
        super().__init__(str(cause))
        self.status = status
        self.cause = cause
        self.headers = headers or {}


def page_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PageError)
    if "text/html" in request.headers.get("accept", ""):
        response: Response = _page(request, exc.status, exc.cause)
    else:
        response = JSONResponse({"detail": str(exc)}, status_code=exc.status)
    response.headers.update(exc.headers)
    return response


async def opened(token: str, request: Request, services: ServicesDep) -> Opened:
    return await run_in_threadpool(_open, services, request, token)


def _unlocked(request: Request, link: Opened) -> Opened:
    """The link, once its access code (if any) was given in this browser."""
    if link.unlocked_cookie is not None and request.cookies.get(COOKIE) != link.unlocked_cookie:
        raise HTTPException(401, "this link needs its access code")
    return link


async def unlocked(request: Request, link: Annotated[Opened, Depends(opened)]) -> Opened:
    return _unlocked(request, link)


OpenedLink = Annotated[Opened, Depends(opened)]
UnlockedLink = Annotated[Opened, Depends(unlocked)]


# The page and its two assets.


def _asset(name: str, media_type: str) -> Response:
    return Response((ASSETS / name).read_bytes(), media_type=media_type)


@router.get("")
async def page(link: OpenedLink) -> Response:
    """The app shell: the script asks for the code when the link has one. Its two assets
    are named from the root: relative to `/s/{token}` they would fall outside the link."""
    shell = (ASSETS / "index.html").read_text().replace("{base}", f"/s/{link.token}")
    return Response(shell, media_type="text/html; charset=utf-8")


@router.get("/app.js")
async def script(link: OpenedLink) -> Response:
    return _asset("app.js", "text/javascript; charset=utf-8")


@router.get("/app.css")
async def style(link: OpenedLink) -> Response:
    return _asset("app.css", "text/css; charset=utf-8")


def _check_code(services: Services, request: Request, link: Opened, code: str) -> None:
    try:
        _shares(services).check_code(link.link, link.code_sha256, link.token, code, link.source)
    except WrongCode as exc:
        _audit(services, request, "share-code", audit.FAILED, link.link, detail=str(exc))
        raise HTTPException(403, str(exc)) from exc
    except ShareLocked as exc:
        _audit(services, request, "share-code", audit.REFUSED, link.link, detail=str(exc))
        raise HTTPException(429, str(exc), headers={"Retry-After": str(exc.retry_after)}) from exc


@router.post("/code")
async def give_code(
    request: Request, services: ServicesDep, link: OpenedLink, code: Annotated[str, Form()]
) -> Response:
    """The access code: right, and this browser may open the link for `SESSION_SECONDS`."""
    await run_in_threadpool(_check_code, services, request, link, code)
    response = Response(status_code=204)
    if link.unlocked_cookie:
        response.set_cookie(
            COOKIE,
            link.unlocked_cookie,
            max_age=SESSION_SECONDS,
            path=f"/s/{link.token}",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
    return response


# What the page shows.


def _study(services: Services, link: Opened) -> PocketStudy:
    found = _shares(services).study(link.link.study_instance_uid)
    if found is None:
        raise HTTPException(404, "the study of this link holds nothing now")
    return found


def _summary(services: Services, request: Request, link: Opened) -> dict:
    study = _study(services, link)
    _shares(services).count_view(link.link)
    _audit(services, request, "share-view", audit.OK, link.link, instances=len(study.instances))
    reports = []
    for position, item in enumerate(study.reports):
        kind = "pdf" if item.sop_class_uid == ENCAPSULATED_PDF else "sr"
        reports.append({"kind": kind, "url": f"report/{position}"})
    return {
        "patient": {
            "name": study.patient_name,
            "sex": study.patient_sex,
            "age": study.patient_age,
        },
        "study": {
            "date": study.study_date.isoformat() if study.study_date else "",
            "description": study.description,
            "institution": study.institution,
            "modalities": study.modalities,
            "body_parts": study.body_parts,
        },
        "series": [
            {
                "number": s.number,
                "description": s.description,
                "modality": s.modality,
                "images": len(s.images),
                "presets": list(PRESETS) if s.modality == "CT" else [],
            }
            for s in study.series
        ],
        "reports": reports,
        "download": "download" if link.link.allow_download else None,
        "sizes": list(SIZES),
    }


@router.get("/study")
async def summary(request: Request, services: ServicesDep, link: UnlockedLink) -> dict:
    """The header, the series and the reports; counted as one view of the link."""
    return await run_in_threadpool(_summary, services, request, link)


def _renditions(services: Services) -> Renditions:
    assert services.renditions is not None
    return services.renditions


def _picture(
    services: Services, link: Opened, series: int, image: int | None, rendering: Rendering
) -> bytes:
    study = _study(services, link)
    if not 0 <= series < len(study.series):
        raise HTTPException(404, "no such series in this study")
    images = study.series[series].images
    if image is None:  # the thumbnail: the series' representative, as the worker made it
        instances = list(dict.fromkeys(i.item for i in images))  # in order, each once
        target, frame = representatives(instances)[0], None
    else:
        if not 0 <= image < len(images):
            raise HTTPException(404, "no such image in this series")
        target, frame = images[image].item, images[image].frame
    try:
        return _renditions(services).rendered(target, frame, rendering).data
    except FrameNotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    except Undecodable as exc:
        raise HTTPException(415, str(exc)[:300]) from exc
    except ObjectStoreUnavailable as exc:
        raise HTTPException(503, "images are unavailable for a moment") from exc


def _jpeg(data: bytes) -> Response:
    return Response(data, media_type="image/jpeg")


def _unlocked_picture(
    services: Services,
    request: Request,
    token: str,
    series: int,
    image: int | None,
    rendering: Rendering,
) -> bytes:
    """Open the link, check its code, render: in one thread hop, not one per step, since
    images are most of what a phone asks for."""
    link = _unlocked(request, _open(services, request, token))
    return _picture(services, link, series, image, rendering)


@router.get("/series/{series}/thumbnail")
async def thumbnail(token: str, series: int, request: Request, services: ServicesDep) -> Response:
    return _jpeg(
        await run_in_threadpool(
            _unlocked_picture, services, request, token, series, None, THUMBNAIL
        )
    )


@router.get("/series/{series}/images/{image}")
async def image(
    token: str,
    series: int,
    image: int,
    request: Request,
    services: ServicesDep,
    size: int = 512,
    preset: str = "",
) -> Response:
    """One slice (or frame) at `size` pixels on its longer side, in a CT window `preset`
    or the stored window."""
    if size not in SIZES:
        raise HTTPException(400, f"size is one of {', '.join(map(str, SIZES))}")
    if preset and preset not in PRESETS:
        raise HTTPException(400, f"preset is one of {', '.join(PRESETS)}")
    rendering = Rendering("image/jpeg", (size, size), PRESETS.get(preset), QUALITY)
    return _jpeg(
        await run_in_threadpool(
            _unlocked_picture, services, request, token, series, image, rendering
        )
    )


def _sr_text(data: bytes) -> str:
    """The readable text of a structured report: its content items, headings first."""
    ds = dcmread(io.BytesIO(data), force=True)
    lines: list[str] = []

    def walk(items, depth: int) -> None:
        for item in items:
            name = ""
            if "ConceptNameCodeSequence" in item and item.ConceptNameCodeSequence:
                name = str(item.ConceptNameCodeSequence[0].get("CodeMeaning", ""))
            value = ""
            kind = item.get("ValueType", "")
            if kind == "TEXT":
                value = str(item.get("TextValue", ""))
            elif kind == "CODE" and item.get("ConceptCodeSequence"):
                value = str(item.ConceptCodeSequence[0].get("CodeMeaning", ""))
            elif kind == "NUM" and item.get("MeasuredValueSequence"):
                measured = item.MeasuredValueSequence[0]
                unit = ""
                if measured.get("MeasurementUnitsCodeSequence"):
                    unit = str(measured.MeasurementUnitsCodeSequence[0].get("CodeValue", ""))
                value = f"{measured.get('NumericValue', '')} {unit}".strip()
            if name or value:
                lines.append(
                    "  " * depth + (f"{name}: {value}" if name and value else name or value)
                )
            if "ContentSequence" in item:
                walk(item.ContentSequence, depth + 1)

    title = ""
    if ds.get("ConceptNameCodeSequence"):
        title = str(ds.ConceptNameCodeSequence[0].get("CodeMeaning", ""))
    walk(ds.get("ContentSequence", []), 0)
    return (title + "\n" if title else "") + "\n".join(lines)


def _report(services: Services, request: Request, link: Opened, position: int) -> Response:
    study = _study(services, link)
    if not 0 <= position < len(study.reports):
        raise HTTPException(404, "no such report in this study")
    item = study.reports[position]
    data = services.objects.get(item.object_key)
    _audit(services, request, "share-report", audit.OK, link.link, instances=1)
    if item.sop_class_uid == ENCAPSULATED_PDF:
        document = dcmread(io.BytesIO(data), force=True).get("EncapsulatedDocument", b"")
        pdf = bytes(document).rstrip(b"\0")
        return Response(
            pdf,
            media_type="application/pdf",
            headers={"Content-Disposition": 'inline; filename="report.pdf"'},
        )
    return JSONResponse({"text": _sr_text(data)})


@router.get("/report/{position}")
async def report(
    position: int, request: Request, services: ServicesDep, link: UnlockedLink
) -> Response:
    """A report of the study: a structured report as text, an encapsulated PDF as is."""
    return await run_in_threadpool(_report, services, request, link, position)


class _Sink(io.RawIOBase):
    """Where zipfile writes a streamed archive: chunks taken away as they come."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.chunks.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data, self.chunks = b"".join(self.chunks), []
        return data


def _zip(services: Services, study: PocketStudy) -> Iterator[bytes]:
    """The originals as stored, one file per instance (`series-N/NNNN.dcm`), streamed:
    the archive never holds more than one chunk of one object."""
    sink = _Sink()
    numbers: dict[str, int] = {}
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for position, item in enumerate(study.instances, start=1):
            series = numbers.setdefault(item.series_instance_uid, len(numbers) + 1)
            info = zipfile.ZipInfo(f"series-{series}/{position:04d}.dcm")
            with archive.open(info, "w", force_zip64=item.size > 2**31) as entry:
                for chunk in services.objects.stream(item.object_key):
                    entry.write(chunk)
                    yield sink.take()
            yield sink.take()
    yield sink.take()


def _download(services: Services, request: Request, link: Opened) -> PocketStudy:
    if not link.link.allow_download:
        _audit(services, request, "share-download", audit.REFUSED, link.link)
        raise HTTPException(403, "this link does not offer a download")
    study = _study(services, link)
    _audit(services, request, "share-download", audit.OK, link.link, instances=len(study.instances))
    return study


@router.get("/download")
async def download(request: Request, services: ServicesDep, link: UnlockedLink) -> Response:
    """The study's original DICOM files as one ZIP, streamed, when the link allows it."""
    study = await run_in_threadpool(_download, services, request, link)
    return StreamingResponse(
        _zip(services, study),
        media_type="application/zip",
        headers={"Content-Disposition": 'attachment; filename="study.zip"'},
    )


# The QR code of the link (no code needed: it holds only the link itself).


@router.get("/qr.{kind}")
async def qr(kind: str, request: Request, services: ServicesDep, link: OpenedLink) -> Response:
    if kind not in ("png", "svg"):
        raise HTTPException(404, "the QR code is qr.png or qr.svg")
    data = qr_code(f"{services.link_base(request)}/s/{link.token}", kind)
    return Response(data, media_type="image/png" if kind == "png" else "image/svg+xml")


__all__ = ["PageError", "PocketHeaders", "masked_path", "masked_token", "page_error_handler"]
