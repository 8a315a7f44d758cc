"""A patchdiff worker process: load the models once, announce them, then run jobs from the queue.

Why RQ's `SimpleWorker` and not its default `Worker`: the default forks a child ("work horse") per
job. A CUDA context cannot be used across fork, and a fresh child would load the weights again for
every job. `SimpleWorker` runs each job in this process, so the models loaded at start-up stay on
the GPU for the life of the worker. Liveness does not rely on the horse either: a heartbeat thread
refreshes this worker's key every `heartbeat_interval_s`, and any process's `reap()` requeues the
job of a worker whose key expired (SIGKILL, out-of-memory kill, lost machine).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

import redis
from rq import SimpleWorker
from rq.serializers import JSONSerializer

from patchdiff_core.service.jobs import JobStore
from patchdiff_core.service.settings import Settings, get_settings
from patchdiff_core.service.store import make_store

from .models import ModelCache
from .tasks import WorkerContext, configure

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
                    log.warning("job %s: %s (found by %s)", job_id, action, self.worker_name)
            except redis.RedisError as exc:  # Redis away: keep trying, the key expires meanwhile
                log.warning("heartbeat failed: %s", exc)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)
        try:
            self.jobs.worker_gone(self.worker_name)
        except redis.RedisError:
            pass


def run_worker(settings: Settings | None = None, burst: bool = False, name: str | None = None) -> None:
    settings = settings or get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if settings.redis_url is None:
        raise SystemExit("PATCHDIFF_REDIS_URL is not set (patchdiff serve sets it for its worker)")
    name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    conn = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, health_check_interval=30)
    jobs = JobStore(conn, settings)
    models = ModelCache(settings)
    models.load_all()
    store = make_store(settings)
    store.check()
    configure(WorkerContext(name=name, jobs=jobs, store=store, models=models))

    heartbeat = Heartbeat(jobs, name, {"name": name, "models": models.describe(), "pid": os.getpid(),
                                       "host": socket.gethostname(), "started_at": time.time()})
    heartbeat.beat()
    heartbeat.start()
    log.info("worker %s serving %s", name, ", ".join(models.models))
    worker = SimpleWorker([jobs.queue], connection=conn, name=name, serializer=JSONSerializer)
    try:
        worker.work(burst=burst, logging_level="WARNING")
    finally:
        heartbeat.stop()


if __name__ == "__main__":
    run_worker()
