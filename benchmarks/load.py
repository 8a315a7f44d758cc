"""Load on the service from its own process: N concurrent submitters, then polls until every job
ends, then GET /jobs/{id} throughput.

    python benchmarks/load.py --jobs 200 --submitters 20 --workers 1 --poll-seconds 10 --poll-clients 8

Without --url it starts a private stack (redis-server, one API process under uvicorn, --workers
worker processes serving the demo model); with --url it loads that service (give --api-key if keys
are on). Prints: accepted / finished / failed / cancelled / lost (not ended within --timeout, or
gone), 5xx answers, POST latency p50/p99, and the status-poll throughput with its p50/p99.
Uses the standard library's http.client (keep-alive, one connection per thread) so the client
costs little per request next to the server.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

TERMINAL = ("finished", "failed", "cancelled")


class Conn:
    def __init__(self, url: str, api_key: str | None):
        parsed = urlparse(url)
        self.host, self.port = parsed.hostname, parsed.port or 80
        self.headers = {"content-type": "application/json", **({"X-API-Key": api_key} if api_key else {})}
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict | None]:
        data = json.dumps(body).encode() if body is not None else None
        for attempt in range(2):
            try:
                self.conn.request(method, path, body=data, headers=self.headers)
                response = self.conn.getresponse()
                raw = response.read()
                try:
                    return response.status, json.loads(raw) if raw else None
                except ValueError:
                    return response.status, None
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
                if attempt:
                    raise
        raise AssertionError("unreachable")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_threads(count: int, target) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process (Linux /proc), to report the API's cost per request
    independently of what else runs on the machine."""
    if pid is None:
        return None
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(url: str, args, api_pid: int | None = None) -> dict:
    body = {"model": args.model, "num_images": args.num_images, "timesteps": args.timesteps}
    ids: list[str] = []
    codes: list[int] = []
    latencies: list[float] = []
    lock = threading.Lock()

    def submitter(index: int) -> None:
        conn = Conn(url, args.api_key)
        for n in range(index, args.jobs, args.submitters):
            started = time.perf_counter()
            status, payload = conn.request("POST", "/generate", {**body, "seed": n})
            elapsed = time.perf_counter() - started
            with lock:
                codes.append(status)
                latencies.append(elapsed)
                if status in (200, 202):
                    ids.append(payload["id"])

    started = time.perf_counter()
    run_threads(args.submitters, submitter)
    submit_s = time.perf_counter() - started

    final: dict[str, str] = {}
    deadline = time.monotonic() + args.timeout
    conn = Conn(url, args.api_key)
    pending = list(ids)
    while pending and time.monotonic() < deadline:
        still = []
        for job_id in pending:
            status, payload = conn.request("GET", f"/jobs/{job_id}")
            codes.append(status)
            if status == 200 and payload["status"] in TERMINAL:
                final[job_id] = payload["status"]
            elif status == 404:
                final[job_id] = "lost"
            else:
                still.append(job_id)
        pending = still
        if pending:
            time.sleep(0.5)
    drain_s = time.perf_counter() - started - submit_s

    poll_latencies: list[float] = []
    poll_codes: list[int] = []
    stop_at = time.perf_counter() + args.poll_seconds

    def poller(index: int) -> None:
        conn = Conn(url, args.api_key)
        local_lat, local_codes = [], []
        i = index
        while time.perf_counter() < stop_at:
            job_id = ids[i % len(ids)]
            i += 1
            t0 = time.perf_counter()
            status, _ = conn.request("GET", f"/jobs/{job_id}")
            local_lat.append(time.perf_counter() - t0)
            local_codes.append(status)
        with lock:
            poll_latencies.extend(local_lat)
            poll_codes.extend(local_codes)

    poll_started = time.perf_counter()
    cpu_before = cpu_seconds(api_pid)
    run_threads(args.poll_clients, poller) if ids else None
    poll_s = time.perf_counter() - poll_started
    cpu_after = cpu_seconds(api_pid)
    api_cpu_us = None
    if cpu_before is not None and cpu_after is not None and poll_latencies:
        api_cpu_us = round((cpu_after - cpu_before) / len(poll_latencies) * 1e6)
    outcomes = list(final.values())
    return {
        "submitted": args.jobs,
        "accepted": len(ids),
        "refused": {str(c): codes[: args.jobs].count(c) for c in sorted(set(codes[: args.jobs])) if c not in (200, 202)},
        "finished": outcomes.count("finished"),
        "failed": outcomes.count("failed"),
        "cancelled": outcomes.count("cancelled"),
        "lost": len(ids) - len(final) + outcomes.count("lost"),
        "http_5xx": sum(1 for c in codes + poll_codes if c >= 500),
        "submit_s": round(submit_s, 2),
        "drain_s": round(drain_s, 2),
        "post_p50_ms": round(percentile(latencies, 0.5) * 1e3, 1),
        "post_p99_ms": round(percentile(latencies, 0.99) * 1e3, 1),
        "poll_requests": len(poll_latencies),
        "poll_rps": round(len(poll_latencies) / poll_s, 1) if poll_latencies else 0,
        "poll_p50_ms": round(percentile(poll_latencies, 0.5) * 1e3, 2),
        "poll_p99_ms": round(percentile(poll_latencies, 0.99) * 1e3, 2),
        "poll_non_200": sum(1 for c in poll_codes if c != 200),
        # CPU the API process spent per poll, and the rate one idle core could serve at that cost.
        "api_cpu_us_per_poll": api_cpu_us,
        "api_capacity_rps_per_core": round(1e6 / api_cpu_us) if api_cpu_us else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="load this service instead of starting one")
    parser.add_argument("--api-key")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--submitters", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model", default="digits")
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--timesteps", default="5")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for all jobs to end")
    parser.add_argument("--poll-seconds", type=float, default=10)
    parser.add_argument("--poll-clients", type=int, default=8)
    args = parser.parse_args(argv)
    if args.url:
        print(json.dumps(load(args.url, args), indent=1))
        return

    from service_harness import Processes, RedisServer, free_port, service_env, wait_until

    with tempfile.TemporaryDirectory() as tmp:
        redis_server = RedisServer(Path(tmp) / "redis").start()
        env = service_env(redis_server.url, REPO / "weights", Path(tmp) / "store",
                          PATCHDIFF_DEFAULT_MODEL=args.model, PATCHDIFF_HEARTBEAT_INTERVAL_S="2",
                          PATCHDIFF_HEARTBEAT_TTL_S="10", PATCHDIFF_LOG_FORMAT="json")
        procs = Processes(env, Path(tmp) / "logs")
        try:
            for _ in range(args.workers):
                procs.worker()
            url = procs.api(free_port())
            import httpx

            wait_until(lambda: httpx.get(url + "/readyz").status_code == 200, 120, "a live worker")
            api_pid = next(p.pid for p in procs.procs if "uvicorn" in " ".join(p.args))
            result = load(url, args, api_pid)
        finally:
            procs.stop_all()
            redis_server.stop()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
