"""Request ids and error bodies for every answer of the inference API.

Every request gets a fresh id (``uuid4().hex``; a client's own ``X-Request-ID`` is not trusted)
in ``request.state.request_id``, returned in the ``X-Request-ID`` header of every answer and in
the body of every refusal (``detail.request_id``). The box's log and audit name the same id, so a
clinician's "it failed" can be found without the answer ever carrying internal details: an
unexpected exception is answered 500 ``internal_error`` with the id only.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.responses import Response

from protocol.errors import Reason

log = logging.getLogger("fedscan.agent.api")

HEADER = "X-Request-ID"


def _rid(request: Request) -> str:
    rid = getattr(request.state, "request_id", None)
    return rid if isinstance(rid, str) else ""


def _error(request: Request, status: int, reason: str, message: str,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"detail": {"reason": reason, "message": message, "request_id": _rid(request)}}
    return JSONResponse(body, status_code=status, headers={**(headers or {}), HEADER: _rid(request)})


def install_request_ids(app: FastAPI) -> None:
    """Add the request-id middleware and the handlers that put the id into every error body."""

    @app.middleware("http")
    async def assign(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        request.state.request_id = uuid.uuid4().hex
        try:
            response = await call_next(request)
        except Exception:  # a bug in a route: logged with the id, answered without details
            log.exception("request %s %s %s failed", request.state.request_id, request.method, request.url.path)
            return _error(request, 500, Reason.INTERNAL_ERROR, "the box failed; its log has the details")
        response.headers[HEADER] = request.state.request_id
        return response

    @app.exception_handler(HTTPException)  # Starlette's: FastAPI's own refusals (body parsing) raise it too
    async def http_refusal(request: Request, exc: HTTPException) -> JSONResponse:
        # our refusals carry {"reason", "message"}; Starlette's own (404 route, 405 method) a plain text
        detail = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
        reason = str(detail.get("reason") or (Reason.NOT_FOUND if exc.status_code == 404 else Reason.INVALID_REQUEST))
        return _error(request, exc.status_code, reason, str(detail.get("message", "")), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(request, 422, Reason.INVALID_REQUEST, f"{where}: {first.get('msg', 'invalid')}"[:300])
