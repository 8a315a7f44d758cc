"""The contract of live progress: webhook payloads and delivery status. The event data itself
(`JobEventData`) is defined with the events, in `patchdiff_core.service.events`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from patchdiff_core.service.events import EventName, JobEventData, PreviewLink  # noqa: F401 - the documented event contract


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
