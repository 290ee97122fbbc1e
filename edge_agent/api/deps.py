"""Dependencies (``Annotated``): the caller behind a bearer token, the service, the store."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from edge_agent.api.errors import http_error
from edge_agent.api.settings import ApiSettings
from edge_agent.serving import DiagnosisService
from edge_agent.store import LocalStore
from protocol.errors import Reason

_bearer = HTTPBearer(auto_error=False, description="a token from FEDSCAN_API_TOKENS")


def request_id(request: Request) -> str:
    """Return the id the request-id middleware gave this request (``X-Request-ID``)."""
    rid = getattr(request.state, "request_id", None)
    return rid if isinstance(rid, str) else ""


def get_settings(request: Request) -> ApiSettings:
    """Return the API settings the app was built with."""
    settings: ApiSettings = request.app.state.settings
    return settings


def get_service(request: Request) -> DiagnosisService:
    """Return the diagnosis service shared by the routes (and the DICOM listener)."""
    service: DiagnosisService = request.app.state.service
    return service


def get_store(request: Request) -> LocalStore:
    """Return the box's local study store."""
    return get_service(request).store


def require_caller(
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    settings: Annotated[ApiSettings, Depends(get_settings)],
) -> str:
    """Return the caller's name for a valid bearer token, else 401 ``missing_token`` / ``invalid_token``."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if creds is None or not creds.credentials:
        raise http_error(Reason.MISSING_TOKEN, "send Authorization: Bearer <token>", challenge)
    given = creds.credentials.encode()
    found: str | None = None
    for name, token in settings.tokens.items():
        if hmac.compare_digest(given, token.get_secret_value().encode()):
            found = name
    if found is None:
        raise http_error(Reason.INVALID_TOKEN, "the bearer token is not valid", challenge)
    return found


Caller = Annotated[str, Depends(require_caller)]
Service = Annotated[DiagnosisService, Depends(get_service)]
Store = Annotated[LocalStore, Depends(get_store)]
Settings = Annotated[ApiSettings, Depends(get_settings)]
