"""What step-level batching buys, measured through the real HTTP API (`patchdiff serve`, one worker,
the demo model, 20 ancestral steps), the engine side by side with the old one-job-at-a-time worker
(the same worker with PATCHDIFF_ENGINE_MAX_JOBS=1: one job at a time, its images in batches).

    python benchmarks/batching.py                 # (a), (b), (c) for both paths, alternating
    python benchmarks/batching.py --batch-curve   # cost per image against rows per forward (the default's basis)

(a) N concurrent 1-image jobs vs one N-image job: ratio of wall times (goal <= 1.5).
(b) a 1-image job submitted while a 128-image job runs: its time from submission to finished over
    its time alone (goal <= 3).
(c) images/s and p50/p90 latency under Poisson arrivals of 1-image jobs at rising rates.
Times are the server's own (the job record's created_at .. finished_at).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
TERMINAL = ("finished", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """`patchdiff serve` with its embedded Redis, in a temporary directory."""

    def __init__(self, threads: int, **env: str):
        self.dir = Path(tempfile.mkdtemp(prefix="patchdiff-batching-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHDIFF_")}
        self.env.update({"PATCHDIFF_STORE_DIR": str(self.dir / "results"), "PATCHDIFF_API_PORT": str(self.port),
                         "PATCHDIFF_DEVICE": "cpu", "OMP_NUM_THREADS": str(threads),
                         "PATCHDIFF_MAX_IMAGES_PER_JOB": "256", **env})
        self.proc = None

    def __enter__(self) -> "Service":
        self.proc = subprocess.Popen([sys.executable, "-m", "patchdiff_core.cli", "serve"], env=self.env, cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    self.client = httpx.Client(base_url=self.url, timeout=30)
                    self.submit(1, 20, seed=0)  # warm-up: first-call costs stay out of the numbers
                    self.wait_all([self.submit(4, 20, seed=1)])
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("patchdiff serve did not become ready")

    def __exit__(self, *exc) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)

    def submit(self, num_images: int, steps: int, seed: int) -> str:
        body = {"model": "digits", "num_images": num_images, "timesteps": str(steps), "sampler": "ancestral",
                "guidance": 1.0, "seed": seed, "class_label": seed % 10}
        response = self.client.post("/generate", json=body)
        response.raise_for_status()
        return response.json()["id"]

    def wait_all(self, ids: list[str], poll: float = 0.02) -> dict[str, dict]:
        jobs: dict[str, dict] = {}
        while len(jobs) < len(ids):
            for job_id in ids:
                if job_id not in jobs:
                    job = self.client.get(f"/jobs/{job_id}").json()
                    if job["status"] in TERMINAL:
                        if job["status"] != "finished":
                            raise RuntimeError(f"job {job_id} {job['status']}: {job['error']}")
                        jobs[job_id] = job
            time.sleep(poll)
        return jobs


def span(jobs: dict[str, dict]) -> float:
    """From the first submission to the last finish."""
    return max(j["timings"]["finished_at"] for j in jobs.values()) - min(j["timings"]["created_at"] for j in jobs.values())


def latency(job: dict) -> float:
    return job["timings"]["finished_at"] - job["timings"]["created_at"]


def burst_ratio(svc: Service, n: int, steps: int) -> tuple[float, float]:
    """(a): wall time of n concurrent 1-image jobs, and of one n-image job."""
    many = span(svc.wait_all([svc.submit(1, steps, seed=100 + i) for i in range(n)]))
    one = span(svc.wait_all([svc.submit(n, steps, seed=200)]))
    return many, one


def behind_large(svc: Service, large: int, steps: int) -> tuple[float, float]:
    """(b): a 1-image job's latency alone, and submitted while a `large`-image job runs."""
    alone = latency(next(iter(svc.wait_all([svc.submit(1, steps, seed=300)]).values())))
    big = svc.submit(large, steps, seed=301)
    while svc.client.get(f"/jobs/{big}").json()["progress"]["step"] == 0:
        time.sleep(0.01)
    small = svc.submit(1, steps, seed=302)
    jobs = svc.wait_all([small, big])
    return alone, latency(jobs[small])


def poisson(svc: Service, rate: float, duration: float, steps: int, seed: int) -> dict:
    """(c): 1-image jobs arriving at `rate` per second for `duration` seconds."""
    rng, ids, lock = random.Random(seed), [], threading.Lock()
    start = time.monotonic()
    next_at = start
    while next_at - start < duration:
        time.sleep(max(0.0, next_at - time.monotonic()))
        with lock:
            ids.append(svc.submit(1, steps, seed=rng.randrange(1 << 30)))
        next_at += rng.expovariate(rate)
    jobs = svc.wait_all(ids)
    lat = sorted(latency(j) for j in jobs.values())
    return {"jobs": len(ids), "images_per_s": len(ids) / span(jobs), "p50": statistics.median(lat),
            "p90": lat[int(0.9 * (len(lat) - 1))]}


def batch_curve(threads: int, sizes: list[int], repeats: int) -> None:
    import torch

    from patchdiff_core.generation.pipeline import SamplingModel

    torch.set_num_threads(threads)
    model = SamplingModel.load("digits", device="cpu")
    forward = model.forwards[0]
    print("| rows per forward | ms per forward | ms per image | relative to 1 row |\n|--:|--:|--:|--:|")
    base = None
    for b in sizes:
        x, t, y = torch.randn(b, 3, 32, 32), torch.full((b,), 500), torch.zeros(b, dtype=torch.long)
        for _ in range(3):
            forward(x, t, y)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            forward(x, t, y)
            times.append(time.perf_counter() - started)
        ms = statistics.median(times) * 1000
        base = base or ms
        print(f"| {b} | {ms:.1f} | {ms / b:.2f} | {ms / base:.2f} |", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--burst", type=int, default=16, help="N for (a)")
    parser.add_argument("--large", type=int, default=128, help="the large job of (b)")
    parser.add_argument("--rates", default="2,4,8,16", help="arrival rates (jobs/s) for (c); empty to skip")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals per rate")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the worker")
    parser.add_argument("--max-batch", type=int, default=0, help="PATCHDIFF_ENGINE_MAX_BATCH (0 = the default)")
    parser.add_argument("--batch-curve", action="store_true", help="only print the cost per image by batch size")
    parser.add_argument("--sizes", default="1,2,4,8,16,32,64")
    args = parser.parse_args(argv)
    if args.batch_curve:
        return batch_curve(args.threads, [int(s) for s in args.sizes.split(",")], repeats=9)

    paths = {"engine": {}, "one job at a time": {"PATCHDIFF_ENGINE_MAX_JOBS": "1"}}
    common = {"PATCHDIFF_ENGINE_MAX_BATCH": str(args.max_batch)} if args.max_batch else {}
    results: dict[str, dict] = {name: {} for name in paths}
    for name, env in paths.items():  # one service per path, measured back to back
        with Service(args.threads, **common, **env) as svc:
            results[name]["a"] = burst_ratio(svc, args.burst, args.steps)
            results[name]["b"] = behind_large(svc, args.large, args.steps)
            rates = [float(r) for r in args.rates.split(",") if r]
            results[name]["c"] = [(rate, poisson(svc, rate, args.duration, args.steps, seed=int(rate * 10))) for rate in rates]
        print(f"measured: {name}", file=sys.stderr, flush=True)

    print(f"\ndemo model, {args.steps} ancestral steps, one worker, {args.threads} torch threads\n")
    print("| path | (a) 16 × 1-image jobs, s | one 16-image job, s | **ratio (a)** | (b) 1-image alone, s "
          f"| behind a {args.large}-image job, s | **ratio (b)** |\n|---|--:|--:|--:|--:|--:|--:|")
    for name, r in results.items():
        (many, one), (alone, behind) = r["a"], r["b"]
        print(f"| {name} | {many:.2f} | {one:.2f} | **{many / one:.2f}** | {alone:.2f} | {behind:.2f} | **{behind / alone:.2f}** |")
    if any(r["c"] for r in results.values()):
        print("\n| arrivals / s | path | jobs | images / s | p50 latency, s | p90 latency, s |\n|--:|---|--:|--:|--:|--:|")
        for i, (rate, _) in enumerate(results["engine"]["c"]):
            for name, r in results.items():
                c = r["c"][i][1]
                print(f"| {rate:g} | {name} | {c['jobs']} | {c['images_per_s']:.2f} | {c['p50']:.2f} | {c['p90']:.2f} |")


if __name__ == "__main__":
    main()
