"""The contract of live progress: job events (SSE and webhook payloads) and webhook delivery status."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from patchdiff_core.service.events import EventName


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
    attempt: int | None = None
    step: int | None = None
    total: int | None = None
    fraction: float | None = None
    preview: PreviewLink | None = Field(default=None, description="progress: a new preview of the job's grid")
    num_results: int | None = None
    links: dict[str, Any] | None = Field(default=None, description="finished: grid, images, record")


class WebhookPayload(BaseModel):
    """The JSON body POSTed to a job's webhook (signed per Standard Webhooks)."""

    type: str = Field(description="job.<event>, e.g. job.finished")
    timestamp: str
    data: JobEventData


class WebhookDelivery(BaseModel):
    event_id: str
    event: EventName
    status: Literal["delivered", "retrying", "failed", "refused"]
    attempts: int
    at: float = Field(description="time of the last attempt (Unix seconds)")
    http_status: int | None = None
    error: str | None = None
    next_attempt_at: float | None = None


class WebhookView(BaseModel):
    url: str
    events: list[EventName]
    deliveries: list[WebhookDelivery] = Field(default_factory=list, description="the latest 50, oldest first")
