"""The API's side of the job contract: admission, reading, cancelling, retention. Torch-free.

Workers talk to Redis through `worker_protocol.WorkerLink`, the reaper through `reaper.Reaper`;
all three share the record (`records.py`), the key layout (`keys.py`) and the scripts
(`scripts.py`).

**Queues.** Each model has one queue, the sorted set `queued:<model>` (job id → enqueue time; a job
put back after its worker stopped goes to the front). Submitting adds the job to it and pushes a
wake-up token for idle workers (`wake:<model>`); a worker takes jobs with the same script that
reports its progress. The queue is the job's own record set, not a second copy of it: no message
can be lost between the two, so there is nothing to reconcile.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import redis

from patchdiff_core.generation.spec import GenerationSpec
from patchdiff_core.service import scripts
from patchdiff_core.service.events import end_event, queued_event
from patchdiff_core.service.keys import Keys
from patchdiff_core.service.records import CANCELLED_BY_REQUEST, TERMINAL, JobRecord, new_job_id
from patchdiff_core.service.settings import Settings

KNOWN_MODELS_REFRESH_S = 2.0  # how long the API trusts its list of model names workers announced
SERVED_CACHE_S = 1.0  # how long it trusts what live workers serve (a submit then costs no read of it)


WAIT_TIMEOUT_MS = 1000  # how long a submit waits for replicas to have the job (`redis_wait_replicas`)


class IdempotencyConflict(Exception):
    pass


class NotReplicated(Exception):
    """The job was created, but not on enough replicas in time: a failover now could lose it. The
    client should retry with the same `idempotency_key` (which returns this job once it is safe)."""


class OverCapacity(Exception):
    """Admission refused: the queued work of this caller (`scope` = "owner"), of the job's model
    ("model") or of all ("global") is full."""

    def __init__(self, scope: str, outstanding: int, cap: int, model: str = ""):
        whose = {"owner": "your", "model": f"model {model!r}"}.get(scope, "the service")
        super().__init__(f"{whose} queued work is full ({outstanding} of {cap} cost units outstanding)")
        self.scope, self.outstanding, self.cap = scope, outstanding, cap


def idempotency_digest(owner: str, idempotency_key: str) -> str:
    return hashlib.sha256(f"{owner}\0{idempotency_key}".encode()).hexdigest()


class JobStore:
    def __init__(self, conn: redis.Redis, settings: Settings, aconn=None):
        self.redis = conn
        self.aredis = aconn  # optional redis.asyncio client (the API's hot paths)
        self.settings = settings
        self.keys = Keys(settings.redis_prefix)
        self._submit = conn.register_script(scripts.SUBMIT)
        self._cancel = conn.register_script(scripts.CANCEL)
        self._served_script = conn.register_script(scripts.SERVED)
        self._live = conn.register_script(scripts.LIVE_WORKERS)
        self._load = conn.register_script(scripts.MODEL_LOAD)
        self._known: tuple[float, list[str]] = (-1e9, [])
        self._served: tuple[float, dict[str, dict[str, Any]]] = (-1e9, {})
        self._replicas: tuple[float, int] = (-1e9, 0)

    # -- admission -----------------------------------------------------------------------------
    def submit(
        self, spec: GenerationSpec, idempotency_key: str | None = None, fingerprint: str = "", owner: str = "",
        cost: int = 0, webhook: str | None = None, webhook_events: list[str] | None = None,
    ) -> tuple[JobRecord, bool]:
        """Create and enqueue a job; returns (record, created).

        Atomic (one script): the idempotency claim, the admission against the queued-work caps, the
        record, its place in the queue and its `queued` event. A repeated `idempotency_key` of the
        same `owner` with the same `fingerprint` (the request as the client sent it) returns the
        first job; with another fingerprint it raises `IdempotencyConflict`. Over a cap it raises
        `OverCapacity`.
        """
        job_id = new_job_id()
        now = time.time()
        record = JobRecord(id=job_id, status="queued", spec=spec, created_at=now, enqueued_at=now, attempt=1,
                           idempotency_key=idempotency_key, owner=owner, cost=cost, webhook=webhook,
                           webhook_events=",".join(webhook_events or []) or None)
        k = self.keys
        idem_key = k.idempotency(idempotency_digest(owner, idempotency_key)) if idempotency_key else k.job(job_id)
        args: list[Any] = [*scripts.limits(self.settings), job_id, "1" if idempotency_key else "0", fingerprint, repr(now),
                           cost, owner, self.settings.max_queued_cost, self.settings.max_queued_cost_per_key, spec.model,
                           self.settings.model_cost_cap(spec.model), queued_event(job_id).to_json(),
                           record.wants_webhook("queued")]
        for field, value in record.to_hash().items():
            args += [field, value]
        result = self._submit(keys=[k.job(job_id), idem_key, k.queued(spec.model), k.wake(spec.model), k.queued_models,
                                    k.costs, k.metrics, k.events(job_id), k.webhooks], args=args)
        outcome = result[0].decode()
        if outcome == "idem":
            existing_id, existing_fingerprint = result[1].decode().split(":", 1)
            existing = self.get(existing_id)
            if existing is None or existing_fingerprint != fingerprint:
                raise IdempotencyConflict("idempotency_key was already used for a different request")
            self._wait_for_replicas()  # the first answer may have been a 503 for this
            return existing, False
        if outcome == "over":
            raise OverCapacity(result[1].decode(), int(float(result[2])), int(float(result[3])), spec.model)
        record.queue_position = int(result[1])
        self._wait_for_replicas()
        return record, True

    def _wait_for_replicas(self) -> None:
        """With replicas (Sentinel), accept a job only once enough of them have it: replication is
        asynchronous, so a master that dies a moment after answering could take the job with it.
        Only replicas that are connected are waited for: right after a failover the new master has
        none until the old one comes back as its replica, and jobs are accepted on it alone (set
        `min-replicas-to-write` on the servers to refuse them instead: the API then answers 503)."""
        wanted = min(self.settings.wait_replicas, self._connected_replicas()) if self.settings.wait_replicas else 0
        if wanted > 0:
            acknowledged = self.redis.wait(wanted, WAIT_TIMEOUT_MS)
            if acknowledged < wanted:
                raise NotReplicated(f"the job is on {acknowledged} of {wanted} replica(s) only; retry with the same "
                                    "idempotency_key")

    # -- reading -------------------------------------------------------------------------------
    def get(self, job_id: str, with_position: bool = False) -> JobRecord | None:
        record = JobRecord.from_hash(self.redis.hgetall(self.keys.job(job_id)))
        if record is not None and with_position and record.status == "queued":
            record.queue_position = self._position(self.redis.zrank(self.keys.queued(record.spec.model), job_id))
        return record

    async def aget(self, job_id: str) -> tuple[JobRecord | None, list[dict[str, Any]]]:
        """The record (with its place in line when queued) and its webhook deliveries, on the asyncio
        client: the status-poll path, with no thread hop; one round trip, two while queued."""
        async with self.aredis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.job(job_id))
            pipe.hgetall(self.keys.webhook_status(job_id))
            data, deliveries = await pipe.execute()
        record = JobRecord.from_hash(data)
        if record is not None and record.status == "queued":
            record.queue_position = self._position(await self.aredis.zrank(self.keys.queued(record.spec.model), job_id))
        rows = sorted((json.loads(v) for v in deliveries.values()),
                      key=lambda r: tuple(int(p) for p in r["event_id"].split("-")))
        return record, rows

    def _connected_replicas(self) -> int:
        """Replicas connected to the master (`ROLE`), read at most once a second."""
        at, count = self._replicas
        if time.monotonic() - at > SERVED_CACHE_S:
            role = self.redis.execute_command("ROLE")
            count = len(role[2]) if role and role[0] in (b"master", "master") else 0
            self._replicas = (time.monotonic(), count)
        return count

    @staticmethod
    def _position(rank: int | None) -> int:
        # A queued job that is not in its queue has been taken by a worker and is starting: next.
        return 0 if rank is None else int(rank)

    def queue_position(self, record: JobRecord) -> int | None:
        """Jobs of the same model ahead of this one (0 = next), or None when it is not waiting."""
        if record.status != "queued":
            return None
        if record.queue_position is not None:
            return record.queue_position
        return self._position(self.redis.zrank(self.keys.queued(record.spec.model), record.id))

    def webhook_deliveries(self, job_id: str) -> list[dict[str, Any]]:
        rows = [json.loads(v) for v in self.redis.hgetall(self.keys.webhook_status(job_id)).values()]
        return sorted(rows, key=lambda r: tuple(int(p) for p in r["event_id"].split("-")))

    # -- cancelling ----------------------------------------------------------------------------
    def cancel(self, job_id: str) -> str | None:
        """Cancel a job: a queued one never runs; a running one stops at its next step.

        Returns the status after the request ("cancelled" or "running"), or None if it already ended.
        """
        k = self.keys
        for _ in range(5):  # a running job may move to another worker between the read and the script
            record = self.get(job_id)
            if record is None or record.status in TERMINAL:
                return None
            worker = record.worker or ""
            fields = json.dumps({"finished_at": repr(time.time()), "error": CANCELLED_BY_REQUEST})
            outcome, *rest = self._cancel(
                keys=[k.job(job_id), k.queued(record.spec.model), k.wake(record.spec.model), k.inbox(worker), k.running,
                      k.costs, k.metrics, k.expiry, k.events(job_id), k.webhooks],
                args=[*scripts.limits(self.settings), job_id, worker if record.status == "running" else "", fields,
                      end_event(job_id, "cancelled", CANCELLED_BY_REQUEST).to_json(), record.wants_webhook("cancelled")])
            outcome = outcome.decode()
            if outcome == "cancelled":
                return "cancelled"
            if outcome == "requested":
                return "running"
            if outcome in ("ended", "gone"):
                return None
        return "running"

    # -- workers, as the API sees them ---------------------------------------------------------
    def announced_models(self, fresh: bool = False) -> list[str]:
        """Models some worker has announced (live or not), cached for `KNOWN_MODELS_REFRESH_S`."""
        at, names = self._known
        if fresh or time.monotonic() - at > KNOWN_MODELS_REFRESH_S:
            names = sorted(n.decode() for n in self.redis.hkeys(self.keys.models))
            self._known = (time.monotonic(), names)
        return names

    def served_models(self, fresh: bool = False) -> dict[str, dict[str, Any]]:
        """Models that some live worker serves, with the description it announced: one round trip,
        O(models), whatever the number of workers; kept for `SERVED_CACHE_S` (`fresh`: read again,
        the list of models too)."""
        at, served = self._served
        if not fresh and time.monotonic() - at < SERVED_CACHE_S:
            return served
        names = self.announced_models(fresh)
        served = {}
        if names:
            flat = self._served_script(keys=[self.keys.models, *(self.keys.model_workers(n) for n in names)], args=names)
            served = {flat[i].decode(): json.loads(flat[i + 1]) for i in range(0, len(flat), 2)}
        self._served = (time.monotonic(), served)
        return served

    def live_workers(self, limit: int = 100) -> tuple[int, list[dict[str, Any]]]:
        """How many workers are alive, and the announcements of up to `limit` of them."""
        count, names = self._live(keys=[self.keys.workers], args=[limit])
        infos = self.redis.mget([self.keys.worker(n.decode()) for n in names]) if names else []
        return int(count), [json.loads(i) for i in infos if i]

    # -- counters ------------------------------------------------------------------------------
    def metric_counters(self) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in self.redis.hgetall(self.keys.metrics).items()}

    def histogram(self, name: str) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in self.redis.hgetall(self.keys.hist(name)).items()}

    def queued_by_model(self) -> dict[str, int]:
        models = sorted(m.decode() for m in self.redis.smembers(self.keys.queued_models))
        with self.redis.pipeline(transaction=False) as pipe:
            for model in models:
                pipe.zcard(self.keys.queued(model))
            return dict(zip(models, pipe.execute()))

    def count_active(self) -> dict[str, int]:
        queued = self.queued_by_model()
        return {"queued": sum(queued.values()), "running": self.redis.zcard(self.keys.running)}

    def model_load(self) -> dict[str, dict[str, int]]:
        """Per model (every model announced or ever queued): cost units queued and running
        (`outstanding_cost`), jobs queued, live workers serving it. One round trip."""
        models = sorted({*self.announced_models(), *(m.decode() for m in self.redis.smembers(self.keys.queued_models))})
        if not models:
            return {}
        keys = [self.keys.costs]
        for model in models:
            keys += [self.keys.queued(model), self.keys.model_workers(model)]
        flat = self._load(keys=keys, args=models)
        return {model: {"outstanding_cost": int(flat[3 * i]), "queued_jobs": int(flat[3 * i + 1]),
                        "live_workers": int(flat[3 * i + 2])} for i, model in enumerate(models)}

    def outstanding_costs(self) -> dict[str, int]:
        """Cost units queued or running, per model (`model:<m>`), per owner and `global`."""
        return {k.decode(): int(v) for k, v in self.redis.hgetall(self.keys.costs).items()}

    # -- retention -----------------------------------------------------------------------------
    def expired_jobs(self, limit: int = 500) -> list[str]:
        """Ended jobs whose retention is over (Redis server time), oldest first."""
        seconds, micros = self.redis.time()
        return [raw.decode() for raw in
                self.redis.zrangebyscore(self.keys.expiry, "-inf", seconds + micros / 1e6, start=0, num=limit)]

    def forget_expired(self, job_id: str) -> None:
        """Delete everything Redis holds of an ended job, after its results were deleted from the store."""
        k = self.keys
        record = self.get(job_id)
        if record is not None and not record.ended:  # never live work, whatever the index says
            self.redis.zrem(k.expiry, job_id)
            return
        doomed = k.job_keys(job_id)
        if record is not None and record.idempotency_key:
            doomed.append(k.idempotency(idempotency_digest(record.owner, record.idempotency_key)))
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(*doomed)
            pipe.zrem(k.expiry, job_id)
            pipe.execute()
