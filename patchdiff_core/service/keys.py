"""The Redis key layout of the service: every key any process or script touches, stated once. Torch-free.

All keys start with `redis_prefix` (setting `PATCHDIFF_REDIS_PREFIX`, default `patchdiff`), so that
several deployments can share one Redis. Lua scripts never build a key name: every key a script
touches is passed in KEYS, computed here (what Redis Cluster would need too; see the docs'
"Running on many machines" for why the service does not use Cluster).

| key | type | what |
|---|---|---|
| `job:<id>` | hash | the job record (`records.JobRecord`); no expiry while queued or running |
| `events:<id>` | stream | the job's events (`events.py`): SSE and webhooks |
| `preview:<id>` | string | the latest preview PNG of a running job |
| `idem:<sha256>` | string | an idempotency claim, `<job id>:<request fingerprint>` |
| `queued:<model>` | sorted set | the queue of a model: job id → enqueue time (negative: put back at the front) |
| `wake:<model>` | list | wake-up tokens for idle workers of a model (one per submitted job, trimmed) |
| `queued-models` | set | models that have (or had) a queue |
| `running` | sorted set | running job → start time (the running gauge) |
| `workers` | sorted set | worker name → heartbeat expiry (Redis server time) |
| `worker:<name>` | string | the worker's announcement (JSON: host, pid, models, rows...) |
| `held:<name>` | set | the jobs a worker holds (taken from a queue and not yet ended) |
| `inbox:<name>` | set | `<id>:<attempt>` of the worker's jobs whose cancel was requested |
| `draining` | hash | worker name → time it began to shut down (its jobs are handed back uncharged) |
| `model-workers:<model>` | sorted set | the workers serving a model → their heartbeat expiry |
| `models` | hash | model → its description as a worker announced it (JSON) |
| `costs` | hash | outstanding cost units: `global`, `owner:<owner>`, `model:<model>` |
| `metrics` | hash | counters (`jobs_submitted`, `jobs_finished`, ...) |
| `hist:<name>` | hash | histogram buckets `b<i>`, `sum`, `count` |
| `expiry` | sorted set | ended job → when the janitor deletes its record and results |
| `rate:<owner>:<minute>` | string | submissions of a tenant in one minute |
| `lease:<role>` | string | the process that holds a role (`reaper`, `janitor`, `metrics`), with an expiry |
| `epoch` | hash | the Redis server's `run_id` and when it was first seen (restart/failover pause) |
| `webhooks` | stream | webhook deliveries waiting to be sent (consumer group `senders`) |
| `webhooks:retry` | sorted set | failed deliveries → when to try again |
| `webhook-status:<id>` | hash | event id → the latest delivery outcome of that event |
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "patchdiff"

    # -- per job ---------------------------------------------------------------------------
    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"

    def preview(self, job_id: str) -> str:
        return f"{self.prefix}:preview:{job_id}"

    def idempotency(self, digest: str) -> str:
        return f"{self.prefix}:idem:{digest}"

    def webhook_status(self, job_id: str) -> str:
        return f"{self.prefix}:webhook-status:{job_id}"

    def job_keys(self, job_id: str) -> list[str]:
        """Everything stored under a job's id (what the janitor deletes with its results)."""
        return [self.job(job_id), self.events(job_id), self.preview(job_id), self.webhook_status(job_id)]

    # -- per model -------------------------------------------------------------------------
    def queued(self, model: str) -> str:
        return f"{self.prefix}:queued:{model}"

    def wake(self, model: str) -> str:
        return f"{self.prefix}:wake:{model}"

    def model_workers(self, model: str) -> str:
        return f"{self.prefix}:model-workers:{model}"

    # -- per worker ------------------------------------------------------------------------
    def worker(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"

    def held(self, name: str) -> str:
        return f"{self.prefix}:held:{name}"

    def inbox(self, name: str) -> str:
        return f"{self.prefix}:inbox:{name}"

    # -- service-wide ----------------------------------------------------------------------
    def hist(self, name: str) -> str:
        return f"{self.prefix}:hist:{name}"

    def rate(self, owner: str, window: int) -> str:
        return f"{self.prefix}:rate:{owner}:{window}"

    @property
    def queued_models(self) -> str:
        return f"{self.prefix}:queued-models"

    @property
    def running(self) -> str:
        return f"{self.prefix}:running"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def draining(self) -> str:
        return f"{self.prefix}:draining"

    @property
    def models(self) -> str:
        return f"{self.prefix}:models"

    @property
    def costs(self) -> str:
        return f"{self.prefix}:costs"

    @property
    def metrics(self) -> str:
        return f"{self.prefix}:metrics"

    @property
    def expiry(self) -> str:
        return f"{self.prefix}:expiry"

    def lease(self, role: str) -> str:
        return f"{self.prefix}:lease:{role}"

    @property
    def epoch(self) -> str:
        return f"{self.prefix}:epoch"

    @property
    def webhooks(self) -> str:
        return f"{self.prefix}:webhooks"

    @property
    def webhook_retries(self) -> str:
        return f"{self.prefix}:webhooks:retry"
