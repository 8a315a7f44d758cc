"""How long one reaper pass takes with many jobs queued, against a private redis-server.

    python benchmarks/reaper.py --queued 100000 --repeats 20

The reaper reads only the workers whose heartbeat expired and what they held, never the queues:
a pass costs the same with 10 or 100,000 jobs queued. Prints the median and worst pass with no
dead worker, then the passes that give back the jobs of a dead worker holding `--held` jobs (at
most 200 per pass), and the commands Redis ran (no SCAN, no KEYS).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from service_harness import RedisServer  # noqa: E402

from patchdiff_core.generation.spec import GenerationSpec  # noqa: E402
from patchdiff_core.service.events import started_template  # noqa: E402
from patchdiff_core.service.jobs import JobStore  # noqa: E402
from patchdiff_core.service.reaper import Reaper  # noqa: E402
from patchdiff_core.service.settings import Settings  # noqa: E402
from patchdiff_core.service.worker_protocol import WorkerLink  # noqa: E402


def timed_pass(reaper: Reaper) -> tuple[float, list]:
    started = time.perf_counter()
    actions = reaper.reap()
    return time.perf_counter() - started, actions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--held", type=int, default=512, help="jobs held by the worker that dies")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp)).start()
        try:
            conn = redis.Redis.from_url(server.url)
            settings = Settings(redis_url=server.url, heartbeat_ttl_s=5, heartbeat_interval_s=2)
            jobs = JobStore(conn, settings)
            spec = GenerationSpec(model="tiny", num_images=1, seed=0)
            started = time.perf_counter()
            for _ in range(args.held + args.queued):
                jobs.submit(spec, cost=1)
            submit_s = time.perf_counter() - started
            worker = WorkerLink(conn, settings, "doomed", ["tiny"])
            worker.report([], beat=True, announcement={"name": "doomed", "models": ["tiny"]},
                          model_descriptions={"tiny": {"name": "tiny"}})
            for _ in range(0, args.held, 256):
                worker.start(worker.report([], take=min(256, args.held)).taken, started_template("doomed").to_json())
            reaper = Reaper(conn, settings, holder="bench")
            reaper.paused()  # records this server's run_id...
            conn.hset(jobs.keys.epoch, "since", 0)  # ...as if seen long ago: no start-up wait
            reaper._healthy_since = -1e9
            queued = conn.zcard(jobs.keys.queued("tiny"))
            conn.config_resetstat()
            quiet = [timed_pass(reaper) for _ in range(args.repeats)]
            assert all(actions == [] for _, actions in quiet)
            conn.zadd(jobs.keys.workers, {"doomed": 0})  # its heartbeat expired
            giving_back, given = [], 0
            while given < args.held:
                seconds, actions = timed_pass(reaper)
                giving_back.append(seconds)
                given += sum(action == "requeued" for _, action in actions)
            stats = conn.info("commandstats")
            scans = sum(stats.get(k, {}).get("calls", 0) for k in ("cmdstat_scan", "cmdstat_keys"))
            times = [s for s, _ in quiet]
            print(f"{queued:,} jobs queued, a worker holding {args.held} running jobs; submit: "
                  f"{submit_s / (args.queued + args.held) * 1e3:.2f} ms per job\n")
            print("| reaper pass | median | worst |")
            print("|---|---|---|")
            print(f"| no dead worker ({args.repeats} passes) | {statistics.median(times) * 1e3:.2f} ms | "
                  f"{max(times) * 1e3:.2f} ms |")
            print(f"| giving back a dead worker's {args.held} jobs ({len(giving_back)} passes, at most 200 jobs each) | "
                  f"{statistics.median(giving_back) * 1e3:.1f} ms | {max(giving_back) * 1e3:.1f} ms |")
            print(f"\nSCAN/KEYS calls: {scans}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
