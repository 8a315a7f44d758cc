"""The job record: what the API creates, workers run and both read back. Torch-free.

A job is the Redis hash `job:<id>` (`keys.Keys.job`). Its status moves

    queued ──> running ──> finished | failed | cancelled
       ^          │
       └──────────┘  (handed back, or its worker died: a new attempt)

every move made by one atomic script (`scripts.py`). `attempt` counts how often the job was put in
a queue: it is the fencing token, and together with `worker` it guards every write a worker makes.
`attempts` counts the runs charged against `max_attempts`: a run is charged when it starts, and
given back when it ends for a reason that is not the job's: handed back by a worker that shuts
down, or lost with a worker that died while shutting down.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel

from patchdiff_core.generation.spec import GenerationSpec

Status = Literal["queued", "running", "finished", "failed", "cancelled"]
TERMINAL: tuple[Status, ...] = ("finished", "failed", "cancelled")
CANCELLED_BY_REQUEST = "cancelled by request"


class JobRecord(BaseModel):
    id: str
    status: Status
    spec: GenerationSpec
    created_at: float
    enqueued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0  # network evaluations done, counted image by image
    total: int = 0  # images × steps
    images_done: int = 0
    error: str | None = None
    worker: str | None = None
    attempt: int = 1  # the fencing token: how often the job was put in a queue
    attempts: int = 0  # runs charged against max_attempts
    results_attempt: int | None = None  # the attempt whose results are published (set by finishing)
    cancel_requested: bool = False
    num_results: int = 0
    model_sha256: list[str] = []
    idempotency_key: str | None = None
    owner: str = ""  # the tenant: a hash of the API key that created it ("" with auth off)
    cost: int = 0
    webhook: str | None = None  # delivery URL (checked at submit: scheme, length, no private target)
    webhook_events: str | None = None  # comma-separated event names sent to the webhook
    # Not stored: filled in by the API when it reads a job for a client.
    queue_position: int | None = None
    webhook_deliveries: list[dict[str, Any]] = []

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL

    def wants_webhook(self, event: str) -> str:
        """The webhook URL if this job's webhook selected `event`, else ''."""
        if not self.webhook or not self.webhook_events:
            return ""
        return self.webhook if event in self.webhook_events.split(",") else ""

    def to_hash(self) -> dict[str, str]:
        """The Redis hash: every value a string (None as '')."""
        data = self.model_dump(exclude={"spec", "model_sha256", "cancel_requested", "queue_position",
                                        "webhook_deliveries"})
        out = {k: "" if v is None else str(v) for k, v in data.items()}
        out["spec"] = self.spec.model_dump_json()
        out["model"] = self.spec.model  # for the scripts, which cannot parse the spec
        out["model_sha256"] = json.dumps(self.model_sha256)
        out["cancel_requested"] = "1" if self.cancel_requested else "0"
        return out

    @classmethod
    def from_hash(cls, data: dict[bytes, bytes] | dict[str, str]) -> "JobRecord | None":
        if not data:
            return None
        fields: dict[str, Any] = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                                  for k, v in data.items()}
        fields.pop("model", None)
        fields["spec"] = json.loads(fields["spec"])
        fields["model_sha256"] = json.loads(fields.get("model_sha256") or "[]")
        fields["cancel_requested"] = fields.get("cancel_requested") == "1"
        fields["owner"] = fields.get("owner") or ""
        return cls.model_validate({k: (None if v == "" and k != "owner" else v) for k, v in fields.items()})


def new_job_id() -> str:
    return uuid.uuid4().hex


def job_cost(spec: GenerationSpec, num_steps: int) -> int:
    """Network evaluations of one image × images: what a job costs a worker (guidance doubles it)."""
    return spec.num_images * num_steps * (2 if spec.guidance != 1.0 else 1)


def result_names(num_results: int) -> list[str]:
    """The files a finished job publishes, relative to its results: the grid, each image, the record."""
    return ["grid.png", *(f"images/{i}.png" for i in range(num_results)), "record.json"]


def result_links(job_id: str, num_results: int, base_url: str = "") -> dict[str, Any]:
    """Where a finished job's results are served: `base_url` + `/jobs/<id>/...` (API-relative without
    a base). The one definition of these URLs: job views, events and webhooks use it."""
    job = f"{base_url}/jobs/{job_id}"
    return {"grid": f"{job}/grid.png", "images": [f"{job}/images/{i}.png" for i in range(num_results)],
            "record": f"{job}/record.json"}
