"""Every HTTP route against every kind of caller it must refuse (issue 6): no key, a revoked
key, a key without the route's scope, and a key of another institution, which may call the
route but must see nothing of this institution's studies.

The table below lists every operation of the OpenAPI schema with the scope it needs; a
route added without a line here fails the first test, so none can be forgotten. The
patient's pages under `/s/{token}` are not in the schema: their key is the share token
(tests/test_pocket.py).
"""

from __future__ import annotations

from pathlib import Path

import httpx
from pydicom import dcmread

from pocketpacs.cli import main
from storage.registry import SCOPES
from viewer_api.app import create_app

# (method, path) -> the scope it needs; None: public, and why.
PUBLIC = {
    ("GET", "/healthz"): "load balancers probe it; it names no patient or study",
    ("GET", "/metrics"): "Prometheus scrapes it; counters only",
}
READ = "read"
ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/dicomweb/studies"): READ,
    ("POST", "/dicomweb/studies"): "ingest",
    ("GET", "/dicomweb/series"): READ,
    ("GET", "/dicomweb/instances"): READ,
    ("GET", "/dicomweb/studies/{study}/series"): READ,
    ("GET", "/dicomweb/studies/{study}/instances"): READ,
    ("GET", "/dicomweb/studies/{study}/series/{series}/instances"): READ,
    ("GET", "/dicomweb/studies/{study}"): READ,
    ("POST", "/dicomweb/studies/{study}"): "ingest",
    ("GET", "/dicomweb/studies/{study}/series/{series}"): READ,
    ("GET", "/dicomweb/studies/{study}/series/{series}/instances/{instance}"): READ,
    ("GET", "/dicomweb/studies/{study}/series/{series}/instances/{instance}/frames/{frames}"): READ,
    ("GET", "/dicomweb/studies/{study}/metadata"): READ,
    ("GET", "/dicomweb/studies/{study}/series/{series}/metadata"): READ,
    ("GET", "/dicomweb/studies/{study}/series/{series}/instances/{instance}/metadata"): READ,
    ("GET", "/dicomweb/studies/{study}/series/{series}/instances/{instance}/rendered"): READ,
    (
        "GET",
        "/dicomweb/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered",
    ): READ,
    ("GET", "/dicomweb/studies/{study}/series/{series}/instances/{instance}/thumbnail"): READ,
    ("GET", "/dicomweb/studies/{study}/series/{series}/thumbnail"): READ,
    ("GET", "/dicomweb/studies/{study}/thumbnail"): READ,
    ("GET", "/api/audit"): "admin",
    ("GET", "/api/shares"): "share",
    ("POST", "/api/shares"): "share",
    ("GET", "/api/shares/{share_id}"): "share",
    ("DELETE", "/api/shares/{share_id}"): "share",
}


# QIDO-RS searches answer another institution with what it may see (nothing of north's here),
# where a retrieval answers 404.
SEARCHES = {
    "/dicomweb/studies",
    "/dicomweb/series",
    "/dicomweb/instances",
    "/dicomweb/studies/{study}/series",
    "/dicomweb/studies/{study}/instances",
    "/dicomweb/studies/{study}/series/{series}/instances",
}


def test_every_route_is_in_the_table() -> None:
    schema = create_app(None).openapi()  # type: ignore[arg-type]  # routes only
    operations = {(m.upper(), path) for path, ops in schema["paths"].items() for m in ops}
    assert operations == set(ROUTES) | set(PUBLIC)
    assert set(ROUTES.values()) <= set(SCOPES)


def _key(archive, capsys, institution: str, scope: str) -> str:
    data = ["--data-dir", str(archive.data_dir)]
    assert main(["keys", "create", "--institution", institution, "--scope", scope, *data]) == 0
    return capsys.readouterr().out.strip()


def _revoke(archive, capsys, token: str) -> None:
    key_id = token.split("_")[1]
    assert main(["keys", "revoke", key_id, "--data-dir", str(archive.data_dir)]) == 0
    capsys.readouterr()


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def test_every_route_refuses_whom_it_must(region, tmp_path: Path, capsys) -> None:
    archive, studies = region
    first = dcmread(tmp_path / "A1.dcm", stop_before_pixels=True)
    series, instance = str(first.SeriesInstanceUID), str(first.SOPInstanceUID)
    north = {scope: _key(archive, capsys, "north", scope) for scope in SCOPES}
    south = {scope: _key(archive, capsys, "south", scope) for scope in SCOPES}
    revoked = {scope: _key(archive, capsys, "north", scope) for scope in SCOPES}
    for token in revoked.values():
        _revoke(archive, capsys, token)
    made = httpx.post(
        f"{archive.http}/api/shares",
        json={"study_uid": studies["A"]},
        headers=_bearer(north["share"]),
    )
    assert made.status_code == 201, made.text
    values = {
        "study": studies["A"],
        "series": series,
        "instance": instance,
        "frames": "1",
        "frame": "1",
        "share_id": str(made.json()["id"]),
    }
    # North's identifiers that another institution's answer must not hold.
    # (South holds a study of its own for the same patient, P1 Doe^Jane: that it may see.)
    secrets = (studies["A"], studies["B"], series, instance)

    for (method, template), scope in ROUTES.items():
        url = archive.http + template.format(**values)
        body = {"json": {"study_uid": studies["A"]}} if template == "/api/shares" else {}

        def call(token: str | None, url: str = url, method: str = method, body=body):
            return httpx.request(method, url, headers=_bearer(token), timeout=60, **body)

        route = f"{method} {template}"
        assert call(None).status_code == 401, f"{route}: no key"
        assert call(revoked[scope]).status_code == 401, f"{route}: a revoked key"
        other_scope = next(s for s in SCOPES if s != scope)
        assert call(north[other_scope]).status_code == 403, f"{route}: without {scope}"
        answer = call(south[scope])
        assert answer.status_code < 500, f"{route}: {answer.status_code}"
        if method == "POST" and scope == "ingest":
            assert answer.status_code >= 400  # an empty body; what south stores is its own
            continue
        if template in SEARCHES:
            assert answer.status_code in (200, 204), f"{route}: {answer.status_code}"
        elif "{" in template or (template == "/api/shares" and method == "POST"):
            assert answer.status_code == 404, f"{route}: another institution got {answer}"
        text = answer.text
        if template != "/api/audit":  # south's own rows name the UIDs south itself asked for
            assert not any(secret in text for secret in secrets), f"{route}: leaked to south"
        assert "north" not in text.lower() or (template == "/api/audit" and '"north"' not in text)
