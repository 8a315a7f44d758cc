"""A patchdiff worker process: load the models once, announce them, then run jobs from the queues of
the models it serves (`<queue_name>:<model>`, one RQ queue per model).

Why RQ's `SimpleWorker` and not its default `Worker`: the default forks a child ("work horse") per
job. A CUDA context cannot be used across fork, and a fresh child would load the weights again for
every job. `SimpleWorker` runs each job in this process, so the models loaded at start-up stay on
the GPU for the life of the worker. Liveness does not rely on the horse either: a heartbeat thread
refreshes this worker's entry every `heartbeat_interval_s`, and any process's `reap()` requeues the
job of a worker whose heartbeat expired (SIGKILL, out-of-memory kill, lost machine).

Redis outages: the worker's Redis client retries every command for as long as Redis is away
(exponential backoff up to `redis_retry_max_s`, one log line per attempt), so a running job simply
waits at its next Redis call and goes on when Redis returns; the worker never exits for it.
SIGTERM/SIGINT: the running job is handed back to the front of its queue at its next step, without
charging an attempt, then the worker exits.
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
from patchdiff_core.service.logs import configure_logging
from patchdiff_core.service.redis_conn import worker_redis
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


class PatchdiffWorker(SimpleWorker):
    """RQ's SimpleWorker, plus: a warm shutdown (first SIGTERM/SIGINT) asks the running job to hand
    itself back at its next step instead of running to the end."""

    shutting_down: threading.Event

    def handle_warm_shutdown_request(self):
        self.shutting_down.set()
        log.info("shutdown requested: handing back the running job, if any", extra={"worker": self.name})


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
    context = WorkerContext(name=name, jobs=jobs, store=store, models=models)
    configure(context)

    heartbeat = Heartbeat(jobs, name, {"name": name, "models": models.describe(), "pid": os.getpid(),
                                       "host": socket.gethostname(), "started_at": time.time()})
    heartbeat.beat()
    heartbeat.start()
    queues = [jobs.queue(model) for model in models.models]
    log.info("worker serving %s on queues %s", ", ".join(models.models), ", ".join(q.name for q in queues),
             extra={"worker": name})
    try:
        round_ = 0
        while not context.shutting_down.is_set():
            # RQ's loop quits on some Redis errors (a timeout while busy, for one); start it again.
            round_ += 1
            worker = PatchdiffWorker(queues, connection=conn, name=name if round_ == 1 else f"{name}.{round_}",
                                     serializer=JSONSerializer)
            worker.shutting_down = context.shutting_down
            worker.work(burst=burst, logging_level="WARNING")
            if burst:
                break
            if not context.shutting_down.is_set():
                log.warning("RQ work loop ended; starting it again", extra={"worker": name})
                time.sleep(1)
    finally:
        heartbeat.stop()


if __name__ == "__main__":
    run_worker()
