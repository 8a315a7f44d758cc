"""The RQ job: a plain function of a job id. Everything else it needs is in the job record.

It runs inside a `worker.main` process, which loaded the models once; `configure()` sets that up.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import torch

from patchdiff_core.errors import Cancelled, PatchdiffError
from patchdiff_core.generation.images import make_grid, png_bytes
from patchdiff_core.generation.pipeline import generate
from patchdiff_core.generation.preview import JobPreview
from patchdiff_core.service.jobs import JobStore
from patchdiff_core.service.store import ObjectStore, result_key

from .models import ModelCache

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    name: str
    jobs: JobStore
    store: ObjectStore
    models: ModelCache


_context: WorkerContext | None = None


def configure(context: WorkerContext) -> None:
    global _context
    _context = context


def run_generation(job_id: str) -> str:
    """Run one job to its end: finished (results in the store), failed (with a reason) or cancelled."""
    if _context is None:
        raise RuntimeError("run_generation needs a patchdiff worker process (patchdiff worker)")
    ctx = _context
    record = ctx.jobs.start(job_id, ctx.name)
    if record is None:
        return "skipped"  # cancelled while queued, or already taken over after a requeue
    try:
        model = ctx.models.get(record.spec.model)
        generation, timings = _sample(ctx, job_id, model, record.spec)
        _write_results(ctx, record, model, generation, timings)
        ctx.jobs.finish(job_id, len(generation.images), model.sha256)
        return "finished"
    except Cancelled:
        ctx.jobs.mark_cancelled(job_id)
        return "cancelled"
    except PatchdiffError as exc:
        ctx.jobs.fail(job_id, str(exc))
        return "failed"
    except Exception as exc:  # noqa: BLE001 - any crash must end the job as failed, with a reason
        log.exception("job %s crashed", job_id)
        ctx.jobs.fail(job_id, f"internal error: {type(exc).__name__}: {exc}")
        return "failed"


def _sample(ctx: WorkerContext, job_id: str, model, spec):
    last = [time.perf_counter()]
    settings = ctx.jobs.settings
    preview = JobPreview(spec.num_images, model.config.res, settings.preview_every_steps,
                         settings.preview_min_interval_s, settings.preview_max_side)

    def on_step(info: dict) -> None:
        now = time.perf_counter()
        stop = ctx.jobs.progress(job_id, info["step"], info["total"], now - last[0])
        last[0] = now
        if stop:
            raise Cancelled(job_id)
        # Live progress for /jobs/{id}/events and webhooks: throttled inside both calls.
        ctx.jobs.events.progress(job_id, info["step"], info["total"], preview.update(info))

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


def _write_results(ctx: WorkerContext, record, model, result, timings: dict) -> None:
    store = ctx.store
    store.put(result_key(record.id, "grid.png"), png_bytes(make_grid(result.images)), "image/png")
    for i, image in enumerate(result.images):
        store.put(result_key(record.id, f"images/{i}.png"), png_bytes(image), "image/png")
    summary = {
        "job_id": record.id,
        "request": record.spec.model_dump(),
        "seed": record.spec.seed,
        "labels": result.labels,
        "timesteps": len(result.timesteps),
        "model": {"name": model.name, "sha256": model.sha256, "device": str(model.device), "precision": model.precision},
        "worker": ctx.name,
        "attempt": record.attempts,
        "timings": {"queued_at": record.created_at, "started_at": record.started_at, **timings},
    }
    store.put(result_key(record.id, "record.json"), json.dumps(summary, indent=1).encode(), "application/json")
