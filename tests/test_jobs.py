"""JobStore against a real Redis: transitions, cancellation and the dead-worker reaper."""

import time

import pytest
import redis

from patchdiff_core.generation.spec import GenerationSpec
from patchdiff_core.service.jobs import IdempotencyConflict, JobStore
from patchdiff_core.service.settings import Settings


@pytest.fixture
def jobs(redis_url):
    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    settings = Settings(redis_url=redis_url, heartbeat_ttl_s=0.3, heartbeat_interval_s=0.05, max_attempts=2,
                        queue_name="unit")
    return JobStore(conn, settings)


SPEC = GenerationSpec(model="tiny", num_images=2, seed=1)


def test_lifecycle_and_atomic_transitions(jobs):
    record, created = jobs.submit(SPEC)
    assert created and record.status == "queued" and jobs.queue_position(record) == 0
    started = jobs.start(record.id, "w1")
    assert started.status == "running" and started.attempts == 1 and started.worker == "w1"
    assert jobs.start(record.id, "w2") is None  # only one worker can take it
    assert jobs.progress(record.id, 3, 10, 0.01) is False
    assert jobs.get(record.id).step == 3
    assert jobs.finish(record.id, 2, ["abc"])
    assert not jobs.fail(record.id, "too late")  # terminal states are final
    final = jobs.get(record.id)
    assert final.status == "finished" and final.num_results == 2 and final.model_sha256 == ["abc"]
    assert record.id.encode() not in jobs.redis.smembers(jobs.active_key)


def test_cancel_queued_and_running(jobs):
    queued, _ = jobs.submit(SPEC)
    assert jobs.cancel(queued.id) == "cancelled"
    assert jobs.queue.count == 0 and jobs.start(queued.id, "w") is None
    running, _ = jobs.submit(SPEC)
    jobs.start(running.id, "w")
    assert jobs.cancel(running.id) == "running"
    assert jobs.progress(running.id, 1, 10, 0.01) is True  # the worker is told to stop
    assert jobs.mark_cancelled(running.id)
    assert jobs.cancel(running.id) is None


def test_idempotency(jobs):
    first, created = jobs.submit(SPEC, "key-1", "fp-a")
    again, created_again = jobs.submit(SPEC, "key-1", "fp-a")
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyConflict):
        jobs.submit(SPEC, "key-1", "fp-b")
    assert jobs.queue.count == 1


def test_dead_worker_job_is_requeued_then_failed(jobs):
    record, _ = jobs.submit(SPEC)
    jobs.heartbeat("w1", {"name": "w1", "models": {}})
    jobs.queue.empty()  # as if w1 had dequeued it
    jobs.start(record.id, "w1")
    assert jobs.reap() == []  # w1 is alive
    time.sleep(0.4)  # w1's heartbeat expires
    assert jobs.reap() == [(record.id, "requeued")]
    again = jobs.get(record.id)
    assert again.status == "queued" and "w1 stopped" in again.error and jobs.queue_position(again) == 0
    jobs.queue.empty()
    jobs.start(record.id, "w2")
    time.sleep(0.4)
    assert jobs.reap() == [(record.id, "failed")]  # max_attempts = 2 reached
    failed = jobs.get(record.id)
    assert failed.status == "failed" and "w2 stopped" in failed.error and "2 attempt" in failed.error


def test_job_lost_from_the_queue_is_requeued(jobs):
    record, _ = jobs.submit(SPEC)
    jobs.queue.empty()  # the message is gone but nobody started the job
    time.sleep(0.4)
    assert jobs.reap() == [(record.id, "requeued")]
    assert jobs.queue.count == 1


def test_served_models_come_from_live_heartbeats(jobs):
    jobs.heartbeat("w1", {"name": "w1", "models": {"a": {"name": "a"}}})
    jobs.heartbeat("w2", {"name": "w2", "models": {"b": {"name": "b"}}})
    assert set(jobs.served_models()) == {"a", "b"}
    jobs.worker_gone("w1")
    assert set(jobs.served_models()) == {"b"}
