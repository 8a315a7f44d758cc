"""A patchdiff worker process: load the models once, announce them, then run jobs from the queues of
the models it serves (`<queue_name>:<model>`, one RQ queue per model) in the batching engine
(`worker.runner`): many jobs at once, one forward pass per model per step.

The jobs run in this process (no fork per job, as RQ's default worker does): a CUDA context cannot
be used across fork, and a fresh child would load the weights again for every job. Liveness does
not rely on RQ either: a heartbeat thread refreshes this worker's entry every `heartbeat_interval_s`,
and any process's `reap()` requeues the jobs of a worker whose heartbeat expired (SIGKILL,
out-of-memory kill, lost machine): every job the worker held, since each job record names its worker.

Redis outages: the worker's Redis client retries every command for as long as Redis is away
(exponential backoff up to `redis_retry_max_s`, one log line per attempt), so the jobs in flight
simply wait at their next Redis call and go on when Redis returns; the worker never exits for it.
SIGTERM/SIGINT: the jobs in flight are handed back to the front of their queues at the next step,
without charging an attempt, then the worker exits.
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

from patchdiff_core.service.jobs import JobStore
from patchdiff_core.service.logs import configure_logging
from patchdiff_core.service.redis_conn import worker_redis
from patchdiff_core.service.settings import Settings, get_settings
from patchdiff_core.service.store import make_store

from .models import ModelCache
from .runner import EngineRunner
from .tasks import configure

log = logging.getLogger("patchdiff.worker")


class Heartbeat(threading.Thread):
    """Announces this worker (and its models) until stopped; also reaps dead workers' jobs."""

    def __init__(self, jobs: JobStore, name: str, info: dict):
        super().__init__(name="patchdiff-heartbeat", daemon=True)
        self.jobs, self.worker_name, self.info = jobs, name, info
        self.stopped = threading.Event()

    def beat(self) -> None:
        self.jobs.heartbeat(self.worker_name, {**self.info, "at": time.time()})

    def run(self) -> None:
        interval = self.jobs.settings.heartbeat_interval_s
        while not self.stopped.wait(interval):
            try:
                self.beat()
                for job_id, action in self.jobs.reap():
                    log.warning("reaped job: %s", action, extra={"job_id": job_id, "worker": self.worker_name})
            except redis.RedisError as exc:  # not a connection error (those are retried): say it, go on
                log.warning("heartbeat failed: %s", exc, extra={"worker": self.worker_name})

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)
        try:
            self.jobs.worker_gone(self.worker_name)
        except redis.RedisError:
            pass


def run_worker(settings: Settings | None = None, burst: bool = False, name: str | None = None) -> None:
    settings = settings or get_settings()
    configure_logging(settings, "worker")
    if settings.redis_url is None:
        raise SystemExit("PATCHDIFF_REDIS_URL is not set (patchdiff serve sets it for its worker)")
    name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    conn = worker_redis(settings)
    jobs = JobStore(conn, settings)
    models = ModelCache(settings)
    models.load_all()
    store = make_store(settings)
    store.check()
    max_rows = {m: settings.engine_rows(m, models.models[m].device.type, models.models[m].config.res) for m in models.models}
    max_jobs = settings.engine_max_jobs or sum(max_rows.values())
    if settings.engine_compile != "off":
        for model_name, model in models.models.items():
            log.info("compiling %s (%s, up to %d rows)", model_name, settings.engine_compile, max_rows[model_name])
            model.compile(max_rows[model_name], settings.engine_compile)
    runner = EngineRunner(name, jobs, store, models, max_rows, max_jobs)
    configure(runner)

    heartbeat = Heartbeat(jobs, name, {"name": name, "models": models.describe(), "pid": os.getpid(),
                                       "host": socket.gethostname(), "started_at": time.time(),
                                       "max_rows": max_rows, "max_jobs": max_jobs})
    heartbeat.beat()
    heartbeat.start()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: runner.stop())
    queues = [jobs.queue(model) for model in models.models]
    log.info("worker serving %s on queues %s (rows per forward: %s; up to %d jobs at once)",
             ", ".join(models.models), ", ".join(q.name for q in queues), max_rows, max_jobs, extra={"worker": name})
    try:
        runner.run(queues, burst=burst)
    finally:
        heartbeat.stop()


if __name__ == "__main__":
    run_worker()
