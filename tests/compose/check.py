"""The checks of `make compose-test` (compose_test.sh), run on the host against the scaled stack:
the proxy's published port (the API's one address), and each API replica on the ephemeral port that
tests/compose/standins.yml publishes for it (`docker compose port --index N api 8000`). `docker
compose` (the command after `--`) restarts, stops and starts containers.

1. Through the proxy, /readyz turns 200 and counts every worker replica; each API replica is ready
   on its own port; the bucket's retention rule was set (s3-init).
2. POST /generate (202 with a queue position) through the proxy -> poll -> finished; the grid PNG
   comes through the API from the S3 store and is a real image of the requested size.
3. Jobs submitted through each API replica all finish; each one's grid is fetched through the other
   replica and through the proxy, byte for byte the same.
4. A longer job; the worker container that runs it is restarted while it runs (`docker restart
   -t 0`: killed at once, so the job is cut short whatever the machine's speed) -> it is handed
   back (SIGTERM) or requeued by the heartbeat reaper (a kill) and still finishes.
5. Metrics: exactly one replica (the `metrics` lease holder) exports the service-wide job metrics,
   so their sum over the replicas equals the jobs submitted and finished; every replica exports
   `patchdiff_redis_up` 1; the replicas' own `POST /generate` counters add up to the jobs submitted
   (every request went to exactly one replica, through the proxy or directly).
6. GPU claims across the worker containers: one process in each claims a GPU (worker/gpus.py, with
   3 GPUs said to be there) in the folder of PATCHDIFF_GPU_LOCK_DIR, the volume they share: three
   different GPUs, and a fourth claim finds none free.
7. `docker compose down` (volumes kept) -> `up` (scaled again) -> through the same proxy port and
   through each new replica, every finished job and its grid are still there, byte for byte
   (Redis AOF volume, S3 volume).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import time

import httpx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

# Holds a claimed GPU lock until its stdin closes (the check closes it), at most a minute.
CLAIM_GPU = """
import os, signal, sys
from pathlib import Path
from worker.gpus import claim_gpu
signal.alarm(60)
claim = claim_gpu(Path(os.environ["PATCHDIFF_GPU_LOCK_DIR"]), 3)
print("claimed", claim.index if claim else "none", flush=True)
sys.stdin.read()
"""


def log(msg: str) -> None:
    print(f"[check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fail(msg: str):
    raise SystemExit(f"FAIL: {msg}")


def wait(pred, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(interval)
    fail(f"{what} not within {timeout:.0f} s (last: {last!r})")


def finished(http: httpx.Client, job_id: str, timeout: float) -> dict:
    def done():
        j = http.get(f"/jobs/{job_id}").json()
        if j["status"] in ("failed", "cancelled"):
            fail(f"job {job_id} {j['status']}: {j.get('error')}")
        return j if j["status"] == "finished" else None
    return wait(done, timeout, f"job {job_id} finished", interval=0.5)


def grid(http: httpx.Client, job_id: str) -> bytes:
    r = http.get(f"/jobs/{job_id}/grid.png")
    if r.status_code != 200 or r.headers["content-type"] != "image/png":
        fail(f"grid of {job_id} from {http.base_url}: {r.status_code} {r.headers.get('content-type')} {r.text[:200]}")
    return r.content


def submit(http: httpx.Client, **request) -> str:
    r = http.post("/generate", json=request)
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    if r.status_code != 202 or (body.get("status") == "queued" and not isinstance(body.get("queue_position"), int)):
        fail(f"POST /generate through {http.base_url}: {r.status_code} {r.text[:300]}")
    return body["id"]


def metrics(http: httpx.Client) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one replica's /metrics."""
    r = http.get("/metrics")
    if r.status_code != 200:
        fail(f"GET /metrics of {http.base_url}: {r.status_code}")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True, help="the proxy's port on 127.0.0.1")
    ap.add_argument("--api-replicas", type=int, default=2)
    ap.add_argument("--worker-replicas", type=int, default=3)
    ap.add_argument("compose", nargs=argparse.REMAINDER, help="-- docker compose -f ... (the stack)")
    args = ap.parse_args()
    compose = [c for c in args.compose if c != "--"]
    docker = compose[0]
    n_api, n_workers = args.api_replicas, args.worker_replicas
    if n_api < 2 or n_workers < 3:
        fail("the checks need 2 API replicas and 3 workers at least")
    proxy = httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=10)
    submitted: list[str] = []

    def sh(*cmd: str, quiet: bool = False) -> str:
        if not quiet:
            log("$ docker compose " + " ".join(cmd))
        out = subprocess.run([*compose, *cmd], check=True, capture_output=True, text=True, timeout=600)
        return out.stdout + out.stderr

    def replicas() -> list[httpx.Client]:
        """A client for each API replica, on the port Docker gave it (new at each start)."""
        clients = []
        for index in range(1, n_api + 1):
            address = sh("port", "--index", str(index), "api", "8000", quiet=True).strip().splitlines()[-1]
            clients.append(httpx.Client(base_url=f"http://{address}", timeout=10))
        return clients

    def ready_with_workers(http: httpx.Client):
        r = http.get("/readyz")
        return r.json() if r.status_code == 200 and r.json().get("workers") == n_workers else None

    t = started = time.monotonic()
    health = wait(lambda: ready_with_workers(proxy), 420, f"GET /readyz 200 with {n_workers} live workers", interval=1)
    log(f"ready after {time.monotonic() - t:.1f} s through the proxy: {health}")
    apis = replicas()
    for i, api in enumerate(apis, 1):
        wait(lambda api=api: api.get("/readyz").status_code == 200, 120, f"API replica {i} ready")
    log("API replicas ready on " + ", ".join(str(a.base_url) for a in apis))
    init_log = sh("logs", "--no-color", "s3-init")
    if "lifecycle rule: prefix 'jobs/' expires after" not in init_log:
        fail(f"s3-init set no retention rule:\n{init_log}")
    log("retention rule set by s3-init: " + next(line for line in init_log.splitlines() if "lifecycle rule" in line).strip())

    # 1. A job end to end, through the proxy.
    t = time.monotonic()
    first = submit(proxy, num_images=16, class_label=7, seed=42)
    submitted.append(first)
    j1 = finished(proxy, first, 300)
    png1 = grid(proxy, first)
    img = Image.open(io.BytesIO(png1))
    img.load()
    if img.size != (4 * 34 + 2, 4 * 34 + 2):  # 4 x 4 images of 32 pixels, 2-pixel gaps
        fail(f"grid of 16 32x32 images is {img.size}")
    log(f"job 1 (proxy) finished in {time.monotonic() - t:.1f} s (run {j1['timings']['run_s']} s) on {j1['worker']}; "
        f"grid {img.size} {len(png1)} bytes, sha256 {hashlib.sha256(png1).hexdigest()[:16]}")
    image0 = proxy.get(f"/jobs/{first}/images/0.png")
    if image0.status_code != 200 or image0.content[:8] != b"\x89PNG\r\n\x1a\n":
        fail(f"image 0 of job 1: {image0.status_code}")
    grids = {first: png1}

    # 2. Jobs through each replica; each read back through another replica and through the proxy.
    t = time.monotonic()
    through: dict[str, int] = {}
    for i, api in enumerate(apis):
        for k in range(2):
            job_id = submit(api, num_images=4, class_label=k + 2 * i, seed=100 + 10 * i + k)
            submitted.append(job_id)
            through[job_id] = i
    workers_used = set()
    for job_id, i in through.items():
        other = apis[(i + 1) % n_api]
        j = finished(other, job_id, 300)
        workers_used.add(j["worker"])
        png = grid(other, job_id)
        if grid(proxy, job_id) != png:
            fail(f"the grid of {job_id} differs between replica {(i + 1) % n_api + 1} and the proxy")
        grids[job_id] = png
    log(f"{len(through)} jobs submitted through the {n_api} replicas ({len(through) // n_api} each) finished in "
        f"{time.monotonic() - t:.1f} s on {len(workers_used)} worker(s); each grid read through another replica "
        "and the proxy, identical")

    # 3. Restart the worker container that runs a job, in the middle of it.
    second = submit(proxy, num_images=16, class_label=3, seed=7, timesteps="150")
    submitted.append(second)

    def running() -> dict | None:
        j = proxy.get(f"/jobs/{second}").json()
        return j if j["status"] == "running" and j["progress"]["step"] >= 3 else None
    j = wait(running, 300, "job 2 running", interval=0.1)
    if j["progress"]["step"] >= j["progress"]["total"] - 10:
        fail(f"job 2 too close to its end to test a restart: {j['progress']}")
    hostname = j["worker"].split("-")[0]  # worker names are <hostname>-<pid>-<random>; a container's hostname is its id
    containers = sh("ps", "-q", "worker", quiet=True).split()
    if len(containers) != n_workers:
        fail(f"{len(containers)} worker containers, expected {n_workers}")
    running_it = [c for c in containers if c.startswith(hostname)]
    if len(running_it) != 1:
        fail(f"job 2's worker {j['worker']} is none of the worker containers {containers}")
    log(f"job 2 running on {j['worker']}, step {j['progress']['step']}/{j['progress']['total']}: restarting its container")
    t = time.monotonic()
    log(f"$ {docker} restart -t 0 {running_it[0][:12]}")
    subprocess.run([docker, "restart", "-t", "0", running_it[0]], check=True, capture_output=True, timeout=120)
    j2 = finished(proxy, second, 600)
    log(f"job 2 finished {time.monotonic() - t:.1f} s after the restart on {j2['worker']}, attempts {j2['attempts']}, "
        f"note {j2['error']!r}")
    # Interrupted either way: the worker caught SIGTERM and handed the job back (no attempt charged),
    # or it died first and the reaper requeued it (a second attempt).
    if j2["attempts"] < 2 and not (j2["error"] or "").startswith(("handed back", "requeued")):
        fail(f"job 2 was not interrupted by the restart (attempts {j2['attempts']})")
    grids[second] = grid(proxy, second)
    wait(lambda: ready_with_workers(proxy), 300, f"{n_workers} live workers again after the restart", interval=1)

    # 4. Metrics: the service-wide job metrics once over the replicas, each replica's own requests.
    def check_metrics(order: list[int]) -> int:
        scraped = {i: metrics(apis[i]) for i in order}
        exporters = [i for i, m in scraped.items() if ("patchdiff_jobs_submitted_total", ()) in m]
        if len(exporters) != 1:
            fail(f"{len(exporters)} replicas export patchdiff_jobs_submitted_total (replicas {[i + 1 for i in exporters]}); "
                 "exactly one should (the metrics lease)")
        submitted_sum = sum(m.get(("patchdiff_jobs_submitted_total", ()), 0) for m in scraped.values())
        finished_sum = sum(m.get(("patchdiff_jobs_completed_total", (("state", "finished"),)), 0) for m in scraped.values())
        if submitted_sum != len(submitted) or finished_sum != len(submitted):
            fail(f"over the replicas: {submitted_sum} submitted, {finished_sum} finished; "
                 f"the test submitted {len(submitted)}, all finished")
        holder = scraped[exporters[0]]
        if holder.get(("patchdiff_workers", ())) != n_workers:
            fail(f"patchdiff_workers {holder.get(('patchdiff_workers', ()))}, expected {n_workers}")
        for i, m in scraped.items():
            if m.get(("patchdiff_redis_up", ())) != 1:
                fail(f"replica {i + 1}: patchdiff_redis_up {m.get(('patchdiff_redis_up', ()))}")
        posts = {i: int(sum(v for (name, labels), v in m.items() if name == "patchdiff_http_requests_total"
                            and dict(labels).get("route") == "/generate" and dict(labels).get("method") == "POST"
                            and dict(labels).get("status") == "202")) for i, m in scraped.items()}
        if sum(posts.values()) != len(submitted) or any(posts[i] < len(through) // n_api for i in posts):
            fail(f"POST /generate 202s per replica {posts}: they should add up to {len(submitted)}, "
                 f"each replica at least the {len(through) // n_api} sent to it directly")
        log(f"metrics (scraped in the order {[i + 1 for i in order]}): replica {exporters[0] + 1} alone exports the job "
            f"metrics: submitted {int(submitted_sum)}, finished {int(finished_sum)}, "
            f"requeued {int(holder.get(('patchdiff_jobs_requeued_total', ()), 0))}, workers {int(holder[('patchdiff_workers', ())])}; "
            f"sums over replicas = {len(submitted)} submitted; redis_up 1 on all; POST /generate 202s per replica "
            + ", ".join(f"{i + 1}: {posts[i]}" for i in sorted(posts)))
        return exporters[0]

    holder = check_metrics(list(range(n_api)))
    if check_metrics(list(reversed(range(n_api)))) != holder:
        fail("the replica exporting the job metrics changed between two scrapes")

    # 5. GPU claims across the worker containers, through their shared lock folder.
    # One claim at a time, each held while the next is made: worker 1 gets GPU 0, worker 2 GPU 1, ...
    holders, claims = [], []
    try:
        for index in [*range(1, n_workers + 1), 1]:
            p = subprocess.Popen([*compose, "exec", "-T", "--index", str(index), "worker", "python", "-c", CLAIM_GPU],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            holders.append(p)
            line = p.stdout.readline().strip()
            if not line.startswith("claimed "):
                fail(f"GPU claim in worker {index}: {line!r} {p.stderr.read() if p.poll() is not None else ''}")
            claims.append(line.split()[1])
    finally:
        for p in holders:
            p.stdin.close()  # the holder reads to the end of its stdin, then exits: its lock goes with it
        for p in holders:
            p.wait(30)
    expected = ["0", "1", "2"] + ["none"] * (n_workers - 3) + ["none"]
    if claims != expected:
        fail(f"GPU claims in workers 1..{n_workers}, then 1 again: {claims}; expected {expected}")
    log(f"GPU claims in workers 1..{n_workers} then 1 again, with 3 GPUs said to be there: {claims}")

    # 6. down (volumes kept) -> up: results and job records survive, on the same port.
    t = time.monotonic()
    sh("down")
    sh("up", "-d", "--scale", f"api={n_api}", "--scale", f"worker={n_workers}")
    wait(lambda: proxy.get("/healthz").status_code == 200, 180, "API up again through the proxy", interval=1)
    log(f"down + up: API answering on the same port after {time.monotonic() - t:.1f} s")
    apis = replicas()
    for i, api in enumerate(apis, 1):
        wait(lambda api=api: api.get("/healthz").status_code == 200, 120, f"API replica {i} up again")
    for job_id, png in grids.items():
        for http in (proxy, *apis):
            j = http.get(f"/jobs/{job_id}").json()
            if j["status"] != "finished":
                fail(f"after down/up job {job_id} is {j['status']} through {http.base_url}")
            if grid(http, job_id) != png:
                fail(f"after down/up the grid of {job_id} differs through {http.base_url}")
    log(f"after down + up: all {len(grids)} jobs finished, grids identical through the proxy and each replica")
    wait(lambda: ready_with_workers(proxy), 300, "GET /readyz 200 with every worker after down/up", interval=1)
    log(f"all checks passed in {time.monotonic() - started:.0f} s")
    print("compose-test: 7 passed, 0 failed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
