"""How long one reaper pass takes with N queued jobs (and a few running), against a private redis-server.

    python benchmarks/reaper.py --queued 10000 --repeats 5

The pass reads the running set, each model's queued set and RQ queue: O(active jobs), no SCAN.
Prints the median pass time and the number of SCAN commands Redis saw (should be 0).
"""

from __future__ import annotations

import argparse
import cProfile
import os

PROFILE = os.environ.get("PROFILE")
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from service_harness import RedisServer  # noqa: E402

from patchdiff_core.generation.spec import GenerationSpec  # noqa: E402
from patchdiff_core.service.jobs import JobStore  # noqa: E402
from patchdiff_core.service.settings import Settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--running", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp)).start()
        try:
            conn = redis.Redis.from_url(server.url)
            settings = Settings(redis_url=server.url, heartbeat_ttl_s=5, heartbeat_interval_s=0.01, queue_name="bench")
            jobs = JobStore(conn, settings)
            spec = GenerationSpec(model="tiny", num_images=1, seed=0)
            started = time.perf_counter()
            for _ in range(args.queued + args.running):
                jobs.submit(spec)
            submit_s = time.perf_counter() - started
            jobs.heartbeat("w", {"name": "w", "models": {}})
            for raw in conn.zrange(jobs.queued_key("tiny"), 0, args.running - 1):
                record = jobs.get(raw.decode())
                jobs.start(record.id, "w", record.attempt)
            time.sleep(5.2)  # older than the heartbeat TTL: every queued job gets the lost-message check
            jobs.heartbeat("w", {"name": "w", "models": {}})
            jobs._redis_just_started = lambda: False  # the fresh server's start-up grace would skip the pass
            conn.config_resetstat()
            times = []
            for _ in range(args.repeats):
                conn.delete("patchdiff:reaper-lock")
                jobs.heartbeat("w", {"name": "w", "models": {}})
                t0 = time.perf_counter()
                actions = jobs.reap() if not PROFILE else cProfile.runctx("jobs.reap()", globals(), locals(), sort="cumtime") or []
                times.append(time.perf_counter() - t0)
                assert actions == [], actions
            scans = conn.info("commandstats").get("cmdstat_scan", {}).get("calls", 0)
            print(f"queued={args.queued} running={args.running} submit={submit_s / (args.queued + args.running) * 1e3:.2f} ms/job")
            print(f"reaper pass: median {statistics.median(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms "
                  f"over {args.repeats} passes (interval {Settings().heartbeat_interval_s} s); SCAN calls: {scans}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
