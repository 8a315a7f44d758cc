"""The job contract against a real Redis: admission, queues, the worker protocol (take, progress,
ends, fencing, hand-back), cancellation, the reaper and retention."""

import json
import time

import pytest
import redis
from service_harness import wait_until

from patchdiff_core.generation.spec import GenerationSpec
from patchdiff_core.service.events import EventLog, end_event, progress_event, started_template
from patchdiff_core.service.jobs import IdempotencyConflict, JobStore, OverCapacity
from patchdiff_core.service.reaper import Reaper
from patchdiff_core.service.records import JobRecord
from patchdiff_core.service.settings import Settings
from patchdiff_core.service.worker_protocol import DONE, REFUSED, MoveOp, ProgressOp, WorkerLink

SPEC = GenerationSpec(model="tiny", num_images=2, seed=1)


@pytest.fixture
def jobs(redis_url):
    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    settings = Settings(redis_url=redis_url, heartbeat_ttl_s=0.5, heartbeat_interval_s=0.05, max_attempts=2)
    return JobStore(conn, settings)


class EagerReaper(Reaper):
    """A pass whenever asked, with no pause after the session's Redis started (tested on its own below)."""

    def paused(self) -> bool:
        return False

    def reap(self):
        self._healthy_since = -1e9
        return super().reap()


@pytest.fixture
def reaper(jobs):
    return EagerReaper(jobs.redis, jobs.settings, holder="test")


def worker(jobs: JobStore, name: str = "w1", models=("tiny",)) -> WorkerLink:
    link = WorkerLink(jobs.redis, jobs.settings, name, list(models))
    link.report([], beat=True, announcement={"name": name, "models": list(models)},
                model_descriptions={m: {"name": m} for m in models})
    return link


def take(link: WorkerLink, n: int = 10) -> list[JobRecord]:
    return link.start(link.report([], take=n).taken, started_template(link.name).to_json())


def finish(link: WorkerLink, record: JobRecord, attempt: int | None = None, sha: str = "abc") -> int:
    attempt = record.attempt if attempt is None else attempt
    op = MoveOp(record, attempt, "finished", {"num_results": str(record.spec.num_images), "finished_at": repr(time.time()),
                                              "model_sha256": json.dumps([sha]), "results_attempt": str(attempt)},
                end_event(record.id, "finished", num_results=record.spec.num_images).to_json())
    return link.report([op]).verdicts[0]


def progress(link: WorkerLink, record: JobRecord, step: int, attempt: int | None = None) -> int:
    attempt = record.attempt if attempt is None else attempt
    op = ProgressOp(record, attempt, step, 10, 0, progress_event(record.id, step, 10, 0).to_json())
    return link.report([op]).verdicts[0]


def events(jobs: JobStore, job_id: str) -> list[tuple[str, dict]]:
    return [(e.event, e.data) for e in EventLog(jobs.redis, jobs.keys).history(job_id)]


def expire(link: WorkerLink) -> None:
    """As if the worker's heartbeat had lapsed (SIGKILL, a lost machine, a long pause)."""
    link.redis.zadd(link.keys.workers, {link.name: 0})


def test_lifecycle_and_atomic_moves(jobs):
    record, created = jobs.submit(SPEC)
    assert created and record.status == "queued" and record.queue_position == 0 and record.attempt == 1
    link = worker(jobs)
    started, = take(link)
    assert started.status == "running" and started.attempts == 1 and started.worker == "w1"
    assert jobs.get(record.id, with_position=True).queue_position is None
    assert progress(link, started, 3) == DONE and jobs.get(record.id).step == 3
    assert finish(link, started) == DONE
    assert finish(link, started) == DONE  # a retry after a lost reply: accepted, nothing changes twice
    final = jobs.get(record.id)
    assert final.status == "finished" and final.num_results == 2 and final.model_sha256 == ["abc"]
    assert final.results_attempt == 1 and final.finished_at is not None
    assert [name for name, _ in events(jobs, record.id)] == ["queued", "started", "progress", "finished"]
    assert jobs.count_active() == {"queued": 0, "running": 0}
    assert jobs.metric_counters()["jobs_finished"] == 1 and jobs.metric_counters()["images_generated"] == 2
    assert jobs.redis.scard(jobs.keys.held("w1")) == 0


def test_a_start_is_idempotent_for_its_worker_only(jobs):
    record, _ = jobs.submit(SPEC)
    link = worker(jobs)
    taken = link.report([], take=1).taken
    first = link.start(taken, started_template("w1").to_json())
    again = link.start(taken, started_template("w1").to_json())  # the reply of the first was lost
    assert [r.id for r in first] == [r.id for r in again] == [record.id]
    assert jobs.get(record.id).attempts == 1  # charged once
    other = worker(jobs, "w2")
    assert other.start(taken, started_template("w2").to_json()) == []  # not in w2's held set


def test_cancel_queued_and_running(jobs):
    queued, _ = jobs.submit(SPEC)
    assert jobs.cancel(queued.id) == "cancelled"
    assert jobs.redis.zcard(jobs.keys.queued("tiny")) == 0
    link = worker(jobs)
    assert take(link) == []  # a cancelled job never runs
    running, _ = jobs.submit(SPEC)
    started, = take(link)
    assert jobs.cancel(running.id) == "running"
    assert link.report([]).cancel_requests == [(running.id, 1)]  # the worker is told at its next report
    op = MoveOp(started, 1, "cancelled", {"error": "cancelled by request", "finished_at": repr(time.time())},
                end_event(running.id, "cancelled", "cancelled by request").to_json())
    assert link.report([op]).verdicts == [DONE]
    assert jobs.get(running.id).status == "cancelled" and jobs.cancel(running.id) is None


def test_a_job_cancelled_while_its_worker_took_it_never_starts(jobs):
    record, _ = jobs.submit(SPEC)
    link = worker(jobs)
    taken = link.report([], take=1).taken  # taken from the queue, not started yet
    assert jobs.get(record.id, with_position=True).queue_position == 0  # "starting"
    assert jobs.cancel(record.id) == "cancelled"
    assert link.start(taken, started_template("w1").to_json()) == []
    assert jobs.redis.scard(jobs.keys.held("w1")) == 0


def test_idempotency_is_per_owner(jobs):
    first, created = jobs.submit(SPEC, "key-1", "fp-a", owner="alice")
    again, created_again = jobs.submit(SPEC, "key-1", "fp-a", owner="alice")
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyConflict) as conflict:
        jobs.submit(SPEC, "key-1", "fp-b", owner="alice")
    assert first.id not in str(conflict.value)
    other, created_other = jobs.submit(SPEC, "key-1", "fp-a", owner="bob")  # another tenant: its own job
    assert created_other and other.id != first.id and other.owner == "bob"
    assert jobs.redis.zcard(jobs.keys.queued("tiny")) == 2


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
    assert jobs.outstanding_costs()["model:tiny"] == 200


def test_fencing_refuses_a_stale_attempt_and_a_stranger(jobs, reaper):
    record, _ = jobs.submit(SPEC)
    w1 = worker(jobs, "w1")
    started, = take(w1)
    expire(w1)  # w1 paused past its heartbeat
    assert reaper.reap() == [(record.id, "requeued")]
    w2 = worker(jobs, "w2")
    again, = take(w2)
    assert again.attempt == 2 and again.attempts == 2
    # w1 resumes: every write of attempt 1 is refused...
    assert progress(w1, started, 5) == REFUSED and finish(w1, started, sha="old") == REFUSED
    # ...and so is a write that names the right attempt from the wrong worker.
    assert finish(w1, started, attempt=2, sha="stranger") == REFUSED
    assert jobs.get(record.id).step == 0
    # w1's next heartbeat tells it the job is no longer its own.
    assert w1.report([], beat=True, reported=[record.id]).lost == [record.id]
    assert finish(w2, again) == DONE
    final = jobs.get(record.id)
    assert final.results_attempt == 2 and final.model_sha256 == ["abc"] and final.worker == "w2"


def test_hand_back_does_not_charge_and_goes_to_the_front(jobs):
    jobs.settings.max_attempts = 1
    first, _ = jobs.submit(SPEC)
    second, _ = jobs.submit(SPEC)
    link = worker(jobs)
    started, _ = take(link, 2)
    op = MoveOp(started, 1, "queued", {"error": "handed back: worker shut down", "enqueued_at": repr(time.time())},
                '{"job_id":"%s","status":"queued","reason":"handed back"}' % first.id, charge=-1)
    assert link.report([op]).verdicts == [DONE]
    again = jobs.get(first.id, with_position=True)
    assert again.status == "queued" and again.attempts == 0 and again.attempt == 2 and again.queue_position == 0
    other = worker(jobs, "w2")
    assert [r.id for r in take(other, 1)] == [first.id]


def test_dead_worker_jobs_are_requeued_then_failed(jobs, reaper):
    record, _ = jobs.submit(SPEC)
    w1 = worker(jobs, "w1")
    take(w1)
    assert reaper.reap() == []  # w1 is alive
    expire(w1)
    assert reaper.reap() == [(record.id, "requeued")]
    again = jobs.get(record.id, with_position=True)
    assert again.status == "queued" and "w1 stopped" in again.error and again.queue_position == 0
    assert not jobs.redis.exists(jobs.keys.held("w1")) and jobs.redis.zscore(jobs.keys.workers, "w1") is None
    w2 = worker(jobs, "w2")
    take(w2)
    expire(w2)
    assert reaper.reap() == [(record.id, "failed")]  # max_attempts = 2 reached
    failed = jobs.get(record.id)
    assert failed.status == "failed" and "w2 stopped" in failed.error and "2 attempt" in failed.error
    assert [name for name, _ in events(jobs, record.id)] == ["queued", "started", "queued", "started", "failed"]


def test_started_events_number_the_runs(jobs, reaper):
    record, _ = jobs.submit(SPEC)
    w1 = worker(jobs, "w1")
    take(w1)
    expire(w1)
    reaper.reap()
    take(worker(jobs, "w2"))
    started = [data for name, data in events(jobs, record.id) if name == "started"]
    assert [(d["worker"], d["attempt"]) for d in started] == [("w1", 1), ("w2", 2)]


def test_a_worker_killed_while_shutting_down_costs_its_jobs_nothing(jobs, reaper):
    jobs.settings.max_attempts = 1
    record, _ = jobs.submit(SPEC)
    w1 = worker(jobs, "w1")
    take(w1)
    w1.draining()  # SIGTERM...
    expire(w1)  # ...then SIGKILL before it could hand the job back
    assert reaper.reap() == [(record.id, "requeued")]  # not failed, though max_attempts is 1
    assert jobs.get(record.id).attempts == 0
    assert not jobs.redis.hexists(jobs.keys.draining, "w1")


def test_a_job_the_worker_never_heard_of_is_given_back(jobs):
    """The reply of a take was lost: the job sits in the worker's held set, unknown to it."""
    record, _ = jobs.submit(SPEC)
    link = worker(jobs)
    assert link.report([], take=1).taken == [record.id]  # ...and the worker never saw this reply
    report = link.report([], beat=True, reported=[])
    assert report.orphans == [record.id]
    link.give_back(report.orphans)
    back = jobs.get(record.id, with_position=True)
    assert back.status == "queued" and back.queue_position == 0 and back.attempts == 0
    assert [r.id for r in take(worker(jobs, "w2"))] == [record.id]


def test_a_started_job_the_worker_lost_is_given_back_uncharged(jobs):
    record, _ = jobs.submit(SPEC)
    link = worker(jobs)
    take(link)  # started, then the worker lost track of it (a bug, a lost reply)
    report = link.report([], beat=True, reported=[])
    link.give_back(report.orphans)
    back = jobs.get(record.id)
    assert back.status == "queued" and back.attempt == 2 and back.attempts == 0


def test_queued_jobs_of_an_unserved_model_stay_queued(jobs, reaper):
    record, _ = jobs.submit(GenerationSpec(model="other", num_images=1, seed=1))
    time.sleep(0.6)
    for _ in range(3):
        assert reaper.reap() == []
    assert jobs.get(record.id).status == "queued" and jobs.redis.zcard(jobs.keys.queued("other")) == 1


def test_a_worker_takes_the_oldest_jobs_of_its_models(jobs):
    a1, _ = jobs.submit(GenerationSpec(model="a", num_images=1, seed=1))
    b1, _ = jobs.submit(GenerationSpec(model="b", num_images=1, seed=1))
    a2, _ = jobs.submit(GenerationSpec(model="a", num_images=1, seed=2))
    c1, _ = jobs.submit(GenerationSpec(model="c", num_images=1, seed=1))
    link = worker(jobs, models=("a", "b"))
    assert link.report([], take=2).taken == [a1.id, b1.id]
    assert link.report([], take=5).taken == [a2.id]
    assert jobs.get(c1.id).status == "queued"
    assert jobs.count_active() == {"queued": 1, "running": 0}  # in the queues (the taken ones start next)


def test_served_models_come_from_live_heartbeats(jobs):
    w1 = worker(jobs, "w1", ("a",))
    worker(jobs, "w2", ("b",))
    assert set(jobs.served_models()) == {"a", "b"}
    assert jobs.live_workers()[0] == 2
    w1.gone()
    assert set(jobs.served_models(fresh=True)) == {"b"}
    assert set(jobs.announced_models(fresh=True)) == {"a", "b"}  # known, not served
    time.sleep(0.6)
    assert jobs.served_models(fresh=True) == {} and jobs.live_workers()[0] == 0


def test_admission_and_the_reaper_do_not_grow_with_the_fleet_or_the_queue(jobs, reaper):
    """Submitting reads one entry per model (not per worker); a reaper pass with no dead worker
    reads nothing per job; nothing ever scans the keyspace."""
    for i in range(300):
        worker(jobs, f"w{i}", ("tiny",))
    for _ in range(300):
        jobs.submit(SPEC)
    jobs.redis.config_resetstat()
    jobs.served_models(fresh=True)
    reaper.reap()
    stats = jobs.redis.info("commandstats")
    calls = sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_config", "cmdstat_info"))
    assert calls < 30, stats
    assert "cmdstat_scan" not in stats and "cmdstat_keys" not in stats


def test_records_of_live_jobs_never_expire(jobs):
    """Retention counts from the end: a queued or running job's keys have no expiry, whatever
    `job_ttl_s`; once it ends, they are deleted `job_ttl_s` later."""
    jobs.settings.job_ttl_s = 60
    queued, _ = jobs.submit(SPEC)
    running, _ = jobs.submit(SPEC)
    link = worker(jobs)
    started, = take(link, 1)
    assert started.id == queued.id
    for job_id in (queued.id, running.id):
        for key in (jobs.keys.job(job_id), jobs.keys.events(job_id)):
            assert jobs.redis.ttl(key) == -1, key
    assert jobs.expired_jobs() == []
    jobs.redis.zadd(jobs.keys.expiry, {queued.id: 0})  # even a wrong index entry...
    jobs.forget_expired(queued.id)
    assert jobs.get(queued.id).status == "running"  # ...never deletes live work
    finish(link, started)
    assert 60 < jobs.redis.ttl(jobs.keys.job(queued.id)) <= 2 * 60 + 3600


def test_a_cancelled_queued_job_leaves_no_key_without_expiry(jobs):
    record, _ = jobs.submit(SPEC, "idem-1", "fp")
    assert jobs.cancel(record.id) == "cancelled"
    keys = [k.decode() for k in jobs.redis.scan_iter(match=f"*{record.id}*")]
    assert keys and all(jobs.redis.ttl(k) > 0 for k in keys), {k: jobs.redis.ttl(k) for k in keys}


def test_the_janitor_deletes_expired_jobs_and_all_their_keys_and_files(jobs, tmp_path):
    from api.janitor import delete_expired
    from patchdiff_core.service.store import LocalStore, result_key

    store = LocalStore(tmp_path)
    record, _ = jobs.submit(SPEC, "idem-1", "fp")
    link = worker(jobs)
    started, = take(link)
    store.put(result_key(record.id, "grid.png", 1), b"png", "image/png")
    store.put(result_key(record.id, "images/0.png", 1), b"png", "image/png")
    jobs.redis.set(jobs.keys.preview(record.id), b"png")
    assert finish(link, started) == DONE
    kept, _ = jobs.submit(SPEC)
    assert delete_expired(jobs, store) == 0 and (tmp_path / record.id).exists()  # retention not over
    jobs.redis.zadd(jobs.keys.expiry, {record.id: 0})
    assert delete_expired(jobs, store) == 1
    assert not (tmp_path / record.id).exists() and jobs.get(record.id) is None
    assert not list(jobs.redis.scan_iter(match=f"*{record.id}*"))
    assert jobs.get(kept.id) is not None
    assert jobs.submit(SPEC, "idem-1", "fp")[1]  # the idempotency key went with the job


def test_the_reaper_waits_after_a_restart_or_a_failover(jobs):
    reaper = Reaper(jobs.redis, jobs.settings, holder="test")
    ttl = jobs.settings.heartbeat_ttl_s
    jobs.redis.delete(jobs.keys.epoch)
    uptime = jobs.redis.info("server")["uptime_in_seconds"]
    # The first server a service sees: no wait unless that server itself started within a TTL, and
    # none after (it was recorded as the master since it started).
    assert reaper.paused() == (uptime < ttl) and reaper.paused() == (uptime < ttl)
    assert jobs.redis.hget(jobs.keys.epoch, "run_id").decode() == jobs.redis.info("server")["run_id"]
    jobs.redis.hset(jobs.keys.epoch, "run_id", "another-master")  # then a replica was promoted
    assert reaper.paused() and reaper.paused()  # a TTL from now, whatever the new master's uptime
    assert jobs.redis.hget(jobs.keys.epoch, "run_id").decode() == jobs.redis.info("server")["run_id"]
    jobs.redis.hset(jobs.keys.epoch, "since", 0)  # ... a TTL ago
    assert reaper.paused() == (uptime < ttl)


def test_the_reaper_waits_after_redis_failed_it(jobs):
    """Redis refusing writes (or away) for longer than the heartbeat TTL expires every heartbeat:
    the reaper must not take the workers that rode it out for dead."""
    record, _ = jobs.submit(SPEC)
    link = worker(jobs)
    take(link)
    reaper = Reaper(jobs.redis, jobs.settings, holder="test")
    reaper.paused = lambda: False
    reaper._healthy_since = -1e9  # healthy for long
    jobs.redis.config_set("maxmemory-policy", "noeviction")
    jobs.redis.config_set("maxmemory", 1)
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            reaper.reap()
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            link.report([], beat=True)  # the worker's heartbeat fails the same way
        time.sleep(0.6)  # longer than the TTL: the heartbeat has expired
    finally:
        jobs.redis.config_set("maxmemory", 0)
    assert reaper.reap() == []  # Redis is back: the reaper gives the workers a TTL to beat again
    for _ in range(3):  # the worker beats again, every 0.25 s, past a whole TTL
        link.report([], beat=True)
        time.sleep(0.25)
    assert reaper.reap() == [] and jobs.get(record.id).status == "running"
    expire(link)  # now it really stops beating
    assert reaper.reap() == [(record.id, "requeued")]


def test_one_process_at_a_time_holds_a_role(jobs):
    from patchdiff_core.service.lease import Lease

    a, b = (Lease(jobs.redis, jobs.keys, "janitor", holder, ttl_s=0.3) for holder in ("api-a", "api-b"))
    assert a.hold() and not b.hold() and a.hold()  # the holder renews; the other stands by
    time.sleep(0.4)  # the holder stopped renewing (it died)
    assert b.hold() and not a.hold()
    a.release()  # only the holder can give it up...
    assert not a.hold()
    b.release()  # ...and a process that stops does, so that another takes over at once
    assert a.hold()


def test_status_changes_and_their_webhooks_are_one_step(jobs):
    """The event of a move and its webhook delivery are written by the script that moves the job."""
    record, _ = jobs.submit(SPEC, webhook="https://example.com/h", webhook_events=["queued", "finished"])
    link = worker(jobs)
    started, = take(link)
    finish(link, started)
    queued = [f for _, f in jobs.redis.xrange(jobs.keys.webhooks) if f[b"job_id"] == record.id.encode()]
    assert [f[b"event"] for f in queued] == [b"queued", b"finished"]
    assert all(f[b"url"] == b"https://example.com/h" for f in queued)
    event_ids = [e.id for e in EventLog(jobs.redis, jobs.keys).history(record.id) if e.event in ("queued", "finished")]
    assert [f[b"event_id"].decode() for f in queued] == event_ids


def test_heartbeat_histograms_and_reannouncement(jobs):
    link = worker(jobs)
    link.report([], beat=True, histograms=[(1, "b3", 4), (1, "count", 4), (1, "sum", 0.02)])
    assert jobs.histogram("step_seconds") == {"b3": 4.0, "count": 4.0, "sum": 0.02}
    jobs.redis.delete(jobs.keys.worker("w1"))  # Redis lost it
    assert link.report([], beat=True).announce
    wait_until(lambda: jobs.live_workers()[0] == 1, 1, "the worker to stay alive")
