"""FastAPI dependencies (async where they do no I/O, so they run on the event loop instead of a
thread hop each): settings, the Redis-backed job store, the object store, API-key auth and
tenants (`Caller`), and `visible_job`: the job a route names, or 404 if the caller may not see it."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from patchdiff_core.service.jobs import JobStore
from patchdiff_core.service.records import JobRecord
from patchdiff_core.service.settings import Settings
from patchdiff_core.service.store import JOB_ID, ObjectStore


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_jobs(request: Request) -> JobStore:
    return request.app.state.jobs


async def get_store(request: Request) -> ObjectStore:
    return request.app.state.store


_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)
_bearer = HTTPBearer(auto_error=False)


@dataclass(frozen=True)
class Caller:
    """Who is asking. `owner` is the tenant: a hash of the API key (never the key itself), "" with
    auth off. Admin keys, and everyone while auth is off, see every tenant's jobs."""

    owner: str
    admin: bool

    def sees(self, record: JobRecord) -> bool:
        return self.admin or record.owner == self.owner


def owner_of(key: str) -> str:
    return hashlib.sha256(b"patchdiff-tenant\0" + key.encode()).hexdigest()[:32]


def _matches(given: str, keys) -> bool:
    # Compare with every key (no early exit), in constant time per key.
    found = False
    for key in keys:
        found |= secrets.compare_digest(given.encode(), key.get_secret_value().encode())
    return found


async def require_api_key(
    settings: Annotated[Settings, Depends(get_settings)],
    header_key: Annotated[str | None, Security(_api_key_header)] = None,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
) -> Caller:
    """Off when no keys are configured; otherwise `X-API-Key: <key>` or `Authorization: Bearer <key>`."""
    if not settings.api_keys and not settings.admin_keys:
        return Caller(owner="", admin=True)
    given = header_key or (bearer.credentials if bearer else None)
    if given and _matches(given, settings.admin_keys):
        return Caller(owner=owner_of(given), admin=True)
    if given and _matches(given, settings.api_keys):
        return Caller(owner=owner_of(given), admin=False)
    raise HTTPException(status_code=401, detail="missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})


async def get_base_url(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> str:
    """Links in responses: PATCHDIFF_PUBLIC_URL behind a proxy, else the URL the client used."""
    return (settings.public_url or str(request.base_url)).rstrip("/")


async def valid_job_id(job_id: str) -> str:
    """A job id is 32 hex digits; anything else cannot name a job (404, never a path on disk)."""
    if not JOB_ID.match(job_id):
        raise HTTPException(status_code=404, detail=f"no job {job_id!r}")
    return job_id


CallerDep = Annotated[Caller, Depends(require_api_key)]


async def visible_job(job_id: Annotated[str, Depends(valid_job_id)], caller: CallerDep,
                      jobs: Annotated[JobStore, Depends(get_jobs)]) -> JobRecord:
    """The job named in the path, if this caller may see it; 404 otherwise (whether it does not
    exist or belongs to another tenant: the answer does not tell which). Async: one round trip
    on the asyncio client for the record and its place in line, no worker thread."""
    record, deliveries = await jobs.aget(job_id)
    if record is None or not caller.sees(record):
        raise HTTPException(status_code=404, detail=f"no job {job_id!r}")
    record.webhook_deliveries = deliveries
    return record


VisibleJob = Annotated[JobRecord, Depends(visible_job)]
Jobs = Annotated[JobStore, Depends(get_jobs)]
Store = Annotated[ObjectStore, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
JobId = Annotated[str, Depends(valid_job_id)]
BaseUrl = Annotated[str, Depends(get_base_url)]
