"""The API contract: request and response bodies."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, WithJsonSchema, model_validator

from patchdiff_core.diffusion.names import SamplerName
from patchdiff_core.diffusion.respacing import NUM_TIMESTEPS, SPEC_FORMS
from patchdiff_core.generation.registry import SamplingDefaults
from patchdiff_core.generation.spec import GenerationSpec
from patchdiff_core.service.events import EventName
from patchdiff_core.service.records import Status

from .live_schemas import WebhookView


def _count_as_spec(value: Any) -> Any:
    """`"timesteps": 20` is the spec "20"; a boolean is not a count (it stays a type error)."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _lower_case(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


TIMESTEPS_MAX_LENGTH = 100
SEED_LIMIT = 2**63  # seeds are 0 <= seed < 2**63
# A spec string, or a whole number of evenly spread steps written as a JSON number.
TimestepsSpec = Annotated[str, Field(max_length=TIMESTEPS_MAX_LENGTH), BeforeValidator(_count_as_spec), WithJsonSchema(
    {"anyOf": [{"type": "string", "maxLength": TIMESTEPS_MAX_LENGTH},
               {"type": "integer", "minimum": 2, "maximum": NUM_TIMESTEPS}]})]
# Sampler names are matched case-insensitively ("DDIM" is "ddim"); the schema lists the canonical ones.
SamplerChoice = Annotated[SamplerName, BeforeValidator(_lower_case)]


class GenerateRequest(BaseModel):
    """POST /generate. Omitted fields take the model's defaults; the seed, when omitted, is drawn
    at random and reported in the job.

    Numbers are strict: `"2"` or `true` is not a number here (422 naming the field), nor `2.0` a
    count; only `guidance` takes integers and fractions alike."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"examples": [{"model": "digits", "num_images": 16, "class_label": 3, "seed": 42}]})

    model: str | None = Field(default=None, description="model name (GET /models); default: the server's default model")
    num_images: int = Field(default=1, ge=1, strict=True, description="images in the job (GET /limits: max_images_per_job)")
    class_label: int | None = Field(default=None, strict=True, description="one label for every image; null = random labels from the seed")
    class_labels: list[StrictInt] | None = Field(default=None, max_length=10_000, description="one label per image")
    timesteps: TimestepsSpec | None = Field(default=None, description=(
        f"respacing: {SPEC_FORMS}, in ASCII digits with no spaces or signs; an integer N is the spec 'N'; "
        "default: the model's"))
    sampler: SamplerChoice | None = Field(default=None, description="case-insensitive; default: the model's")
    guidance: float | None = Field(default=None, strict=True, description="classifier-free guidance weight; 1.0 = none")
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT, strict=True)
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
    step: int = Field(description="network evaluations done, counted image by image")
    total: int = Field(description="images × steps")
    fraction: float
    images_done: int = Field(default=0, description="images finished")


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


class Limits(BaseModel):
    """GET /limits: what this server accepts in a request (its settings), so that a client can
    check a form before it submits. The server checks every request against these anyway."""

    max_images_per_job: int = Field(description="num_images at most")
    max_timesteps: int = Field(description="sampling steps of one job at most (the steps a timesteps spec gives)")
    timesteps_max_length: int = Field(description="characters of a timesteps spec at most")
    min_guidance: float
    max_guidance: float
    allowed_samplers: list[SamplerName]
    max_job_cost: int = Field(description="cost units of one job at most: images × steps, × 2 with guidance")
    max_seed: int = Field(description="the largest seed (the smallest is 0)")
    submit_rate_per_minute: int = Field(description="submissions per API key and minute (with API keys on); 0 = no limit")


class ModelLoad(BaseModel):
    outstanding_cost: int = Field(description="cost units (network evaluations: images × steps, × 2 with guidance) of "
                                  "the model's queued and running jobs")
    queued_jobs: int = Field(description="jobs waiting in the model's queue")
    live_workers: int = Field(description="workers with a live heartbeat that serve the model")


class Autoscale(BaseModel):
    """The work waiting for the workers, per model: the signal to scale them on (KEDA's `metrics-api`
    scaler reads `models.<model>.outstanding_cost`). Queued jobs alone would read 0 while the
    workers' engines are full (a CUDA worker holds up to 512 jobs at once); outstanding cost counts
    what they hold too."""

    outstanding_cost: int = Field(description="all models together")
    models: dict[str, ModelLoad]


class Health(BaseModel):
    status: str
    redis: str | None = None
    workers: int | None = Field(default=None, description="workers with a live heartbeat")
    workers_unwritable: int | None = Field(default=None, description="of those, workers whose result store is full "
                                           "or unreachable (they take no jobs until it can be written again)")
    store: str | None = Field(default=None, description="this API's result store: ok, low on space, or unwritable")
    store_free_bytes: int | None = Field(default=None, description="free space of a local store (none for S3)")
    detail: str | None = None


class ErrorBody(BaseModel):
    detail: str
