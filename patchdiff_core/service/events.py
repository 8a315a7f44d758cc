"""Job events in Redis: what `GET /jobs/{id}/events` streams and what webhooks deliver. Torch-free.

Each job has one Redis Stream, `patchdiff:events:<id>`, trimmed to about `events_max_len` entries
and expiring with the job (`job_ttl_s`). An entry is `event` (queued, started, progress, finished,
failed, cancelled) and `data` (JSON). The entry id is the SSE event id, so a client that reconnects
with `Last-Event-ID` resumes exactly after the last event it saw.

Who writes what:
- status events (queued, started, finished, failed, cancelled, and queued again on a requeue) are
  written by `JobStore` at each successful status transition (`status_event`), so whichever process
  makes the move writes the event: the API (submit, cancel while queued), the worker (start, finish,
  fail, cancel while running), the reaper (requeue, give up);
- progress events (with an optional preview PNG) are written by the process that samples, through
  `JobEvents.progress`, which throttles them (`progress_event_interval_s`);
- queue positions are not stored: the SSE route reads them while a job waits (they change with
  other jobs, not with this one).

The same Lua script that appends an event also queues a webhook delivery (stream
`patchdiff:webhooks`) when the job has a webhook that selected this event; `webhooks.py` sends it.
"""

from __future__ import annotations

import base64
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Literal

import redis

from patchdiff_core.service.settings import Settings

PREFIX = "patchdiff"
EventName = Literal["queued", "started", "progress", "finished", "failed", "cancelled"]
EVENT_NAMES: tuple[str, ...] = ("queued", "started", "progress", "finished", "failed", "cancelled")
TERMINAL_EVENTS = ("finished", "failed", "cancelled")
WEBHOOK_STREAM = f"{PREFIX}:webhooks"
WEBHOOK_STREAM_MAX_LEN = 100_000
STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")

# KEYS: the job's event stream, the job hash, the webhook delivery stream.
# ARGV: event, data (JSON), max length, TTL (s), job id.
# Appends the event, refreshes the stream's TTL, and queues a webhook delivery when the job's
# `webhook_events` (comma-separated) names this event. Returns the event id.
_PUBLISH = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'event', ARGV[1], 'data', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
local hook = redis.call('HMGET', KEYS[2], 'webhook', 'webhook_events')
if hook[1] and hook[1] ~= '' and hook[2] then
  for wanted in string.gmatch(hook[2], '[^,]+') do
    if wanted == ARGV[1] then
      redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'job_id', ARGV[5], 'event_id', id,
                 'event', ARGV[1], 'data', ARGV[2], 'url', hook[1])
      break
    end
  end
end
return id
"""


def stream_key(job_id: str) -> str:
    return f"{PREFIX}:events:{job_id}"


def preview_key(job_id: str) -> str:
    return f"{PREFIX}:preview:{job_id}"


def job_hash_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"  # the same key as JobStore.job_key


def result_links(job_id: str, num_results: int) -> dict[str, Any]:
    """Links relative to the API root; the SSE route and the webhook sender make them absolute."""
    base = f"/jobs/{job_id}"
    return {"grid": f"{base}/grid.png", "images": [f"{base}/images/{i}.png" for i in range(num_results)],
            "record": f"{base}/record.json"}


def status_event(job_id: str, status: str, fields: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The event for a status transition, from the fields the transition set."""
    data: dict[str, Any] = {"status": status}
    if status == "queued":
        data["reason"] = fields.get("error") or "submitted"  # a requeue says why
    elif status == "running":
        data.update(worker=fields.get("worker"), attempt=int(fields.get("attempts") or 1))
        return "started", data
    elif status == "finished":
        n = int(fields.get("num_results") or 0)
        data.update(num_results=n, links=result_links(job_id, n))
    elif status in ("failed", "cancelled"):
        data["reason"] = fields.get("error") or status
    return status, data


@dataclass
class JobEvent:
    id: str  # the stream entry id: the SSE event id
    event: str
    data: dict[str, Any]

    @classmethod
    def from_entry(cls, entry_id: bytes | str, fields: dict) -> "JobEvent":
        get = lambda k: fields.get(k.encode(), fields.get(k))  # noqa: E731 - bytes or str keys
        raw_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        event, data = get("event"), get("data")
        return cls(raw_id, event.decode() if isinstance(event, bytes) else event, json.loads(data))


class JobEvents:
    """Writes a job's events (every process) and reads them back (tests, sync callers)."""

    def __init__(self, conn: redis.Redis, settings: Settings):
        self.redis = conn
        self.settings = settings
        self._publish = conn.register_script(_PUBLISH)
        self._last_progress: dict[str, float] = {}  # job id -> monotonic time of its last progress event

    def publish(self, job_id: str, event: str, data: dict[str, Any]) -> str:
        """Append one event to the job's stream (and queue its webhook delivery); returns the event id."""
        if event not in EVENT_NAMES:
            raise ValueError(f"unknown event {event!r}")
        if event in TERMINAL_EVENTS:
            self._last_progress.pop(job_id, None)
        payload = json.dumps({"job_id": job_id, **data}, separators=(",", ":"))
        event_id = self._publish(
            keys=[stream_key(job_id), job_hash_key(job_id), WEBHOOK_STREAM],
            args=[event, payload, self.settings.events_max_len, self.settings.job_ttl_s, job_id, WEBHOOK_STREAM_MAX_LEN],
        )
        return event_id.decode() if isinstance(event_id, bytes) else event_id

    def progress(self, job_id: str, step: int, total: int, preview_png: bytes | None = None) -> str | None:
        """One sampling step of a job. Call it at every step; it publishes a `progress` event when one
        is due (the first and last steps, a step with a preview, or `progress_event_interval_s` after
        the last one) and returns its id, else None. A preview is stored as the job's latest
        (`GET /jobs/{id}/preview.png`) and, when small, also sent inline in the event."""
        now = time.monotonic()
        last = self._last_progress.get(job_id)
        due = (preview_png is not None or step <= 1 or step >= total or last is None
               or now - last >= self.settings.progress_event_interval_s)
        if not due:
            return None
        self._last_progress[job_id] = now
        data: dict[str, Any] = {"status": "running", "step": step, "total": total,
                                "fraction": round(step / total, 4) if total else 0.0}
        if preview_png is not None:
            self.redis.set(preview_key(job_id), preview_png, ex=self.settings.job_ttl_s)
            preview: dict[str, Any] = {"url": f"/jobs/{job_id}/preview.png?step={step}", "bytes": len(preview_png)}
            if len(preview_png) <= self.settings.preview_inline_max_bytes:
                preview["png_base64"] = base64.b64encode(preview_png).decode()
            data["preview"] = preview
        return self.publish(job_id, "progress", data)

    def preview(self, job_id: str) -> bytes | None:
        return self.redis.get(preview_key(job_id))

    def history(self, job_id: str, after: str = "0-0", count: int | None = None) -> list[JobEvent]:
        """The job's events after `after` (exclusive), oldest first."""
        entries = self.redis.xrange(stream_key(job_id), min=f"({after}" if after != "0-0" else "-", count=count)
        return [JobEvent.from_entry(entry_id, fields) for entry_id, fields in entries]


async def read_events(aconn, job_id: str, after: str, block_ms: int, count: int = 100) -> list[JobEvent]:
    """Events after `after` from an asyncio Redis client, waiting up to `block_ms` for the first one.

    XREAD BLOCK holds one connection per waiting reader, not a thread: the API bounds the readers
    with `sse_max_streams`.
    """
    reply = await aconn.xread({stream_key(job_id): after}, count=count, block=block_ms)
    if not reply:
        return []
    (_, entries), = reply
    return [JobEvent.from_entry(entry_id, fields) for entry_id, fields in entries]
