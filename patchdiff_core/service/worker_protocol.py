"""The worker's side of the job contract: the Redis calls a worker makes. Torch-free.

A worker says everything in one call per engine step, `report` (one script): its heartbeat when
due, the progress of the jobs that moved (throttled), the ends of its jobs (finished, failed,
cancelled, handed back), and it gets back the cancel requests for its jobs and new jobs from its
models' queues while its engine has room. Jobs it took are started with `start` (a second call, only
on steps that took any). So a step costs one round trip, two when it takes jobs, whatever the
number of jobs held.

**Fencing.** Every write names the job's `attempt` and is made only if the job is still that
attempt *and* held by this worker: a worker that was paused past its heartbeat (SIGSTOP, a long
GC) and whose jobs were given to another can change nothing when it resumes.

**Nothing is lost in between.** A job taken from a queue is in the worker's held set in the same
atomic step; every heartbeat compares that set with the jobs the worker says it holds, so a job
the worker never heard of (a reply lost with its connection) is given back, and a job it holds but
no longer owns is dropped. When a worker dies, the reaper (`reaper.py`) gives back what its held
set names.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from patchdiff_core.service import scripts
from patchdiff_core.service.keys import Keys
from patchdiff_core.service.records import JobRecord
from patchdiff_core.service.settings import Settings

DONE, REFUSED = 0, 2  # verdicts of a report's ops


@dataclass
class ProgressOp:
    record: JobRecord
    attempt: int
    step: int
    total: int
    images_done: int
    event: str = ""  # JSON of the progress event, or '' (only the record's progress is written)
    preview_png: bytes = b""


@dataclass
class MoveOp:
    """End a job (finished / failed / cancelled) or hand it back (queued)."""

    record: JobRecord
    attempt: int
    to: str
    fields: dict[str, str]
    event: str
    charge: int = 0  # added to the runs charged: -1 gives this run back (a hand-back)


@dataclass
class Report:
    verdicts: list[int] = field(default_factory=list)  # one per op, in order
    cancel_requests: list[tuple[str, int]] = field(default_factory=list)  # (job id, attempt)
    taken: list[str] = field(default_factory=list)  # job ids taken from the queues: `start` them
    orphans: list[str] = field(default_factory=list)  # held in Redis, unknown to the worker: give back
    lost: list[str] = field(default_factory=list)  # known to the worker, no longer held by it: drop
    announce: bool = False  # Redis forgot this worker's announcement: send it again


class WorkerLink:
    def __init__(self, conn: redis.Redis, settings: Settings, name: str, models: list[str]):
        self.redis, self.settings, self.name, self.models = conn, settings, name, list(models)
        self.keys = Keys(settings.redis_prefix)
        self._report = conn.register_script(scripts.REPORT)
        self._start = conn.register_script(scripts.START)
        self._release = conn.register_script(scripts.RELEASE)
        self._forget = conn.register_script(scripts.FORGET_WORKER)
        self.calls = 0  # round trips made (benchmarks)

    def report(self, ops: list[ProgressOp | MoveOp], take: int = 0, beat: bool = False,
               announcement: dict[str, Any] | None = None, model_descriptions: dict[str, Any] | None = None,
               histograms: list[tuple[int, str, float]] = (), reported: list[str] | None = None) -> Report:
        """One round trip: see the module docstring. `histograms` are (1 = step_seconds or
        2 = job_seconds, field, increment); `reported` (with a heartbeat) are all the job ids this
        worker holds, for the comparison with its held set."""
        k, name = self.keys, self.name
        keys = [k.workers, k.held(name), k.inbox(name), k.running, k.costs, k.metrics, k.expiry, k.webhooks,
                k.worker(name), k.models, k.hist("step_seconds"), k.hist("job_seconds"), k.draining]
        for model in self.models:
            keys += [k.queued(model), k.wake(model), k.model_workers(model)]
        announcing = announcement is not None
        args: list[Any] = [*scripts.limits(self.settings), name,
                           self.settings.heartbeat_ttl_s if beat else "",
                           json.dumps(announcement) if announcing else "",
                           take, len(self.models), len(ops), max(60, int(self.settings.job_ttl_s)), len(histograms),
                           "" if reported is None else len(reported), *self.models]
        args += [json.dumps((model_descriptions or {}).get(m)) if announcing else "" for m in self.models]
        for which, key, increment in histograms:
            args += [which, key, repr(increment) if key == "sum" else int(increment)]
        args += reported or []
        for op in ops:
            record = op.record
            keys += [k.job(record.id), k.events(record.id), k.preview(record.id), k.queued(record.spec.model),
                     k.wake(record.spec.model)]
            if isinstance(op, ProgressOp):
                args += ["p", record.id, op.attempt, op.step, op.total, op.images_done, op.event, op.preview_png,
                         record.wants_webhook("progress") if op.event else ""]
            else:
                event_name = "queued" if op.to == "queued" else op.to
                args += ["m", record.id, op.attempt, op.to, op.charge, json.dumps(op.fields), op.event,
                         record.wants_webhook(event_name), ""]
        self.calls += 1
        verdicts, inbox, taken, orphans, lost, announce = self._report(keys=keys, args=args)
        requests = []
        for entry in inbox:
            job_id, _, attempt = entry.decode().partition(":")
            requests.append((job_id, int(attempt)))
        return Report([int(v) for v in verdicts], requests, [t.decode() for t in taken],
                      [o.decode() for o in orphans], [x.decode() for x in lost], bool(announce))

    def start(self, job_ids: list[str], started_event_template: str) -> list[JobRecord]:
        """Start jobs this worker took (queued -> running, one run charged each); returns the records
        of those it may run (a job cancelled meanwhile, or given back by the reaper, is left out)."""
        if not job_ids:
            return []
        k = self.keys
        keys = [k.held(self.name), k.running, k.webhooks]
        for job_id in job_ids:
            keys += [k.job(job_id), k.events(job_id)]
        self.calls += 1
        rows = self._start(keys=keys, args=[*scripts.limits(self.settings), self.name, repr(time.time()),
                                             started_event_template, *job_ids])
        return [JobRecord.from_hash(dict(zip(row[::2], row[1::2]))) for row in rows]

    def give_back(self, job_ids: list[str]) -> None:
        """Jobs in this worker's held set that it does not hold (a lost reply): put them back in line."""
        from patchdiff_core.service.reaper import release_jobs  # the reaper's rules, for one live worker

        release_jobs(self.redis, self._release, self.settings, self.keys, self.name, job_ids,
                     reason=f"worker {self.name} lost track of it", died=False)

    def draining(self) -> None:
        """Say that this worker is shutting down: if it dies before handing its jobs back (a deploy
        that kills it after a grace period), they are given back without charging a run."""
        self.redis.hset(self.keys.draining, self.name, repr(time.time()))

    def gone(self) -> None:
        """Leave for good (after every job was handed back or ended)."""
        k = self.keys
        self._forget(keys=[k.workers, k.worker(self.name), k.held(self.name), k.inbox(self.name), k.draining,
                           *(k.model_workers(m) for m in self.models)], args=["0", self.name])
