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
    """Every setting of the CLI, the API and the workers; each is read from `PATCHDIFF_<NAME>`.

    Each field's `description` is its documentation: the settings page of the docs is generated
    from this class, so it cannot go stale."""

    model_config = SettingsConfigDict(env_prefix="PATCHDIFF_", extra="ignore")

    # -- Models ------------------------------------------------------------------------------
    weights_dir: Path = Field(default=REPO_ROOT / "weights", description="model files and their `manifest.json`")
    default_model: str = Field(default="digits", description="the model of a request that names none, and what a worker serves by default")
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="where workers and the CLI run the networks: `auto`, `cpu`, `cuda` or `cuda:N` (GPU N)")
    gpu_lock_dir: Path | None = Field(default=None, description="workers on one machine with several GPUs each claim a GPU no other holds, by a lock file in this folder shared by them (the compose file mounts one); unset: `cuda` is GPU 0 (or what `CUDA_VISIBLE_DEVICES` leaves)")

    # -- Redis -------------------------------------------------------------------------------
    redis_url: str | None = Field(default=None, description="`redis://host:6379/0` or `unix:///path`; unset: `patchdiff serve` starts an embedded Redis")
    redis_sentinels: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated `host:port` of Redis Sentinels; when set, every client finds the master through them (and follows a failover), and `redis_url` is not used")
    redis_sentinel_master: str = Field(default="patchdiff", description="the master's name in the Sentinels' configuration")
    redis_password: SecretStr | None = Field(default=None, description="the Redis password with Sentinels (with `redis_url`, put it in the URL)")
    redis_sentinel_password: SecretStr | None = Field(default=None, description="the Sentinels' own password, if they have one")
    redis_wait_replicas: int = Field(default=-1, ge=-1, description="a job is accepted (202) only once this many of the master's connected replicas have it (`WAIT`), so that a failover cannot lose it; -1: 1 with Sentinels, 0 (no wait) otherwise")
    redis_prefix: str = Field(default="patchdiff", pattern=r"^[A-Za-z0-9_.{}-]{1,64}$",
                              description="prefix of every Redis key of the service (several deployments can share one Redis)")
    redis_retry_max_s: float = Field(default=2.0, gt=0, description="workers: longest wait between Redis reconnect attempts")

    # -- Object store ------------------------------------------------------------------------
    store_dir: Path = Field(default=REPO_ROOT / "data" / "results", description="results on the local disk (when no S3 bucket is set)")
    store_s3_bucket: str | None = Field(default=None, description="results in this S3-compatible bucket instead of `store_dir`; credentials from the `AWS_*` variables")
    store_s3_prefix: str = Field(default="jobs", description="key prefix of the results in the bucket")
    store_s3_endpoint_url: str | None = Field(default=None, description="S3 endpoint of a non-AWS store, e.g. `http://minio:9000`")
    store_min_free_bytes: int = Field(default=100_000_000, ge=0, description="`/readyz` says not ready while a local store has less free space than this (root may write past a full disk's reserve)")

    # -- API ---------------------------------------------------------------------------------
    api_host: str = Field(default="127.0.0.1", description="address the API listens on (`patchdiff serve`)")
    api_port: int = Field(default=8000, description="port the API listens on (`patchdiff serve`)")
    public_url: str | None = Field(default=None, description="base URL of the links in responses behind a proxy; unset: the URL the client used")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list, description="comma-separated API keys; empty: no authentication")
    admin_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list, description="comma-separated keys that see every tenant's jobs")
    max_body_bytes: int = Field(default=1_048_576, ge=1024, description="larger request bodies get 413 and are never read whole")
    submit_rate_per_minute: int = Field(default=120, ge=0, description="`POST /generate` per API key and minute (with keys on); 0 = no limit")
    # Work is counted in cost units: images × sampling steps × 2 with guidance (network evaluations).
    max_job_cost: int = Field(default=128_000, ge=1, description="cost units (images × steps × 2 if guided) of one job; the default lets 64 images × 1000 guided steps through")
    max_queued_cost_per_key: int = Field(default=1_000_000, ge=0, description="cost of the queued and running jobs of one API key; 0 = no cap")
    max_queued_cost: int = Field(default=10_000_000, ge=0, description="cost of all queued and running jobs; 0 = no cap")
    max_queued_cost_per_model: dict[str, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict, description='JSON `{"model": cap}` (`"*"`: every model not named): queued and running cost per '
        "model, so that one model's backlog cannot take the whole global cap; unset: no cap")
    retry_after_s: int = Field(default=5, ge=1, description="`Retry-After` of every 503 (Redis unavailable, no live worker serves the model) and of the 429s of the caps")

    # -- Request limits ----------------------------------------------------------------------
    max_images_per_job: int = Field(default=64, ge=1, description="images in one job")
    max_timesteps: int = Field(default=1000, ge=2, le=1000, description="sampling steps of one job")
    min_guidance: float = Field(default=1.0, description="smallest classifier-free guidance weight accepted")
    max_guidance: float = Field(default=20.0, description="largest classifier-free guidance weight accepted")
    allowed_samplers: Annotated[list[SamplerName], NoDecode] = Field(
        default_factory=lambda: list(SAMPLER_NAMES), description="comma-separated samplers a request may choose")

    # -- Workers -----------------------------------------------------------------------------
    worker_models: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated models a worker loads; empty: `default_model`")
    # The batching engine: network rows per forward pass and model (a guided image takes two), and
    # how many jobs a worker holds at once.
    engine_max_batch: int = Field(default=0, ge=0, description="network rows per forward pass and model (a guided image takes two); 0 = by device and image size: 4 on a CPU, on CUDA 512 for images up to 64 px, fewer for larger ones, at least 64")
    engine_max_batch_per_model: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict, description='JSON, e.g. `{"church_p4": 32}`: `engine_max_batch` per model')
    engine_max_jobs: int = Field(default=0, ge=0, description="jobs a worker holds at once; 0 = as many as rows (each job holds at least one); 1 = one job at a time")
    engine_compile: Literal["auto", "off", "default", "reduce-overhead", "max-autotune"] = Field(
        default="auto", description="run the networks through `torch.compile`, compiled in the background while the worker serves eagerly, each row bucket switching to compiled code when it is ready: `auto` = on CUDA (CUDA graphs for the buckets of small forwards), off on the CPU; `default` = compiled without CUDA graphs; `reduce-overhead` = every bucket a CUDA graph; `max-autotune` = Inductor's autotuning (slower to compile); `off` = eager")
    heartbeat_interval_s: float = Field(default=2.0, gt=0, description="how often a worker announces itself")
    worker_report_interval_s: float = Field(default=0.25, ge=0, description="a worker reports to Redis after an engine step at once when something is due (a job's end, a progress event, its heartbeat), else at most this often: cancel requests and new jobs are seen within it")
    heartbeat_ttl_s: float = Field(default=10.0, gt=0, description="a worker silent this long is taken for dead and its jobs are requeued")
    max_attempts: int = Field(default=2, ge=1, description="runs of a job before it fails, counting only runs that ended because their worker died while running it (a worker that shuts down hands its jobs back without charging them)")
    store_retry_s: float = Field(default=600.0, ge=0, description="how long a worker keeps trying to write a finished job's results while the store cannot take them (a full disk), taking no new jobs meanwhile; then the job fails with the reason")
    job_ttl_s: int = Field(default=7 * 24 * 3600, ge=60, description="a job's record and results are deleted this long after it ended")
    janitor_interval_s: float = Field(default=60.0, gt=0, description="how often the records and results of expired jobs are deleted")
    log_format: Literal["json", "text"] = Field(default="json", description="JSON lines, or plain text for a terminal")
    access_log: bool = Field(default=True, description="one log line per API request (costs some throughput on a busy API)")

    # -- Live progress: job event streams, previews, SSE, webhooks ---------------------------
    events_max_len: int = Field(default=2000, ge=10, description="events kept per job (a Redis Stream, trimmed)")
    progress_event_interval_s: float = Field(default=0.25, ge=0, description="a `progress` event per job this often (and with each preview); a job that ends sooner has only its started and finished events")
    preview_every_steps: int = Field(default=10, ge=1, description="a preview at most every k steps of a job...")
    preview_min_interval_s: float = Field(default=1.0, ge=0, description="...and at most this often per job")
    preview_max_side: int = Field(default=256, ge=16, le=2048, description="the preview grid is downscaled to fit this many pixels")
    preview_inline_max_bytes: int = Field(default=16384, ge=0, description="previews up to this size ride inline in their event (base64)")
    sse_max_streams: int = Field(default=100, ge=1, description="concurrent `/events` streams per API process (429 beyond)")
    sse_keepalive_s: float = Field(default=15.0, gt=0, description="a comment line is sent when nothing else was for this long")
    sse_max_stream_s: float = Field(default=3600.0, gt=0, description="then the server closes the stream; clients resume with `Last-Event-ID`")
    webhook_secret: SecretStr | None = Field(default=None, description="`whsec_<base64>` signing secret (Standard Webhooks); unset: requests with a webhook are refused")
    webhook_allow_private: bool = Field(default=False, description="allow loopback, private and link-local webhook targets (the SSRF guard off)")
    webhook_max_url_length: int = Field(default=2048, ge=16, description="longest webhook URL accepted")
    webhook_timeout_s: float = Field(default=10.0, gt=0, description="one delivery attempt")
    webhook_max_attempts: int = Field(default=6, ge=1, description="delivery attempts of one event")
    webhook_backoff_s: float = Field(default=2.0, gt=0, description="retry after b, 2b, 4b, ... seconds")
    webhook_max_concurrency: int = Field(default=16, ge=1, description="deliveries in flight per API process")
    sse_max_streams_per_key: int = Field(default=20, ge=1, description="concurrent `/events` streams of one API key per API process (429 beyond), so that one key cannot take every stream; not applied with authentication off")

    # -- Compiled networks: the persistent compile cache -------------------------------------
    compile_cache_dir: Path | None = Field(default=None, description="workers keep the compiled networks here (PyTorch Inductor's caches, in `torch-<version>/<device kind>/` subfolders), so that a restarted worker loads them instead of compiling again; a volume shared by the workers of one machine; unset: a temp folder (lost with the container)")

    @field_validator("api_keys", "admin_keys", "worker_models", "allowed_samplers", "redis_sentinels", mode="before")
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
    def redis_configured(self) -> bool:
        return bool(self.redis_url or self.redis_sentinels)

    @property
    def wait_replicas(self) -> int:
        """Replicas that must have a job before it is accepted."""
        if self.redis_wait_replicas >= 0:
            return self.redis_wait_replicas
        return 1 if self.redis_sentinels else 0

    @property
    def served_models(self) -> list[str]:
        return self.worker_models or [self.default_model]

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.api_host}:{self.api_port}").rstrip("/")


@lru_cache
def get_settings() -> Settings:
    return Settings()
