"""The worker's sampling side: jobs from the control loop into the batching engine, one engine step
after another, and what each step did back to the control loop. It never calls Redis.

Three kinds of threads, so that the network never waits for anything else:
- the sampling thread (`EngineRunner.run`): takes started jobs and stop requests from the control
  loop at each step boundary, runs one engine step (one forward pass per model over the images of
  every job it holds), and leaves a note of what moved (`ControlLoop.step_done`);
- a small pool (`writer`) that renders previews (a downscale on the device, the copy to the host,
  a PNG) and writes the results of finished jobs: a finished job is handed to it in the same step
  its last image is done, before any Redis call of that step is even attempted;
- the control loop (`worker/control.py`), which does all the Redis work.

Results are written under the job's attempt prefix (`jobs/<id>/a<attempt>/`); the control loop
publishes them with the move to `finished`. When the store cannot be written (a full disk), the
partial files are removed at once, the worker takes no new jobs, and the write is tried again as
space returns, for up to `store_retry_s`; then the job fails with the reason.

With `max_jobs = 1` the runner is the old one-job-at-a-time worker (a job's images in batches of
`max_rows`): `benchmarks/batching.py` compares the two that way.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from patchdiff_core.generation.engine import BatchEngine, RequestInFlight, StepReport, images_uint8
from patchdiff_core.generation.images import make_grid, png_bytes, to_uint8
from patchdiff_core.generation.pipeline import SamplingModel
from patchdiff_core.generation.preview import preview_png, preview_side, shrink_for_preview
from patchdiff_core.service.records import JobRecord
from patchdiff_core.service.store import ObjectStore, attempt_prefix, result_key

from .control import ControlLoop

log = logging.getLogger("patchdiff.worker")

IDLE_POLL_S = 0.2  # an idle sampling thread looks for started jobs (and a stop) this often
STORE_RETRY_INTERVAL_S = 2.0


@dataclass
class HeldJob:
    record: JobRecord
    admitted_at: float = field(default_factory=time.perf_counter)
    last_step_at: float = field(default_factory=time.perf_counter)
    preview_step: int = 0  # image-steps at the last preview (the first comes after as many steps)
    preview_at: float = field(default_factory=time.monotonic)  # time.monotonic() of the last preview (or start)

    @property
    def attempt(self) -> int:
        return self.record.attempt


class EngineRunner:
    def __init__(self, name: str, control: ControlLoop, store: ObjectStore, models: dict[str, SamplingModel],
                 max_rows: dict[str, int], settings):
        self.name, self.control, self.store, self.models, self.settings = name, control, store, models, settings
        self.engine = BatchEngine(models, max_rows)
        self.held: dict[str, HeldJob] = {}
        self.writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="patchdiff-results")
        self.writing: dict[str, Future] = {}  # job id -> its results being written
        self.stopping = threading.Event()

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, burst: bool = False) -> None:
        """Sample until `stop()` (with `burst`: until the queues are empty and every job is done);
        then hand every job still in the engine back and wait for the writes."""
        try:
            while not self.stopping.is_set():
                self._take_started(block=self.engine.idle)
                self._take_stops()
                if not self.engine.idle:
                    self.step()
                elif burst and not self.writing and self.control.drained.is_set() and self.control.started.empty():
                    break
        finally:
            self._shut_down()

    def stop(self) -> None:
        self.stopping.set()

    def _take_started(self, block: bool) -> None:
        try:
            record = self.control.started.get(timeout=IDLE_POLL_S) if block else self.control.started.get_nowait()
        except queue.Empty:
            return
        while True:
            self.accept(record)
            try:
                record = self.control.started.get_nowait()
            except queue.Empty:
                return

    def accept(self, record: JobRecord) -> bool:
        """Put a started job in the engine (or end it at once: cancelled meanwhile, or not runnable)."""
        if self.stopping.is_set():
            self.control.hand_back(record.id)
            return False
        if record.cancel_requested:  # its cancel was asked while it waited to run again
            self.control.cancelled_job(record.id)
            return False
        try:
            if record.spec.model not in self.models:
                raise ValueError(f"this worker does not serve model {record.spec.model!r}")
            self.engine.add(record.id, record.spec)
        except Exception as exc:  # noqa: BLE001 - a job this worker cannot run fails with the reason
            self.control.failed_job(record.id, str(exc))
            return False
        self.held[record.id] = HeldJob(record)
        log.info("job started", extra=self._fields(record.id))
        return True

    def _take_stops(self) -> None:
        while True:
            try:
                stop = self.control.stops.get_nowait()
            except queue.Empty:
                return
            held = self.held.get(stop.job_id)
            if held is not None and held.attempt == stop.attempt:
                self.engine.remove(stop.job_id)  # its images leave before the next step
                del self.held[stop.job_id]
                if stop.why == "cancel":
                    self.control.cancelled_job(stop.job_id)
                    log.info("job cancelled", extra=self._fields(stop.job_id, stop.attempt))
            if stop.why == "superseded":  # another attempt owns the job: drop what this one wrote
                self._discard(stop.job_id, stop.attempt)

    def _fields(self, job_id: str, attempt: int | None = None) -> dict:
        held = self.held.get(job_id)
        return {"job_id": job_id, "worker": self.name, "attempt": attempt or (held.attempt if held else None)}

    def step(self) -> StepReport:
        try:
            with torch.inference_mode():
                report = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - the engine isolates job failures; this is a bug
            log.exception("engine step failed; failing the jobs it held")
            for job_id in list(self.held):
                self.engine.remove(job_id)
                del self.held[job_id]
                self.control.failed_job(job_id, f"internal error: {type(exc).__name__}: {exc}")
            return StepReport()
        self.publish(report)
        return report

    # -- what a step did -> the control loop (no Redis here) ----------------------------------------
    def publish(self, report: StepReport) -> None:
        # Finished jobs first: their results go to the writer before anything else can fail.
        finished: dict[str, HeldJob] = {}
        for request in report.finished:
            held = self.held.pop(request.id, None)
            if held is not None:
                finished[request.id] = held
                self.control.left_engine(request.id)
                self.writing[request.id] = self.writer.submit(self._write_results, held, request)
                self.writing[request.id].add_done_callback(lambda _f, i=request.id: self.writing.pop(i, None))
        for request, reason in report.failed:
            if self.held.pop(request.id, None) is not None:
                self.control.failed_job(request.id, reason)
        now = time.perf_counter()
        moved = []
        for request in report.advanced:
            held = self.held.get(request.id) or finished.get(request.id)
            if held is None:
                continue  # dropped meanwhile (cancelled, taken over)
            self.control.histograms.observe("step_seconds", now - held.last_step_at)
            held.last_step_at = now
            if not request.done:
                self._maybe_preview(held, request)
            moved.append((request.id, request.image_steps, request.total_steps, len(request.results)))
        self.control.step_done(moved)

    def _maybe_preview(self, held: HeldJob, request: RequestInFlight) -> None:
        """A preview of the job's grid when one is due: every `preview_every_steps` of the job's steps
        and at most every `preview_min_interval_s`. Rendered by the writer pool, off this thread."""
        settings, now = self.settings, time.monotonic()
        per_step = max(1, len(request.running))  # image-steps of one step of the job, now
        if (request.image_steps - held.preview_step < settings.preview_every_steps * per_step
                or now - held.preview_at < settings.preview_min_interval_s):
            return
        held.preview_step, held.preview_at = request.image_steps, now
        # The latest x0 of its running images and the results of its done ones: tensors the engine
        # no longer writes to, so the writer may read them while sampling goes on.
        latest = {image.index: image.x0 for image in request.running if image.x0 is not None} | request.results
        self.writer.submit(self._render_preview, request.id, request.spec.num_images, request.model.config.res, latest)

    def _render_preview(self, job_id: str, num_images: int, res: int, latest: dict[int, torch.Tensor]) -> None:
        try:
            max_side = self.settings.preview_max_side
            side = preview_side(num_images, res, max_side)
            canvas = np.zeros((num_images, side, side, 3), np.uint8)
            indices = sorted(latest)
            if indices:
                with torch.inference_mode():
                    canvas[indices] = to_uint8(shrink_for_preview(torch.stack([latest[i] for i in indices]),
                                                                  num_images, max_side))
            self.control.preview(job_id, preview_png(canvas, max_side))
        except Exception:  # noqa: BLE001 - a preview is best effort; the job goes on
            log.exception("rendering a preview failed", extra={"job_id": job_id, "worker": self.name})

    # -- results ------------------------------------------------------------------------------------
    def _write_results(self, held: HeldJob, request: RequestInFlight) -> None:
        record, attempt = held.record, held.attempt
        try:
            files = self._encode_results(held, request)
        except Exception as exc:  # noqa: BLE001 - the job's own failure
            log.exception("encoding results failed", extra=self._fields(record.id, attempt))
            self.control.failed_job(record.id, f"encoding results failed: {type(exc).__name__}: {exc}")
            return
        deadline = time.monotonic() + self.settings.store_retry_s
        tries = 0
        while True:
            tries += 1
            try:
                for name, (data, content_type) in files.items():
                    self.store.put(result_key(record.id, name, attempt), data, content_type)
            except Exception as exc:  # noqa: BLE001 - a full disk, a store that is away...
                self._discard(record.id, attempt, wait=False)  # no partial results left behind
                detail = f"{type(exc).__name__}: {exc}"
                log.warning("writing results failed (try %d): %s", tries, detail, extra=self._fields(record.id, attempt))
                self.control.store_writable(False, detail)
                if self.stopping.is_set():  # another worker computes it again, uncharged
                    self.control.hand_back(record.id, "worker shut down while its results could not be written")
                    return
                if time.monotonic() > deadline:
                    self.control.failed_job(record.id, f"writing results failed after {tries} tries: {detail}")
                    return
                self._wait_for_store(deadline)
                continue
            if tries > 1:
                self.control.store_writable(True)
            self.control.finished_job(record.id, request.spec.num_images, request.model.sha256, request.total_steps)
            log.info("job results written", extra=self._fields(record.id, attempt))
            return

    def _wait_for_store(self, deadline: float) -> None:
        """Until a probe can be written again (or the deadline)."""
        while time.monotonic() < deadline and not self.stopping.is_set():
            time.sleep(STORE_RETRY_INTERVAL_S)
            try:
                self.store.check()
                return
            except Exception:  # noqa: BLE001 - still not writable
                continue

    def _encode_results(self, held: HeldJob, request: RequestInFlight) -> dict[str, tuple[bytes, str]]:
        record = held.record
        images = images_uint8(request)
        files = {"grid.png": (png_bytes(make_grid(images)), "image/png")}
        for i, image in enumerate(images):
            files[f"images/{i}.png"] = (png_bytes(image), "image/png")
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
            "attempt": held.attempt,
            "timings": {"queued_at": record.created_at, "started_at": record.started_at,
                        "sampling_s": round(time.perf_counter() - held.admitted_at, 4)},
        }
        files["record.json"] = (json.dumps(summary, indent=1).encode(), "application/json")
        return files

    def _discard(self, job_id: str, attempt: int, wait: bool = True) -> None:
        """Delete an attempt's files (after its write, if one is in flight)."""
        def delete(_=None):
            try:
                self.store.delete_prefix(attempt_prefix(job_id, attempt))
            except Exception:  # noqa: BLE001 - best effort: the janitor deletes them with the job
                log.exception("deleting an attempt's files failed", extra={"job_id": job_id, "attempt": attempt})

        writing = self.writing.get(job_id) if wait else None
        if writing is not None and not writing.done():
            writing.add_done_callback(delete)
        else:
            delete()

    # -- stopping -----------------------------------------------------------------------------------
    def _shut_down(self) -> None:
        """Graceful shutdown: every job still in the engine goes back to the front of its queue
        without charging its run (another worker, or this one restarted, takes it from the start);
        results being written are finished first."""
        for job_id in list(self.held):
            self.engine.remove(job_id)
            del self.held[job_id]
            self.control.hand_back(job_id)
            log.info("job handed back", extra={"job_id": job_id, "worker": self.name})
        self.writer.shutdown(wait=True)
        while True:  # jobs started just before the stop
            try:
                record = self.control.started.get_nowait()
            except queue.Empty:
                break
            self.control.hand_back(record.id)
        self.control.sampler_done()
