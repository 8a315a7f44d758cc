"""The worker in one process: `EngineRunner` (the sampling thread and the result writers) with its
`ControlLoop` (all the Redis work), a real engine on a tiny model, a real Redis and a local store."""

from __future__ import annotations

import errno
import json
import threading
import time

import pytest
import redis
from service_harness import wait_until

from patchdiff_core.generation.pipeline import SamplingModel
from patchdiff_core.generation.spec import GenerationSpec
from patchdiff_core.service.events import EventLog
from patchdiff_core.service.jobs import JobStore
from patchdiff_core.service.settings import Settings
from patchdiff_core.service.store import LocalStore, result_key
from patchdiff_core.service.worker_protocol import WorkerLink
from worker.control import ControlLoop
from worker.runner import EngineRunner


@pytest.fixture(scope="module")
def tiny(tiny_model_file):
    return SamplingModel.load(weights=[tiny_model_file], device="cpu")


class Worker:
    """A worker's three parts in this process; `stop()` shuts it down as SIGTERM does."""

    def __init__(self, jobs: JobStore, model: SamplingModel, store, name: str = "w1", max_jobs: int = 4):
        link = WorkerLink(redis.Redis.from_url(jobs.settings.redis_url), jobs.settings, name, ["tiny"])
        self.control = ControlLoop(link, jobs.settings, max_jobs, {"name": name, "models": ["tiny"], "store": "ok"},
                                   {"tiny": {"name": "tiny"}})
        self.runner = EngineRunner(name, self.control, store, {"tiny": model}, {"tiny": 4}, jobs.settings)
        self.thread = threading.Thread(target=self.runner.run, daemon=True)
        self.control.start()
        self.thread.start()

    def stop(self) -> None:
        self.control.stop()
        self.runner.stop()
        self.thread.join(30)
        self.control.join(30)


@pytest.fixture
def jobs(redis_url):
    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    return JobStore(conn, Settings(redis_url=redis_url, heartbeat_interval_s=0.2, heartbeat_ttl_s=5,
                                   progress_event_interval_s=0, preview_every_steps=2, preview_min_interval_s=0,
                                   store_retry_s=30))


def spec(steps: int = 6, n: int = 2, seed: int = 1) -> GenerationSpec:
    return GenerationSpec(model="tiny", num_images=n, timesteps=str(steps), seed=seed, class_labels=[1] * n)


def status(jobs: JobStore, job_id: str, *wanted: str, timeout: float = 60) -> dict:
    return wait_until(lambda: (lambda r: r if r and r.status in wanted else None)(jobs.get(job_id)), timeout,
                      f"job {job_id} to be {wanted}")


def test_jobs_run_to_the_end_with_their_results_events_and_previews(jobs, tiny, tmp_path):
    store = LocalStore(tmp_path)
    worker = Worker(jobs, tiny, store)
    try:
        ids = [jobs.submit(spec(seed=i))[0].id for i in range(3)]
        for job_id in ids:
            done = status(jobs, job_id, "finished", "failed")
            assert done.status == "finished" and done.results_attempt == 1 and done.images_done == 2
            assert done.step == done.total == 12
            for name in ("grid.png", "images/0.png", "images/1.png", "record.json"):
                assert store.get(result_key(job_id, name, 1)), name
            events = EventLog(jobs.redis, jobs.keys).history(job_id)
            assert [e.event for e in events][:2] == ["queued", "started"] and events[-1].event == "finished"
            assert any("preview" in e.data for e in events if e.event == "progress")
        record = json.loads(store.get(result_key(ids[0], "record.json", 1)))
        assert record["worker"] == "w1" and record["attempt"] == 1
        wait_until(lambda: jobs.histogram("job_seconds").get("count") == 3, 10, "the histograms to be flushed")
    finally:
        worker.stop()
    assert worker.runner.held == {} and jobs.redis.zscore(jobs.keys.workers, "w1") is None  # left cleanly


def test_a_cancelled_job_leaves_the_engine_at_its_next_step(jobs, tiny, tmp_path):
    worker = Worker(jobs, tiny, LocalStore(tmp_path))
    try:
        long, _ = jobs.submit(spec(steps=1000, n=1))
        short, _ = jobs.submit(spec(steps=5, n=1))
        wait_until(lambda: jobs.get(long.id).step > 2, 30, "the long job to run")
        assert jobs.cancel(long.id) == "running"
        assert status(jobs, long.id, "cancelled").error == "cancelled by request"
        assert long.id not in worker.runner.held
        assert status(jobs, short.id, "finished").status == "finished"
    finally:
        worker.stop()


def test_a_job_taken_over_is_dropped_with_its_files(jobs, tiny, tmp_path):
    """Redis gives the job to another attempt while this worker runs it (as the reaper would if this
    worker had been paused): at its next heartbeat the worker drops the job and what it wrote."""
    store = LocalStore(tmp_path)
    worker = Worker(jobs, tiny, store)
    try:
        record, _ = jobs.submit(spec(steps=1000, n=1))
        wait_until(lambda: jobs.get(record.id).step > 2, 30, "the job to run")
        store.put(result_key(record.id, "grid.png", 1), b"partial", "image/png")
        jobs.redis.hincrby(jobs.keys.job(record.id), "attempt", 1)  # another attempt owns it now
        jobs.redis.srem(jobs.keys.held("w1"), record.id)
        wait_until(lambda: record.id not in worker.runner.held, 30, "the worker to drop the job")
        wait_until(lambda: not (tmp_path / record.id / "a1").exists(), 10, "its files to go")
    finally:
        worker.stop()


def test_stopping_hands_the_running_jobs_back_uncharged(jobs, tiny, tmp_path):
    worker = Worker(jobs, tiny, LocalStore(tmp_path))
    record, _ = jobs.submit(spec(steps=1000, n=1))
    wait_until(lambda: jobs.get(record.id).step > 2, 30, "the job to run")
    worker.stop()
    back = jobs.get(record.id, with_position=True)
    assert back.status == "queued" and back.attempts == 0 and back.attempt == 2 and back.queue_position == 0
    assert "handed back" in back.error


class FullDisk:
    """A local store whose writes fail with ENOSPC until `free()`."""

    def __init__(self, root):
        self.inner, self.full = LocalStore(root), True

    def put(self, key, data, content_type):
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.inner.put(key, data, content_type)

    def check(self):
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")

    def get(self, key):
        return self.inner.get(key)

    def delete_prefix(self, prefix):
        return self.inner.delete_prefix(prefix)


def test_results_wait_for_a_full_disk_and_no_job_is_taken_meanwhile(jobs, tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("worker.runner.STORE_RETRY_INTERVAL_S", 0.1)
    store = FullDisk(tmp_path)
    worker = Worker(jobs, tiny, store)
    try:
        first, _ = jobs.submit(spec(steps=4, n=1))
        wait_until(lambda: "unwritable" in (jobs.live_workers()[1] or [{}])[0].get("store", ""), 30,
                   "the worker to say its store is full")
        second, _ = jobs.submit(spec(steps=4, n=1))
        time.sleep(1.0)
        assert jobs.get(first.id).status == "running"  # its results wait in memory
        assert jobs.get(second.id).status == "queued"  # no new job while nothing can be written
        store.full = False
        assert status(jobs, first.id, "finished").status == "finished"
        assert status(jobs, second.id, "finished").status == "finished"
        assert store.get(result_key(first.id, "grid.png", 1))
        wait_until(lambda: jobs.live_workers()[1][0].get("store") == "ok", 10, "the worker to say it can write")
    finally:
        worker.stop()


def test_results_that_never_fit_fail_the_job_with_the_reason(jobs, tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("worker.runner.STORE_RETRY_INTERVAL_S", 0.05)
    jobs.settings.store_retry_s = 0.5
    worker = Worker(jobs, tiny, FullDisk(tmp_path))
    try:
        record, _ = jobs.submit(spec(steps=4, n=1))
        failed = status(jobs, record.id, "failed")
        assert "No space left on device" in failed.error and "tries" in failed.error
        assert not list(tmp_path.rglob("*.png"))
    finally:
        worker.stop()


def test_an_idle_worker_takes_a_submitted_job_at_once(jobs, monkeypatch):
    """Idle, the control loop blocks on its models' wake-up lists, not on its mailbox: a job
    submitted then is taken at once, not at the next heartbeat or idle look (both made an hour
    long here, so the test fails if the loop is anywhere else when the job comes)."""
    import worker.control as control

    monkeypatch.setattr(control, "IDLE_WAIT_MAX_S", 3600.0)
    settings = jobs.settings.model_copy(update={"heartbeat_interval_s": 3600.0, "heartbeat_ttl_s": 7200.0})
    link = WorkerLink(redis.Redis.from_url(settings.redis_url), settings, "w1", ["tiny"])
    loop = ControlLoop(link, settings, 4, {"name": "w1", "models": ["tiny"], "store": "ok"}, {"tiny": {"name": "tiny"}})
    loop.start()
    try:
        wait_until(lambda: jobs.redis.zscore(jobs.keys.workers, "w1") is not None, 10, "the first heartbeat")
        wait_until(lambda: loop.counters.loops >= 2, 10, "the loop to go idle")
        record, _ = jobs.submit(spec())
        assert loop.started.get(timeout=30).id == record.id
        loop.hand_back(record.id, "the test is over")
    finally:
        loop.stop()
        loop.sampler_done()  # there is no sampling thread here
        jobs.redis.rpush(jobs.keys.wake("tiny"), "1")  # end the loop's wait
        loop.join(30)
    assert loop.finished.is_set()  # and it left at once: nothing held, nothing to wait for
