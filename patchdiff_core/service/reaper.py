"""The reaper: gives back the jobs of workers that stopped beating. Torch-free.

A worker is dead when its heartbeat (an expiry in Redis server time, so host clocks need not agree)
has passed. The reaper reads the expired workers (a few per pass), and for each the jobs its held
set names (a bounded slice per pass):

- a job it took but never started goes back to the front of its queue, as it was;
- a running job of that worker goes back to the front as a new attempt, or fails once it has used
  `max_attempts` runs, or ends as cancelled if its cancel was requested;
- anything else (ended, or taken over meanwhile) is only forgotten.

A run is charged only when the worker died while running the job: a worker that had begun to shut
down (SIGTERM; `WorkerLink.draining`) and was killed before handing its jobs back costs its jobs
nothing. Each move is applied only if the job is still as the reaper read it (`scripts.RELEASE`).

A pass reads nothing but the expired workers and what they held: with no dead worker it is a few
small commands, whatever the number of jobs queued or running. Every API process and every worker
runs the loop, but only the holder of the `reaper` lease (`lease.py`) makes passes; another takes
over within `3 × heartbeat_interval_s` of its end.

The reaper takes nobody for dead unless Redis has been able to take heartbeats for a whole
`heartbeat_ttl_s`: after Redis restarts, after a failover promotes a replica (its `run_id` differs
from the one recorded in `epoch`), and after any error of its own passes (Redis away, refusing
writes at `maxmemory`, read-only), it waits that long, so that workers that rode out the outage
beat again first. (Their heartbeats failed for the same reason its passes did.)
"""

from __future__ import annotations

import json
import logging
import time

import redis

from patchdiff_core.service import scripts
from patchdiff_core.service.events import end_event, queued_event
from patchdiff_core.service.keys import Keys
from patchdiff_core.service.lease import Lease
from patchdiff_core.service.records import CANCELLED_BY_REQUEST
from patchdiff_core.service.settings import Settings

log = logging.getLogger("patchdiff.reaper")

WORKERS_PER_PASS = 16
JOBS_PER_WORKER_PER_PASS = 200
_FIELDS = ("status", "attempt", "worker", "attempts", "cancel_requested", "model", "webhook", "webhook_events")


def release_jobs(conn: redis.Redis, release, settings: Settings, keys: Keys, worker: str, job_ids: list[str],
                 reason: str, died: bool) -> list[tuple[str, str]]:
    """Give back `job_ids` from `worker`'s held set; returns [(job id, what happened)].

    `died`: the worker stopped beating (its run is charged unless it was shutting down); otherwise
    a live worker lost track of the jobs (never charged)."""
    if not job_ids:
        return []
    with conn.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hmget(keys.job(job_id), *_FIELDS)
        pipe.hexists(keys.draining, worker)
        *rows, draining = pipe.execute()
    charged = died and not draining
    k, now = keys, repr(time.time())
    script_keys = [k.held(worker), k.running, k.costs, k.metrics, k.expiry, k.webhooks]
    args: list = [*scripts.limits(settings), worker]
    actions = []
    for job_id, row in zip(job_ids, rows):
        f = {name: (v.decode() if v is not None else "") for name, v in zip(_FIELDS, row)}
        model = f["model"] or "-"
        script_keys += [k.job(job_id), k.events(job_id), k.queued(model), k.wake(model)]
        hooks = set(f["webhook_events"].split(",")) if f["webhook"] else set()
        to, charge, fields, event, event_name = "drop", 0, {}, "", ""
        if f["status"] == "queued":
            to, action = "queued", "put back"
        elif f["status"] == "running" and f["worker"] == worker:
            runs = int(f["attempts"] or 0)
            if f["cancel_requested"] == "1":
                to, action, event_name = "cancelled", "cancelled", "cancelled"
                fields = {"finished_at": now, "error": CANCELLED_BY_REQUEST}
                event = end_event(job_id, "cancelled", CANCELLED_BY_REQUEST).to_json()
            elif charged and runs >= settings.max_attempts:
                error = f"{reason}; gave up after {runs} attempt(s)"
                to, action, event_name = "failed", "failed", "failed"
                fields = {"finished_at": now, "error": error}
                event = end_event(job_id, "failed", error).to_json()
            else:
                to, action, event_name = "queued", "requeued", "queued"
                charge = 0 if charged else -1
                fields = {"enqueued_at": now, "error": f"requeued: {reason}"}
                event = queued_event(job_id, f"requeued: {reason}").to_json()
        else:
            action = "forgotten"
        args += [job_id, f["status"], f["attempt"], to, charge, json.dumps(fields), event,
                 f["webhook"] if event_name in hooks else ""]
        actions.append((job_id, action))
    verdicts = release(keys=script_keys, args=args)
    return [(job_id, action if int(v) == 0 or action == "forgotten" else "raced")
            for (job_id, action), v in zip(actions, verdicts)]


class Reaper:
    def __init__(self, conn: redis.Redis, settings: Settings, holder: str):
        self.redis, self.settings = conn, settings
        self.keys = Keys(settings.redis_prefix)
        self.lease = Lease(conn, self.keys, "reaper", holder, 3 * settings.heartbeat_interval_s)
        self._expired = conn.register_script(scripts.EXPIRED_WORKERS)
        self._release = conn.register_script(scripts.RELEASE)
        self._forget = conn.register_script(scripts.FORGET_WORKER)
        self._healthy_since: float | None = None  # monotonic time since this process's passes succeed

    def reap(self) -> list[tuple[str, str]]:
        """One bounded pass; returns [(job id, what happened)]."""
        try:
            return self._pass()
        except redis.RedisError:
            self._healthy_since = None  # heartbeats may have failed the same way: wait a TTL again
            raise

    def _pass(self) -> list[tuple[str, str]]:
        if not self.lease.hold():
            return []
        now = time.monotonic()
        if self._healthy_since is None:
            self._healthy_since = now
        if now - self._healthy_since < self.settings.heartbeat_ttl_s or self.paused():
            return []
        actions = []
        for raw in self._expired(keys=[self.keys.workers], args=[WORKERS_PER_PASS]):
            worker = raw.decode()
            held = [j.decode() for j in self.redis.srandmember(self.keys.held(worker), JOBS_PER_WORKER_PER_PASS)]
            actions += release_jobs(self.redis, self._release, self.settings, self.keys, worker, held,
                                    reason=f"worker {worker} stopped (no heartbeat)", died=True)
            self._forget_if_done(worker)
        return actions

    def _forget_if_done(self, worker: str) -> None:
        info = self.redis.get(self.keys.worker(worker))
        models = list(json.loads(info).get("models", {})) if info else []
        k = self.keys
        self._forget(keys=[k.workers, k.worker(worker), k.held(worker), k.inbox(worker), k.draining,
                           *(k.model_workers(m) for m in models)], args=["1", worker])

    def paused(self) -> bool:
        """True for `heartbeat_ttl_s` after Redis (re)started or another server became the master."""
        info = self.redis.info("server")
        run_id, uptime = info.get("run_id", ""), float(info.get("uptime_in_seconds", 0))
        seconds, micros = self.redis.time()
        now = seconds + micros / 1e6
        seen = self.redis.hgetall(self.keys.epoch)
        recorded = seen.get(b"run_id", b"").decode()
        if recorded != run_id:
            # The first server this service sees is the master since it started; a different one
            # (a restart, or a replica promoted: its uptime says nothing of that) since now.
            since = now if recorded else now - uptime
            self.redis.hset(self.keys.epoch, mapping={"run_id": run_id, "since": repr(since)})
            if recorded:
                log.warning("Redis server %s replaced %s (a restart or a failover): the reaper waits %.0f s",
                            run_id[:12], recorded[:12], self.settings.heartbeat_ttl_s)
            else:
                log.info("the reaper records Redis server %s (up %.0f s)", run_id[:12], uptime)
        else:
            since = float(seen.get(b"since", b"0"))
        return uptime < self.settings.heartbeat_ttl_s or now - since < self.settings.heartbeat_ttl_s
