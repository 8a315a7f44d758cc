"""Job records in Redis: the contract between the API (which creates and cancels jobs) and the workers
(which run them). Torch-free.

A job is a Redis hash `patchdiff:job:<id>`; its status moves queued → running → finished | failed |
cancelled, every move made atomically by a Lua script. The RQ queue only carries the job id to a
worker (`worker.tasks.run_generation(job_id)`, JSON-serialised).

Workers announce themselves with a heartbeat key that expires after `heartbeat_ttl_s`; `reap()`
gives the jobs of a worker that stopped beating (killed, out of memory) back to the queue, or fails
them after `max_attempts`, so no job stays "running" for long after its worker died.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from typing import Any, Literal

import redis
from pydantic import BaseModel
from rq import Queue
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from patchdiff_core.generation.spec import GenerationSpec
from patchdiff_core.service.events import JobEvents, status_event
from patchdiff_core.service.settings import Settings

Status = Literal["queued", "running", "finished", "failed", "cancelled"]
TERMINAL = ("finished", "failed", "cancelled")
TASK = "worker.tasks.run_generation"
PREFIX = "patchdiff"
log = logging.getLogger("patchdiff.jobs")

# Histogram buckets (seconds) for the job and step latencies exported on /metrics.
JOB_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

# Move a job to ARGV[2] if its status is one of ARGV[1] (comma-separated), then set the field/value
# pairs ARGV[3..]; terminal moves also take it off the active set (KEYS[2]) and count it in the
# metrics hash (KEYS[3], field jobs_<status>). Returns the previous status, or false when the job is
# missing or in another status.
_TRANSITION = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
for allowed in string.gmatch(ARGV[1], '[^,]+') do
  if status == allowed then
    redis.call('HSET', KEYS[1], 'status', ARGV[2], unpack(ARGV, 3))
    if ARGV[2] == 'finished' or ARGV[2] == 'failed' or ARGV[2] == 'cancelled' then
      redis.call('SREM', KEYS[2], string.match(KEYS[1], '[^:]+$'))
      redis.call('HINCRBY', KEYS[3], 'jobs_' .. ARGV[2], 1)
    end
    return status
  end
end
return false
"""


class JobRecord(BaseModel):
    id: str
    status: Status
    spec: GenerationSpec
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0
    total: int = 0
    error: str | None = None
    worker: str | None = None
    attempts: int = 0
    cancel_requested: bool = False
    rq_id: str | None = None
    num_results: int = 0
    model_sha256: list[str] = []
    idempotency_key: str | None = None
    webhook: str | None = None  # delivery URL (checked at submit: scheme, length, no private target)
    webhook_events: str | None = None  # comma-separated event names sent to the webhook

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> "JobRecord":
        fields: dict[str, Any] = dict(data)
        fields["spec"] = json.loads(fields["spec"])
        fields["model_sha256"] = json.loads(fields.get("model_sha256") or "[]")
        fields["cancel_requested"] = fields.get("cancel_requested") == "1"
        return cls.model_validate({k: (None if v == "" else v) for k, v in fields.items()})


def new_job_id() -> str:
    return uuid.uuid4().hex


class IdempotencyConflict(Exception):
    pass


class JobStore:
    def __init__(self, conn: redis.Redis, settings: Settings):
        self.redis = conn
        self.settings = settings
        self.queue = Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)
        self._transition = conn.register_script(_TRANSITION)
        self.events = JobEvents(conn, settings)  # every status transition appends a job event

    # -- keys ------------------------------------------------------------------------------
    @staticmethod
    def job_key(job_id: str) -> str:
        return f"{PREFIX}:job:{job_id}"

    active_key = f"{PREFIX}:active"
    metrics_key = f"{PREFIX}:metrics"

    @staticmethod
    def worker_key(name: str) -> str:
        return f"{PREFIX}:worker:{name}"

    def transition(self, job_id: str, allowed: tuple[str, ...], status: str, **fields: Any) -> str | None:
        args: list[Any] = [",".join(allowed), status]
        for key, value in fields.items():
            args += [key, "" if value is None else value]
        previous = self._transition(keys=[self.job_key(job_id), self.active_key, self.metrics_key], args=args)
        if previous:
            try:
                self.events.publish(job_id, *status_event(job_id, status, fields))
            except redis.RedisError as exc:  # the move happened; a lost event must not undo or stall it
                log.warning("job %s: could not publish its %s event: %s", job_id, status, exc)
        return previous.decode() if isinstance(previous, bytes) else previous or None

    # -- API side --------------------------------------------------------------------------
    def submit(
        self, spec: GenerationSpec, idempotency_key: str | None = None, fingerprint: str = "",
        webhook: str | None = None, webhook_events: list[str] | None = None,
    ) -> tuple[JobRecord, bool]:
        """Create and enqueue a job; returns (record, created).

        A repeated `idempotency_key` with the same `fingerprint` (the request as the client sent
        it) returns the first job instead; with another fingerprint it raises `IdempotencyConflict`.
        """
        job_id = new_job_id()
        record = JobRecord(id=job_id, status="queued", spec=spec, created_at=time.time(), idempotency_key=idempotency_key,
                           webhook=webhook, webhook_events=",".join(webhook_events or []) or None)
        self.redis.hset(self.job_key(job_id), mapping=self._to_hash(record))
        self.redis.expire(self.job_key(job_id), self.settings.job_ttl_s)
        if idempotency_key:
            # Claimed only after the record exists, so whoever reads the key finds a job.
            key = f"{PREFIX}:idem:{hashlib.sha256(idempotency_key.encode()).hexdigest()}"
            if not self.redis.set(key, f"{job_id}:{fingerprint}", nx=True, ex=self.settings.job_ttl_s):
                self.redis.delete(self.job_key(job_id))
                existing_id, existing_fingerprint = (self.redis.get(key) or b":").decode().split(":", 1)
                existing = self.get(existing_id)
                if existing is None or existing_fingerprint != fingerprint:
                    raise IdempotencyConflict(
                        f"idempotency_key was already used for a different request (job {existing_id})"
                    )
                return existing, False
        with self.redis.pipeline() as pipe:
            pipe.sadd(self.active_key, job_id)
            pipe.hincrby(self.metrics_key, "jobs_submitted", 1)
            pipe.execute()
        self.events.publish(job_id, *status_event(job_id, "queued", {}))  # before a worker can start it
        self._enqueue(record)
        return self.get(job_id), True

    def _enqueue(self, record: JobRecord) -> None:
        rq_id = f"{record.id}-{record.attempts + 1}"
        self.redis.hset(self.job_key(record.id), "rq_id", rq_id)
        self.queue.enqueue(
            TASK,
            record.id,
            job_id=rq_id,
            job_timeout=-1,  # liveness is ours (heartbeats); a long job is not a dead one
            result_ttl=600,
            failure_ttl=self.settings.job_ttl_s,
        )

    @staticmethod
    def _to_hash(record: JobRecord) -> dict[str, Any]:
        data = record.model_dump(exclude={"spec", "model_sha256", "cancel_requested"})
        data = {k: ("" if v is None else v) for k, v in data.items()}
        data["spec"] = record.spec.model_dump_json()
        data["model_sha256"] = json.dumps(record.model_sha256)
        data["cancel_requested"] = "1" if record.cancel_requested else "0"
        return data

    def get(self, job_id: str) -> JobRecord | None:
        data = self.redis.hgetall(self.job_key(job_id))
        if not data:
            return None
        return JobRecord.from_hash({k.decode(): v.decode() for k, v in data.items()})

    def queue_position(self, record: JobRecord) -> int | None:
        """Jobs ahead of this one in the queue (0 = next), or None when it is not waiting."""
        if record.status != "queued" or not record.rq_id:
            return None
        return self.queue.get_job_position(record.rq_id)

    def cancel(self, job_id: str) -> str | None:
        """Cancel a job: a queued one never runs; a running one stops at its next step.

        Returns the status after the request ("cancelled" or "running"), or None if already over.
        """
        record = self.get(job_id)
        if record is None or record.status in TERMINAL:
            return None
        if self.transition(job_id, ("queued",), "cancelled", finished_at=time.time(), error="cancelled by request"):
            if record.rq_id:
                self.queue.remove(record.rq_id)
            return "cancelled"
        # Running (or just started): the worker checks this flag at every step.
        self.redis.hset(self.job_key(job_id), "cancel_requested", "1")
        after = self.get(job_id)
        return after.status if after and after.status not in TERMINAL else None

    # -- worker side -----------------------------------------------------------------------
    def start(self, job_id: str, worker: str) -> JobRecord | None:
        record = self.get(job_id)
        if record is None:
            return None
        previous = self.transition(
            job_id, ("queued",), "running", started_at=time.time(), worker=worker,
            attempts=record.attempts + 1, step=0, total=0,
        )
        return self.get(job_id) if previous else None

    def progress(self, job_id: str, step: int, total: int, step_seconds: float) -> bool:
        """Record one sampling step; returns True if the job should stop (cancel requested)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.job_key(job_id), mapping={"step": step, "total": total})
            self._observe(pipe, "step_seconds", STEP_BUCKETS, step_seconds)
            pipe.hget(self.job_key(job_id), "cancel_requested")
            flag = pipe.execute()[-1]
        return flag == b"1"

    def finish(self, job_id: str, num_results: int, model_sha256: list[str]) -> bool:
        now = time.time()
        started_at = float(self.redis.hget(self.job_key(job_id), "started_at") or now)
        ok = self.transition(
            job_id, ("running",), "finished", finished_at=now, num_results=num_results,
            model_sha256=json.dumps(model_sha256),
        )
        if ok:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.hincrby(self.metrics_key, "images_generated", num_results)
                self._observe(pipe, "job_seconds", JOB_BUCKETS, now - started_at)
                pipe.execute()
        return bool(ok)

    def fail(self, job_id: str, error: str) -> bool:
        return bool(self.transition(job_id, ("queued", "running"), "failed", finished_at=time.time(), error=error))

    def mark_cancelled(self, job_id: str) -> bool:
        return bool(self.transition(job_id, ("running",), "cancelled", finished_at=time.time(), error="cancelled by request"))

    def _observe(self, pipe, name: str, buckets: tuple[float, ...], value: float) -> None:
        index = next((i for i, b in enumerate(buckets) if value <= b), len(buckets))
        key = f"{PREFIX}:hist:{name}"
        pipe.hincrby(key, f"b{index}", 1)
        pipe.hincrbyfloat(key, "sum", value)
        pipe.hincrby(key, "count", 1)

    # -- workers and liveness --------------------------------------------------------------
    def heartbeat(self, name: str, info: dict[str, Any]) -> None:
        ttl_ms = int(self.settings.heartbeat_ttl_s * 1000)
        self.redis.set(self.worker_key(name), json.dumps(info), px=ttl_ms)

    def worker_gone(self, name: str) -> None:
        self.redis.delete(self.worker_key(name))

    def live_workers(self) -> list[dict[str, Any]]:
        keys = list(self.redis.scan_iter(match=self.worker_key("*"), count=100))
        values = self.redis.mget(keys) if keys else []
        return [json.loads(v) for v in values if v]

    def served_models(self) -> dict[str, dict[str, Any]]:
        """Models that some live worker serves, with the facts its heartbeat carries about them.

        Kept in the heartbeat itself (not a separate key) so that it comes back by itself when
        Redis restarts empty.
        """
        return {name: info for w in self.live_workers() for name, info in w.get("models", {}).items()}

    def reap(self) -> list[tuple[str, str]]:
        """Requeue (or fail) the jobs of dead workers; returns [(job id, what happened)].

        Safe to call from every process: a short lock makes one reaper run at a time, and each
        job moves by an atomic status transition.
        """
        if not self.redis.set(f"{PREFIX}:reaper-lock", "1", nx=True, px=int(self.settings.heartbeat_interval_s * 1000)):
            return []
        alive = {w["name"] for w in self.live_workers()}
        started = StartedJobRegistry(queue=self.queue)
        actions = []
        for raw_id in self.redis.smembers(self.active_key):
            job_id = raw_id.decode()
            record = self.get(job_id)
            if record is None:
                self.redis.srem(self.active_key, job_id)
                continue
            if record.status == "running" and record.worker not in alive:
                actions.append((job_id, self._orphaned(record, f"worker {record.worker} stopped (no heartbeat)")))
            elif record.status == "queued" and time.time() - record.created_at > self.settings.heartbeat_ttl_s:
                # Queued but neither waiting in the queue nor picked up by a live worker: lost.
                if self.queue.get_job_position(record.rq_id or "") is not None:
                    continue
                if record.rq_id in started and self._rq_worker_alive(record.rq_id, alive):
                    continue
                actions.append((job_id, self._orphaned(record, "job left the queue without a live worker")))
            elif record.status in TERMINAL:
                self.redis.srem(self.active_key, job_id)
        return actions

    def _rq_worker_alive(self, rq_id: str, alive: set[str]) -> bool:
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        try:
            return Job.fetch(rq_id, connection=self.redis, serializer=JSONSerializer).worker_name in alive
        except NoSuchJobError:
            return False

    def _orphaned(self, record: JobRecord, reason: str) -> str:
        if record.cancel_requested:
            self.transition(record.id, (record.status,), "cancelled", finished_at=time.time(), error="cancelled by request")
            return "cancelled"
        if record.attempts < self.settings.max_attempts:
            if self.transition(record.id, (record.status,), "queued", worker=None, step=0, total=0, error=f"requeued: {reason}"):
                self.redis.hincrby(self.metrics_key, "jobs_requeued", 1)
                self._enqueue(self.get(record.id))
                return "requeued"
            return "raced"
        self.fail(record.id, f"{reason}; gave up after {record.attempts} attempt(s)")
        return "failed"

    def metric_counters(self) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in self.redis.hgetall(self.metrics_key).items()}

    def histogram(self, name: str) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in self.redis.hgetall(f"{PREFIX}:hist:{name}").items()}

    def count_active(self) -> dict[str, int]:
        counts = {"queued": 0, "running": 0}
        with self.redis.pipeline(transaction=False) as pipe:
            for raw_id in self.redis.smembers(self.active_key):
                pipe.hget(self.job_key(raw_id.decode()), "status")
            statuses = pipe.execute()
        for status in statuses:
            if status and status.decode() in counts:
                counts[status.decode()] += 1
        return counts
