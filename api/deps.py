"""FastAPI dependencies: settings, the Redis-backed job store, the object store, API-key auth."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from patchdiff_core.service.jobs import JobStore
from patchdiff_core.service.settings import Settings
from patchdiff_core.service.store import JOB_ID, ObjectStore


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_jobs(request: Request) -> JobStore:
    return request.app.state.jobs


def get_store(request: Request) -> ObjectStore:
    return request.app.state.store


_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)
_bearer = HTTPBearer(auto_error=False)


def require_api_key(
    settings: Annotated[Settings, Depends(get_settings)],
    header_key: Annotated[str | None, Security(_api_key_header)] = None,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
) -> None:
    """Off when no keys are configured; otherwise `X-API-Key: <key>` or `Authorization: Bearer <key>`."""
    if not settings.api_keys:
        return
    given = header_key or (bearer.credentials if bearer else None)
    if given and any(secrets.compare_digest(given.encode(), k.get_secret_value().encode()) for k in settings.api_keys):
        return
    raise HTTPException(status_code=401, detail="missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})


def get_base_url(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> str:
    """Links in responses: PATCHDIFF_PUBLIC_URL behind a proxy, else the URL the client used."""
    return (settings.public_url or str(request.base_url)).rstrip("/")


def valid_job_id(job_id: str) -> str:
    """A job id is 32 hex digits; anything else cannot name a job (404, never a path on disk)."""
    if not JOB_ID.match(job_id):
        raise HTTPException(status_code=404, detail=f"no job {job_id!r}")
    return job_id


Jobs = Annotated[JobStore, Depends(get_jobs)]
Store = Annotated[ObjectStore, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
JobId = Annotated[str, Depends(valid_job_id)]
BaseUrl = Annotated[str, Depends(get_base_url)]
