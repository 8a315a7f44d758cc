"""The checks of `make compose-test` (compose_test.sh), run on the host against the stack's published
API port only; `docker compose` (the command after `--`) restarts, stops and starts containers.

1. /readyz turns 200 (Redis reachable, a live worker); the bucket's retention rule was set (s3-init).
2. POST /generate (202 with a queue position) -> poll -> finished; the grid PNG comes through the
   API from the S3 store and is a real image of the requested size.
3. A second, longer job; the worker container is restarted while it runs (`restart --timeout 0`:
   killed at once, so the job is cut short whatever the machine's speed) -> the heartbeat reaper
   requeues it (the worker hands it back on SIGTERM, or the reaper requeues it if the kill came first)
   and it still finishes on the restarted worker.
4. `docker compose down` (volumes kept) -> `up` -> both finished jobs and their grids are still there,
   byte for byte (Redis AOF volume, S3 volume).
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


def log(msg: str) -> None:
    print(f"[check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


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
    raise SystemExit(f"FAIL: {what} not within {timeout:.0f} s (last: {last!r})")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("compose", nargs=argparse.REMAINDER, help="-- docker compose -f ... (the stack)")
    args = ap.parse_args()
    compose = [c for c in args.compose if c != "--"]
    base = f"http://127.0.0.1:{args.port}"
    http = httpx.Client(base_url=base, timeout=10)

    def sh(*cmd: str) -> str:
        log("$ docker compose " + " ".join(cmd))
        out = subprocess.run([*compose, *cmd], check=True, capture_output=True, text=True)
        return out.stdout + out.stderr

    def ready() -> bool:
        return http.get("/readyz").status_code == 200

    def finished(job_id: str, timeout: float) -> dict:
        def done():
            j = http.get(f"/jobs/{job_id}").json()
            if j["status"] in ("failed", "cancelled"):
                raise SystemExit(f"FAIL: job {job_id} {j['status']}: {j.get('error')}")
            return j if j["status"] == "finished" else None
        return wait(done, timeout, f"job {job_id} finished", interval=0.5)

    def grid(job_id: str) -> bytes:
        r = http.get(f"/jobs/{job_id}/grid.png")
        if r.status_code != 200 or r.headers["content-type"] != "image/png":
            raise SystemExit(f"FAIL: grid of {job_id}: {r.status_code} {r.headers.get('content-type')} {r.text[:200]}")
        return r.content

    t = started = time.monotonic()
    wait(ready, 300, "GET /readyz 200 (Redis and a live worker)", interval=1)
    log(f"ready after {time.monotonic() - t:.1f} s: {http.get('/readyz').json()}")
    init_log = sh("logs", "--no-color", "s3-init")
    if "lifecycle rule: prefix 'jobs/' expires after" not in init_log:
        raise SystemExit(f"FAIL: s3-init set no retention rule:\n{init_log}")
    log("retention rule set by s3-init: " + next(line for line in init_log.splitlines() if "lifecycle rule" in line).strip())

    # 1. A job end to end.
    t = time.monotonic()
    r = http.post("/generate", json={"num_images": 16, "class_label": 7, "seed": 42})
    if r.status_code != 202 or (r.json()["status"] == "queued" and not isinstance(r.json().get("queue_position"), int)):
        raise SystemExit(f"FAIL: POST /generate: {r.status_code} {r.text[:300]}")
    first = r.json()
    log(f"POST /generate -> 202, status {first['status']}, queue_position {first['queue_position']}")
    j1 = finished(first["id"], 300)
    png1 = grid(first["id"])
    img = Image.open(io.BytesIO(png1))
    img.load()
    if img.size != (4 * 34 + 2, 4 * 34 + 2):  # 4 x 4 images of 32 pixels, 2-pixel gaps
        raise SystemExit(f"FAIL: grid of 16 32x32 images is {img.size}")
    log(f"job 1 finished in {time.monotonic() - t:.1f} s (run {j1['timings']['run_s']} s); grid {img.size} "
        f"{len(png1)} bytes, sha256 {hashlib.sha256(png1).hexdigest()[:16]}")
    image0 = http.get(f"/jobs/{first['id']}/images/0.png")
    assert image0.status_code == 200 and image0.content[:8] == b"\x89PNG\r\n\x1a\n", image0.status_code

    # 2. Restart the worker container in the middle of a job.
    r = http.post("/generate", json={"num_images": 16, "class_label": 3, "seed": 7, "timesteps": "150"})
    assert r.status_code == 202, r.text
    second = r.json()["id"]
    j = wait(lambda: (lambda j: j if j["status"] == "running" and j["progress"]["step"] >= 3 else None)(
        http.get(f"/jobs/{second}").json()), 300, "job 2 running", interval=0.1)
    if j["progress"]["step"] >= j["progress"]["total"] - 10:
        raise SystemExit(f"FAIL: job 2 too close to its end to test a restart: {j['progress']}")
    log(f"job 2 running, step {j['progress']['step']}/{j['progress']['total']}: restarting the worker")
    t = time.monotonic()
    sh("restart", "--timeout", "0", "worker")
    j2 = finished(second, 600)
    log(f"job 2 finished {time.monotonic() - t:.1f} s after the restart, attempts {j2['attempts']}, "
        f"note {j2['error']!r}")
    # Interrupted either way: the worker caught SIGTERM and handed the job back (no attempt charged),
    # or it died first and the reaper requeued it (a second attempt).
    if j2["attempts"] < 2 and not (j2["error"] or "").startswith(("handed back", "requeued")):
        raise SystemExit(f"FAIL: job 2 was not interrupted by the restart (attempts {j2['attempts']})")
    png2 = grid(second)

    # 3. down (volumes kept) -> up: results and job records survive.
    t = time.monotonic()
    sh("down")
    sh("up", "-d")
    wait(lambda: http.get("/healthz").status_code == 200, 180, "API up again", interval=1)
    log(f"down + up: API answering after {time.monotonic() - t:.1f} s")
    for job_id, png in ((first["id"], png1), (second, png2)):
        j = http.get(f"/jobs/{job_id}").json()
        if j["status"] != "finished":
            raise SystemExit(f"FAIL: after down/up job {job_id} is {j['status']}")
        if grid(job_id) != png:
            raise SystemExit(f"FAIL: after down/up the grid of {job_id} differs")
    log("after down + up: both jobs finished, grids identical")
    wait(ready, 300, "GET /readyz 200 after down/up", interval=1)
    log(f"all checks passed in {time.monotonic() - started:.0f} s")
    print("compose-test: 4 passed, 0 failed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
