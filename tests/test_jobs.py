"""JobStore against a real Redis: transitions, fencing, cancellation, routing and the reaper."""

import time

import pytest
import redis

from patchdiff_core.generation.spec import GenerationSpec
from patchdiff_core.service.jobs import IdempotencyConflict, JobStore, OverCapacity
from patchdiff_core.service.settings import Settings


@pytest.fixture
def jobs(redis_url):
    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    settings = Settings(redis_url=redis_url, heartbeat_ttl_s=0.3, heartbeat_interval_s=0.05, max_attempts=2,
                        queue_name="unit")
    store = JobStore(conn, settings)
    return store


@pytest.fixture(autouse=True)
def _redis_started_long_ago(monkeypatch):
    # reap() waits heartbeat_ttl_s after a Redis (re)start; the session's server is older than that
    # except right at the start, so do not depend on test order.
    monkeypatch.setattr(JobStore, "_redis_just_started", lambda self: False)


SPEC = GenerationSpec(model="tiny", num_images=2, seed=1)


def test_lifecycle_and_atomic_transitions(jobs):
    record, created = jobs.submit(SPEC)
    assert created and record.status == "queued" and jobs.queue_position(record) == 0 and record.attempt == 1
    started = jobs.start(record.id, "w1", 1)
    assert started.status == "running" and started.attempts == 1 and started.worker == "w1"
    assert jobs.start(record.id, "w1", 1) is not None  # a retried start (lost reply) is idempotent...
    assert jobs.start(record.id, "w2", 1) is None  # ...for the worker that started it only
    assert jobs.get(record.id).attempts == 1
    assert jobs.progress(record.id, 1, 3, 10, 0.01) is False
    assert jobs.get(record.id).step == 3
    assert jobs.finish(record.id, 1, 2, ["abc"])
    assert not jobs.fail(record.id, 1, "too late")  # terminal states are final
    final = jobs.get(record.id)
    assert final.status == "finished" and final.num_results == 2 and final.model_sha256 == ["abc"]
    assert final.results_attempt == 1
    assert jobs.count_active() == {"queued": 0, "running": 0}


def test_cancel_queued_and_running(jobs):
    queued, _ = jobs.submit(SPEC)
    assert jobs.cancel(queued.id) == "cancelled"
    assert jobs.queue("tiny").count == 0 and jobs.start(queued.id, "w", 1) is None
    running, _ = jobs.submit(SPEC)
    jobs.start(running.id, "w", 1)
    assert jobs.cancel(running.id) == "running"
    assert jobs.progress(running.id, 1, 1, 10, 0.01) is True  # the worker is told to stop
    assert jobs.mark_cancelled(running.id, 1)
    assert jobs.cancel(running.id) is None


def test_idempotency_is_per_owner(jobs):
    first, created = jobs.submit(SPEC, "key-1", "fp-a", owner="alice")
    again, created_again = jobs.submit(SPEC, "key-1", "fp-a", owner="alice")
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyConflict) as conflict:
        jobs.submit(SPEC, "key-1", "fp-b", owner="alice")
    assert first.id not in str(conflict.value)
    other, created_other = jobs.submit(SPEC, "key-1", "fp-a", owner="bob")  # another tenant: its own job
    assert created_other and other.id != first.id and other.owner == "bob"
    assert jobs.queue("tiny").count == 2


def test_queued_cost_caps(jobs):
    jobs.settings.max_queued_cost_per_key = 100
    jobs.settings.max_queued_cost = 250
    a1, _ = jobs.submit(SPEC, owner="a", cost=60)
    with pytest.raises(OverCapacity) as over:
        jobs.submit(SPEC, owner="a", cost=60)
    assert over.value.scope == "owner" and over.value.outstanding == 60
    jobs.submit(SPEC, owner="b", cost=100)
    with pytest.raises(OverCapacity) as over:
        jobs.submit(SPEC, owner="c", cost=100)
    assert over.value.scope == "global"
    jobs.cancel(a1.id)  # an ended job gives its cost back
    jobs.submit(SPEC, owner="a", cost=100)


def test_fencing_refuses_a_stale_attempt(jobs):
    record, _ = jobs.submit(SPEC)
    jobs.heartbeat("w1", {"name": "w1", "models": {}})
    jobs.queue("tiny").empty()
    assert jobs.start(record.id, "w1", 1)
    time.sleep(0.4)  # w1 paused past its heartbeat
    assert jobs.reap() == [(record.id, "requeued")]
    assert jobs.start(record.id, "w1", 1) is None  # the old message cannot start it again
    assert jobs.start(record.id, "w2", 2).attempt == 2
    # w1 resumes: every write of attempt 1 is refused, and it is told to stop.
    assert jobs.progress(record.id, 1, 5, 10, 0.01) is True
    assert not jobs.finish(record.id, 1, 2, ["old"])
    assert not jobs.fail(record.id, 1, "old") and not jobs.mark_cancelled(record.id, 1)
    assert not jobs.hand_back(record.id, 1)
    assert jobs.get(record.id).step == 0
    assert jobs.finish(record.id, 2, 2, ["new"])
    final = jobs.get(record.id)
    assert final.results_attempt == 2 and final.model_sha256 == ["new"] and final.attempts == 2


def test_hand_back_does_not_charge_an_attempt(jobs):
    jobs.settings.max_attempts = 1
    first, _ = jobs.submit(SPEC)
    second, _ = jobs.submit(SPEC)
    jobs.queue("tiny").empty()
    jobs.start(first.id, "w1", 1)
    assert jobs.hand_back(first.id, 1, "worker shut down")
    again = jobs.get(first.id)
    assert again.status == "queued" and again.attempts == 0 and again.attempt == 2
    assert jobs.queue_position(again) == 0 and jobs.queue_position(jobs.get(second.id)) == 1  # at the front
    assert jobs.queue("tiny").get_job_ids() == [f"{first.id}-2"]
    assert jobs.start(first.id, "w2", 2) and jobs.finish(first.id, 2, 2, [])


def test_dead_worker_job_is_requeued_then_failed(jobs):
    record, _ = jobs.submit(SPEC)
    jobs.heartbeat("w1", {"name": "w1", "models": {}})
    jobs.queue("tiny").empty()  # as if w1 had dequeued it
    jobs.start(record.id, "w1", 1)
    assert jobs.reap() == []  # w1 is alive
    time.sleep(0.4)  # w1's heartbeat expires
    assert jobs.reap() == [(record.id, "requeued")]
    again = jobs.get(record.id)
    assert again.status == "queued" and "w1 stopped" in again.error and jobs.queue_position(again) == 0
    jobs.queue("tiny").empty()
    jobs.start(record.id, "w2", again.attempt)
    time.sleep(0.4)
    assert jobs.reap() == [(record.id, "failed")]  # max_attempts = 2 reached
    failed = jobs.get(record.id)
    assert failed.status == "failed" and "w2 stopped" in failed.error and "2 attempt" in failed.error


def test_job_lost_from_the_queue_is_requeued(jobs):
    record, _ = jobs.submit(SPEC)
    jobs.queue("tiny").empty()  # the message is gone but nobody started the job
    time.sleep(0.4)
    assert jobs.reap() == [(record.id, "requeued")]
    assert jobs.queue("tiny").count == 1 and jobs.get(record.id).attempts == 0


def test_queued_jobs_of_an_unserved_model_stay_queued(jobs):
    """No worker serves 'other' any more: its queued jobs wait in its queue, never failed."""
    record, _ = jobs.submit(GenerationSpec(model="other", num_images=1, seed=1))
    time.sleep(0.4)
    for _ in range(3):
        assert jobs.reap() == []
    assert jobs.get(record.id).status == "queued" and jobs.queue("other").count == 1


def test_one_queue_per_model(jobs):
    a, _ = jobs.submit(GenerationSpec(model="a", num_images=1, seed=1))
    b, _ = jobs.submit(GenerationSpec(model="b", num_images=1, seed=1))
    assert jobs.queue("a").get_job_ids() == [f"{a.id}-1"] and jobs.queue("b").get_job_ids() == [f"{b.id}-1"]
    assert jobs.queue("a").name == "unit:a"
    assert jobs.queue_position(jobs.get(b.id)) == 0
    assert jobs.count_active() == {"queued": 2, "running": 0}


def test_served_models_come_from_live_heartbeats(jobs):
    jobs.heartbeat("w1", {"name": "w1", "models": {"a": {"name": "a"}}})
    jobs.heartbeat("w2", {"name": "w2", "models": {"b": {"name": "b"}}})
    assert set(jobs.served_models()) == {"a", "b"}
    jobs.worker_gone("w1")
    assert set(jobs.served_models()) == {"b"}
    time.sleep(0.4)
    assert jobs.served_models() == {}


def test_live_workers_never_scan_the_keyspace(jobs):
    jobs.redis.config_resetstat()  # count only this test's commands (the server is shared by the session)
    jobs.heartbeat("w1", {"name": "w1", "models": {}})
    jobs.redis.mset({f"junk:{i}": 1 for i in range(2000)})
    monitor_calls = []
    original = jobs.redis.scan_iter
    jobs.redis.scan_iter = lambda *a, **k: monitor_calls.append(a) or original(*a, **k)
    assert [w["name"] for w in jobs.live_workers()] == ["w1"]
    jobs.reap()
    assert monitor_calls == []
    stats = jobs.redis.info("commandstats")
    assert "cmdstat_scan" not in stats


def test_expired_jobs_are_listed_for_the_janitor(jobs):
    jobs.settings.job_ttl_s = 60
    record, _ = jobs.submit(SPEC)
    jobs.cancel(record.id)
    assert jobs.expired_jobs() == []
    jobs.redis.zadd(jobs.expiry_key, {record.id: 0})  # as if its retention had ended
    assert jobs.expired_jobs() == [record.id]
    jobs.forget_expired(record.id)
    assert jobs.get(record.id) is None and jobs.expired_jobs() == []


def test_janitor_deletes_expired_jobs_and_all_their_files(jobs, tmp_path):
    from api.janitor import delete_expired
    from patchdiff_core.service.store import LocalStore, result_key

    store = LocalStore(tmp_path)
    record, _ = jobs.submit(SPEC)
    jobs.queue("tiny").empty()
    jobs.start(record.id, "w", 1)
    store.put(result_key(record.id, "grid.png", 1), b"png", "image/png")
    store.put(result_key(record.id, "images/0.png", 1), b"png", "image/png")
    assert jobs.finish(record.id, 1, 1, [])
    kept, _ = jobs.submit(SPEC)
    assert delete_expired(jobs, store) == 0 and (tmp_path / record.id).exists()  # retention not over
    jobs.redis.zadd(jobs.expiry_key, {record.id: 0})
    assert delete_expired(jobs, store) == 1
    assert not (tmp_path / record.id).exists() and jobs.get(record.id) is None
    assert jobs.get(kept.id) is not None
