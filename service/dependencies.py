"""FastAPI dependencies: what a handler may rely on before it runs (a ready recommender, an authorized caller).

Everything they read lives on `app.state`, set by the app factory and the lifespan (`service.app`), not in
closures, so routes can sit in their own module and a test can build or inspect an app's state directly.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.models import Served
from service.settings import ServeSettings

MIN_TOKEN_CHARS = 16
BEARER = HTTPBearer(auto_error=False, description="the server's POD_API_TOKEN")


def api_token(settings: ServeSettings) -> bytes | None:
    """The token the recommendation endpoints require, or None (open); refuses to start with a short one,
    without echoing it (start-up errors end up in logs)."""
    token = settings.api_token.get_secret_value().encode() if settings.api_token else None
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"POD_API_TOKEN is shorter than {MIN_TOKEN_CHARS} characters; use a long random one")
    return token


async def authorized(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]
) -> None:
    """Constant-time comparison, so response timing does not reveal how much of a guess was right. Bytes, so a
    non-ASCII header is a plain mismatch (401), not a 500."""
    given = credentials.credentials.encode() if credentials is not None else b""
    if not hmac.compare_digest(given, request.app.state.api_token):
        raise HTTPException(
            401,
            detail=[
                {
                    "loc": ["header", "authorization"],
                    "msg": "missing or wrong bearer token (Authorization: Bearer <token>)",
                    "input": None,
                }
            ],
            headers={"WWW-Authenticate": "Bearer"},
        )


async def ready_model(request: Request) -> Served:
    """The model being served (read once per request, so a swap cannot change it midway), once loaded and warm
    and until shutdown starts; before and after, 503 with Retry-After so a load balancer looks elsewhere."""
    state = request.app.state
    if not state.ready:
        raise HTTPException(
            503,
            detail=[{"loc": [], "msg": "not ready (loading or shutting down)", "input": None}],
            headers={"Retry-After": "1"},
        )
    return state.model


async def settings(request: Request) -> ServeSettings:
    return request.app.state.settings


ReadyModel = Annotated[Served, Depends(ready_model)]
Settings = Annotated[ServeSettings, Depends(settings)]
