"""Job events: what `GET /jobs/{id}/events` streams and what webhooks deliver. Torch-free.

Each job has one Redis Stream (`keys.Keys.events`), trimmed to about `events_max_len` entries; it
lives as long as the job's record. An entry is `event` (one of `EVENT_NAMES`) and `data` (JSON of
`JobEventData`). The entry id is the SSE event id, so a client that reconnects with
`Last-Event-ID` resumes exactly after the last event it saw.

Status events are appended by the same script that changes the status (`scripts.py`), so a
status change and its event cannot be separated; the script also queues the webhook delivery
when the job's webhook selected that event. Progress events come from the sampling worker, in its
one report per step, throttled (`progress_event_interval_s`). Every payload is built here, from
the pydantic models the API documents.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import redis
from pydantic import BaseModel, Field

from patchdiff_core.service.keys import Keys
from patchdiff_core.service.records import CANCELLED_BY_REQUEST, TERMINAL, JobRecord, result_links

EventName = Literal["queued", "started", "progress", "finished", "failed", "cancelled"]
EVENT_NAMES: tuple[str, ...] = ("queued", "started", "progress", "finished", "failed", "cancelled")
TERMINAL_EVENTS: tuple[str, ...] = TERMINAL  # a job's last event is named after its terminal status
STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


class PreviewLink(BaseModel):
    url: str = Field(description="GET it for the latest preview PNG (the step is only there to make URLs distinct)")
    bytes: int
    png_base64: str | None = Field(default=None, description="the same PNG inline, when it is small enough")


class JobEventData(BaseModel):
    """The JSON `data` of every event on `/jobs/{id}/events` and of every webhook's `data`."""

    job_id: str
    status: str
    reason: str | None = Field(default=None, description="queued: submitted or why it was requeued; failed/cancelled: why")
    queue_position: int | None = Field(default=None, description="queued events sent while waiting: jobs ahead (0 = next)")
    worker: str | None = None
    attempt: int | None = Field(default=None, description="started: which run this is (1 = the first)")
    step: int | None = Field(default=None, description="progress: network evaluations done, counted image by image")
    total: int | None = Field(default=None, description="progress: images × steps")
    fraction: float | None = None
    images_done: int | None = Field(default=None, description="progress: images finished")
    preview: PreviewLink | None = Field(default=None, description="progress: a new preview of the job's grid")
    num_results: int | None = None
    links: dict[str, Any] | None = Field(default=None, description="finished: grid, images, record")

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)


# -- payloads ---------------------------------------------------------------------------------
def queued_event(job_id: str, reason: str = "submitted") -> JobEventData:
    return JobEventData(job_id=job_id, status="queued", reason=reason)


def started_template(worker: str) -> JobEventData:
    """The `started` event of this worker's jobs; the start script fills in `job_id` and `attempt`,
    which only it knows."""
    return JobEventData(job_id="", status="running", worker=worker, attempt=0)


def progress_event(job_id: str, step: int, total: int, images_done: int,
                   preview: PreviewLink | None = None) -> JobEventData:
    return JobEventData(job_id=job_id, status="running", step=step, total=total,
                        fraction=round(step / total, 4) if total else 0.0, images_done=images_done, preview=preview)


def end_event(job_id: str, status: str, reason: str | None = None, num_results: int = 0) -> JobEventData:
    """The terminal event: `finished` with the links to the results, or `failed`/`cancelled` with why."""
    if status == "finished":
        return JobEventData(job_id=job_id, status=status, num_results=num_results,
                            links=result_links(job_id, num_results))
    return JobEventData(job_id=job_id, status=status, reason=reason or status)


def event_of(record: JobRecord) -> tuple[str, JobEventData]:
    """The event of a terminal record as it stands (for a stream whose terminal entry was trimmed)."""
    reason = record.error or (CANCELLED_BY_REQUEST if record.status == "cancelled" else None)
    return record.status, end_event(record.id, record.status, reason, record.num_results)


# -- reading ----------------------------------------------------------------------------------
@dataclass
class JobEvent:
    id: str  # the stream entry id: the SSE event id
    event: str
    data: dict[str, Any]

    @classmethod
    def from_entry(cls, entry_id: bytes | str, fields: dict) -> "JobEvent":
        def text(key: str) -> str:
            value = fields.get(key.encode(), fields.get(key))
            return value.decode() if isinstance(value, bytes) else value

        raw_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        return cls(raw_id, text("event"), json.loads(text("data")))


class EventLog:
    """Reads a job's events and preview back (sync: tests, the janitor, tools)."""

    def __init__(self, conn: redis.Redis, keys: Keys):
        self.redis, self.keys = conn, keys

    def history(self, job_id: str, after: str = "0-0", count: int | None = None) -> list[JobEvent]:
        """The job's events after `after` (exclusive), oldest first."""
        entries = self.redis.xrange(self.keys.events(job_id), min=f"({after}" if after != "0-0" else "-", count=count)
        return [JobEvent.from_entry(entry_id, fields) for entry_id, fields in entries]

    def preview(self, job_id: str) -> bytes | None:
        return self.redis.get(self.keys.preview(job_id))


async def read_events(aconn, keys: Keys, job_id: str, after: str, block_ms: int, count: int = 100) -> list[JobEvent]:
    """Events after `after` from an asyncio Redis client, waiting up to `block_ms` for the first one.

    XREAD BLOCK holds one connection per waiting reader, not a thread: the API bounds the readers
    with `sse_max_streams`.
    """
    reply = await aconn.xread({keys.events(job_id): after}, count=count, block=block_ms)
    if not reply:
        return []
    (_, entries), = reply
    return [JobEvent.from_entry(entry_id, fields) for entry_id, fields in entries]
