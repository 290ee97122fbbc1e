"""API settings, validated where the program starts (STYLE 5): tokens from configuration.

``ApiSettings.from_env()`` reads ``FEDSCAN_API_TOKENS`` (``name:token,name:token``) and
``FEDSCAN_ENV``. Outside ``development`` an empty token list or a token shorter than 16
characters is refused at start-up, never discovered at the first request.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

MIN_TOKEN_CHARS = 16


class ApiSettings(BaseModel):
    """The API's settings (environment, bearer tokens, timeouts), refused at start when insecure."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    environment: Literal["development", "production"] = "production"
    tokens: dict[str, SecretStr] = Field(default_factory=dict, description="caller name -> bearer token")
    retry_after_s: int = Field(1, ge=1, le=3600)
    request_timeout_s: float = Field(30.0, gt=0, le=600)
    title: str = "fedscan edge box"

    @model_validator(mode="after")
    def _secure(self) -> ApiSettings:
        if self.environment != "development":
            if not self.tokens:
                raise ValueError("no API tokens configured (set FEDSCAN_API_TOKENS=name:token)")
            short = [n for n, t in self.tokens.items() if len(t.get_secret_value()) < MIN_TOKEN_CHARS]
            if short:
                raise ValueError(f"API tokens shorter than {MIN_TOKEN_CHARS} characters: {sorted(short)}")
        return self

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ApiSettings:
        """Read ``FEDSCAN_API_TOKENS`` and ``FEDSCAN_ENV`` (``environ``: instead of the process environment)."""
        env = os.environ if environ is None else environ
        tokens: dict[str, str] = {}
        for item in filter(None, (s.strip() for s in env.get("FEDSCAN_API_TOKENS", "").split(","))):
            name, sep, token = item.partition(":")
            if not sep or not name or not token:
                raise ValueError("FEDSCAN_API_TOKENS items look like name:token")
            tokens[name] = token
        return cls.model_validate({"environment": env.get("FEDSCAN_ENV", "production"), "tokens": tokens})
