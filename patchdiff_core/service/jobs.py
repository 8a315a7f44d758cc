"""Job records in Redis: the contract between the API (which creates and cancels jobs) and the workers
(which run them). Torch-free.

A job is a Redis hash `patchdiff:job:<id>`; its status moves queued → running → finished | failed |
cancelled, every move made atomically by a Lua script (`lua.py`). The RQ queue of the job's model
(`<queue_name>:<model>`) only carries `(job id, attempt)` to a worker
(`worker.tasks.run_generation(job_id, attempt)`, JSON-serialised).

**Fencing.** `attempt` counts how often the job was put in a queue; it is the fencing token. Every
worker call (`start`, `progress`, `finish`, `fail`, `mark_cancelled`, `hand_back`) names the attempt
it works on and is refused once the job has moved on to another attempt, so a worker that was paused
past its heartbeat (SIGSTOP, a long GC) and resumes after its job was requeued can change nothing.
Results are written under `jobs/<id>/a<attempt>/...` and published by `finish`, which records the
attempt whose files the API serves, in the same atomic step as the status move.

`attempts` (shown to clients) counts the runs charged against `max_attempts`: a run that ends because
its worker died is charged; one handed back by a worker that shuts down gracefully is not.

**Bookkeeping in O(active).** Live workers are a sorted set (name → heartbeat expiry, Redis server
time); queued jobs are one sorted set per model, running jobs one sorted set; `reap()` reads only
those, never the keyspace.
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
from rq.serializers import JSONSerializer

from patchdiff_core.generation.spec import GenerationSpec
from patchdiff_core.service import lua
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


class JobRecord(BaseModel):
    id: str
    status: Status
    spec: GenerationSpec
    created_at: float
    enqueued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0
    total: int = 0
    error: str | None = None
    worker: str | None = None
    attempt: int = 0  # the fencing token: how often the job was put in a queue
    attempts: int = 0  # runs charged against max_attempts
    results_attempt: int | None = None  # the attempt whose results are published (set by finish)
    cancel_requested: bool = False
    rq_id: str | None = None
    num_results: int = 0
    model_sha256: list[str] = []
    idempotency_key: str | None = None
    owner: str = ""  # the tenant: a hash of the API key that created it ("" with auth off)
    cost: int = 0
    webhook: str | None = None  # delivery URL (checked at submit: scheme, length, no private target)
    webhook_events: str | None = None  # comma-separated event names sent to the webhook
    # Not stored: filled in by `get(..., with_position=True)` for queued jobs.
    queue_position: int | None = None

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> "JobRecord":
        fields: dict[str, Any] = dict(data)
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


class IdempotencyConflict(Exception):
    pass


class OverCapacity(Exception):
    """Admission refused: the queued work of this caller (`scope` = "owner"), of the job's model
    ("model") or of all ("global") is full."""

    def __init__(self, scope: str, outstanding: int, cap: int, model: str = ""):
        whose = {"owner": "your", "model": f"model {model!r}"}.get(scope, "the service")
        super().__init__(f"{whose} queued work is full ({outstanding} of {cap} cost units outstanding)")
        self.scope, self.outstanding, self.cap = scope, outstanding, cap


class JobStore:
    def __init__(self, conn: redis.Redis, settings: Settings, aconn=None):
        self.redis = conn
        self.aredis = aconn  # optional redis.asyncio client (the API's hot paths)
        self._aget_script = None
        self.settings = settings
        self._queues: dict[str, Queue] = {}
        self.events = JobEvents(conn, settings)  # every status transition appends a job event
        self._transition = conn.register_script(lua.TRANSITION)
        self._submit = conn.register_script(lua.SUBMIT)
        self._heartbeat = conn.register_script(lua.HEARTBEAT)
        self._live = conn.register_script(lua.LIVE_WORKERS)
        self._progress = conn.register_script(lua.PROGRESS)
        self._gone = conn.register_script(lua.GONE)
        self._lost_queued = conn.register_script(lua.LOST_QUEUED)
        self._get_with_position = conn.register_script(lua.GET_WITH_POSITION)

    # -- keys ------------------------------------------------------------------------------
    @staticmethod
    def job_key(job_id: str) -> str:
        return f"{PREFIX}:job:{job_id}"

    @staticmethod
    def queued_key(model: str) -> str:
        return f"{PREFIX}:queued:{model}"

    running_key = f"{PREFIX}:running"  # job id → start time
    queued_models_key = f"{PREFIX}:queued-models"  # models that have (or had) queued jobs
    workers_key = f"{PREFIX}:workers"  # worker name → heartbeat expiry (Redis server time)
    metrics_key = f"{PREFIX}:metrics"
    active_cost_key = f"{PREFIX}:active-cost"  # job id → "owner|cost" while not ended
    costs_key = f"{PREFIX}:costs"  # "global", "owner:<owner>" and "model:<model>" → outstanding cost
    expiry_key = f"{PREFIX}:expiry"  # job id → when the janitor deletes its record and results

    @staticmethod
    def worker_key(name: str) -> str:
        return f"{PREFIX}:worker:{name}"

    def queue_name(self, model: str) -> str:
        return f"{self.settings.queue_name}:{model}"

    def queue(self, model: str) -> Queue:
        if model not in self._queues:
            self._queues[model] = Queue(self.queue_name(model), connection=self.redis, serializer=JSONSerializer)
        return self._queues[model]

    def transition(
        self, job_id: str, allowed: tuple[str, ...], status: str, attempt: int | None = None,
        bump_attempt: bool = False, charge: int = 0, at_front: bool = False, **fields: Any,
    ) -> tuple[str, int, int] | None:
        """Move a job to `status` if it is in one of `allowed` (and, given `attempt`, still on that
        attempt); returns (previous status, attempt, attempts) or None when refused.

        `bump_attempt` starts a new attempt (a requeue); `charge` is added to `attempts`;
        `at_front` puts a requeued job ahead of the others of its model (as RQ's `at_front`)."""
        now = time.time()
        args: list[Any] = [",".join(allowed), status, "" if attempt is None else attempt, -now if at_front else now,
                           "1" if bump_attempt else "0", charge, PREFIX, self.settings.job_ttl_s]
        for key, value in fields.items():
            args += [key, "" if value is None else value]
        keys = [self.job_key(job_id), self.running_key, self.metrics_key, self.active_cost_key, self.costs_key,
                self.queued_models_key, self.expiry_key]
        result = self._transition(keys=keys, args=args)
        if not result:
            return None
        previous, new_attempt, attempts = result
        try:
            self.events.publish(job_id, *status_event(job_id, status, fields))
        except redis.RedisError as exc:  # the move happened; a lost event must not undo or stall it
            log.warning("job %s: could not publish its %s event: %s", job_id, status, exc)
        return (previous.decode() if isinstance(previous, bytes) else previous), int(new_attempt), int(attempts)

    # -- API side --------------------------------------------------------------------------
    def submit(
        self, spec: GenerationSpec, idempotency_key: str | None = None, fingerprint: str = "", owner: str = "",
        cost: int = 0, webhook: str | None = None, webhook_events: list[str] | None = None,
    ) -> tuple[JobRecord, bool]:
        """Create and enqueue a job; returns (record, created).

        Atomic (one Lua script): the idempotency claim, the admission against the queued-work caps
        and the record. A repeated `idempotency_key` of the same `owner` with the same `fingerprint`
        (the request as the client sent it) returns the first job; with another fingerprint it
        raises `IdempotencyConflict`. Over a cap it raises `OverCapacity`.
        """
        job_id = new_job_id()
        now = time.time()
        record = JobRecord(id=job_id, status="queued", spec=spec, created_at=now, enqueued_at=now, attempt=1,
                           rq_id=f"{job_id}-1", idempotency_key=idempotency_key, owner=owner, cost=cost,
                           webhook=webhook, webhook_events=",".join(webhook_events or []) or None)
        idem_key = ""
        if idempotency_key:
            digest = hashlib.sha256(f"{owner}\0{idempotency_key}".encode()).hexdigest()
            idem_key = f"{PREFIX}:idem:{digest}"
        args: list[Any] = [job_id, self.settings.job_ttl_s, fingerprint, now, cost, owner,
                           self.settings.max_queued_cost, self.settings.max_queued_cost_per_key, spec.model,
                           self.settings.model_cost_cap(spec.model)]
        for key, value in self._to_hash(record).items():
            args += [key, value]
        result = self._submit(
            keys=[self.job_key(job_id), idem_key or self.job_key(job_id) + ":noidem", self.queued_key(spec.model),
                  self.metrics_key, self.active_cost_key, self.costs_key, self.queued_models_key],
            args=args,
        )
        outcome = result[0].decode()
        if outcome == "idem":
            existing_id, existing_fingerprint = result[1].decode().split(":", 1)
            existing = self.get(existing_id)
            if existing is None or existing_fingerprint != fingerprint:
                raise IdempotencyConflict("idempotency_key was already used for a different request")
            return existing, False
        if outcome == "over":
            raise OverCapacity(result[1].decode(), int(float(result[2])), int(float(result[3])), spec.model)
        self.events.publish(job_id, *status_event(job_id, "queued", {}))  # before a worker can start it
        self._enqueue(record)
        return record, True

    def _enqueue(self, record: JobRecord, at_front: bool = False) -> None:
        self.queue(record.spec.model).enqueue(
            TASK,
            record.id,
            record.attempt,
            job_id=f"{record.id}-{record.attempt}",
            job_timeout=-1,  # liveness is ours (heartbeats); a long job is not a dead one
            result_ttl=600,
            failure_ttl=self.settings.job_ttl_s,
            at_front=at_front,
        )

    @staticmethod
    def _to_hash(record: JobRecord) -> dict[str, Any]:
        data = record.model_dump(exclude={"spec", "model_sha256", "cancel_requested", "queue_position"})
        data = {k: ("" if v is None else v) for k, v in data.items()}
        data["spec"] = record.spec.model_dump_json()
        data["model"] = record.spec.model  # for the Lua scripts, which cannot parse the spec
        data["model_sha256"] = json.dumps(record.model_sha256)
        data["cancel_requested"] = "1" if record.cancel_requested else "0"
        return data

    def get(self, job_id: str, with_position: bool = False) -> JobRecord | None:
        """The job's record; `with_position` also fills in `queue_position` (same round trip)."""
        if with_position:
            flat, position = self._get_with_position(keys=[self.job_key(job_id)], args=[PREFIX])
            return self._record(dict(zip(flat[::2], flat[1::2])), position)
        return self._record(self.redis.hgetall(self.job_key(job_id)), None)

    async def aget(self, job_id: str) -> JobRecord | None:
        """`get(job_id, with_position=True)` on the asyncio client (`aredis`): the status-poll path,
        which then needs neither a worker thread nor a second round trip."""
        if self._aget_script is None:
            self._aget_script = self.aredis.register_script(lua.GET_WITH_POSITION)
        flat, position = await self._aget_script(keys=[self.job_key(job_id)], args=[PREFIX])
        return self._record(dict(zip(flat[::2], flat[1::2])), position)

    @staticmethod
    def _record(data: dict[bytes, bytes], position) -> JobRecord | None:
        if not data:
            return None
        fields = {k.decode(): v.decode() for k, v in data.items()}
        fields.pop("model", None)
        record = JobRecord.from_hash(fields)
        if position is not None:
            record.queue_position = int(position)
        return record

    def queue_position(self, record: JobRecord) -> int | None:
        """Jobs of the same model ahead of this one (0 = next), or None when it is not waiting."""
        if record.status != "queued":
            return None
        if record.queue_position is not None:
            return record.queue_position
        return self.redis.zrank(self.queued_key(record.spec.model), record.id)

    def cancel(self, job_id: str) -> str | None:
        """Cancel a job: a queued one never runs; a running one stops at its next step.

        Returns the status after the request ("cancelled" or "running"), or None if already over.
        """
        record = self.get(job_id)
        if record is None or record.status in TERMINAL:
            return None
        if self.transition(job_id, ("queued",), "cancelled", finished_at=time.time(), error="cancelled by request"):
            if record.rq_id:
                self.queue(record.spec.model).remove(record.rq_id)
            return "cancelled"
        # Running (or just started): the worker checks this flag at every step.
        self.redis.hset(self.job_key(job_id), "cancel_requested", "1")
        after = self.get(job_id)
        return after.status if after and after.status not in TERMINAL else None

    # -- worker side: every call names the attempt it works on (the fencing token) ---------
    def start(self, job_id: str, worker: str, attempt: int) -> JobRecord | None:
        """Take a queued job for `attempt`; None if it was cancelled, or moved on to another attempt."""
        moved = self.transition(job_id, ("queued",), "running", attempt=attempt, charge=1,
                                started_at=time.time(), worker=worker, step=0, total=0)
        record = self.get(job_id) if moved else None
        # A repeated start (a retry after a lost reply) succeeds only for the worker that started it.
        return record if record is not None and record.worker == worker else None

    def progress(self, job_id: str, attempt: int, step: int, total: int, step_seconds: float) -> bool:
        """Record one sampling step; returns True if the job should stop (cancel requested, or this
        attempt lost the job to another one)."""
        return self.progress_many([(job_id, attempt, step, total, step_seconds)])[job_id] != 0

    def progress_many(self, updates: list[tuple[str, int, int, int, float]]) -> dict[str, int]:
        """`progress` of several jobs (job id, attempt, step, total, seconds since its last step) in one
        round trip; returns each job's verdict: 0 go on, 1 cancel requested, 2 not this attempt's job."""
        if not updates:
            return {}
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id, attempt, step, total, step_seconds in updates:
                self._progress(keys=[self.job_key(job_id)], args=[attempt, step, total], client=pipe)
                self._observe(pipe, "step_seconds", STEP_BUCKETS, step_seconds)
            replies = pipe.execute()
        per_job = len(replies) // len(updates)
        return {update[0]: int(replies[k * per_job]) for k, update in enumerate(updates)}

    def finish(self, job_id: str, attempt: int, num_results: int, model_sha256: list[str]) -> bool:
        """Publish the results of `attempt` (under its attempt prefix) and end the job as finished."""
        now = time.time()
        moved = self.transition(
            job_id, ("running",), "finished", attempt=attempt, finished_at=now, num_results=num_results,
            model_sha256=json.dumps(model_sha256), results_attempt=attempt,
        )
        if moved and moved[0] == "running":
            started_at = float(self.redis.hget(self.job_key(job_id), "started_at") or now)
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.hincrby(self.metrics_key, "images_generated", num_results)
                self._observe(pipe, "job_seconds", JOB_BUCKETS, now - started_at)
                pipe.execute()
        return moved is not None

    def fail(self, job_id: str, attempt: int | None, error: str) -> bool:
        """End the job as failed; `attempt` None only for the reaper and the API (no worker fence)."""
        return self.transition(job_id, ("queued", "running"), "failed", attempt=attempt, finished_at=time.time(),
                               error=error) is not None

    def mark_cancelled(self, job_id: str, attempt: int) -> bool:
        return self.transition(job_id, ("running",), "cancelled", attempt=attempt, finished_at=time.time(),
                               error="cancelled by request") is not None

    def hand_back(self, job_id: str, attempt: int, reason: str = "worker shut down") -> bool:
        """Give a running job back to the front of its queue without charging the attempt (graceful
        shutdown). Returns False if the job had already moved on."""
        moved = self.transition(job_id, ("running",), "queued", attempt=attempt, bump_attempt=True, charge=-1,
                                at_front=True, worker=None, step=0, total=0, enqueued_at=time.time(), error=f"handed back: {reason}")
        if moved is None:
            return False
        self._enqueue(self.get(job_id), at_front=True)
        return True

    def _observe(self, pipe, name: str, buckets: tuple[float, ...], value: float) -> None:
        index = next((i for i, b in enumerate(buckets) if value <= b), len(buckets))
        key = f"{PREFIX}:hist:{name}"
        pipe.hincrby(key, f"b{index}", 1)
        pipe.hincrbyfloat(key, "sum", value)
        pipe.hincrby(key, "count", 1)

    # -- workers and liveness --------------------------------------------------------------
    def heartbeat(self, name: str, info: dict[str, Any]) -> None:
        """Announce a live worker until `heartbeat_ttl_s` from now (Redis server time, so the
        clocks of the hosts do not matter)."""
        self._heartbeat(keys=[self.workers_key, self.worker_key(name)],
                        args=[self.settings.heartbeat_ttl_s, name, json.dumps(info)])

    def worker_gone(self, name: str) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(self.workers_key, name)
            pipe.delete(self.worker_key(name))
            pipe.execute()

    def live_workers(self) -> list[dict[str, Any]]:
        """The heartbeats of live workers: one round trip, O(live workers)."""
        return [json.loads(v) for v in self._live(keys=[self.workers_key], args=[PREFIX]) if v]

    def served_models(self) -> dict[str, dict[str, Any]]:
        """Models that some live worker serves, with the facts its heartbeat carries about them.

        Kept in the heartbeat itself (not a separate key) so that it comes back by itself when
        Redis restarts empty.
        """
        return {name: info for w in self.live_workers() for name, info in w.get("models", {}).items()}

    def reap(self) -> list[tuple[str, str]]:
        """Requeue (or fail) the jobs of dead workers, and requeue queued jobs whose queue message
        was lost; returns [(job id, what happened)].

        Safe to call from every process: a short lock makes one reaper run at a time, and each job
        moves by an atomic, fenced status transition. Reads only the running set, the queued sets
        and the RQ queues: O(active jobs), never the keyspace. Does nothing in the first
        `heartbeat_ttl_s` after Redis (re)started, so workers that rode out an outage can beat
        again before they are taken for dead.
        """
        ttl = self.settings.heartbeat_ttl_s
        if not self.redis.set(f"{PREFIX}:reaper-lock", "1", nx=True, px=int(self.settings.heartbeat_interval_s * 1000)):
            return []
        if self._redis_just_started():
            return []
        server_now = self._server_time()
        alive = {w["name"] for w in self.live_workers()}
        self.redis.zremrangebyscore(self.workers_key, "-inf", server_now - ttl)  # long dead: forget them
        actions = self._reap_running(alive) + self._reap_lost_queued(server_now)
        return actions

    def _redis_just_started(self) -> bool:
        return int(self.redis.info("server").get("uptime_in_seconds", 0)) < self.settings.heartbeat_ttl_s

    def _server_time(self) -> float:
        seconds, micros = self.redis.time()
        return seconds + micros / 1e6

    def _reap_running(self, alive: set[str]) -> list[tuple[str, str]]:
        ids = [raw.decode() for raw in self.redis.zrange(self.running_key, 0, -1)]
        if not ids:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(self.job_key(job_id), "status", "worker", "attempt")
            rows = pipe.execute()
        actions = []
        for job_id, (status, worker, attempt) in zip(ids, rows):
            if status is None:  # the record expired: forget it
                self._forget(job_id, None)
                continue
            if status != b"running":
                self.redis.zrem(self.running_key, job_id)
                continue
            if worker.decode() not in alive:
                actions.append((job_id, self._orphaned(job_id, int(attempt), f"worker {worker.decode()} stopped (no heartbeat)")))
        return actions

    def _reap_lost_queued(self, now: float) -> list[tuple[str, str]]:
        """Queued jobs that are neither in their queue nor being picked up by a worker: requeue."""
        actions = []
        older_than = time.time() - self.settings.heartbeat_ttl_s
        for raw_model in self.redis.smembers(self.queued_models_key):
            model = raw_model.decode()
            if not self.redis.exists(self.queued_key(model)):
                self.redis.srem(self.queued_models_key, model)
                continue
            queue = self.queue(model)
            lost, gone = self._lost_queued(
                keys=[self.queued_key(model), queue.key, queue.started_job_registry.key], args=[older_than, PREFIX])
            for job_id in gone:
                self._forget(job_id.decode(), model)
            for entry in lost:
                job_id, attempt = entry.decode().split(":")
                actions.append((job_id, self._requeue(job_id, int(attempt), "queued", "job left its queue without running")))
        return actions

    def _forget(self, job_id: str, model: str | None) -> None:
        """A job whose record expired while active: drop it from the indexes and the cost counters."""
        queued = self.queued_key(model) if model else self.queued_key("")
        self._gone(keys=[self.running_key, self.active_cost_key, self.costs_key, queued], args=[job_id])

    def _orphaned(self, job_id: str, attempt: int, reason: str) -> str:
        record = self.get(job_id)
        if record is None:
            return "gone"
        if record.cancel_requested:
            moved = self.transition(job_id, ("running",), "cancelled", attempt=attempt, finished_at=time.time(),
                                    error="cancelled by request")
            return "cancelled" if moved else "raced"
        if record.attempts < self.settings.max_attempts:
            return self._requeue(job_id, attempt, "running", reason)
        moved = self.transition(job_id, ("running",), "failed", attempt=attempt, finished_at=time.time(),
                                error=f"{reason}; gave up after {record.attempts} attempt(s)")
        return "failed" if moved else "raced"

    def _requeue(self, job_id: str, attempt: int, status: str, reason: str) -> str:
        moved = self.transition(job_id, (status,), "queued", attempt=attempt, bump_attempt=True, worker=None,
                                step=0, total=0, enqueued_at=time.time(), error=f"requeued: {reason}")
        if moved is None:
            return "raced"
        self.redis.hincrby(self.metrics_key, "jobs_requeued", 1)
        self._enqueue(self.get(job_id))
        return "requeued"

    def metric_counters(self) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in self.redis.hgetall(self.metrics_key).items()}

    def histogram(self, name: str) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in self.redis.hgetall(f"{PREFIX}:hist:{name}").items()}

    def count_active(self) -> dict[str, int]:
        models = [m.decode() for m in self.redis.smembers(self.queued_models_key)]
        with self.redis.pipeline(transaction=False) as pipe:
            for model in models:
                pipe.zcard(self.queued_key(model))
            pipe.zcard(self.running_key)
            counts = pipe.execute()
        return {"queued": sum(counts[:-1]), "running": counts[-1]}

    def queued_by_model(self) -> dict[str, int]:
        models = [m.decode() for m in self.redis.smembers(self.queued_models_key)]
        with self.redis.pipeline(transaction=False) as pipe:
            for model in models:
                pipe.zcard(self.queued_key(model))
            return dict(zip(models, pipe.execute()))

    # -- retention -------------------------------------------------------------------------
    def expired_jobs(self, limit: int = 500) -> list[str]:
        """Jobs whose retention ended (Redis server time), oldest first."""
        return [raw.decode() for raw in
                self.redis.zrangebyscore(self.expiry_key, "-inf", self._server_time(), start=0, num=limit)]

    def forget_expired(self, job_id: str) -> None:
        """Delete a job's record, after its results were deleted from the object store."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.job_key(job_id))
            pipe.zrem(self.expiry_key, job_id)
            pipe.execute()
