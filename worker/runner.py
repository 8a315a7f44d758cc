"""The worker's loop: jobs from the RQ queue into the batching engine, and what the engine did back to
Redis (progress, cancel, results, failures).

At every step boundary the runner takes new jobs from the queue while it holds fewer than `max_jobs`
(RQ stays the queue: `Queue.dequeue_any`, the same pop an RQ worker does; the RQ job only carries our
job id), runs one engine step (one forward pass per model over the images of every job it holds),
then for each job that moved writes its progress and reads its cancel flag in one round trip. A job
whose last image is done has its PNGs written and is marked finished by a small thread pool, so
encoding and uploading results never stalls the sampling of the others.

With `max_jobs = 1` the runner is the old one-job-at-a-time worker (a job's images in batches of
`max_rows`): `benchmarks/batching.py` compares the two that way.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import redis
import torch
from rq import Queue
from rq.exceptions import DequeueTimeout
from rq.serializers import JSONSerializer

from patchdiff_core.generation.engine import BatchEngine, RequestInFlight, StepReport, images_uint8
from patchdiff_core.generation.images import make_grid, png_bytes
from patchdiff_core.service.jobs import JobRecord, JobStore
from patchdiff_core.service.store import ObjectStore, result_key

from .models import ModelCache

log = logging.getLogger("patchdiff.worker")


class RedisBackoff:
    """Waits between attempts while Redis is away: 0.5 s doubling to 10 s, one log line each."""

    def __init__(self, first: float = 0.5, most: float = 10.0):
        self.first, self.most, self.delay = first, most, first

    def wait(self, exc: Exception, stopping: threading.Event) -> None:
        log.warning("Redis unavailable (%s: %s); retrying in %.1f s", type(exc).__name__, exc, self.delay)
        stopping.wait(self.delay)
        self.delay = min(self.most, self.delay * 2)

    def reset(self) -> None:
        self.delay = self.first


def until_redis_answers(call, stopping: threading.Event):
    """Run `call()` until it gets through to Redis (or the worker stops); returns its result."""
    backoff = RedisBackoff()
    while True:
        try:
            return call()
        except redis.RedisError as exc:
            if stopping.is_set():
                raise
            backoff.wait(exc, stopping)


@dataclass
class HeldJob:
    record: JobRecord
    admitted_at: float = field(default_factory=time.perf_counter)
    last_step_at: float = field(default_factory=time.perf_counter)


class EngineRunner:
    def __init__(self, name: str, jobs: JobStore, store: ObjectStore, models: ModelCache,
                 max_rows: dict[str, int], max_jobs: int):
        self.name, self.jobs, self.store, self.models = name, jobs, store, models
        self.engine = BatchEngine(models.models, max_rows)
        self.max_jobs = max(1, max_jobs)
        self.held: dict[str, HeldJob] = {}
        self.publisher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="patchdiff-results")
        self.publishing: dict[str, Future] = {}
        self.stopping = threading.Event()

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, queues: list[Queue], burst: bool = False) -> None:
        """Serve until `stop()` (or, with `burst`, until the queue is empty and every job is done)."""
        backoff = RedisBackoff()
        while not self.stopping.is_set():
            try:
                self.admit(queues, block=self.engine.idle)
                backoff.reset()
            except redis.RedisError as exc:  # Redis away: keep sampling what we hold, retry later
                backoff.wait(exc, self.stopping)
            if self.engine.idle:
                if burst and not self.publishing:
                    break
                continue
            self.step()
        self.drain()

    def admit(self, queues: list[Queue], block: bool) -> int:
        """Take jobs from the queue while this worker holds fewer than `max_jobs`; returns how many."""
        taken = 0
        while len(self.held) < self.max_jobs and not self.stopping.is_set():
            timeout = 1 if block and taken == 0 else None  # block only while there is nothing to do
            try:
                popped = Queue.dequeue_any(queues, timeout, connection=self.jobs.redis, serializer=JSONSerializer)
            except DequeueTimeout:
                popped = None
            if popped is None:
                break
            rq_job, queue = popped
            job_id = rq_job.args[0] if rq_job.args else None
            # Our job record, not the RQ job, is the truth from here on. (RQ parks a popped id in an
            # intermediate list until its worker starts it; this worker starts it at once.)
            queue.intermediate_queue.remove(rq_job.id)
            rq_job.delete(remove_from_queue=False)
            if job_id and self.accept(job_id):
                taken += 1
        return taken

    def accept(self, job_id: str) -> bool:
        """Start a job (queued → running) and hand it to the engine."""
        record = self.jobs.start(job_id, self.name)
        if record is None:
            return False  # cancelled while queued, or already taken over after a requeue
        try:
            self.models.get(record.spec.model)
            self.engine.add(job_id, record.spec)
        except Exception as exc:  # noqa: BLE001 - a job this worker cannot run fails with the reason
            self.jobs.fail(job_id, str(exc))
            return False
        self.held[job_id] = HeldJob(record)
        return True

    def step(self) -> StepReport:
        try:
            with torch.inference_mode():
                report = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - the engine isolates job failures; this is a bug
            log.exception("engine step failed; failing the jobs it held")
            for job_id in list(self.held):
                self.engine.remove(job_id)
                self._fail(job_id, f"internal error: {type(exc).__name__}: {exc}")
            return StepReport()
        try:
            self.publish(report)
        except redis.RedisError as exc:  # progress of this step is lost; results wait for Redis
            log.warning("publishing step results failed (Redis): %s", exc)
        return report

    # -- what a step did -> Redis ----------------------------------------------------------------
    def publish(self, report: StepReport) -> None:
        for request, reason in report.failed:
            self._fail(request.id, reason)
        now = time.perf_counter()
        moved = [r for r in report.advanced if r.id in self.held]
        cancelled = self.jobs.progress_many(
            [(r.id, r.image_steps, r.total_steps, now - self.held[r.id].last_step_at) for r in moved]
        )
        for request in moved:
            self.held[request.id].last_step_at = now
        for job_id in cancelled:
            if self.engine.remove(job_id) is not None or job_id in self.held:
                self.held.pop(job_id, None)
                self.jobs.mark_cancelled(job_id)
        for request in report.finished:
            if request.id in self.held and request.id not in cancelled:
                held = self.held.pop(request.id)
                self.publishing[request.id] = self.publisher.submit(self._write_results, held, request)
                self.publishing[request.id].add_done_callback(lambda _f, i=request.id: self.publishing.pop(i, None))

    def _write_results(self, held: HeldJob, request: RequestInFlight) -> None:
        record = held.record
        try:
            images = images_uint8(request)
            self.store.put(result_key(record.id, "grid.png"), png_bytes(make_grid(images)), "image/png")
            for i, image in enumerate(images):
                self.store.put(result_key(record.id, f"images/{i}.png"), png_bytes(image), "image/png")
            model = request.model
            summary = {
                "job_id": record.id,
                "request": record.spec.model_dump(),
                "seed": record.spec.seed,
                "labels": request.labels,
                "timesteps": len(request.steps),
                "model": {"name": model.name, "sha256": model.sha256, "device": str(model.device),
                          "precision": model.precision},
                "worker": self.name,
                "attempt": record.attempts,
                "timings": {"queued_at": record.created_at, "started_at": record.started_at,
                            "sampling_s": round(time.perf_counter() - held.admitted_at, 4)},
            }
            self.store.put(result_key(record.id, "record.json"), json.dumps(summary, indent=1).encode(), "application/json")
            until_redis_answers(lambda: self.jobs.finish(record.id, len(images), model.sha256), self.stopping)
        except Exception as exc:  # noqa: BLE001 - a job whose results cannot be written fails, with why
            log.exception("job %s: writing results failed", record.id)
            self._fail(record.id, f"writing results failed: {type(exc).__name__}: {exc}")

    def _fail(self, job_id: str, reason: str) -> None:
        self.held.pop(job_id, None)
        try:
            self.jobs.fail(job_id, reason)
        except redis.RedisError:
            log.exception("job %s: could not record the failure", job_id)

    # -- stopping ------------------------------------------------------------------------------
    def stop(self) -> None:
        self.stopping.set()

    def drain(self) -> None:
        """Wait for results being written; jobs still in flight are left to the reaper's requeue."""
        self.publisher.shutdown(wait=True)

    def holds(self) -> list[str]:
        return list(self.held)
