"""The FastAPI application: `uvicorn --factory api.main:create_app`, or `patchdiff serve` for everything."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

import redis
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from patchdiff_core import __version__
from patchdiff_core.generation.registry import all_models
from patchdiff_core.service.jobs import IdempotencyConflict, JobStore
from patchdiff_core.service.settings import Settings, get_settings
from patchdiff_core.service.store import make_store, result_key

from .deps import BaseUrl, JobId, Jobs, SettingsDep, Store, require_api_key
from .metrics import JobMetrics
from .schemas import GenerateRequest, Health, JobView, ModelView
from .service import RequestError, build_spec, job_view, model_views, request_fingerprint
from .webhook import checked_webhook
from . import events as live_events, web

log = logging.getLogger("patchdiff.api")


def redis_client(url: str) -> redis.Redis:
    # Short timeouts: with Redis away a request answers 503 at once instead of hanging.
    return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=3, health_check_interval=10)


async def _reap_forever(jobs: JobStore, interval: float) -> None:
    """Requeue jobs of dead workers even when no worker is alive to notice."""
    while True:
        await asyncio.sleep(interval)
        try:
            for job_id, action in await asyncio.to_thread(jobs.reap):
                log.warning("job %s: %s", job_id, action)
        except redis.RedisError as exc:
            log.debug("reaper: %s", exc)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    if not settings.redis_url:
        raise RuntimeError("PATCHDIFF_REDIS_URL is not set (patchdiff serve sets it)")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        reaper = asyncio.create_task(_reap_forever(app.state.jobs, settings.heartbeat_interval_s))
        yield
        reaper.cancel()

    app = FastAPI(
        title="patchdiff",
        version=__version__,
        summary="Patch Diffusion as a service: queue a sampling job, poll it, download the PNGs.",
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc come from api.web, with their assets served offline
        redoc_url=None,
    )
    app.include_router(live_events.router)  # /jobs/{id}/events, /jobs/{id}/preview.png, webhook sender
    app.include_router(web.router)  # the page at /, /docs, /redoc
    app.state.settings = settings
    app.state.jobs = JobStore(redis_client(settings.redis_url), settings)
    app.state.store = make_store(settings)
    metrics_registry = CollectorRegistry()
    metrics_registry.register(JobMetrics(app.state.jobs))

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def redis_unavailable(request: Request, exc: redis.RedisError) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": f"queue unavailable (Redis): {exc}"},
                            headers={"Retry-After": "2"})

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        # Same shape as FastAPI's own validation errors, so clients handle one format.
        return JSONResponse(status_code=422, content={"detail": [{"loc": ["body", exc.field], "msg": exc.message, "type": "value_error"}]})

    auth = [Depends(require_api_key)]

    @app.post("/generate", status_code=202, response_model=JobView, dependencies=auth,
              responses={200: {"model": JobView, "description": "an earlier job with the same idempotency_key"}})
    def generate(req: GenerateRequest, response: Response, jobs: Jobs, settings: SettingsDep, base: BaseUrl) -> JobView:
        spec = build_spec(req, settings, jobs.served_models())
        webhook, webhook_events = checked_webhook(req, settings)
        try:
            record, created = jobs.submit(spec, req.idempotency_key, request_fingerprint(req), webhook, webhook_events)
        except IdempotencyConflict as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from None
        view = job_view(record, jobs, base)
        response.headers["Location"] = view.links.self
        if not created:
            response.status_code = 200
        return view

    @app.get("/jobs/{job_id}", response_model=JobView, dependencies=auth)
    def get_job(job_id: JobId, jobs: Jobs, base: BaseUrl) -> JobView:
        return job_view(_record(jobs, job_id), jobs, base)

    @app.delete("/jobs/{job_id}", status_code=202, response_model=JobView, dependencies=auth)
    def cancel_job(job_id: JobId, jobs: Jobs, base: BaseUrl) -> JobView:
        """A queued job is cancelled at once and never runs; a running one stops at its next step."""
        record = _record(jobs, job_id)
        if jobs.cancel(job_id) is None:
            raise HTTPException(status_code=409, detail=f"job {job_id} already ended ({record.status})")
        return job_view(_record(jobs, job_id), jobs, base)

    @app.get("/jobs/{job_id}/grid.png", dependencies=auth, response_class=Response,
             responses={200: {"content": {"image/png": {}}}, 404: {"description": "unknown job or not finished"}})
    def get_grid(job_id: JobId, jobs: Jobs, store: Store) -> Response:
        return _result(jobs, store, job_id, "grid.png", "image/png")

    @app.get("/jobs/{job_id}/images/{index}.png", dependencies=auth, response_class=Response,
             responses={200: {"content": {"image/png": {}}}, 404: {"description": "unknown job, image or not finished"}})
    def get_image(job_id: JobId, index: int, jobs: Jobs, store: Store) -> Response:
        return _result(jobs, store, job_id, f"images/{index}.png", "image/png", index=index)

    @app.get("/jobs/{job_id}/record.json", dependencies=auth, response_class=Response,
             responses={200: {"content": {"application/json": {}}}})
    def get_record(job_id: JobId, jobs: Jobs, store: Store) -> Response:
        return _result(jobs, store, job_id, "record.json", "application/json")

    @app.get("/models", response_model=list[ModelView], dependencies=auth)
    def list_models(jobs: Jobs, settings: SettingsDep) -> list[ModelView]:
        return model_views(all_models(settings.weights_dir), jobs.served_models(), settings.weights_dir)

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, responses={503: {"model": Health}})
    def readyz(jobs: Jobs) -> JSONResponse:
        try:
            jobs.redis.ping()
            workers = len(jobs.live_workers())
        except redis.RedisError as exc:
            return JSONResponse(status_code=503, content=Health(status="unavailable", redis="down", detail=str(exc)).model_dump())
        ready = workers > 0
        body = Health(status="ready" if ready else "unavailable", redis="ok", workers=workers,
                      detail=None if ready else "no live worker")
        return JSONResponse(status_code=200 if ready else 503, content=body.model_dump())

    @app.get("/metrics", response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _record(jobs: JobStore, job_id: str):
    record = jobs.get(job_id)
    if record is None:
        raise HTTPException(status_code=404, detail=f"no job {job_id!r}")
    return record


def _result(jobs: JobStore, store, job_id: str, name: str, media_type: str, index: int | None = None) -> Response:
    record = _record(jobs, job_id)
    if record.status != "finished":
        raise HTTPException(status_code=404, detail=f"job {job_id} is {record.status}; results exist once it is finished")
    if index is not None and not 0 <= index < record.num_results:
        raise HTTPException(status_code=404, detail=f"job {job_id} has images 0..{record.num_results - 1}")
    data = store.get(result_key(job_id, name))
    if data is None:
        raise HTTPException(status_code=404, detail=f"result {name} of job {job_id} is missing from the store")
    return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=86400"})

