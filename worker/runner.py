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

import numpy as np
import redis
import torch
from rq import Queue
from rq.exceptions import DequeueTimeout
from rq.serializers import JSONSerializer

from patchdiff_core.generation.engine import BatchEngine, RequestInFlight, StepReport, images_uint8
from patchdiff_core.generation.images import make_grid, png_bytes, to_uint8
from patchdiff_core.generation.preview import preview_png, preview_side, shrink_for_preview
from patchdiff_core.service.jobs import JobRecord, JobStore
from patchdiff_core.service.store import ObjectStore, attempt_prefix, result_key

from .models import ModelCache

log = logging.getLogger("patchdiff.worker")


@dataclass
class HeldJob:
    record: JobRecord
    attempt: int  # the fencing token: every write of this job names it
    admitted_at: float = field(default_factory=time.perf_counter)
    last_step_at: float = field(default_factory=time.perf_counter)
    preview_step: int = -(10**9)  # image-steps at the last preview
    preview_at: float = -(10**9)  # time.monotonic() of the last preview


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
        while not self.stopping.is_set():
            # The worker's Redis client waits out connection losses by itself (redis_conn.worker_redis).
            try:
                self.admit(queues, block=self.engine.idle)
            except redis.RedisError as exc:
                log.warning("taking jobs failed: %s", exc, extra={"worker": self.name})
                self.stopping.wait(1)
            if self.engine.idle:
                if burst and not self.publishing:
                    break
                continue
            self.step()
        self.hand_back_all()
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
            job_id, attempt = (list(rq_job.args) + [None, None])[:2]
            # Our job record, not the RQ job, is the truth from here on. (RQ parks a popped id in an
            # intermediate list until its worker starts it; this worker starts it at once.)
            queue.intermediate_queue.remove(rq_job.id)
            rq_job.delete(remove_from_queue=False)
            if job_id and attempt and self.accept(job_id, int(attempt)):
                taken += 1
        return taken

    def accept(self, job_id: str, attempt: int) -> bool:
        """Start `attempt` of a job (queued → running) and hand it to the engine."""
        record = self.jobs.start(job_id, self.name, attempt)
        if record is None:
            return False  # cancelled while queued, or a stale message of an earlier attempt
        try:
            self.models.get(record.spec.model)
            self.engine.add(job_id, record.spec)
        except Exception as exc:  # noqa: BLE001 - a job this worker cannot run fails with the reason
            self.jobs.fail(job_id, attempt, str(exc))
            return False
        self.held[job_id] = HeldJob(record, attempt)
        log.info("job started", extra=self._fields(job_id))
        return True

    def _fields(self, job_id: str) -> dict:
        held = self.held.get(job_id)
        return {"job_id": job_id, "worker": self.name, "attempt": held.attempt if held else None}

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
        verdicts = self.jobs.progress_many([
            (r.id, self.held[r.id].attempt, r.image_steps, r.total_steps, now - self.held[r.id].last_step_at)
            for r in moved
        ])
        for request in moved:
            held = self.held[request.id]
            held.last_step_at = now
            # Live progress for /jobs/{id}/events and webhooks (throttled there and here).
            self.jobs.events.progress(request.id, request.image_steps, request.total_steps, self._preview(held, request))
        for job_id, verdict in verdicts.items():
            if verdict == 0:
                continue
            self.engine.remove(job_id)  # its images leave before the next step
            held = self.held.pop(job_id)
            if verdict == 1 and self.jobs.mark_cancelled(job_id, held.attempt):
                log.info("job cancelled", extra={**self._fields(job_id), "attempt": held.attempt})
            else:  # the job moved on to another attempt while this one was paused: drop ours
                self._superseded(job_id, held.attempt)
        for request in report.finished:
            if request.id in self.held:
                held = self.held.pop(request.id)
                self.publishing[request.id] = self.publisher.submit(self._write_results, held, request)
                self.publishing[request.id].add_done_callback(lambda _f, i=request.id: self.publishing.pop(i, None))

    def _preview(self, held: HeldJob, request: RequestInFlight) -> bytes | None:
        """The job's grid as the engine now predicts it (x0 of its running images, the final x0 of its
        done ones, black for those not started), as a small PNG, when one is due: every
        `preview_every_steps` of the job's steps and at most every `preview_min_interval_s`."""
        settings = self.jobs.settings
        now = time.monotonic()
        per_step = max(1, len(request.running))  # image-steps of one step of the job, now
        if (request.image_steps - held.preview_step < settings.preview_every_steps * per_step
                or now - held.preview_at < settings.preview_min_interval_s) and not request.done:
            return None
        held.preview_step, held.preview_at = request.image_steps, now
        n = request.spec.num_images
        latest = {image.index: image.x0 for image in request.running if image.x0 is not None} | request.results
        indices = sorted(latest)
        side = preview_side(n, request.model.config.res, settings.preview_max_side)
        canvas = np.zeros((n, side, side, 3), np.uint8)
        if indices:
            canvas[indices] = to_uint8(shrink_for_preview(torch.stack([latest[i] for i in indices]), n,
                                                          settings.preview_max_side))
        return preview_png(canvas, settings.preview_max_side)

    def _write_results(self, held: HeldJob, request: RequestInFlight) -> None:
        record = held.record
        try:
            images = images_uint8(request)
            # Under this attempt's own prefix: `finish` publishes them, or a stale attempt's are dropped.
            attempt = held.attempt
            self.store.put(result_key(record.id, "grid.png", attempt), png_bytes(make_grid(images)), "image/png")
            for i, image in enumerate(images):
                self.store.put(result_key(record.id, f"images/{i}.png", attempt), png_bytes(image), "image/png")
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
                "attempt": attempt,
                "timings": {"queued_at": record.created_at, "started_at": record.started_at,
                            "sampling_s": round(time.perf_counter() - held.admitted_at, 4)},
            }
            self.store.put(result_key(record.id, "record.json", attempt), json.dumps(summary, indent=1).encode(),
                           "application/json")
            if self.jobs.finish(record.id, attempt, len(images), model.sha256):
                log.info("job finished", extra={"job_id": record.id, "worker": self.name, "attempt": attempt})
            else:
                self._superseded(record.id, attempt)
        except Exception as exc:  # noqa: BLE001 - a job whose results cannot be written fails, with why
            log.exception("writing results failed", extra={"job_id": record.id, "worker": self.name, "attempt": held.attempt})
            self._fail(record.id, f"writing results failed: {type(exc).__name__}: {exc}", held.attempt)

    def _fail(self, job_id: str, reason: str, attempt: int | None = None) -> None:
        held = self.held.pop(job_id, None)
        attempt = attempt if attempt is not None else (held.attempt if held else None)
        try:
            if not self.jobs.fail(job_id, attempt, reason):
                self._superseded(job_id, attempt)
        except redis.RedisError:
            log.exception("could not record the failure", extra={"job_id": job_id, "worker": self.name})

    def _superseded(self, job_id: str, attempt: int | None) -> None:
        """This attempt lost its job (requeued while this worker was paused): drop what it wrote."""
        if attempt is not None:
            self.store.delete_prefix(attempt_prefix(job_id, attempt))
        log.warning("job superseded by a later attempt", extra={"job_id": job_id, "worker": self.name, "attempt": attempt})

    # -- stopping ------------------------------------------------------------------------------
    def stop(self) -> None:
        self.stopping.set()

    def hand_back_all(self) -> None:
        """Graceful shutdown: every job still in flight goes back to the front of its queue without
        charging its attempt (another worker, or this one restarted, takes it from the start)."""
        for job_id, held in list(self.held.items()):
            self.engine.remove(job_id)
            self.held.pop(job_id)
            handed = self.jobs.hand_back(job_id, held.attempt)
            log.info("job handed back" if handed else "job had moved on", extra={"job_id": job_id, "worker": self.name,
                                                                             "attempt": held.attempt})

    def drain(self) -> None:
        """Wait for the results being written."""
        self.publisher.shutdown(wait=True)

    def holds(self) -> list[str]:
        return list(self.held)
