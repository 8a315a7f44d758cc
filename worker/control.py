"""A worker's control loop: everything between its sampling thread and Redis, on a thread of its own.

The sampling thread (`worker/runner.py`) never waits for Redis: after each engine step it drops a
note of what moved in a mailbox and goes on. This loop turns the notes into at most one
`WorkerLink.report` per engine step (one round trip, two on steps that take new jobs), whatever the
number of jobs: at once when something is due (a job's end, a progress event, the heartbeat), else
at most every `worker_report_interval_s` (so cancel requests and new jobs are seen within it):

- progress of every job that moved, written when due (the first and last steps, a preview, or
  `progress_event_interval_s` after the job's last progress event);
- the ends of jobs (finished once their results are written, failed, cancelled, handed back);
- the heartbeat, every `heartbeat_interval_s`, with the list of jobs held (so that Redis and the
  worker can never disagree for long about which jobs it holds) and the latency histograms;
- new jobs from the queues while the engine has room (fewer than `max_jobs` in it), started in the
  same step and handed to the sampling thread;
- cancel requests, handed to the sampling thread.

When the sampling thread is idle, the loop blocks on its models' wake-up lists (a token is pushed
with every submitted job), so an idle worker takes a new job at once and costs Redis nothing else
but its heartbeat.

Any Redis error (connection lost, out of memory, READONLY after a failover...) leaves everything
as it was: the notes stay pending and the same report is tried again with backoff. A job's end is
repeated until Redis has it; repeating one that Redis already has is harmless (the scripts accept a
move that already happened for the same attempt). So no finished result is ever dropped.

Torch-free: `benchmarks/control_plane.py` runs this same loop with a stand-in engine.
"""

from __future__ import annotations

import base64
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from patchdiff_core.service.events import PreviewLink, end_event, progress_event, queued_event, started_template
from patchdiff_core.service.metrics import HistogramBuffer
from patchdiff_core.service.records import CANCELLED_BY_REQUEST, JobRecord
from patchdiff_core.service.worker_protocol import DONE, MoveOp, ProgressOp, WorkerLink

log = logging.getLogger("patchdiff.worker.control")

STOP_TIMEOUT_S = 60.0  # after a stop, how long to wait for the sampling side to hand back and finish
END_GATHER_S = 0.02  # a job's end waits this long for the ends of the jobs that finished with it (one report)
IDLE_WAIT_MAX_S = 1.0  # an idle worker looks at its queues at least this often
WAKE_GATHER_S = 0.02  # a woken idle worker waits this long for the jobs submitted with the first (one take)
IDLE_WAIT_MIN_S = 0.05  # an idle worker blocks on its wake-up lists only when its heartbeat is further away


@dataclass
class Held:
    record: JobRecord
    sampling: bool = True  # in the engine (counts against max_jobs); False once its end is pending
    progress: tuple[int, int, int] | None = None  # (step, total, images done) not yet written
    written_at: float = field(default_factory=time.monotonic)  # its last progress event (or its start)
    preview: bytes | None = None
    end: MoveOp | None = None
    end_at: float = 0.0  # monotonic time its end was noted

    @property
    def attempt(self) -> int:
        return self.record.attempt


@dataclass
class Stop:
    """Told to the sampling thread: drop this job (`why`: "cancel" or "superseded")."""

    job_id: str
    attempt: int
    why: str


@dataclass
class _Mail:
    kind: str
    job_id: str = ""
    payload: Any = None


@dataclass
class Counters:
    loops: int = 0
    reports: int = 0
    failures: int = 0
    seconds_in_redis: float = 0.0  # in reports (one per engine step at most)
    seconds_starting: float = 0.0  # in starting the jobs taken
    seconds_waiting: float = 0.0  # idle, blocked on the wake-up lists
    steps: int = 0


class ControlLoop(threading.Thread):
    def __init__(self, link: WorkerLink, settings, max_jobs: int, announcement: dict[str, Any],
                 model_descriptions: dict[str, Any] | None = None):
        super().__init__(name="patchdiff-control", daemon=True)
        self.link, self.settings = link, settings
        self.max_jobs = max(1, max_jobs)
        self.announcement, self.model_descriptions = announcement, model_descriptions or {}
        self.histograms = HistogramBuffer()
        self.started: queue.SimpleQueue[JobRecord] = queue.SimpleQueue()  # to the sampling thread
        self.stops: queue.SimpleQueue[Stop] = queue.SimpleQueue()  # to the sampling thread
        self.counters = Counters()
        self._mail: queue.SimpleQueue[_Mail] = queue.SimpleQueue()
        self._held: dict[str, Held] = {}
        self._to_start: list[str] = []
        self._to_give_back: list[str] = []
        self._step_seen = False  # a step happened since the last report: report soon
        self._woken = False  # a wake-up token came: report now, taking jobs
        self._last_report = -1e9  # monotonic
        self._next_beat = 0.0
        self._announce = True
        self._accepting = True  # False while the store cannot be written, and once stopping
        self._stopping = threading.Event()
        self._sampler_done = threading.Event()
        self._stop_deadline = float("inf")
        self._failures_in_a_row = 0
        self.finished = threading.Event()  # set when the loop has left (after `gone`)
        self.drained = threading.Event()  # the last look at the queues found nothing, and nothing is held

    # -- the sampling side's notes (any thread) ----------------------------------------------------
    def step_done(self, moved: list[tuple[str, int, int, int]]) -> None:
        """After an engine step: (job id, step, total, images done) of every job that moved."""
        self._mail.put(_Mail("step", payload=moved))

    def preview(self, job_id: str, png: bytes) -> None:
        self._mail.put(_Mail("preview", job_id, png))

    def left_engine(self, job_id: str) -> None:
        """The job's last image is done: its results are being written (its place is free)."""
        self._mail.put(_Mail("left", job_id))

    def finished_job(self, job_id: str, num_results: int, model_sha256: list[str], total_steps: int) -> None:
        """Its results are written: publish them (the job is finished, its progress complete)."""
        self._mail.put(_Mail("end", job_id, ("finished", {
            "num_results": str(num_results), "model_sha256": json.dumps(model_sha256),
            "step": str(total_steps), "total": str(total_steps), "images_done": str(num_results)})))

    def failed_job(self, job_id: str, reason: str) -> None:
        self._mail.put(_Mail("end", job_id, ("failed", {"error": reason[:2000]})))

    def cancelled_job(self, job_id: str) -> None:
        self._mail.put(_Mail("end", job_id, ("cancelled", {"error": CANCELLED_BY_REQUEST})))

    def hand_back(self, job_id: str, reason: str = "worker shut down") -> None:
        self._mail.put(_Mail("end", job_id, ("queued", {"error": f"handed back: {reason}"})))

    def store_writable(self, ok: bool, detail: str = "") -> None:
        """While the result store cannot be written, take no new jobs (and say so in the announcement)."""
        self._mail.put(_Mail("store", payload=(ok, detail)))

    def sampler_done(self) -> None:
        """The sampling thread has stopped: every job it held was handed back or ended."""
        self._sampler_done.set()
        self._mail.put(_Mail("wake"))

    def stop(self) -> None:
        """Shut down: mark this worker draining, take nothing new, record every pending end, leave."""
        if not self._stopping.is_set():
            self._stop_deadline = time.monotonic() + STOP_TIMEOUT_S
            self._stopping.set()
            self._mail.put(_Mail("wake"))

    # -- the loop --------------------------------------------------------------------------------
    @property
    def room(self) -> int:
        if not self._accepting or self._stopping.is_set():
            return 0
        return max(0, self.max_jobs - sum(h.sampling for h in self._held.values()) - len(self._to_start))

    def holds(self) -> list[str]:
        return [*self._held, *self._to_start]

    def run(self) -> None:
        try:
            draining_said = False
            while True:
                self.counters.loops += 1
                self._read_mail(self._wait_s())
                if self._stopping.is_set():
                    if not draining_said:
                        draining_said = self._try(self.link.draining)
                    if self._may_leave():
                        break
                if self._waits_for_work():
                    self._wait_for_work()
                if self._due() or self._woken or self._to_start or self._to_give_back or self._step_report_due():
                    if not self._try(self._report):
                        self._backoff()
        finally:
            left = self._try(self.link.gone) if not self._held else False
            if self._held:
                log.warning("stopping with %d job(s) whose end Redis has not confirmed; the reaper gives them back",
                            len(self._held))
            log.info("control loop stopped (left: %s)", left)
            self.finished.set()

    def _may_leave(self) -> bool:
        """Stopping, and every job ended or handed back (or out of time for it)."""
        return self._stopping.is_set() and (
            (self._sampler_done.is_set() and not self._held and not self._to_start)
            or time.monotonic() > self._stop_deadline)

    def _idle(self) -> bool:
        return not self._held and not self._to_start

    def _waits_for_work(self) -> bool:
        """Idle with room, and nothing due before a block on the wake-up lists would be worth it."""
        return (self._idle() and self.room > 0 and not self._woken and not self._to_give_back
                and self._next_due() - time.monotonic() > IDLE_WAIT_MIN_S)

    def _step_report_due(self) -> bool:
        return self._step_seen and time.monotonic() - self._last_report >= self.settings.worker_report_interval_s

    def _next_due(self) -> float:
        """When a report is due (monotonic): the heartbeat, a job's end (once the ends that finished
        with it had END_GATHER_S to arrive; at once when stopping), a job's progress event."""
        due = self._next_beat
        gather = 0.0 if self._stopping.is_set() else END_GATHER_S
        interval = self.settings.progress_event_interval_s
        for h in self._held.values():
            if h.end is not None:
                due = min(due, h.end_at + gather)
            if h.progress is not None:
                due = min(due, h.written_at + interval)
        return due

    def _wait_s(self) -> float:
        """How long to wait for mail before something is due anyway; 0 when idle with room: then the
        wait is on the wake-up lists (`_wait_for_work`), so that a job submitted meanwhile is taken at once."""
        if self._woken or self._to_start or self._to_give_back or self._waits_for_work() or self._may_leave():
            return 0.0
        due = self._next_due()
        if self._step_seen:
            due = min(due, self._last_report + self.settings.worker_report_interval_s)
        return max(0.0, min(due - time.monotonic(), IDLE_WAIT_MAX_S))

    def _due(self) -> bool:
        return bool(self._to_start or self._to_give_back) or time.monotonic() >= self._next_due()

    def _read_mail(self, wait_s: float) -> None:
        try:
            mail = self._mail.get(timeout=wait_s) if wait_s > 0 else self._mail.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(mail)
            try:
                mail = self._mail.get_nowait()
            except queue.Empty:
                return

    def _apply(self, mail: _Mail) -> None:
        held = self._held.get(mail.job_id)
        if mail.kind == "step":
            self._step_seen = True
            self.counters.steps += 1
            for job_id, step, total, images_done in mail.payload:
                h = self._held.get(job_id)
                if h is not None:
                    h.progress = (step, total, images_done)
        elif mail.kind == "preview" and held is not None:
            held.preview = mail.payload
        elif mail.kind == "left" and held is not None:
            held.sampling = False
        elif mail.kind == "end" and held is not None:
            to, fields = mail.payload
            self._end(held, to, fields)
        elif mail.kind == "store":
            ok, detail = mail.payload
            if ok != self._accepting:
                log.warning("result store %s%s", "writable again: taking jobs" if ok else "not writable: taking no jobs",
                            f" ({detail})" if detail else "")
            self._accepting = ok
            self.announcement = {**self.announcement, "store": "ok" if ok else f"unwritable: {detail}"}
            self._announce = True

    def _end(self, held: Held, to: str, fields: dict[str, str]) -> None:
        record, now = held.record, time.time()
        held.sampling = False
        held.end_at = time.monotonic()
        if to == "finished":
            fields = {**fields, "finished_at": repr(now), "results_attempt": str(held.attempt)}
            event = end_event(record.id, "finished", num_results=int(fields["num_results"])).to_json()
            if record.started_at:
                self.histograms.observe("job_seconds", now - record.started_at)
            held.end = MoveOp(record, held.attempt, "finished", fields, event)
        elif to == "queued":
            fields = {**fields, "enqueued_at": repr(now)}
            held.end = MoveOp(record, held.attempt, "queued", fields, queued_event(record.id, fields["error"]).to_json(),
                              charge=-1)
        else:
            fields = {**fields, "finished_at": repr(now)}
            held.end = MoveOp(record, held.attempt, to, fields, end_event(record.id, to, fields["error"]).to_json())

    def _ops(self) -> list[ProgressOp | MoveOp]:
        now, interval = time.monotonic(), self.settings.progress_event_interval_s
        ops: list[ProgressOp | MoveOp] = []
        for held in self._held.values():
            if held.end is not None:
                ops.append(held.end)
                continue
            if held.progress is None:
                continue
            step, total, images_done = held.progress
            # Due with a preview, or `progress_event_interval_s` after the last one (a job shorter than
            # that has none: its started and finished events say all).
            if held.preview is None and now - held.written_at < interval:
                continue
            preview = None
            if held.preview is not None:
                preview = PreviewLink(url=f"/jobs/{held.record.id}/preview.png?step={step}", bytes=len(held.preview))
                if len(held.preview) <= self.settings.preview_inline_max_bytes:
                    preview.png_base64 = base64.b64encode(held.preview).decode()
            event = progress_event(held.record.id, step, total, images_done, preview).to_json()
            ops.append(ProgressOp(held.record, held.attempt, step, total, images_done, event, held.preview or b""))
        return ops

    def _report(self) -> None:
        now = time.monotonic()
        beat = now >= self._next_beat
        ops = self._ops()
        take = self.room
        histograms = self.histograms.take() if beat else []
        started = time.perf_counter()
        try:
            report = self.link.report(
                ops, take=take, beat=beat, announcement=self.announcement if beat and self._announce else None,
                model_descriptions=self.model_descriptions, histograms=histograms,
                reported=self.holds() if beat else None)
        except BaseException:
            self.histograms.put_back(histograms)
            raise
        finally:
            self.counters.seconds_in_redis += time.perf_counter() - started
        self.counters.reports += 1
        self._step_seen = self._woken = False
        self._last_report = now
        if beat:
            self._announce = report.announce
            # Redis forgot the announcement (a restart without persistence): say it again at once.
            self._next_beat = now if report.announce else now + self.settings.heartbeat_interval_s
        for op, verdict in zip(ops, report.verdicts):
            held = self._held.get(op.record.id)
            if held is None:
                continue
            if verdict != DONE:
                self._lost(op.record.id, held)
            elif isinstance(op, MoveOp):
                del self._held[op.record.id]
            else:
                held.written_at, held.preview = now, None
                if held.progress == (op.step, op.total, op.images_done):
                    held.progress = None
        for job_id, attempt in report.cancel_requests:
            held = self._held.get(job_id)
            if held is not None and held.attempt == attempt and held.sampling and held.end is None:
                self.stops.put(Stop(job_id, attempt, "cancel"))
        for job_id in report.lost:
            if job_id in self._held:
                self._lost(job_id, self._held[job_id])
            elif job_id in self._to_start:
                self._to_start.remove(job_id)
        self._to_give_back += [j for j in report.orphans if j not in self._to_give_back]
        self._to_start += report.taken
        if take > 0 and not report.taken and not self._held and not self._to_start:
            self.drained.set()
        elif report.taken:
            self.drained.clear()
        self._start_taken()
        if self._to_give_back:
            self.link.give_back(self._to_give_back)
            self._to_give_back = []

    def _start_taken(self) -> None:
        if not self._to_start:
            return
        if self._stopping.is_set():  # taken just before the stop: put them back as they were
            self._to_give_back += self._to_start
            self._to_start = []
            return
        started = time.perf_counter()
        try:
            records = self.link.start(self._to_start, started_template(self.link.name).to_json())
        finally:
            self.counters.seconds_starting += time.perf_counter() - started
        self._to_start = []
        for record in records:
            self._held[record.id] = Held(record)
            self.started.put(record)

    def _lost(self, job_id: str, held: Held) -> None:
        """Redis says this worker no longer owns the job (it was given to another attempt)."""
        del self._held[job_id]
        log.warning("job taken over by another attempt; dropping ours",
                    extra={"job_id": job_id, "worker": self.link.name, "attempt": held.attempt})
        self.stops.put(Stop(job_id, held.attempt, "superseded"))

    def _wait_for_work(self) -> None:
        """Block until a job may be waiting (a wake-up token), the next heartbeat, or a stop. Called
        only when `_waits_for_work()`: the heartbeat is more than IDLE_WAIT_MIN_S away."""
        if not self._mail.empty():
            return
        timeout = min(IDLE_WAIT_MAX_S, max(IDLE_WAIT_MIN_S, self._next_due() - time.monotonic()))  # never 0: forever
        keys = [self.link.keys.wake(m) for m in self.link.models]
        started = time.perf_counter()
        try:
            # BLPOP's timeout is whole seconds on old servers; fractions work from Redis 6.
            woken = self.link.redis.blpop(keys, timeout=timeout)
        except redis.RedisError as exc:
            self._note_failure(exc)
            self._backoff()
            return
        finally:
            self.counters.seconds_waiting += time.perf_counter() - started
        if woken:
            # Report now, taking the job (else the heartbeat, due, takes what is queued); a client's
            # burst comes a few ms apart: a moment's wait takes it in one report and one start.
            time.sleep(WAKE_GATHER_S)
            self._woken = True

    def _try(self, call) -> bool:
        try:
            call()
        except redis.RedisError as exc:
            self._note_failure(exc)
            return False
        if self._failures_in_a_row:
            log.warning("Redis answers again after %d failed attempt(s)", self._failures_in_a_row,
                        extra={"worker": self.link.name})
        self._failures_in_a_row = 0
        return True

    def _note_failure(self, exc: Exception) -> None:
        self.counters.failures += 1
        self._failures_in_a_row += 1
        log.warning("Redis call failed (%s): %s; attempt %d, everything stays pending", type(exc).__name__,
                    str(exc).splitlines()[0][:200] if str(exc) else "", self._failures_in_a_row,
                    extra={"worker": self.link.name})

    def _backoff(self) -> None:
        time.sleep(min(self.settings.redis_retry_max_s, 0.05 * 2 ** min(self._failures_in_a_row, 10)))
