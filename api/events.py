"""Live progress routes: `GET /jobs/{id}/events` (Server-Sent Events), `GET /jobs/{id}/preview.png`.

Streams are async end to end (redis.asyncio XREAD BLOCK on the job's event stream): a client holds
a Redis connection while it waits, never a thread. They are bounded (`api.sse`): `sse_max_streams`
per API process and `sse_max_streams_per_key` per API key (429 past either), a keep-alive comment
every `sse_keepalive_s`, a client that reads nothing for two keep-alive intervals is dropped, and
the server closes a stream after the job's terminal event or after `sse_max_stream_s` whatever the
client does (the client resumes with Last-Event-ID). An error after the stream has started (Redis
gone) ends it with an `error` event, never a broken response.

This router's lifespan also runs the webhook sender (`patchdiff_core.service.webhooks`) when
`PATCHDIFF_WEBHOOK_SECRET` is set.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from patchdiff_core.service.events import TERMINAL_EVENTS, JobEventData, event_of, read_events
from patchdiff_core.service.jobs import JobStore
from patchdiff_core.service.records import TERMINAL, JobRecord
from patchdiff_core.service.redis_conn import events_redis_async
from patchdiff_core.service.settings import Settings
from patchdiff_core.service.webhooks import WebhookSender, absolute_links

from .deps import BaseUrl, CallerDep, Jobs, SettingsDep, VisibleJob, require_api_key  # VisibleJob: tenant rules
from .responses import ERR, JOB_ERRORS
from .sse import BoundedEventSourceResponse, EventId, StreamSlots, send_timeout_s

log = logging.getLogger("patchdiff.api.events")

QUEUED_POLL_MS = 1000  # how often a waiting job's queue position is read
RUNNING_POLL_MS = 5000  # how long to wait for an event before looking at the job's status


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    # One pool for the streams and the webhook sender; a blocked XREAD holds one connection.
    app.state.events_redis = events_redis_async(
        settings, max_connections=settings.sse_max_streams + settings.webhook_max_concurrency + 8,
        socket_timeout=RUNNING_POLL_MS / 1000 + 10)
    app.state.sse_streams = StreamSlots(settings.sse_max_streams, settings.sse_max_streams_per_key)
    sender = None
    if settings.webhook_secret is not None:
        consumer = f"{socket.gethostname()}-{os.getpid()}"
        sender = asyncio.create_task(WebhookSender(app.state.events_redis, settings, consumer).run())
    yield
    if sender is not None:
        sender.cancel()
        with suppress(asyncio.CancelledError, Exception):
            await sender
    await app.state.events_redis.aclose()


router = APIRouter(tags=["live progress"], dependencies=[Depends(require_api_key)], lifespan=lifespan)


def events_redis(request: Request) -> aioredis.Redis:
    return request.app.state.events_redis


EventsRedis = Annotated[aioredis.Redis, Depends(events_redis)]

EVENTS_DOC = """Server-Sent Events for one job, oldest first:

- `queued` (stored when the job is submitted or requeued; while it waits, more `queued` events
  without an id carry its `queue_position` whenever that changes),
- `started`, then `progress` (`step`, `total`, `fraction`, and every few steps a `preview`: a link
  to `/jobs/{id}/preview.png` and, when small, the PNG inline as base64),
- one terminal event: `finished` (with `links` to the results), `failed` or `cancelled` (with a
  `reason`), after which the server closes the stream;
- or, if the stream itself fails (the event store is unreachable), an `error` event without an id
  (`job_id`, `reason`) and the end of the stream: reconnect with the last id you got.

Every stored event has an `id`; reconnect with `Last-Event-ID: <id>` (browsers' EventSource does it
by itself) to get exactly the events after it. Comment lines keep idle connections open. `data` is
JSON (`JobEventData`). The server closes a stream after `sse_max_stream_s` (reconnect to go on),
and drops a client that reads nothing for two keep-alive intervals."""


@router.get("/jobs/{job_id}/events", response_class=EventSourceResponse, description=EVENTS_DOC,
            responses={**JOB_ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "the event stream"},
                       429: {**ERR, "description": "too many open event streams (this process's or this key's); "
                                                   "retry after Retry-After"}})
async def job_events(
    record: VisibleJob, caller: CallerDep, request: Request, jobs: Jobs, settings: SettingsDep, base: BaseUrl,
    aconn: EventsRedis,
    last_event_id: Annotated[EventId | None, Header(alias="Last-Event-ID", description="resume after this event id")] = None,
    after: Annotated[EventId | None, Query(description="the same as Last-Event-ID, for clients that cannot set headers")] = None,
) -> EventSourceResponse:
    slots: StreamSlots = request.app.state.sse_streams
    token = slots.acquire(caller.owner)
    if token is None:
        raise HTTPException(status_code=429, detail=slots.refusal(caller.owner),
                            headers={"Retry-After": str(settings.retry_after_s)})
    deadline = time.monotonic() + settings.sse_max_stream_s
    stream = _job_stream(record, last_event_id or after or "0-0", aconn, jobs, settings, base, deadline)
    return BoundedEventSourceResponse(stream, deadline=deadline, send_timeout=send_timeout_s(settings.sse_keepalive_s),
                                      on_end=lambda: slots.release(token), ping=settings.sse_keepalive_s,
                                      headers={"Cache-Control": "no-store"})


def _sse(event: str, data: dict | JobEventData, base: str, event_id: str | None = None) -> ServerSentEvent:
    if isinstance(data, JobEventData):
        data = data.model_dump(exclude_none=True)
    return ServerSentEvent(data=json.dumps(absolute_links(data, base), separators=(",", ":")), event=event, id=event_id)


async def _job_stream(record: JobRecord, after: str, aconn: aioredis.Redis, jobs: JobStore, settings: Settings,
                      base: str, deadline: float) -> AsyncIterator[ServerSentEvent]:
    """The job's events after `after` until its terminal event or `deadline` (monotonic time)."""
    job_id = record.id
    waiting = record.status == "queued"
    position_sent: int | None = None
    try:
        while (left_ms := int((deadline - time.monotonic()) * 1000)) > 0:
            wait_ms = min(QUEUED_POLL_MS if waiting else RUNNING_POLL_MS, left_ms)  # never past the deadline
            events = await read_events(aconn, jobs.keys, job_id, after, wait_ms)
            for event in events:
                after = event.id
                yield _sse(event.event, event.data, base, event.id)
                if event.event in TERMINAL_EVENTS:
                    return
                if event.event == "queued":
                    position_sent = None  # a requeue: send the new position
            status = await aconn.hget(jobs.keys.job(job_id), "status")
            if status is None:
                return  # the job expired
            status = status.decode()
            if status in TERMINAL and not events:
                # Its terminal event is appended just after the status moves; if it is not there
                # even now (a stream trimmed or expired before this job ended), say it without an id.
                late = await read_events(aconn, jobs.keys, job_id, after, 500)
                for event in late:
                    yield _sse(event.event, event.data, base, event.id)
                if not any(e.event in TERMINAL_EVENTS for e in late):
                    final = await asyncio.to_thread(jobs.get, job_id)
                    if final is not None and final.status in TERMINAL:
                        name, data = event_of(final)
                        yield _sse(name, data, base)
                return
            waiting = status == "queued"
            if waiting:  # jobs of the same model ahead of this one, as GET /jobs/{id} reports it
                position = await aconn.zrank(jobs.keys.queued(record.spec.model), job_id)
                if position is not None and position != position_sent:
                    position_sent = position
                    yield _sse("queued", JobEventData(job_id=job_id, status="queued", queue_position=position), base)
    except Exception as exc:  # noqa: BLE001 - e.g. Redis gone: the client gets an event, not a broken response
        log.warning("event stream of job %s ended by %s: %s", job_id, type(exc).__name__, exc)
        data = JobEventData(job_id=job_id, status="unknown", reason=f"the event stream failed ({type(exc).__name__}); "
                            "reconnect with the last event id to resume")
        yield ServerSentEvent(data=data.to_json(), event="error", retry=settings.retry_after_s * 1000)


@router.get("/jobs/{job_id}/preview.png", response_class=Response,
            responses={**JOB_ERRORS, 200: {"content": {"image/png": {}}, "description": "the latest preview of the job's grid"},
                       404: {**ERR, "description": "no such job visible to this key, or no preview yet"}})
async def job_preview(
    record: VisibleJob, jobs: Jobs, aconn: EventsRedis,
    step: Annotated[int | None, Query(ge=0, description="ignored: lets each progress event link a distinct URL")] = None,
) -> Response:
    """The newest x0 prediction of the job's grid, downscaled; it changes as the job runs."""
    data = await aconn.get(jobs.keys.preview(record.id))
    if data is None:
        raise HTTPException(status_code=404, detail=f"job {record.id} has no preview yet ({record.status})")
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})
