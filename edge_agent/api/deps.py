"""Dependencies (``Annotated``): the caller behind a bearer token, the service, the store."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from edge_agent.api.settings import ApiSettings
from edge_agent.serving import DiagnosisService
from edge_agent.store import LocalStore

_bearer = HTTPBearer(auto_error=False, description="a token from FEDSCAN_API_TOKENS")


def http_error(status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(status_code=status, detail={"reason": reason, "message": message}, headers=headers)


def get_settings(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.settings
    return settings


def get_service(request: Request) -> DiagnosisService:
    service: DiagnosisService = request.app.state.service
    return service


def get_store(request: Request) -> LocalStore:
    return get_service(request).store


def require_caller(
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    settings: Annotated[ApiSettings, Depends(get_settings)],
) -> str:
    """The caller's name for a valid bearer token, else 401 ``missing_token`` / ``invalid_token``."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if creds is None or not creds.credentials:
        raise http_error(401, "missing_token", "send Authorization: Bearer <token>", challenge)
    given = creds.credentials.encode()
    found: str | None = None
    for name, token in settings.tokens.items():
        if hmac.compare_digest(given, token.get_secret_value().encode()):
            found = name
    if found is None:
        raise http_error(401, "invalid_token", "the bearer token is not valid", challenge)
    return found


Caller = Annotated[str, Depends(require_caller)]
Service = Annotated[DiagnosisService, Depends(get_service)]
Store = Annotated[LocalStore, Depends(get_store)]
Settings = Annotated[ApiSettings, Depends(get_settings)]
