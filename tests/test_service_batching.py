"""End to end through the batching engine (real redis-server, worker and API processes): concurrent
mixed jobs share batches and give `patchdiff sample`'s pictures; cancel inside a shared batch; a
worker SIGKILLed while holding several jobs; a large job and a burst of small ones."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image
from service_harness import Processes, RedisServer, free_port, service_env, wait_until, write_weights_dir

pytestmark = pytest.mark.slow
TERMINAL = ("finished", "failed", "cancelled")


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_model_file):
    return write_weights_dir(tmp_path_factory.mktemp("weights"), tiny_model_file, "tiny")


def start(tmp, weights, workers: int = 1, **extra):
    redis_server = RedisServer(tmp / "redis").start()
    env = service_env(redis_server.url, weights, tmp / "store", PATCHDIFF_ENGINE_MAX_BATCH="8", **extra)
    procs = Processes(env, tmp / "logs")
    pool = [procs.worker() for _ in range(workers)]
    url = procs.api(free_port())
    wait_until(lambda: httpx.get(url + "/readyz").json().get("workers") == workers, 60, "the workers")
    return redis_server, procs, pool, url, env


def status(url, job_id):
    return httpx.get(f"{url}/jobs/{job_id}").json()


def wait_all(url, ids, timeout=180):
    return wait_until(lambda: (lambda js: js if all(j["status"] in TERMINAL for j in js.values()) else None)(
        {i: status(url, i) for i in ids}), timeout, "all jobs to end")


def service_images(url, job) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(httpx.get(link).content))) for link in job["links"]["images"]])


def cli_images(env, tmp, request: dict) -> np.ndarray:
    """The same request through `patchdiff sample` (its npz holds the uint8 images)."""
    out = tmp / f"cli-{request['seed']}.npz"
    args = [sys.executable, "-m", "patchdiff_core.cli", "sample", "--model", "tiny", "--num-images",
            str(request["num_images"]), "--timesteps", request["timesteps"], "--sampler", request["sampler"],
            "--guidance", str(request["guidance"]), "--seed", str(request["seed"]), "--action", "npz",
            "--out", str(out), "--device", "cpu", "--quiet"]
    for label in request.get("class_labels") or []:
        args += ["--class-label", str(label)]
    subprocess.run(args, env=env, check=True, capture_output=True, timeout=300)
    return np.load(out)["arr_0"]


MIXED = [
    {"num_images": 3, "timesteps": "39", "sampler": "ancestral", "guidance": 1.0, "seed": 1, "class_labels": [0, 1, 2]},
    {"num_images": 2, "timesteps": "36", "sampler": "ddim", "guidance": 3.0, "seed": 2, "class_labels": [7, 7]},
    {"num_images": 4, "timesteps": "42", "sampler": "ancestral", "guidance": 1.5, "seed": 3, "class_labels": [4, 5, 6, 9]},
    {"num_images": 1, "timesteps": "ddim40", "sampler": "ddim", "guidance": 1.0, "seed": 4, "class_labels": [8]},
]


def test_mixed_concurrent_jobs_share_batches_and_match_the_cli(tmp_path, weights):
    redis_server, procs, (worker,), url, env = start(tmp_path, weights)
    try:
        # All four are queued before the worker looks (it is stopped meanwhile), so that its engine
        # takes them together: an idle worker starts the first job it sees at once, and one that is
        # sampling takes new jobs at its next report, by which time a job of the tiny model may be done.
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            ids = [httpx.post(url + "/generate", json={"model": "tiny", **r}).json()["id"] for r in MIXED]
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        jobs = wait_all(url, ids)
        assert all(j["status"] == "finished" for j in jobs.values()), (jobs, procs.logs())
        # They ran side by side in one worker: their run times overlap.
        runs = [(j["timings"]["started_at"], j["timings"]["finished_at"]) for j in jobs.values()]
        assert max(s for s, _ in runs) < min(f for _, f in runs)
        for job_id, request in zip(ids, MIXED):
            ours, cli = service_images(url, jobs[job_id]), cli_images(env, tmp_path, request)
            assert ours.shape == cli.shape
            assert np.abs(ours.astype(int) - cli).max() <= 1, request
    finally:
        procs.stop_all()
        redis_server.stop()


def test_cancel_inside_a_shared_batch_and_a_burst_behind_a_large_job(tmp_path, weights):
    redis_server, procs, _, url, env = start(tmp_path, weights)
    try:
        large = httpx.post(url + "/generate", json={"model": "tiny", "num_images": 48, "timesteps": "40", "seed": 9}).json()
        wait_until(lambda: status(url, large["id"])["progress"]["step"] > 0, 60, "the large job to run")
        doomed = httpx.post(url + "/generate", json={"model": "tiny", "num_images": 4, "timesteps": "200", "seed": 10}).json()
        burst = [httpx.post(url + "/generate", json={"model": "tiny", "num_images": 1, "timesteps": "10", "seed": 20 + i}).json()
                 for i in range(6)]
        wait_until(lambda: status(url, doomed["id"])["progress"]["step"] > 0, 60, "the doomed job to share the batch")
        assert httpx.delete(f"{url}/jobs/{doomed['id']}").status_code == 202
        jobs = wait_all(url, [large["id"], doomed["id"], *(b["id"] for b in burst)], timeout=300)
        assert jobs[doomed["id"]]["status"] == "cancelled"
        assert 0 < jobs[doomed["id"]]["progress"]["step"] < 4 * 200
        assert all(jobs[b["id"]]["status"] == "finished" for b in burst), procs.logs()
        assert jobs[large["id"]]["status"] == "finished"
        # The small jobs did not wait for the large one: all of them finished first.
        large_end = jobs[large["id"]]["timings"]["finished_at"]
        assert all(jobs[b["id"]]["timings"]["finished_at"] < large_end for b in burst)
        # The cancel left the others' pictures alone.
        request = {"num_images": 1, "timesteps": "10", "sampler": "ancestral", "guidance": 1.0, "seed": 20}
        ours, cli = service_images(url, jobs[burst[0]["id"]]), cli_images(env, tmp_path, request)
        assert np.abs(ours.astype(int) - cli).max() <= 1
    finally:
        procs.stop_all()
        redis_server.stop()


def test_worker_killed_holding_several_jobs_all_finish_elsewhere(tmp_path, weights):
    redis_server, procs, (first,), url, env = start(tmp_path, weights)
    try:
        ids = [httpx.post(url + "/generate", json={"model": "tiny", "num_images": 2, "timesteps": "1000", "seed": s}).json()["id"]
               for s in range(4)]
        wait_until(lambda: all(status(url, i)["status"] == "running" for i in ids), 60, "one worker to hold all jobs")
        assert {status(url, i)["worker"] for i in ids} == {status(url, ids[0])["worker"]}
        second = procs.worker()
        wait_until(lambda: httpx.get(url + "/readyz").json().get("workers") == 2, 60, "the second worker")
        os.kill(first.pid, signal.SIGKILL)
        jobs = wait_all(url, ids, timeout=300)
        for job in jobs.values():
            assert job["status"] == "finished", (job, procs.logs())
            assert job["attempts"] == 2 and f"-{second.pid}-" in job["worker"]
    finally:
        procs.stop_all()
        redis_server.stop()
