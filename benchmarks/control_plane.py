"""What the Redis control plane costs: the worker's real Redis calls against a real redis-server.

    python benchmarks/control_plane.py                       # all modes, the sizes below
    python benchmarks/control_plane.py --mode runner --jobs 512 --steps 20 --step-ms 38
    python benchmarks/control_plane.py --mode service        # needs torch: the real API + worker
    python benchmarks/control_plane.py --mode fleet --workers 1,10,50,100

Modes (each starts its own redis-server on a free port):

- `runner`: one worker holding N one-image jobs of S steps, its real control loop
  (`worker/control.py`: the same `WorkerLink` calls as a real worker), the network replaced by a
  stand-in that takes `--step-ms` per step (no torch). Prints the worker's client time per engine
  step, side by side in the same run with a replay of the previous control plane's per-step calls
  (a pipeline of one progress script and 3 histogram commands per job, with a SCRIPT EXISTS, plus
  one unpipelined event script per job whose progress event was due), and the Redis commands and
  Redis CPU per job.
- `admission`: the API's submit path (`served_models` + `submit`) with 1, 100 and 400 workers
  announced; API CPU per submit.
- `service`: the real service (API under uvicorn, one CPU worker with the demo model, its Redis),
  a burst of 16 one-image 20-step jobs; Redis commands per job sent by clients and run inside
  scripts (from MONITOR; the idle service's own traffic measured before and subtracted; nothing
  polls), and Redis CPU per job (`INFO` used_cpu, the median of several bursts, less the idle
  service's CPU measured between them and the benchmark's own polls).
- `fleet`: W simulated workers (processes of threads, each the real control loop with the stand-in
  network) against one Redis, fed by a submitter: jobs/s, p99 time from submit to start, Redis CPU
  per job and the rate at which one Redis core would saturate.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from service_harness import RedisServer, free_port, service_env, wait_until  # noqa: E402

from patchdiff_core.generation.spec import GenerationSpec  # noqa: E402
from patchdiff_core.service.jobs import JobStore  # noqa: E402
from patchdiff_core.service.keys import Keys  # noqa: E402
from patchdiff_core.service.settings import Settings  # noqa: E402
from patchdiff_core.service.worker_protocol import WorkerLink  # noqa: E402
from worker.control import ControlLoop  # noqa: E402 - torch-free

SPEC = GenerationSpec(model="stub", num_images=1, seed=0, timesteps="20")


# -- the stand-in network ------------------------------------------------------------------------------
class StubSampler(threading.Thread):
    """Stands in for the engine: every `step_s`, every held job advances one step; a job's last
    step finishes it (no files: the control plane is what is measured)."""

    def __init__(self, control: ControlLoop, steps: int, step_s: float):
        super().__init__(daemon=True)
        self.control, self.steps, self.step_s = control, steps, step_s
        self.stopped = threading.Event()
        self.held: dict[str, int] = {}
        self.engine_steps = 0
        self.first_step_at: dict[str, float] = {}

    def run(self) -> None:
        while not self.stopped.is_set():
            self._take(block=not self.held)
            if not self.held:
                continue
            time.sleep(self.step_s)
            self.engine_steps += 1
            moved, done = [], []
            for job_id in list(self.held):
                self.held[job_id] += 1
                step = self.held[job_id]
                self.first_step_at.setdefault(job_id, time.time())
                moved.append((job_id, step, self.steps, int(step == self.steps)))
                if step == self.steps:
                    done.append(job_id)
                    del self.held[job_id]
            for job_id in done:
                self.control.left_engine(job_id)
            self.control.step_done(moved)
            for job_id in done:
                self.control.finished_job(job_id, 1, ["stub"], self.steps)
        for job_id in self.held:  # stopping: as a real worker does
            self.control.hand_back(job_id)
        self.control.sampler_done()

    def _take(self, block: bool) -> None:
        try:
            record = self.control.started.get(timeout=0.05) if block else self.control.started.get_nowait()
        except queue.Empty:
            return
        while True:
            self.held[record.id] = 0
            try:
                record = self.control.started.get_nowait()
            except queue.Empty:
                break
        while True:
            try:
                stop = self.control.stops.get_nowait()
            except queue.Empty:
                return
            self.held.pop(stop.job_id, None)
            if stop.why == "cancel":
                self.control.cancelled_job(stop.job_id)


def stub_worker(conn: redis.Redis, settings: Settings, name: str, max_jobs: int, steps: int, step_s: float):
    link = WorkerLink(conn, settings, name, ["stub"])
    control = ControlLoop(link, settings, max_jobs, {"name": name, "models": ["stub"]},
                          {"stub": {"name": "stub", "config": {}, "defaults": {}}})
    sampler = StubSampler(control, steps, step_s)
    control.start()
    sampler.start()
    return control, sampler


def stop_worker(control: ControlLoop, sampler: StubSampler) -> None:
    control.stop()
    sampler.stopped.set()
    control.join(30)


def bench_settings(url: str, **extra) -> Settings:
    return Settings(**{"redis_url": url, "log_format": "text", "heartbeat_interval_s": 2.0, "heartbeat_ttl_s": 10.0,
                       **extra})


def redis_cpu(conn: redis.Redis) -> float:
    info = conn.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def redis_cpu_per_call(conn: redis.Redis, call, n: int = 5000) -> float:
    """Redis CPU seconds of one `call()`, made n times back to back."""
    cpu0 = redis_cpu(conn)
    for _ in range(n):
        call()
    return (redis_cpu(conn) - cpu0) / n


def total_commands(conn: redis.Redis) -> int:
    return sum(v["calls"] for k, v in conn.info("commandstats").items())


# -- runner: one worker holding N jobs ------------------------------------------------------------
LEGACY_PROGRESS = """
local s = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'cancel_requested')
if s[1] ~= 'running' or s[2] ~= ARGV[1] then return 2 end
redis.call('HSET', KEYS[1], 'step', ARGV[2], 'total', ARGV[3])
if s[3] == '1' then return 1 end
return 0
"""
LEGACY_PUBLISH = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'event', ARGV[1], 'data', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
local hook = redis.call('HMGET', KEYS[2], 'webhook', 'webhook_events')
return id
"""


def legacy_replay(conn: redis.Redis, jobs: int, steps: int, step_s: float, event_interval_s: float) -> float:
    """The previous control plane's per-step Redis calls for `jobs` held jobs (replayed: its
    `progress_many` pipeline and its per-job event publishing); returns client seconds per step."""
    progress = conn.register_script(LEGACY_PROGRESS)
    publish = conn.register_script(LEGACY_PUBLISH)
    ids = [f"legacy{i:06d}" for i in range(jobs)]
    for job_id in ids:
        conn.hset(f"legacy:job:{job_id}", mapping={"status": "running", "attempt": "1"})
    last_event = dict.fromkeys(ids, -1e9)
    client_s = 0.0
    for step in range(1, steps + 1):
        time.sleep(step_s)
        started = time.perf_counter()
        with conn.pipeline(transaction=False) as pipe:
            for job_id in ids:
                progress(keys=[f"legacy:job:{job_id}"], args=[1, step, steps], client=pipe)
                pipe.hincrby("legacy:hist:step_seconds", "b4", 1)
                pipe.hincrbyfloat("legacy:hist:step_seconds", "sum", step_s)
                pipe.hincrby("legacy:hist:step_seconds", "count", 1)
            pipe.execute()
        now = time.monotonic()
        for job_id in ids:
            if step in (1, steps) or now - last_event[job_id] >= event_interval_s:
                last_event[job_id] = now
                data = json.dumps({"job_id": job_id, "status": "running", "step": step, "total": steps})
                publish(keys=[f"legacy:events:{job_id}", f"legacy:job:{job_id}", "legacy:webhooks"],
                        args=["progress", data, 2000, 3600, job_id, 100000])
        client_s += time.perf_counter() - started
    return client_s / steps


def run_runner(url: str, jobs: int, steps: int, step_ms: float) -> dict:
    conn = redis.Redis.from_url(url)
    conn.flushdb()
    settings = bench_settings(url)
    store = JobStore(conn, settings)
    legacy_s = legacy_replay(conn, jobs, steps, step_ms / 1000, settings.progress_event_interval_s)
    conn.flushdb()
    cmds0, cpu0 = total_commands(conn), redis_cpu(conn)
    t0 = time.perf_counter()
    ids = [store.submit(SPEC.model_copy(update={"timesteps": str(steps)}), cost=steps)[0].id for _ in range(jobs)]
    submit_cmds = total_commands(conn) - cmds0
    control, sampler = stub_worker(redis.Redis.from_url(url), settings, "bench-worker", jobs, steps, step_ms / 1000)
    wait_until(lambda: store.metric_counters().get("jobs_finished", 0) >= jobs, 600, "the jobs to finish")
    elapsed = time.perf_counter() - t0
    cmds, cpu = total_commands(conn) - cmds0, redis_cpu(conn) - cpu0
    stop_worker(control, sampler)
    client_per_step = control.counters.seconds_in_redis / max(1, sampler.engine_steps)
    assert all(store.get(i).status == "finished" for i in ids)
    return {"jobs": jobs, "steps": steps, "step_ms": step_ms, "engine_steps": sampler.engine_steps,
            "reports": control.counters.reports, "client_ms_per_step": client_per_step * 1e3,
            "start_client_ms_per_job": control.counters.seconds_starting / jobs * 1e3,
            "legacy_client_ms_per_step": legacy_s * 1e3, "commands_per_job": cmds / jobs,
            "submit_commands_per_job": submit_cmds / jobs, "redis_cpu_ms_per_job": cpu / jobs * 1e3,
            "elapsed_s": elapsed}


# -- admission: submits with many live workers ---------------------------------------------------------
def run_admission(url: str, submits: int, fleets: list[int]) -> dict:
    from api.service import build_spec
    from api.schemas import GenerateRequest

    conn = redis.Redis.from_url(url)
    results = {}
    for workers in fleets:
        conn.flushdb()
        settings = bench_settings(url, default_model="stub", heartbeat_ttl_s=3600)
        store = JobStore(conn, settings)
        description = {"name": "stub", "config": {"res": 32, "c": 64, "c_mult": [1, 2], "n_blocks": 1, "attn_resos": [],
                                                  "num_classes": 10, "patch_size": 4},
                       "defaults": {"timesteps": "20", "sampler": "ddim"}, "classes": []}
        for i in range(workers):
            link = WorkerLink(conn, settings, f"w{i}", ["stub"])
            link.report([], beat=True, announcement={"name": f"w{i}", "models": ["stub"], "host": "h" * 20,
                                                     "max_rows": {"stub": 512}}, model_descriptions={"stub": description})
        request = GenerateRequest(num_images=1)
        store.served_models(fresh=True)
        cpu0 = time.process_time()
        for _ in range(submits):
            spec, cost = build_spec(request, settings, store.served_models(), frozenset(), set())
            store.submit(spec, cost=cost)
        results[workers] = (time.process_time() - cpu0) / submits * 1e3
    return {"submits": submits, "api_cpu_ms_per_submit": results,
            "ratio_to_one_worker": {w: results[w] / results[fleets[0]] for w in fleets}}


# -- service: the real thing, counted with MONITOR -----------------------------------------------------
class CommandCounter(threading.Thread):
    """Counts the commands Redis runs, by who sent them (a client, or a script), from MONITOR."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.sent, self.in_scripts, self.finished = url, 0, 0, 0
        self.lock = threading.Lock()
        self.ready = threading.Event()

    def run(self) -> None:
        conn = redis.Redis.from_url(self.url)
        try:
            with conn.monitor() as monitor:
                self.ready.set()
                for entry in monitor.listen():
                    with self.lock:
                        if entry.get("client_type") == "lua":
                            self.in_scripts += 1
                            if "jobs_finished" in entry.get("command", ""):
                                self.finished += 1
                        else:
                            self.sent += 1
        except redis.ConnectionError:
            pass  # the server stopped

    def read(self) -> tuple[int, int, int]:
        with self.lock:
            return self.sent, self.in_scripts, self.finished


def pin_apart(redis_pid: int, others: list[int]) -> None:
    """Redis on a CPU of its own, the service's processes on the others (where there are at least
    two): on a shared core, Redis' CPU time per command grows with what it is descheduled for (cold
    caches), which is not Redis' cost. Threads started later inherit their process's affinity."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return
    os.sched_setaffinity(redis_pid, {cpus[0]})
    for pid in others:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(task), set(cpus[1:]))
            except OSError:
                pass


CPU_BURSTS = 9  # bursts whose Redis CPU is measured (the median is reported)


class ServiceStack:
    """One service (API under uvicorn, one CPU worker with the demo model) on a Redis of its own.
    `tree`: the checkout whose service runs (another one measures an earlier version side by side:
    `git worktree add /tmp/before <commit>`)."""

    def __init__(self, tmp: Path, jobs: int, steps: int, tree: Path):
        from service_harness import Processes

        self.jobs, self.steps, self.tree = jobs, steps, tree
        self.server = RedisServer(tmp / "redis").start()
        env = service_env(self.server.url, tree / "weights", tmp / "store", PATCHDIFF_DEFAULT_MODEL="digits",
                          PATCHDIFF_HEARTBEAT_INTERVAL_S="2", PATCHDIFF_HEARTBEAT_TTL_S="10",
                          PATCHDIFF_ACCESS_LOG="false", PYTHONPATH=str(tree))
        if tree != REPO:
            env["PATCHDIFF_REDIS_PREFIX"] = "patchdiff"  # an earlier version may know no other
        self.procs = Processes(env, tmp / "logs", cwd=tree)
        self.metrics_key = Keys(env["PATCHDIFF_REDIS_PREFIX"]).metrics
        self.conn = redis.Redis.from_url(self.server.url)
        self.polls = 0
        self.bursts_cpu: list[tuple[float, float]] = []  # (Redis CPU less the polls', seconds) of each burst
        self.idle_cpu = self.idle_time = 0.0

    def start(self) -> ServiceStack:
        import httpx

        self.procs.worker()
        self.url = self.procs.api(free_port())
        wait_until(lambda: httpx.get(self.url + "/readyz").status_code == 200, 120, "the worker")
        pin_apart(self.server.proc.pid, [p.pid for p in self.procs.procs] + [os.getpid()])
        return self

    def stop(self) -> None:
        self.procs.stop_all()
        self.server.stop()

    def finished_jobs(self) -> int:
        """The benchmark's own poll (polls are not the service's work: their Redis CPU is measured
        alone and subtracted)."""
        self.polls += 1
        return int(self.conn.hget(self.metrics_key, "jobs_finished") or 0)

    def burst(self, finished, seed0: int) -> float:
        """Submit the burst, wait until `finished()` counts all of it; returns its seconds."""
        import httpx

        t0 = time.monotonic()
        with httpx.Client(base_url=self.url) as client:
            for i in range(self.jobs):
                response = client.post("/generate", json={"num_images": 1, "timesteps": str(self.steps),
                                                          "seed": seed0 + i})
                assert response.status_code == 202, response.text
        wait_until(lambda: finished() >= self.jobs, 300, "the burst to finish", interval=0.25)
        return time.monotonic() - t0

    def calibrate(self) -> None:
        """A warm-up burst; this machine's floor (the Redis CPU of one PING round trip, mostly the
        kernel's) and the cost of one of the benchmark's polls."""
        self.burst(self.finished_jobs, 10_000)
        self.ping_cpu = redis_cpu_per_call(self.conn, self.conn.ping)
        self.poll_cpu = redis_cpu_per_call(self.conn, self.finished_jobs)

    def measure_burst(self, idle_s: float, repeat: int) -> None:
        """The idle service's CPU for `idle_s` (Redis' timers and the service's heartbeats), then a
        burst's CPU less that idle rate and the polls."""
        time.sleep(1)  # the last burst's tail
        cpu0, t0 = redis_cpu(self.conn), time.monotonic()
        time.sleep(idle_s)
        self.idle_cpu += redis_cpu(self.conn) - cpu0
        self.idle_time += time.monotonic() - t0
        done0 = self.finished_jobs()
        cpu0, self.polls = redis_cpu(self.conn), 0
        elapsed = self.burst(lambda: self.finished_jobs() - done0, 20_000 + 1000 * repeat)
        burst_cpu = redis_cpu(self.conn) - cpu0 - self.poll_cpu * self.polls
        self.bursts_cpu.append((burst_cpu, elapsed))

    def count_commands(self, idle_s: float) -> dict:
        """Commands of the idle service, then of a burst, from MONITOR (which itself costs Redis far
        more CPU than the service does: done after the CPU bursts)."""
        counter = CommandCounter(self.server.url)
        counter.start()
        counter.ready.wait(10)
        time.sleep(1)
        s0, i0, _ = counter.read()
        time.sleep(idle_s)
        s1, i1, f1 = counter.read()
        idle_sent, idle_script = (s1 - s0) / idle_s, (i1 - i0) / idle_s
        elapsed = self.burst(lambda: counter.read()[2] - f1, 0)
        s2, i2, _ = counter.read()
        return {"sent_per_job": (s2 - s1 - idle_sent * elapsed) / self.jobs,
                "in_scripts_per_job": (i2 - i1 - idle_script * elapsed) / self.jobs,
                "idle_sent_per_s": idle_sent, "idle_in_scripts_per_s": idle_script, "elapsed_s": elapsed}

    def result(self) -> dict:
        idle_rate = self.idle_cpu / self.idle_time
        per_job = [(cpu - idle_rate * elapsed) / self.jobs * 1e3 for cpu, elapsed in self.bursts_cpu]
        return {"jobs": self.jobs, "steps": self.steps, "redis_cpu_ms_per_job": statistics.median(per_job),
                "redis_cpu_ms_per_job_bursts": per_job,
                "redis_cpu_ms_per_job_range": [min(per_job), max(per_job)],
                "idle_redis_cpu_ms_per_s": idle_rate * 1e3,
                "ping_redis_cpu_us": self.ping_cpu * 1e6, "poll_redis_cpu_us": self.poll_cpu * 1e6}


def run_service(jobs: int, steps: int, idle_s: float, trees: list[Path]) -> list[dict]:
    """The same bursts on one service per tree, taken in turn (this one, an earlier one, this one...),
    so that the machine's drift shows in all alike: CPU_BURSTS each for Redis CPU (the median is
    reported: one burst is a few ms of Redis CPU on a machine whose noise is of that order), then
    one each counted with MONITOR. Returns one result per tree; with two, also the median of the
    per-pair ratios of Redis CPU (under "ratios")."""
    with tempfile.TemporaryDirectory() as tmp:
        stacks: list[ServiceStack] = []
        try:
            for i, tree in enumerate(trees):
                stacks.append(ServiceStack(Path(tmp) / str(i), jobs, steps, tree).start())
            for stack in stacks:
                stack.calibrate()
            for repeat in range(CPU_BURSTS):
                for stack in stacks:
                    stack.measure_burst(idle_s / CPU_BURSTS, repeat)
            results = [{**stack.result(), **stack.count_commands(idle_s)} for stack in stacks]
        finally:
            for stack in stacks:
                stack.stop()
    if len(stacks) == 2:
        ours, before = results
        ratios = [a / b for a, b in zip(ours["redis_cpu_ms_per_job_bursts"], before["redis_cpu_ms_per_job_bursts"])]
        ours["ratio_to_before"] = statistics.median(ratios)
        ours["ratio_to_before_range"] = [min(ratios), max(ratios)]
    return results


# -- fleet: many simulated workers ------------------------------------------------------------------------
def _fleet_process(where: dict, names: list[str], max_jobs: int, steps: int, step_s: float, stop_at: float) -> None:
    from patchdiff_core.service.redis_conn import worker_redis

    settings = Settings(**where, log_format="text", heartbeat_interval_s=2.0, heartbeat_ttl_s=10.0)
    conn = worker_redis(settings, max_connections=4 * len(names) + 8)  # a Sentinel-aware client when asked
    workers = [stub_worker(conn, settings, name, max_jobs, steps, step_s) for name in names]
    time.sleep(max(0.0, stop_at - time.time()))
    for control, sampler in workers:
        stop_worker(control, sampler)


def run_fleet(where: dict, workers: int, seconds: float, max_jobs: int, steps: int, step_ms: float,
              processes: int, submit_rate: float, submitters: int) -> dict:
    """`where`: the settings that say where Redis is (a URL, or Sentinels)."""
    from patchdiff_core.service.redis_conn import api_redis

    settings = Settings(**where, log_format="text", heartbeat_interval_s=2.0, heartbeat_ttl_s=10.0)
    conn = api_redis(settings)
    conn.flushdb()
    store = JobStore(conn, settings)
    stop_at = time.time() + seconds + 5
    per = [[f"sim{p}-{i}" for i in range(p, workers, processes)] for p in range(min(processes, workers))]
    ctx = multiprocessing.get_context("spawn")
    children = [ctx.Process(target=_fleet_process, args=(where, names, max_jobs, steps, step_ms / 1000, stop_at))
                for names in per if names]
    for child in children:
        child.start()
    wait_until(lambda: store.live_workers(limit=0)[0] >= workers, 120, "the simulated workers")
    spec = SPEC.model_copy(update={"timesteps": str(steps)})
    cpu0, finished0 = redis_cpu(conn), store.metric_counters().get("jobs_finished", 0)
    ids: list[str] = []
    lock = threading.Lock()
    t0 = time.monotonic()
    capacity = workers * max_jobs / (steps * step_ms / 1000)  # jobs/s the stand-in workers can finish
    submit_rate = submit_rate or 0.8 * capacity  # a steady state: below what they can do
    interval = submitters / submit_rate

    def submit_for_a_while() -> None:
        mine = JobStore(api_redis(settings), settings)
        count = 0
        while time.monotonic() - t0 < seconds:
            job_id = mine.submit(spec, cost=steps)[0].id
            count += 1
            with lock:
                ids.append(job_id)
            if interval:
                time.sleep(max(0.0, t0 + count * interval - time.monotonic()))

    threads = [threading.Thread(target=submit_for_a_while) for _ in range(submitters)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - t0
    cpu = redis_cpu(conn) - cpu0
    done = store.metric_counters().get("jobs_finished", 0) - finished0
    waits = []
    with conn.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hmget(store.keys.job(job_id), "created_at", "started_at")
        for created, started in pipe.execute():
            if started:
                waits.append(float(started) - float(created))
    for child in children:
        child.join(60)
    waits.sort()
    return {"workers": workers, "capacity_per_s": capacity, "submitted": len(ids), "finished": int(done),
            "jobs_per_s": done / elapsed,
            "submitted_per_s": len(ids) / elapsed, "p50_wait_ms": 1e3 * waits[len(waits) // 2] if waits else None,
            "p99_wait_ms": 1e3 * waits[int(0.99 * (len(waits) - 1))] if waits else None,
            "redis_cpu_ms_per_job": cpu / max(1, done) * 1e3, "redis_cpu_share": cpu / elapsed}


# -- report ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["all", "runner", "admission", "service", "fleet"], default="all")
    parser.add_argument("--jobs", type=int, default=512, help="runner: jobs held by the worker")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--step-ms", type=float, default=38.0, help="the stand-in network's time per step")
    parser.add_argument("--submits", type=int, default=2000, help="admission: submits per fleet size")
    parser.add_argument("--fleets", default="1,100,400", help="admission: live workers")
    parser.add_argument("--burst", type=int, default=16, help="service: one-image jobs in the burst")
    parser.add_argument("--idle-s", type=float, default=20.0, help="service: idle traffic measured for this long")
    parser.add_argument("--before", type=Path, help="service: also measure this checkout (an earlier version), "
                        "side by side")
    parser.add_argument("--workers", default="1,10,50,100", help="fleet: simulated workers")
    parser.add_argument("--fleet-seconds", type=float, default=20.0)
    parser.add_argument("--fleet-max-jobs", type=int, default=16, help="fleet: jobs each simulated worker holds")
    parser.add_argument("--fleet-processes", type=int, default=4)
    parser.add_argument("--submit-rate", type=float, default=0.0,
                        help="fleet: jobs/s submitted (0 = 80%% of what the simulated workers can finish)")
    parser.add_argument("--submitters", type=int, default=4, help="fleet: submitting threads")
    parser.add_argument("--sentinel", action="store_true", help="fleet: through Redis Sentinel (a master, a replica, 3 sentinels)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            if args.mode in ("all", "runner"):
                r = out["runner"] = run_runner(server.url, args.jobs, args.steps, args.step_ms)
                print(f"## One worker holding {r['jobs']} one-image jobs, {r['steps']} steps of {r['step_ms']:.0f} ms\n")
                print("| | worker client time per engine step |")
                print("|---|---|")
                print(f"| previous control plane (replayed calls) | {r['legacy_client_ms_per_step']:.1f} ms |")
                print(f"| this control plane (one report per step) | {r['client_ms_per_step']:.2f} ms |")
                print(f"| ratio | {r['client_ms_per_step'] / r['legacy_client_ms_per_step']:.3f} |\n")
                print(f"Redis commands per job (submit to finished, in scripts included): {r['commands_per_job']:.1f} "
                      f"(submit {r['submit_commands_per_job']:.1f}); Redis CPU per job: {r['redis_cpu_ms_per_job']:.3f} ms; "
                      f"{r['reports']} reports for {r['engine_steps']} engine steps; starting the jobs: "
                      f"{r['start_client_ms_per_job']:.3f} ms of worker client time per job, once (the replayed "
                      f"calls have no start either).\n", flush=True)
            if args.mode in ("all", "admission"):
                fleets = [int(x) for x in args.fleets.split(",")]
                r = out["admission"] = run_admission(server.url, args.submits, fleets)
                print(f"## Submitting with many live workers ({r['submits']} submits each)\n")
                print("| live workers | API CPU per submit | vs 1 worker |")
                print("|---|---|---|")
                for w in fleets:
                    print(f"| {w} | {r['api_cpu_ms_per_submit'][w]:.3f} ms | {r['ratio_to_one_worker'][w]:.2f} |")
                print(flush=True)
        finally:
            server.stop()
    if args.mode in ("all", "service"):
        trees = [REPO] + ([args.before.resolve()] if args.before else [])
        results = run_service(args.burst, args.steps, args.idle_s, trees)
        r = out["service"] = results[0]
        print(f"## Through the real service: a burst of {r['jobs']} one-image {r['steps']}-step jobs\n")
        print(f"Redis commands per job: {r['sent_per_job']:.1f} sent by clients + {r['in_scripts_per_job']:.1f} run "
              f"inside scripts (idle service: {r['idle_sent_per_s']:.1f} + {r['idle_in_scripts_per_s']:.1f} per second, "
              f"subtracted); Redis CPU per job: {r['redis_cpu_ms_per_job']:.3f} ms (median of "
              f"{CPU_BURSTS} bursts, {r['redis_cpu_ms_per_job_range'][0]:.3f}-{r['redis_cpu_ms_per_job_range'][1]:.3f}; idle service: "
              f"{r['idle_redis_cpu_ms_per_s']:.2f} ms per second, and the benchmark's own polls, "
              f"{r['poll_redis_cpu_us']:.1f} us each, subtracted), the CPU of "
              f"{r['redis_cpu_ms_per_job'] * 1e3 / r['ping_redis_cpu_us']:.0f} PING round trips on this machine "
              f"({r['ping_redis_cpu_us']:.1f} us each); a burst took {r['elapsed_s']:.1f} s.\n", flush=True)
        if args.before:
            b = out["service_before"] = results[1]
            print(f"Side by side with `{args.before}`, burst for burst in turn (Redis CPU: the median of the "
                  f"{CPU_BURSTS} per-burst ratios, {r['ratio_to_before_range'][0]:.2f}-{r['ratio_to_before_range'][1]:.2f}):\n")
            print("| per job | before | this version | ratio |")
            print("|---|---|---|---|")
            for key, label in [("sent_per_job", "commands sent by clients"), ("in_scripts_per_job", "commands run in scripts")]:
                print(f"| {label} | {b[key]:.3g} | {r[key]:.3g} | {r[key] / b[key]:.2f} |")
            print(f"| Redis CPU (ms) | {b['redis_cpu_ms_per_job']:.3g} | {r['redis_cpu_ms_per_job']:.3g} | "
                  f"{r['ratio_to_before']:.2f} |")
            print()
    if args.mode in ("all", "fleet"):
        out["fleet"] = []
        print(f"## Simulated workers against one Redis{' (through Sentinel)' if args.sentinel else ''}: each holds up "
              f"to {args.fleet_max_jobs} jobs of {args.steps} steps of {args.step_ms:.0f} ms\n")
        print("| workers | submitted/s | finished/s | p50 / p99 submit to start | Redis CPU per job | Redis busy |")
        print("|---|---|---|---|---|---|")
        for workers in [int(x) for x in args.workers.split(",")]:
            with tempfile.TemporaryDirectory() as tmp:
                if args.sentinel:
                    from sentinel_harness import MASTER_NAME, SentinelSet

                    cluster = SentinelSet(Path(tmp)).start()
                    where = {"redis_sentinels": cluster.addresses, "redis_sentinel_master": MASTER_NAME}
                else:
                    cluster = RedisServer(Path(tmp) / "redis").start()
                    where = {"redis_url": cluster.url}
                try:
                    r = run_fleet(where, workers, args.fleet_seconds, args.fleet_max_jobs, args.steps, args.step_ms,
                                  args.fleet_processes, args.submit_rate, args.submitters)
                finally:
                    cluster.stop()
            out["fleet"].append(r)
            print(f"| {workers} | {r['submitted_per_s']:.0f} | {r['jobs_per_s']:.0f} | {r['p50_wait_ms']:.0f} / "
                  f"{r['p99_wait_ms']:.0f} ms | {r['redis_cpu_ms_per_job']:.3f} ms | {100 * r['redis_cpu_share']:.0f} % |",
                  flush=True)
        print()
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
