"""The API contract: request and response bodies."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from patchdiff_core.diffusion.names import SamplerName
from patchdiff_core.diffusion.respacing import SPEC_FORMS
from patchdiff_core.generation.registry import SamplingDefaults
from patchdiff_core.generation.spec import GenerationSpec
from patchdiff_core.service.events import EventName
from patchdiff_core.service.jobs import Status

from .live_schemas import WebhookView


class GenerateRequest(BaseModel):
    """POST /generate. Omitted fields take the model's defaults; the seed, when omitted, is drawn
    at random and reported in the job."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"examples": [{"model": "digits", "num_images": 16, "class_label": 3, "seed": 42}]})

    model: str | None = Field(default=None, description="model name (GET /models); default: the server's default model")
    num_images: int = Field(default=1, ge=1)
    class_label: int | None = Field(default=None, description="one label for every image; null = random labels from the seed")
    class_labels: list[int] | None = Field(default=None, max_length=10_000, description="one label per image")
    timesteps: str | None = Field(default=None, description=f"respacing: {SPEC_FORMS}", max_length=100)
    sampler: SamplerName | None = None
    guidance: float | None = Field(default=None, description="classifier-free guidance weight; 1.0 = none")
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    webhook: str | None = Field(default=None, max_length=8192, description="URL that gets this job's events, signed "
                                "(Standard Webhooks); public http(s) targets only unless the server allows private ones")
    webhook_events: list[EventName] | None = Field(default=None, max_length=6, description="events sent to the webhook; "
                                                   "default all but progress")

    @model_validator(mode="after")
    def _one_way_to_give_labels(self) -> "GenerateRequest":
        if self.class_label is not None and self.class_labels is not None:
            raise ValueError("give class_label or class_labels, not both")
        return self


class Progress(BaseModel):
    step: int
    total: int
    fraction: float


class Timings(BaseModel):
    created_at: float
    started_at: float | None
    finished_at: float | None
    queued_s: float | None = Field(description="time from submission to start (or until now)")
    run_s: float | None = Field(description="time from start to end (or until now)")


class Links(BaseModel):
    self: str
    grid: str | None = None
    images: list[str] = []
    record: str | None = None


class JobView(BaseModel):
    id: str
    status: Status
    queue_position: int | None = Field(description="jobs ahead of this one (0 = next); null unless queued")
    progress: Progress
    timings: Timings
    request: GenerationSpec = Field(description="the request as accepted, with the seed actually used")
    error: str | None = None
    attempts: int
    worker: str | None = None
    cancel_requested: bool
    links: Links
    webhook: WebhookView | None = Field(default=None, description="the job's webhook and its deliveries")


class ModelView(BaseModel):
    name: str
    description: str
    resolution: int
    patch_size: int
    num_classes: int
    classes: list[str]
    defaults: SamplingDefaults
    parameters: int | None = Field(default=None, description="all networks' parameters; known once a worker serves it")
    installed: bool = Field(description="weights present on this server or on a live worker")
    served: bool = Field(description="a live worker has it loaded: requests are accepted")


class Health(BaseModel):
    status: str
    redis: str | None = None
    workers: int | None = None
    store: str | None = None
    detail: str | None = None


class ErrorBody(BaseModel):
    detail: str
