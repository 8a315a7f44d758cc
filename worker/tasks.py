"""The RQ job: a plain function of a job id and the attempt it is for (the fencing token).
Everything else it needs is in the job record.

It runs inside a `worker.main` process, which loaded the models once; `configure()` sets that up.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from patchdiff_core.errors import Cancelled, PatchdiffError
from patchdiff_core.generation.images import make_grid, png_bytes
from patchdiff_core.generation.pipeline import generate
from patchdiff_core.service.jobs import JobStore
from patchdiff_core.service.store import ObjectStore, attempt_prefix, result_key

from .models import ModelCache

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    name: str
    jobs: JobStore
    store: ObjectStore
    models: ModelCache
    # Set by a graceful shutdown (SIGTERM): the running job is handed back at its next step.
    shutting_down: threading.Event = field(default_factory=threading.Event)


class HandBack(Exception):
    """The worker is shutting down: give the job back to the queue without charging the attempt."""


_context: WorkerContext | None = None


def configure(context: WorkerContext) -> None:
    global _context
    _context = context


def run_generation(job_id: str, attempt: int) -> str:
    """Run one attempt of a job to its end: finished (results published), failed (with a reason),
    cancelled, handed back (shutdown) or superseded (the job moved on to another attempt while this
    one was paused; everything this attempt wrote is discarded)."""
    if _context is None:
        raise RuntimeError("run_generation needs a patchdiff worker process (patchdiff worker)")
    ctx = _context
    record = ctx.jobs.start(job_id, ctx.name, attempt)
    if record is None:
        return "skipped"  # cancelled while queued, or a stale message of an earlier attempt
    log_fields = {"job_id": job_id, "attempt": attempt, "worker": ctx.name}
    log.info("job started", extra=log_fields)
    try:
        model = ctx.models.get(record.spec.model)
        generation, timings = _sample(ctx, job_id, attempt, model, record.spec)
        _write_results(ctx, record, attempt, model, generation, timings)
        if ctx.jobs.finish(job_id, attempt, len(generation.images), model.sha256):
            outcome = "finished"
        else:
            outcome = _superseded(ctx, job_id, attempt)
    except HandBack:
        outcome = "handed back" if ctx.jobs.hand_back(job_id, attempt) else _superseded(ctx, job_id, attempt)
    except Cancelled:
        outcome = "cancelled" if ctx.jobs.mark_cancelled(job_id, attempt) else _superseded(ctx, job_id, attempt)
    except PatchdiffError as exc:
        outcome = "failed" if ctx.jobs.fail(job_id, attempt, str(exc)) else _superseded(ctx, job_id, attempt)
    except Exception as exc:  # noqa: BLE001 - any crash must end the job as failed, with a reason
        log.exception("job crashed", extra=log_fields)
        failed = ctx.jobs.fail(job_id, attempt, f"internal error: {type(exc).__name__}: {exc}")
        outcome = "failed" if failed else _superseded(ctx, job_id, attempt)
    log.info("job %s", outcome, extra=log_fields)
    return outcome


def _superseded(ctx: WorkerContext, job_id: str, attempt: int) -> str:
    """This attempt lost its job (it was requeued while we were paused): drop what it wrote."""
    ctx.store.delete_prefix(attempt_prefix(job_id, attempt))
    return "superseded"


def _sample(ctx: WorkerContext, job_id: str, attempt: int, model, spec):
    last = [time.perf_counter()]

    def on_step(info: dict) -> None:
        now = time.perf_counter()
        stop = ctx.jobs.progress(job_id, attempt, info["step"], info["total"], now - last[0])
        last[0] = now
        if stop:  # cancel requested, or superseded: mark_cancelled tells which
            raise Cancelled(job_id)
        if ctx.shutting_down.is_set():
            raise HandBack(job_id)

    batch_size = ctx.jobs.settings.worker_batch_size
    started = time.perf_counter()
    while True:
        try:
            with torch.inference_mode():
                result = generate(model, spec, batch_size, on_step)
            break
        except torch.cuda.OutOfMemoryError:
            # Images do not depend on the batch size, so a smaller batch gives the same pictures.
            if batch_size == 1:
                raise
            batch_size //= 2
            torch.cuda.empty_cache()
            log.warning("job %s: CUDA out of memory, retrying with batch size %d", job_id, batch_size)
    return result, {"sampling_s": round(time.perf_counter() - started, 4), "batch_size": batch_size}


def _write_results(ctx: WorkerContext, record, attempt: int, model, result, timings: dict) -> None:
    """Under this attempt's own prefix; `finish` publishes them (or they are discarded)."""
    store = ctx.store
    store.put(result_key(record.id, "grid.png", attempt), png_bytes(make_grid(result.images)), "image/png")
    for i, image in enumerate(result.images):
        store.put(result_key(record.id, f"images/{i}.png", attempt), png_bytes(image), "image/png")
    summary = {
        "job_id": record.id,
        "request": record.spec.model_dump(),
        "seed": record.spec.seed,
        "labels": result.labels,
        "timesteps": len(result.timesteps),
        "model": {"name": model.name, "sha256": model.sha256, "device": str(model.device), "precision": model.precision},
        "worker": ctx.name,
        "attempt": attempt,
        "timings": {"queued_at": record.created_at, "started_at": record.started_at, **timings},
    }
    store.put(result_key(record.id, "record.json", attempt), json.dumps(summary, indent=1).encode(), "application/json")
