"""The clinician's page on the box: photograph in, diagnosis and reliability out (issue 16 item 5).

``GET /clinic`` serves a static page (HTML + ``app.js`` + ``style.css`` from this package, no CDN:
the box may have no internet) under a strict Content-Security-Policy. The page holds no data of
its own: everything it shows comes from the box's API with the clinician's bearer token (the
same ``FEDSCAN_API_TOKENS``; kept in the tab's ``sessionStorage`` only): ``POST /v1/diagnose``
for a dropped or picked image (label, calibrated probabilities, reliability %, model version,
the box's milliseconds), ``GET /v1/studies`` for the recent studies, ``POST
/v1/studies/{id}/finding`` to confirm or correct a finding (which becomes a training label) and
``GET /v1/model`` for the classes. Without a valid token every call answers 401 and the page
says so.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, HTTPException, Response

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' blob: data:; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
)
_ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store",
           "Referrer-Policy": "no-referrer"}


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def clinic_router(base: str = "/clinic") -> APIRouter:
    """The page and its two static assets (the data comes from the token-protected API)."""
    base = "/" + base.strip("/")
    router = APIRouter()
    page = _asset("index.html").replace("{{BASE}}", base)

    @router.get(base, include_in_schema=False)
    def clinic() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=HEADERS)

    @router.get(base + "/static/{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        if name not in _ASSETS:
            raise HTTPException(404)
        return Response(_asset(name), media_type=_ASSETS[name], headers=HEADERS)

    return router
