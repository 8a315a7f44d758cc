"""The standing soak: jobs from several clients against a real service while it is being broken.

    python benchmarks/soak.py --seconds 300            # `make soak`
    python benchmarks/soak.py --seconds 60 --json      # what tests/test_soak.py runs

A private stack: its own redis-server (append-only, fsync always), the API under uvicorn, 2 workers,
serving a tiny random model built here (or `--weights weights/digits.safetensors`). For `--seconds`:

- `--clients` threads submit jobs (1-4 images, 10-30 steps); each submission carries an idempotency
  key and is retried with it on a 503 or a broken connection, so every job a client was told about
  is known exactly once;
- a worker is SIGKILLed every `--kill-every` seconds (the other keeps working) and a new one started;
- Redis is SIGKILLed once, half-way, and restarted from its append-only file;
- `--stallers` clients open `/jobs/{id}/events` and never read past the response head (under their
  own API key), and `--followers` clients follow jobs' events to the end, resuming by id.

Then every job is waited for (`--drain` seconds at most) and the script prints:

- lost: accepted jobs whose record is gone; stuck: not ended after the drain;
- duplicated: jobs with more than one terminal event in their event stream (a job finished twice);
  ended without their terminal event: a job whose status ended but whose stream has no such event
  (its webhook never hears of the end);
- failed, by cause; files valid: every PNG of every finished job, fetched and decoded;
- the SSE followers: streams ended by a terminal event, resumed, refused, broken (a cut response).

The service is driven only through HTTP and processes; the event streams are read back from Redis
(XRANGE, read-only) only to count terminal events, which the HTTP stream stops at.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from service_harness import Processes, RedisServer, free_port, service_env, wait_until, write_weights_dir  # noqa: E402

TERMINAL = ("finished", "failed", "cancelled")
STALLER_KEY = "soak-staller"  # the stalled readers' key; one submitter uses it too, so they have jobs to watch
CLIENT_KEYS = ["soak-client-a", "soak-client-b", STALLER_KEY]
TINY = {"res": 16, "c": 32, "n_blocks": 1, "attn_resos": [4], "c_mult": [1, 2], "num_classes": 10, "patch_size": 2,
        "se": False}


def build_tiny_model(path: Path) -> Path:
    """A small random class-conditional model (as tests/conftest.py's `tiny_model_file`)."""
    import torch

    from patchdiff_core.model.checkpoint import save_model
    from patchdiff_core.model.config import ModelConfig
    from patchdiff_core.model.unet import PatchedUNet

    torch.manual_seed(0)
    model = PatchedUNet(ModelConfig(**TINY))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_model(model, path, {"model": "tiny", "classes": json.dumps([f"c{i}" for i in range(10)])})
    return path


class Tally:
    """What the clients saw, shared by the threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.jobs: dict[str, str] = {}  # job id -> the key that submitted it
        self.followed: set[str] = set()
        self.counts: collections.Counter[str] = collections.Counter()

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] += n

    def job(self, job_id: str, key: str) -> None:
        with self.lock:
            self.jobs[job_id] = key

    def some_job(self, key: str | None = None) -> tuple[str, str] | None:
        """One of the 50 latest jobs (of `key`, if given): (job id, key)."""
        with self.lock:
            latest = [(j, k) for j, k in self.jobs.items() if key is None or k == key][-50:]
        return random.choice(latest) if latest else None

    def newest_unfollowed(self) -> tuple[str, str] | None:
        """The newest job no follower took yet (so followers watch jobs as they run), of a key other
        than the stalled readers': their streams must never be refused for the stallers' sake."""
        with self.lock:
            for job_id in reversed(self.jobs):
                if job_id not in self.followed and self.jobs[job_id] != STALLER_KEY:
                    self.followed.add(job_id)
                    return job_id, self.jobs[job_id]
        return None


def submitter(url: str, key: str, pause_s: float, tally: Tally, stop: threading.Event, rng: random.Random) -> None:
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=30) as client:
        while not stop.is_set():
            body = {"model": "tiny", "num_images": rng.randint(1, 4), "timesteps": str(rng.choice([10, 20, 30])),
                    "seed": rng.randrange(2**31), "idempotency_key": uuid.uuid4().hex}
            while True:  # the same idempotency key until the service answers for certain
                try:
                    response = client.post("/generate", json=body)
                except httpx.HTTPError:
                    tally.add("submit retries (connection)")
                    time.sleep(0.5)
                    continue
                if response.status_code in (200, 202):
                    tally.job(response.json()["id"], key)
                    tally.add("submitted")
                    break
                if response.status_code in (429, 503):
                    tally.add(f"submit retries ({response.status_code})")
                    time.sleep(min(float(response.headers.get("retry-after", 1)), 2.0))
                    continue
                tally.add(f"submit refused ({response.status_code})")
                break
            stop.wait(rng.uniform(0.5, 1.5) * pause_s)


def stalled_reader(url: str, tally: Tally, stop: threading.Event, rng: random.Random) -> None:
    """Opens an event stream of one of its key's jobs, reads the response head, then never reads;
    a new one every few seconds."""
    parts = urlsplit(url)
    while not stop.is_set():
        picked = tally.some_job(STALLER_KEY)
        if picked is None:
            stop.wait(0.5)
            continue
        sock = socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(10)
            sock.connect((parts.hostname, parts.port))
            sock.sendall(f"GET /jobs/{picked[0]}/events HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                         f"X-API-Key: {STALLER_KEY}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                byte = sock.recv(1)
                if not byte:
                    break
                head += byte
            status = head.split(b" ")[1].decode() if head.count(b" ") else "none"
            tally.add(f"stalled streams {status}")
            stop.wait(rng.uniform(3, 10))  # hold it without reading
        except OSError:
            tally.add("stalled streams (connection error)")
            stop.wait(1)
        finally:
            sock.close()


def follower(url: str, tally: Tally, stop: threading.Event) -> None:
    """Follows jobs' events, each to its terminal event, resuming by id after any interruption; takes
    no new job once `stop` is set."""
    while not stop.is_set():
        picked = tally.newest_unfollowed()
        if picked is None:
            stop.wait(0.5)
            continue
        job_id, key = picked
        last_id, ids, ended = None, [], False
        deadline = time.monotonic() + 120
        while not ended and time.monotonic() < deadline:
            headers = {"X-API-Key": key, **({"Last-Event-ID": last_id} if last_id else {})}
            try:
                with httpx.stream("GET", f"{url}/jobs/{job_id}/events", headers=headers,
                                  timeout=httpx.Timeout(30)) as response:
                    if response.status_code != 200:
                        tally.add(f"follower streams refused ({response.status_code})")
                        time.sleep(1)
                        continue
                    event = None
                    for line in response.iter_lines():
                        if line.startswith("id:"):
                            last_id = line[3:].strip()
                            ids.append(last_id)
                        elif line.startswith("event:"):
                            event = line[6:].strip()
                            if event in TERMINAL:
                                ended = True
                            elif event == "error":
                                tally.add("follower error events")
                if not ended:
                    tally.add("follower resumed")
            except httpx.RemoteProtocolError:
                tally.add("follower streams broken (cut response)")
            except httpx.HTTPError:
                tally.add("follower resumed (connection error)")
                time.sleep(0.5)
        tally.add("follower jobs ended" if ended else "follower jobs not ended in 120 s")
        keyed = [tuple(int(p) for p in i.split("-")) for i in ids]
        if keyed != sorted(set(keyed)):
            tally.add("follower saw an event twice or out of order")


class Chaos:
    """Kills a worker every `kill_every` seconds (and starts another), and Redis once."""

    def __init__(self, procs: Processes, redis_server: RedisServer, kill_every: float, redis_at: float | None):
        self.procs, self.redis, self.kill_every, self.redis_at = procs, redis_server, kill_every, redis_at
        self.workers = [procs.worker(), procs.worker()]
        self.kills = 0
        self.redis_restarts = 0
        self.log: list[str] = []

    def run(self, stop: threading.Event, started: float) -> None:
        next_kill = started + self.kill_every
        while not stop.is_set():
            now = time.monotonic()
            if self.redis_at is not None and not self.redis_restarts and now - started >= self.redis_at:
                self.redis.kill()
                stop.wait(1.0)
                self.redis.start()
                self.redis_restarts += 1
                self.log.append(f"{now - started:6.1f} s  redis-server SIGKILLed and restarted from its append-only file")
            if now >= next_kill:
                victim = random.choice(self.workers)
                if victim.poll() is None:
                    os.killpg(victim.pid, signal.SIGKILL)  # its own process group (Processes.spawn)
                    victim.wait(10)
                self.workers.remove(victim)
                self.workers.append(self.procs.worker())
                self.kills += 1
                next_kill = now + self.kill_every
                self.log.append(f"{now - started:6.1f} s  worker pid {victim.pid} SIGKILLed, a new one started")
            stop.wait(0.2)


def png_ok(data: bytes) -> bool:
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.format == "PNG"
    except Exception:  # noqa: BLE001 - anything unreadable counts as invalid
        return False


def cause_of(error: str | None) -> str:
    """Failure reasons grouped: ids and numbers taken out."""
    text = re.sub(r"[0-9a-f]{32}", "<id>", error or "(no reason)")
    return re.sub(r"\d+(\.\d+)?", "N", text)[:160]


def verify(url: str, redis_url: str, prefix: str, tally: Tally, drain_s: float) -> dict:
    import redis

    keys = {job_id: {"X-API-Key": key} for job_id, key in tally.jobs.items()}
    views: dict[str, dict | None] = {}

    def poll() -> bool:
        for job_id, headers in keys.items():
            view = views.get(job_id)
            if view is not None and view["status"] in TERMINAL:
                continue
            try:
                response = httpx.get(f"{url}/jobs/{job_id}", headers=headers, timeout=10)
            except httpx.HTTPError:
                return False
            if response.status_code == 404:
                views[job_id] = None  # the record is gone: lost
            else:
                views[job_id] = response.json() if response.status_code == 200 else {"status": f"HTTP {response.status_code}"}
        return all(v is None or v["status"] in TERMINAL for v in views.values())

    try:
        wait_until(poll, drain_s, "every job to end", interval=1.0)
    except TimeoutError:
        pass
    lost = sorted(j for j, v in views.items() if v is None)
    stuck = sorted(j for j in keys if j not in views or (views[j] is not None and views[j]["status"] not in TERMINAL))
    statuses = collections.Counter(v["status"] for v in views.values() if v is not None)
    failed = collections.Counter(cause_of(v.get("error")) for v in views.values() if v and v["status"] == "failed")

    conn = redis.Redis.from_url(redis_url)
    duplicated, unannounced, finished_events = [], [], collections.Counter()
    for job_id in keys:
        entries = conn.xrange(f"{prefix}:events:{job_id}")
        ends = [fields[b"event"].decode() for _, fields in entries if fields[b"event"].decode() in TERMINAL]
        finished_events[len([e for e in ends if e == "finished"])] += 1
        if len(ends) > 1:
            duplicated.append(job_id)
        view = views.get(job_id)
        if view is not None and view["status"] in TERMINAL and view["status"] not in ends:
            unannounced.append(job_id)  # ended without its terminal event: no webhook, SSE restates it

    files = collections.Counter()
    with httpx.Client(timeout=30) as client:
        for job_id, view in views.items():
            if not view or view["status"] != "finished":
                continue
            links = view["links"]
            for link in [links["grid"], *links["images"]]:
                response = client.get(link, headers=keys[job_id])
                files["valid" if response.status_code == 200 and png_ok(response.content) else "invalid"] += 1
    return {"jobs": len(keys), "statuses": dict(statuses), "lost": len(lost), "stuck": len(stuck),
            "duplicated": len(duplicated), "ended_without_event": len(unannounced),
            "failed_by_cause": dict(failed.most_common()),
            "jobs_by_finished_events": {str(k): v for k, v in sorted(finished_events.items())},
            "files_valid": files["valid"], "files_invalid": files["invalid"],
            "examples": {"lost": lost[:5], "stuck": stuck[:5], "duplicated": duplicated[:5],
                         "ended_without_event": unannounced[:5]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300, help="how long jobs are submitted under faults")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rate", type=float, default=4.0, help="jobs per second from all clients together (about)")
    parser.add_argument("--max-jobs", type=int, default=0, help="stop submitting after this many (0 = no limit)")
    parser.add_argument("--kill-every", type=float, default=20, help="seconds between worker SIGKILLs")
    parser.add_argument("--no-redis-restart", action="store_true")
    parser.add_argument("--stallers", type=int, default=12,
                        help="clients that open event streams and never read (more than their key's cap of 10)")
    parser.add_argument("--followers", type=int, default=3, help="clients that follow jobs' events to the end")
    parser.add_argument("--drain", type=float, default=180, help="seconds to wait for every job to end afterwards")
    parser.add_argument("--weights", type=Path, default=None, help="a model file to serve instead of a tiny random one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="also print the result as one JSON line (last line)")
    parser.add_argument("--keep", type=Path, default=None, help="keep logs and data in this folder")
    args = parser.parse_args(argv)
    random.seed(args.seed)

    tmp_ctx = tempfile.TemporaryDirectory(prefix="soak-")
    tmp = args.keep or Path(tmp_ctx.name)
    tmp.mkdir(parents=True, exist_ok=True)
    model = args.weights or build_tiny_model(tmp / "tiny.safetensors")
    weights = write_weights_dir(tmp / "weights", model, "tiny", defaults={"timesteps": "10", "guidance": 1.0})
    redis_server = RedisServer(tmp / "redis", appendonly=True).start()
    env = service_env(redis_server.url, weights, tmp / "store",
                      PATCHDIFF_API_KEYS=",".join([*CLIENT_KEYS, STALLER_KEY]),
                      PATCHDIFF_SSE_KEEPALIVE_S="2", PATCHDIFF_SSE_MAX_STREAM_S="60",
                      PATCHDIFF_SSE_MAX_STREAMS="40", PATCHDIFF_SSE_MAX_STREAMS_PER_KEY="10",
                      PATCHDIFF_PREVIEW_EVERY_STEPS="2", PATCHDIFF_PREVIEW_MIN_INTERVAL_S="0",
                      PATCHDIFF_SUBMIT_RATE_PER_MINUTE="0",  # the soak sets its own pace (--rate)
                      PATCHDIFF_LOG_FORMAT="json")
    procs = Processes(env, tmp / "logs")
    tally = Tally()
    stop_clients, stop_chaos = threading.Event(), threading.Event()
    try:
        chaos = Chaos(procs, redis_server, args.kill_every, None if args.no_redis_restart else args.seconds / 2)
        url = procs.api(free_port())
        wait_until(lambda: _ready(url), 120, "the API and a live worker")
        started = time.monotonic()
        threads = [threading.Thread(target=chaos.run, args=(stop_chaos, started), daemon=True)]
        pause = args.clients / args.rate
        threads += [threading.Thread(target=submitter, args=(url, CLIENT_KEYS[i % len(CLIENT_KEYS)], pause, tally,
                                                              stop_clients, random.Random(args.seed * 1000 + i)),
                                     daemon=True)
                    for i in range(args.clients)]
        readers = [threading.Thread(target=stalled_reader, args=(url, tally, stop_clients, random.Random(i)), daemon=True)
                   for i in range(args.stallers)]
        readers += [threading.Thread(target=follower, args=(url, tally, stop_clients), daemon=True)
                    for _ in range(args.followers)]
        for thread in threads + readers:
            thread.start()
        while time.monotonic() - started < args.seconds:
            if args.max_jobs and tally.counts["submitted"] >= args.max_jobs:
                break
            time.sleep(0.5)
        stop_clients.set()
        for thread in threads[1:]:
            thread.join(60)
        stop_chaos.set()  # faults stop with the submissions; the drain runs on a calm service
        threads[0].join(30)
        elapsed = time.monotonic() - started
        result = verify(url, redis_server.url, env.get("PATCHDIFF_REDIS_PREFIX", "patchdiff"), tally, args.drain)
        for thread in readers:
            thread.join(130)
        result.update(seconds=round(elapsed, 1), clients=args.clients, worker_kills=chaos.kills,
                      redis_restarts=chaos.redis_restarts, client_counts=dict(sorted(tally.counts.items())))
        _print(result, chaos.log)
        if args.json:
            print(json.dumps(result))
        bad = ("lost", "stuck", "duplicated", "ended_without_event", "files_invalid")
        return 0 if not any(result[name] for name in bad) else 1
    finally:
        stop_clients.set()
        stop_chaos.set()
        procs.stop_all()
        redis_server.stop()
        if args.keep is None:
            tmp_ctx.cleanup()


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _print(result: dict, chaos_log: list[str]) -> None:
    print("faults:")
    for line in chaos_log:
        print("  " + line)
    print(f"jobs: {result['jobs']} accepted from {result['clients']} clients in {result['seconds']} s; "
          f"{result['worker_kills']} worker kills, {result['redis_restarts']} Redis restart(s)")
    print(f"  statuses:   {result['statuses']}")
    print(f"  lost:       {result['lost']}")
    print(f"  stuck:      {result['stuck']}")
    print(f"  duplicated: {result['duplicated']}  (jobs by number of `finished` events: {result['jobs_by_finished_events']})")
    print(f"  ended without their terminal event: {result['ended_without_event']}")
    print(f"  failed by cause: {result['failed_by_cause'] or '-'}")
    print(f"  files valid: {result['files_valid']}, invalid: {result['files_invalid']}")
    print("clients:")
    for name, count in result["client_counts"].items():
        print(f"  {name}: {count}")


if __name__ == "__main__":
    sys.exit(main())
