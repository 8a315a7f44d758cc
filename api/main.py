"""The FastAPI application: `uvicorn --factory api.main:create_app`, or `patchdiff serve` for everything."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from contextlib import asynccontextmanager

import redis
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from patchdiff_core import __version__
from patchdiff_core.generation.registry import all_models
from patchdiff_core.generation.spec import SpecError
from patchdiff_core.service.jobs import IdempotencyConflict, JobStore, NotReplicated, OverCapacity
from patchdiff_core.service.lease import Lease
from patchdiff_core.service.reaper import Reaper
from patchdiff_core.service.records import JobRecord
from patchdiff_core.service.logs import configure_logging
from patchdiff_core.service.redis_conn import UNAVAILABLE, api_redis, api_redis_async
from patchdiff_core.service.settings import Settings, get_settings
from patchdiff_core.service.store import ObjectStore, make_store, result_key, store_status

from . import events as live_events
from . import info, web
from .deps import BaseUrl, CallerDep, Jobs, SettingsDep, Store, VisibleJob, require_api_key
from .janitor import delete_expired
from .errors import install_error_handlers
from .limits import BodySizeLimit, check_submit_rate
from .metrics import METRICS_LEASE_S, JobMetrics, StoreMetrics
from .observe import RequestObserver, register_process_metrics
from .responses import AUTH_ERRORS, ERR, JOB_ERRORS, PNG, operation_id, use_exact_openapi
from .schemas import GenerateRequest, Health, JobView, ModelView
from .service import NotServed, build_spec, job_view, model_views, request_fingerprint
from .webhook import checked_webhook

log = logging.getLogger("patchdiff.api")
REQUIRE_WORKER_DOC = ("also require a live worker (default). An orchestrator's readiness probe sets it false: this "
                      "process serves job status and results, and answers new jobs with 503 and Retry-After, without one")



async def _every(interval: float, what: str, work) -> None:
    """Run `work` in a thread every `interval` s; a Redis outage costs one log line per attempt."""
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(work)
        except redis.RedisError as exc:
            log.warning("%s: Redis unavailable (%s); retrying in %.1f s", what, str(exc).splitlines()[0][:200], interval)
        except Exception:  # noqa: BLE001 - a background loop must not die
            log.exception("%s failed", what)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings, "api")
    if not settings.redis_configured:
        raise RuntimeError("PATCHDIFF_REDIS_URL (or PATCHDIFF_REDIS_SENTINELS) is not set (patchdiff serve sets it)")
    jobs = JobStore(api_redis(settings), settings, api_redis_async(settings))
    store = make_store(settings)

    # Roles that one API process at a time holds (`lease.py`): the reaper (workers contend for it too),
    # the janitor, and exporting the service-wide job metrics (so that a Prometheus sum over replicas
    # counts them once).
    me = f"api-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    reaper = Reaper(jobs.redis, settings, holder=me)
    janitor = Lease(jobs.redis, jobs.keys, "janitor", me, 3 * settings.janitor_interval_s)
    metrics_lease = Lease(jobs.redis, jobs.keys, "metrics", me, METRICS_LEASE_S)

    def reap() -> None:
        for job_id, action in reaper.reap():
            log.warning("reaped job: %s", action, extra={"job_id": job_id})

    def clean() -> None:
        if janitor.hold():
            delete_expired(jobs, store)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not settings.api_keys and not settings.admin_keys:
            log.warning("auth is off: no PATCHDIFF_API_KEYS set, every caller sees every job")
        tasks = [asyncio.create_task(_every(settings.heartbeat_interval_s, "reaper", reap)),
                 asyncio.create_task(_every(settings.janitor_interval_s, "janitor", clean))]
        yield
        for task in tasks:
            task.cancel()
        for lease in (reaper.lease, janitor, metrics_lease):  # another replica takes the roles at once
            await asyncio.to_thread(lease.release)

    app = FastAPI(
        title="patchdiff",
        version=__version__,
        summary="Patch Diffusion as a service: queue a sampling job, poll it, download the PNGs.",
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc come from api.web, with their assets served offline
        redoc_url=None,
        generate_unique_id_function=operation_id,  # stable client method names: the route's function name
    )
    use_exact_openapi(app)
    app.include_router(live_events.router)  # /jobs/{id}/events, /jobs/{id}/preview.png, webhook sender
    app.include_router(web.router)  # the page at /, /docs, /redoc
    app.include_router(info.router)  # GET /limits
    app.state.settings = settings
    app.state.jobs = jobs
    app.state.store = store
    metrics_registry = CollectorRegistry()
    metrics_registry.register(JobMetrics(jobs, metrics_lease))
    metrics_registry.register(StoreMetrics(store))
    register_process_metrics(metrics_registry)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestObserver, registry=metrics_registry, access_log=settings.access_log)  # outermost: sees the 413s too
    install_error_handlers(app)

    async def redis_unavailable(request: Request, exc: redis.RedisError) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": f"queue unavailable (Redis): {exc}"},
                            headers={"Retry-After": str(settings.retry_after_s)})

    for error in UNAVAILABLE:
        app.add_exception_handler(error, redis_unavailable)

    @app.exception_handler(SpecError)
    async def request_error(request: Request, exc: SpecError) -> JSONResponse:
        # Same shape as FastAPI's own validation errors, so clients handle one format.
        return JSONResponse(status_code=422, content={"detail": [{"loc": ["body", exc.field], "msg": str(exc), "type": "value_error"}]})

    auth = [Depends(require_api_key)]

    @app.post("/generate", status_code=202, response_model=JobView, responses={
        **AUTH_ERRORS,
        200: {"model": JobView, "description": "an earlier job with the same idempotency_key"},
        400: {**ERR, "description": "the body cannot be decoded (not UTF-8)"},
        409: {**ERR, "description": "idempotency_key already used for another request"},
        413: {**ERR, "description": "request body too large"},
        429: {**ERR, "description": "rate limit or queued-work cap reached; retry after Retry-After"},
        503: {**ERR, "description": "no live worker serves the model, Redis unavailable, or (with replicas) the job "
                                   "not yet on a replica; retry after Retry-After (with the same idempotency_key)"},
    })
    def generate(req: GenerateRequest, response: Response, caller: CallerDep, jobs: Jobs, settings: SettingsDep,
                 base: BaseUrl) -> JobView:
        try:
            served = jobs.served_models()
            if (req.model or settings.default_model) not in served:  # a model announced a moment ago?
                served = jobs.served_models(fresh=True)
            spec, cost = build_spec(req, settings, served, all_models(settings.weights_dir), set(jobs.announced_models()))
        except NotServed as exc:
            raise HTTPException(status_code=503, detail=str(exc),
                                headers={"Retry-After": str(settings.retry_after_s)}) from None
        webhook, webhook_events = checked_webhook(req, settings)
        if settings.api_keys or settings.admin_keys:
            check_submit_rate(jobs, caller.owner, settings.submit_rate_per_minute)
        try:
            record, created = jobs.submit(spec, req.idempotency_key, request_fingerprint(req), caller.owner, cost,
                                          webhook, webhook_events)
        except IdempotencyConflict as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from None
        except OverCapacity as exc:
            raise HTTPException(status_code=429, detail=str(exc),
                                headers={"Retry-After": str(settings.retry_after_s)}) from None
        except NotReplicated as exc:
            raise HTTPException(status_code=503, detail=str(exc),
                                headers={"Retry-After": str(settings.retry_after_s)}) from None
        view = job_view(record, base)
        response.headers["Location"] = view.links.self
        if not created:
            response.status_code = 200
        return view

    @app.get("/jobs/{job_id}", response_model=JobView, responses=JOB_ERRORS)
    async def get_job(job: VisibleJob, jobs: Jobs, base: BaseUrl) -> Response:
        # The hot path of polling clients: no I/O left here (visible_job fetched the record and its
        # queue position), and the view is serialised once by pydantic instead of re-validated.
        return Response(job_view(job, base).model_dump_json(), media_type="application/json")

    @app.delete("/jobs/{job_id}", status_code=202, response_model=JobView,
                responses={**JOB_ERRORS, 409: {**ERR, "description": "the job already ended"}})
    def cancel_job(job: VisibleJob, jobs: Jobs, base: BaseUrl) -> JobView:
        """A queued job is cancelled at once and never runs; a running one stops at its next step."""
        if jobs.cancel(job.id) is None:
            raise HTTPException(status_code=409, detail=f"job {job.id} already ended ({job.status})")
        after = jobs.get(job.id, with_position=True) or job
        after.webhook_deliveries = jobs.webhook_deliveries(job.id) if after.webhook else []
        return job_view(after, base)

    @app.get("/jobs/{job_id}/grid.png", response_class=Response,
             responses={**JOB_ERRORS, 200: PNG, 404: {**ERR, "description": "unknown job or not finished"}})
    def get_grid(job: VisibleJob, store: Store) -> Response:
        return _result(store, job, "grid.png", "image/png")

    @app.get("/jobs/{job_id}/images/{index}.png", response_class=Response,
             responses={**JOB_ERRORS, 200: PNG, 404: {**ERR, "description": "unknown job, image or not finished"},
                        422: {"description": "index is not an integer"}})
    def get_image(job: VisibleJob, index: int, store: Store) -> Response:
        return _result(store, job, f"images/{index}.png", "image/png", index=index)

    @app.get("/jobs/{job_id}/record.json", response_class=Response,
             responses={**JOB_ERRORS, 200: {"content": {"application/json": {}}, "description": "the run's record"}})
    def get_record(job: VisibleJob, store: Store) -> Response:
        return _result(store, job, "record.json", "application/json")

    @app.get("/models", response_model=list[ModelView], dependencies=auth, responses=AUTH_ERRORS)
    def list_models(jobs: Jobs, settings: SettingsDep) -> list[ModelView]:
        return model_views(all_models(settings.weights_dir), jobs.served_models(), settings.weights_dir)

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        """Liveness: this process answers. Readiness (Redis, a worker, the store) is /readyz."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, responses={503: {"model": Health, "description": "not ready"}})
    def readyz(jobs: Jobs, store: Store, require_worker: Annotated[bool, Query(description=REQUIRE_WORKER_DOC)] = True,
               ) -> JSONResponse:
        try:
            jobs.redis.ping()
            workers, announcements = jobs.live_workers(limit=1000)
        except redis.RedisError as exc:
            body = Health(status="unavailable", redis="down", detail=str(exc))
            return JSONResponse(status_code=503, content=body.model_dump(),
                                headers={"Retry-After": str(settings.retry_after_s)})
        status = store_status(store)  # writes and reads back a real probe
        store_state, store_error = "ok", None
        if not status.ok:
            store_state, store_error = "unwritable", f"object store: {status.detail}"
        elif status.free_bytes is not None and status.free_bytes < settings.store_min_free_bytes:
            store_state, store_error = "low on space", f"object store: {status.free_bytes} bytes free"
        unwritable = sum(info.get("store", "ok") != "ok" for info in announcements)
        problems = [p for p in (None if workers or not require_worker else "no live worker", store_error) if p]
        notes = problems + ([f"{unwritable} worker(s) cannot write results"] if unwritable else [])
        body = Health(status="unavailable" if problems else "ready", redis="ok", workers=workers,
                      workers_unwritable=unwritable, store=store_state, store_free_bytes=status.free_bytes,
                      detail="; ".join(notes) or None)
        return JSONResponse(status_code=503 if problems else 200, content=body.model_dump(),
                            headers={"Retry-After": str(settings.retry_after_s)} if problems else None)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    def metrics() -> Response:
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _result(store: ObjectStore, record: JobRecord, name: str, media_type: str, index: int | None = None) -> Response:
    """A result of the published attempt: a stale attempt's files are never served."""
    if record.status != "finished" or record.results_attempt is None:
        raise HTTPException(status_code=404, detail=f"job {record.id} is {record.status}; results exist once it is finished")
    if index is not None and not 0 <= index < record.num_results:
        raise HTTPException(status_code=404, detail=f"job {record.id} has images 0..{record.num_results - 1}")
    data = store.get(result_key(record.id, name, record.results_attempt))
    if data is None:
        raise HTTPException(status_code=404, detail=f"result {name} of job {record.id} is missing from the store")
    return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=86400"})
