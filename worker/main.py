"""A patchdiff worker process: load the models once, announce them, then run the jobs of the models
it serves in the batching engine: many jobs at once, one forward pass per model per step.

Three parts, each on its own thread (`worker/runner.py`, `worker/control.py`):
- the sampling thread runs the engine and never waits for Redis;
- the control loop does all the Redis work: one report per engine step (progress, ends, heartbeat,
  cancel requests, new jobs);
- the reaper thread gives back the jobs of workers that died (any live process may; one at a time).

The jobs run in this process (no fork per job): a CUDA context cannot be used across fork, and a
fresh child would load the weights again for every job. Liveness is a heartbeat in Redis server
time; a worker that stops beating (SIGKILL, out-of-memory kill, lost machine) has its jobs given
back by the reaper of any other process.

Redis outages: every Redis error only delays the control loop, which keeps what it has to say and
tries again with backoff (one log line per attempt); sampling goes on meanwhile and finished
results wait in memory and on disk. The worker never exits for it.
SIGTERM/SIGINT: the worker says it is draining, hands the jobs in flight back to the front of their
queues at the next step (without charging a run), finishes writing results, and exits.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid

import redis
import torch

from patchdiff_core.service.logs import configure_logging
from patchdiff_core.service.reaper import Reaper
from patchdiff_core.service.redis_conn import worker_redis
from patchdiff_core.service.settings import Settings, get_settings
from patchdiff_core.service.store import make_store
from patchdiff_core.service.worker_protocol import WorkerLink

from .control import ControlLoop
from .gpus import choose_device
from .health import LIVENESS_FILE
from .models import ModelCache
from .runner import EngineRunner

log = logging.getLogger("patchdiff.worker")


class ReaperThread(threading.Thread):
    """Runs the reaper every `heartbeat_interval_s` (one pass at a time across all processes)."""

    def __init__(self, reaper: Reaper, name: str, interval: float):
        super().__init__(name="patchdiff-reaper", daemon=True)
        self.reaper, self.worker_name, self.interval = reaper, name, interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                for job_id, action in self.reaper.reap():
                    log.warning("reaped job: %s", action, extra={"job_id": job_id, "worker": self.worker_name})
            except redis.RedisError as exc:  # the control loop reports outages; one line here
                log.warning("reaper pass skipped: %s", str(exc).splitlines()[0][:200], extra={"worker": self.worker_name})


class Liveness(threading.Thread):
    """Touches `LIVENESS_FILE` (read by `worker.health`) while the control loop goes round."""

    def __init__(self, control: ControlLoop, path: str = LIVENESS_FILE):
        super().__init__(name="patchdiff-liveness", daemon=True)
        self.control, self.path = control, path

    def run(self) -> None:
        loops = -1
        while True:
            if self.control.counters.loops != loops:
                loops = self.control.counters.loops
                try:
                    with open(self.path, "w") as f:
                        f.write(str(time.time()))
                except OSError:
                    pass
            if self.control.finished.wait(5):
                return


def run_worker(settings: Settings | None = None, burst: bool = False, name: str | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or, with `burst`, until the queues are empty and every job is done)."""
    settings = settings or get_settings()
    configure_logging(settings, "worker")
    if not settings.redis_configured:
        raise SystemExit("PATCHDIFF_REDIS_URL (or PATCHDIFF_REDIS_SENTINELS) is not set (patchdiff serve sets it)")
    name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    conn = worker_redis(settings)
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device, gpu_claim = choose_device(settings.device, settings.gpu_lock_dir, visible)  # held for our whole life
    if device != settings.device:
        settings = settings.model_copy(update={"device": device})
    if device.startswith("cuda:"):
        torch.cuda.set_device(int(device.split(":")[1]))  # anything on "the current device" goes there too
    models = ModelCache(settings)
    models.load_all()
    store = make_store(settings)
    store.check()
    max_rows = {m: settings.engine_rows(m, models.models[m].device.type, models.models[m].config.res) for m in models.models}
    max_jobs = settings.engine_max_jobs or sum(max_rows.values())
    models.start_compiling(max_rows)  # in the background: the models serve eagerly meanwhile

    announcement = {"name": name, "host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time(),
                    "models": list(models.models), "max_rows": max_rows, "max_jobs": max_jobs, "store": "ok",
                    "device": device}
    control = ControlLoop(WorkerLink(conn, settings, name, list(models.models)), settings, max_jobs, announcement,
                          models.describe())
    runner = EngineRunner(name, control, store, models.models, max_rows, settings)
    reaper = ReaperThread(Reaper(conn, settings, holder=name), name, settings.heartbeat_interval_s)

    def stop(*_):
        control.stop()
        runner.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    control.start()
    reaper.start()
    Liveness(control).start()
    log.info("worker serving %s (rows per forward: %s; up to %d jobs at once)", ", ".join(models.models), max_rows,
             max_jobs, extra={"worker": name})
    try:
        runner.run(burst=burst)
    finally:
        control.stop()
        reaper.stopped.set()
        control.join()
        reaper.reaper.lease.release()


if __name__ == "__main__":
    run_worker()
