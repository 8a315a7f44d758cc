"""Fault tests with real processes: routing by model, a paused worker (fencing), graceful hand-back,
and a Redis outage while workers hold jobs."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
from service_harness import Processes, RedisServer, free_port, service_env, wait_until
from test_service_e2e import wait_job, weights  # noqa: F401 - weights is a fixture

pytestmark = pytest.mark.slow


def _job(url: str, job_id: str) -> dict:
    return httpx.get(f"{url}/jobs/{job_id}", timeout=10).json()


@pytest.fixture
def stack(tmp_path, weights):  # noqa: F811
    servers: list[RedisServer] = []

    def start(appendonly: bool = False, **extra: str):
        redis_server = RedisServer(tmp_path / "redis", appendonly=appendonly).start()
        servers.append(redis_server)
        # One job per worker at a time, so "2 workers hold jobs and 20 are queued" is what happens
        # (test_service_batching.py covers workers holding many jobs, SIGKILL included).
        env = service_env(redis_server.url, weights, tmp_path / "store", **{"PATCHDIFF_ENGINE_MAX_JOBS": "1", **extra})
        procs = Processes(env, tmp_path / "logs")
        created.append(procs)
        return redis_server, procs

    created: list[Processes] = []
    yield start
    for procs in created:
        procs.stop_all()
    for server in servers:
        server.stop()


def test_each_model_runs_on_a_worker_that_serves_it(stack):
    _, procs = stack()
    only_tiny = procs.worker(PATCHDIFF_WORKER_MODELS="tiny")
    only_tinyu = procs.worker(PATCHDIFF_WORKER_MODELS="tinyu")
    url = procs.api(free_port())
    wait_until(lambda: httpx.get(url + "/readyz").json().get("workers") == 2, 90, "both workers")
    ids = {}
    for i in range(3):
        for model in ("tiny", "tinyu"):
            job = httpx.post(url + "/generate", json={"model": model, "num_images": 1, "timesteps": "5", "seed": i})
            assert job.status_code == 202, job.text
            ids[job.json()["id"]] = model
    pids = {"tiny": only_tiny.pid, "tinyu": only_tinyu.pid}
    for job_id, model in ids.items():
        done = wait_job(url, job_id, timeout=90)
        assert done["status"] == "finished", (done, procs.logs())
        assert f"-{pids[model]}-" in done["worker"] and done["attempts"] == 1

    # The tinyu worker goes away: its model's jobs are refused (503), queued ones wait, none fails.
    os.kill(only_tinyu.pid, signal.SIGKILL)
    wait_until(lambda: httpx.get(url + "/readyz").json().get("workers") == 1, 30, "the heartbeat to expire")
    # (The API trusts what it read of the live workers for a second.)
    refused = wait_until(lambda: (lambda r: r if r.status_code != 202 else None)(
        httpx.post(url + "/generate", json={"model": "tinyu", "num_images": 1})), 5, "tinyu jobs to be refused")
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) > 0
    assert httpx.post(url + "/generate", json={"model": "tiny", "num_images": 1, "timesteps": "5"}).status_code == 202


def test_queued_job_waits_for_a_worker_of_its_model(stack):
    _, procs = stack()
    worker = procs.worker(PATCHDIFF_WORKER_MODELS="tinyu")
    url = procs.api(free_port())
    wait_until(lambda: httpx.get(url + "/readyz").status_code == 200, 90, "the worker")
    job = httpx.post(url + "/generate", json={"model": "tinyu", "num_images": 1, "timesteps": "1000"}).json()
    queued = httpx.post(url + "/generate", json={"model": "tinyu", "num_images": 1, "timesteps": "5"}).json()
    wait_until(lambda: _job(url, job["id"])["progress"]["step"] > 0, 60, "the job to run")
    os.kill(worker.pid, signal.SIGKILL)
    time.sleep(8)  # > heartbeat TTL (3 s): the reaper has run many times with no tinyu worker alive
    assert _job(url, queued["id"])["status"] == "queued"
    assert _job(url, job["id"])["status"] == "queued"  # requeued after its worker died, not failed
    procs.worker(PATCHDIFF_WORKER_MODELS="tinyu")
    assert wait_job(url, queued["id"], timeout=90)["status"] == "finished", procs.logs()


def test_paused_worker_cannot_overwrite_the_results(stack, tmp_path):
    """SIGSTOP a worker past its heartbeat TTL: its job is requeued and finished elsewhere; after
    SIGCONT the paused worker's attempt is refused and only the finished attempt's results exist."""
    _, procs = stack()
    workers = [procs.worker(), procs.worker()]
    url = procs.api(free_port())
    wait_until(lambda: httpx.get(url + "/readyz").json().get("workers") == 2, 90, "two workers")
    job = httpx.post(url + "/generate", json={"num_images": 2, "timesteps": "400", "seed": 11}).json()
    running = wait_until(lambda: (lambda j: j if j["progress"]["step"] > 3 else None)(_job(url, job["id"])), 60, "the job to run")
    paused = next(w for w in workers if f"-{w.pid}-" in running["worker"])
    other = next(w for w in workers if w is not paused)
    os.kill(paused.pid, signal.SIGSTOP)
    try:
        done = wait_job(url, job["id"], timeout=120)
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    assert done["status"] == "finished" and f"-{other.pid}-" in done["worker"], (done, procs.logs())
    published = httpx.get(done["links"]["record"]).json()
    assert published["attempt"] == 2 and published["worker"] == done["worker"]
    grid = httpx.get(done["links"]["grid"]).content
    # The resumed worker learns at its next heartbeat that the job is no longer its own, and deletes
    # what its attempt wrote.
    wait_until(lambda: sorted(p.name for p in (tmp_path / "store" / job["id"]).iterdir()) == ["a2"], 30,
               "the stale attempt's files to go")
    after = _job(url, job["id"])
    assert after["status"] == "finished" and after["worker"] == done["worker"]
    assert httpx.get(done["links"]["grid"]).content == grid
    assert paused.poll() is None  # the paused worker lives on and takes new jobs
    again = httpx.post(url + "/generate", json={"num_images": 1, "timesteps": "5"}).json()
    assert wait_job(url, again["id"], timeout=60)["status"] == "finished"


def test_sigterm_hands_the_job_back_without_spending_an_attempt(stack):
    _, procs = stack(PATCHDIFF_MAX_ATTEMPTS="1")
    first = procs.worker()
    url = procs.api(free_port())
    wait_until(lambda: httpx.get(url + "/readyz").status_code == 200, 90, "the worker")
    job = httpx.post(url + "/generate", json={"num_images": 2, "timesteps": "400", "seed": 5}).json()
    wait_until(lambda: _job(url, job["id"])["progress"]["step"] > 3, 60, "the job to run")
    os.kill(first.pid, signal.SIGTERM)
    assert first.wait(30) == 0
    handed = _job(url, job["id"])
    assert handed["status"] == "queued" and handed["attempts"] == 0 and "handed back" in handed["error"], handed
    second = procs.worker()
    done = wait_job(url, job["id"], timeout=120)
    assert done["status"] == "finished" and done["attempts"] == 1 and f"-{second.pid}-" in done["worker"], procs.logs()


def test_redis_killed_while_workers_hold_jobs(stack, tmp_path):
    """SIGKILL Redis while 2 workers hold jobs and 20 wait; restart it ~10 s later from its AOF:
    the workers ride it out and every job finishes."""
    redis_server, procs = stack(appendonly=True)
    workers = [procs.worker(), procs.worker()]
    url = procs.api(free_port())
    wait_until(lambda: httpx.get(url + "/readyz").json().get("workers") == 2, 90, "two workers")
    ids = [httpx.post(url + "/generate", json={"num_images": 1, "timesteps": "250", "seed": i}).json()["id"]
           for i in range(22)]
    wait_until(lambda: sum(_job(url, i)["status"] == "running" for i in ids) == 2, 60, "both workers busy")
    redis_server.kill()
    time.sleep(10)
    assert all(w.poll() is None for w in workers), procs.logs()
    restarted = RedisServer(tmp_path / "redis", port=redis_server.port, appendonly=True).start()
    try:
        final = [wait_job(url, i, timeout=240) for i in ids]
        assert [j["status"] for j in final] == ["finished"] * 22, (final, procs.logs())
        assert all(w.poll() is None for w in workers), procs.logs()
    finally:
        restarted.stop()
    worker_logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("worker-*.log"))
    assert "reconnect attempt" in worker_logs  # one line per attempt...
    assert "Traceback" not in worker_logs, worker_logs[-5000:]  # ...and no tracebacks


def test_redis_refusing_writes_while_jobs_run_loses_no_job(stack, tmp_path):
    """Redis at `maxmemory` (noeviction) refuses every write for several seconds while a worker holds
    jobs and finishes some of them: nothing finished is dropped, and once writes are allowed again
    every job ends finished. Submitting meanwhile is a 503 with Retry-After, never a 500."""
    import redis as redis_client

    redis_server, procs = stack(PATCHDIFF_ENGINE_MAX_JOBS="3")
    procs.worker()
    url = procs.api(free_port())
    wait_until(lambda: httpx.get(url + "/readyz").status_code == 200, 90, "the worker")
    ids = [httpx.post(url + "/generate", json={"num_images": 1, "timesteps": str(steps), "seed": i}).json()["id"]
           for i, steps in enumerate([250, 300, 350, 600, 650, 700])]
    wait_until(lambda: any(_job(url, i)["status"] == "running" for i in ids), 60, "a job to run")
    conn = redis_client.Redis.from_url(redis_server.url)
    conn.config_set("maxmemory-policy", "noeviction")
    conn.config_set("maxmemory", 1)  # every write is refused from now on: OOM
    try:
        refused = httpx.post(url + "/generate", json={"num_images": 1})
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) > 0, refused.text
        time.sleep(6)  # jobs reach their last step meanwhile: their results wait for Redis
    finally:
        conn.config_set("maxmemory", 0)
    final = [wait_job(url, i, timeout=120) for i in ids]
    assert [j["status"] for j in final] == ["finished"] * len(ids), (final, procs.logs())
    assert all(j["attempts"] == 1 for j in final)
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("worker-*.log"))
    assert "maxmemory" in logs  # the refusals really happened (OOM errors), and were ridden out
