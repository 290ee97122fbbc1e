"""Fleet dashboard: one FastAPI router serving a static page and the JSON it polls.

``GET {base}`` — the page (HTML + ``app.js`` + ``style.css``, all served from this package: no
CDN, the coordinator may have no internet). ``GET {base}/api/fleet`` — one page of the fleet
view snapshot (agents, online state, model versions, current resources and recent history;
``offset``/``limit`` page it, ``q`` filters by agent id, ``state`` by presence, ``matching``
says how many agents pass, ``total``/``online`` count the fleet) plus the current round and
rollout progress from two optional callables the composition root provides::

    app.include_router(dashboard_router(view, round_info=rounds.progress, rollout_info=rollout.progress))

``round_info`` / ``rollout_info`` return a JSON-able mapping or ``None``; the page shows every key
and draws a progress bar from ``done``/``total`` (or ``received``/``expected``) when present. A
callable that raises is reported as ``{"error": "<ExceptionClass>"}`` and the page stays up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query, Response

from coordinator.fleet_view import FleetView

log = logging.getLogger(__name__)

ProgressInfo = Callable[[], Mapping[str, Any] | None]

#: Everything the page loads comes from the coordinator itself.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
)
_ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


def _asset(name: str) -> str:
    # Beside this module (not in a sub-folder) so pyproject's package-data globs ship them in a wheel.
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _call(fn: ProgressInfo | None) -> dict[str, Any] | None:
    if fn is None:
        return None
    try:
        value = fn()
    except Exception as exc:  # the dashboard must not die with the round manager
        log.warning("dashboard: progress callable failed: %s", exc.__class__.__name__)
        return {"error": exc.__class__.__name__}
    return dict(value) if value is not None else None


def dashboard_router(
    view: FleetView,
    *,
    round_info: ProgressInfo | None = None,
    rollout_info: ProgressInfo | None = None,
    base: str = "/dashboard",
    refresh_s: float = 2.0,
) -> APIRouter:
    """The dashboard's routes: the page, its static assets and the JSON it polls."""
    base = "/" + base.strip("/")
    router = APIRouter()
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
    page = (
        _asset("index.html")
        .replace("{{BASE}}", base)
        .replace("{{REFRESH_MS}}", str(int(refresh_s * 1000)))
    )

    @router.get(base, include_in_schema=False)
    def dashboard() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=headers)

    @router.get(base + "/static/{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        if name not in _ASSETS:
            raise HTTPException(404)
        return Response(_asset(name), media_type=_ASSETS[name], headers=headers)

    @router.get(base + "/api/fleet")
    def fleet(
        points: int = Query(120, ge=0, le=2000),
        offset: int = Query(0, ge=0),
        limit: int = Query(100, ge=1, le=500),
        q: str = Query("", max_length=64),
        state: Literal["all", "online", "offline"] = "all",
    ) -> dict[str, Any]:
        snap = view.snapshot(history_points=points, offset=offset, limit=limit, query=q or None,
                             online=None if state == "all" else state == "online")
        snap["round"] = _call(round_info)
        snap["rollout"] = _call(rollout_info)
        return snap

    return router
