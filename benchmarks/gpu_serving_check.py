"""The networks at full speed through the service, measured side by side in one run (`gpu_check.sh` runs
it; each section is appended to the report as soon as it is measured).

Sections (`--sections`, in this order):
- attention: does the U-Net's `scaled_dot_product_attention` run on a fused kernel (flash, memory-
  efficient) in fp16 and bf16, and what do channels_last activations change (eager, default rows);
- church: a church_p4-sized network (256 px, random weights) served the default way (default
  precision, compile setting and rows per forward): images/s of a burst of one-image jobs through
  the engine, eager and compiled, and the model FLOP utilisation against the card's dense fp16 peak
  (goal: at least 40 %); the compile's buckets, seconds and compile-cache hits;
- demo: the demo model served the default way against eager at 128 rows per forward (the earlier
  default), a burst of 512 one-image 20-step jobs (goal: at least 4× the eager figure);
- worker: a real worker process (`python -m worker`) started against an embedded Redis, cold (an
  empty compile cache) and warm (the cache the cold run filled): seconds from process start to
  serving, to the first finished job, and to every bucket compiled ("full speed"; goal warm <= 30 s),
  and the latency of a trickle of one-image jobs submitted while it compiles (goal: none waits for
  compilation), then a burst of 512 one-image jobs through the warm worker against the same burst in
  the engine alone (goal: at least 0.9);
- precision: forward images/s and error against true fp32 of fp16, bf16 and fp32 with TF32, each
  compiled, for both networks at their default rows, and the registry value it suggests
  (`cuda_precision`);
- buckets: CUDA graph against none per bucket size, and a static-shape compile against the dynamic
  batch dimension, at the default rows.

    python benchmarks/gpu_serving_check.py --out benchmarks/results/gpu_check.md      # appends
    python benchmarks/gpu_serving_check.py --smoke --device cpu                          # a CPU smoke run

`--smoke` runs every section on a tiny random network (its own weights folder), a handful of jobs and
steps; in-process compiles use Dynamo's graphs without Inductor (seconds, not minutes), while the
worker processes compile with Inductor for real (the cold/warm cache path).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch
from gpu_check import _peak, rel, run_engine, sync, tf32, timed, true_fp32

from patchdiff_core.diffusion.schedule import Schedule
from patchdiff_core.generation.compiled import (
    Bucket,
    CompiledForward,
    CompilePlan,
    compile_plan,
    gflops_per_row,
    use_compile_cache,
)
from patchdiff_core.generation.pipeline import SamplingModel
from patchdiff_core.generation.registry import RELEASED, get_model
from patchdiff_core.generation.spec import GenerationSpec
from patchdiff_core.model.checkpoint import save_model
from patchdiff_core.model.config import ModelConfig
from patchdiff_core.model.device import PRECISIONS
from patchdiff_core.model.unet import PatchedUNet
from patchdiff_core.service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
TINY = ModelConfig(res=16, c=32, n_blocks=1, attn_resos=[4], c_mult=[1, 2], num_classes=10, patch_size=2)
PRECISION_TOL = 1e-2  # largest relative x0 error against true fp32 that a served precision may have
EARLIER_DEMO_IPS = 441.6  # the demo burst through the eager engine at 128 rows in the earlier GPU check


def eager_backend(gm, example_inputs):
    return gm.forward


@dataclasses.dataclass
class Setup:
    """What the sections run on: the real networks on a GPU, a tiny one in a smoke run."""

    device: torch.device
    smoke: bool
    weights_dir: Path
    demo: str  # the served demo model's name
    setting: str  # the compile setting served by default on this device
    work: Path  # scratch folder (compile caches, the worker's Redis and results)
    results: dict = dataclasses.field(default_factory=dict)  # what one section hands to a later one

    @property
    def backend(self):
        return eager_backend if self.smoke else "inductor"

    def rows(self, name: str, config: ModelConfig) -> int:
        return Settings().engine_rows(name, self.device.type, config.res)

    def plan(self, config: ModelConfig, rows: int, **change) -> CompilePlan:
        plan = compile_plan(config, self.device, rows, self.setting)
        return dataclasses.replace(plan, backend=self.backend, **change)

    def demo_model(self, precision: str = "auto") -> SamplingModel:
        return SamplingModel.load(self.demo, weights_dir=self.weights_dir, device=str(self.device), precision=precision)

    def church_model(self, precision: str = "auto") -> SamplingModel:
        config = TINY if self.smoke else next(e for e in RELEASED if e.name == "church_p4").config
        torch.manual_seed(0)
        net = PatchedUNet(config).to(self.device).eval()
        if self.device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        with torch.no_grad():  # the zero-initialised output layers of a fresh network would make x0 trivial
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        prec = ("fp16" if self.device.type == "cuda" else "fp32") if precision == "auto" else precision
        return SamplingModel(name="church_sized", config=config, networks=[net], schedule=Schedule.linear(config.beta_max),
                             device=self.device, precision=prec)

    def specs(self, model: SamplingModel, jobs: int, sampler: str, steps: str) -> list[GenerationSpec]:
        return [GenerationSpec(model=model.name, num_images=1, seed=i, sampler=sampler, timesteps=steps,
                               class_labels=[i % 10] if model.config.conditional else None) for i in range(jobs)]


def tiny_weights(folder: Path) -> Path:
    """A weights folder serving a tiny random class-conditional model as "tiny" (the smoke run's demo)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = PatchedUNet(TINY)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_model(net, folder / "tiny.safetensors", {"model": "tiny"})
    entry = {"name": "tiny", "description": "smoke-test model", "config": json.loads(TINY.model_dump_json()),
             "files": ["tiny.safetensors"], "defaults": {"sampler": "ddim", "timesteps": "5"}}
    (folder / "manifest.json").write_text(json.dumps({"models": [entry]}))
    return folder


def mfu(ips: float, gflop: float, peak) -> str:
    return f"{100 * ips * gflop / 1e3 / peak:.1f} %" if peak else "n/a (peak unknown)"


def compiled_burst(setup: Setup, model: SamplingModel, rows: int, specs, plan: CompilePlan | None = None):
    """Compile `model` the default way (in the background, as a worker does; waited for here), warm it
    (a first burst captures the CUDA graphs), then time a burst. Returns (compilation, seconds, done)."""
    compilation = model.compile(rows, setup.setting, background=True, plan=plan or setup.plan(model.config, rows))
    compilation.wait()
    run_engine(model, rows, specs)
    done: list = []
    seconds = run_engine(model, rows, specs, done)
    return compilation, seconds, done


def bucket_lines(compilation) -> list[str]:
    lines = ["| network | bucket rows | CUDA graph | compile s | compile cache hits / misses | error |",
             "|---|--:|---|--:|--:|---|"]
    for r in compilation.reports:
        lines.append(f"| {r.label} | {r.size} | {'yes' if r.graph else 'no'} | {r.seconds:.1f} | "
                     f"{r.cache_hits} / {r.cache_misses} | {r.error or ''} |")
    return lines


def x0_error(done_a, done_b) -> float:
    a = torch.cat([r.x0_images() for r in sorted(done_a, key=lambda r: r.id)]).float()
    b = torch.cat([r.x0_images() for r in sorted(done_b, key=lambda r: r.id)]).float()
    return float((a - b).norm() / b.norm())


# -- sections --------------------------------------------------------------------------------------
def attention_section(setup: Setup, deadline: float) -> list[str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = setup.church_model()
    net = model.networks[0]
    layer = next(m for m in net.modules() if type(m).__name__ == "Attention")
    width, side = layer.qkv.in_features, max(model.config.attn_resos)  # the first attention layer's grid
    x = torch.randn(2 if setup.smoke else 64, width, side, side, device=setup.device)
    lines = ["## Attention and layout\n",
             f"One attention layer of the church-sized network ({width} channels, {side}×{side} positions, "
             f"{layer.heads} heads of 64), forward under autocast; a backend that cannot run the inputs raises.\n",
             "| precision | flash | memory-efficient | math (ms) | default (ms) |", "|---|---|---|--:|--:|"]
    precisions = ["fp16", "bf16"] if setup.device.type == "cuda" else ["bf16"]
    for precision in precisions:
        dtype = PRECISIONS[precision]
        cells = []
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            try:
                with torch.inference_mode(), torch.autocast(setup.device.type, dtype=dtype), sdpa_kernel(backend):
                    layer(x)
                cells.append("yes")
            except Exception as exc:  # noqa: BLE001 - the report says which backend cannot run
                cells.append(f"no ({type(exc).__name__})")

        def run(backend=None, dtype=dtype):
            with torch.inference_mode(), torch.autocast(setup.device.type, dtype=dtype), (
                    sdpa_kernel(backend) if backend is not None else nullcontext()):
                layer(x)

        iters = 1 if setup.smoke else 20
        math_ms = 1e3 * timed(lambda: run(SDPBackend.MATH), setup.device, 1, iters)
        default_ms = 1e3 * timed(run, setup.device, 1, iters)
        lines.append(f"| {precision} | {cells[0]} | {cells[1]} | {math_ms:.2f} | {default_ms:.2f} |")
    lines.append("")
    if setup.device.type == "cuda" and time.monotonic() < deadline:
        rows = setup.rows("church_p4", model.config)
        xb = torch.randn(rows, 3, model.config.res, model.config.res, device=setup.device)
        tb = torch.full((rows,), 500, device=setup.device)
        cells = []
        for channels_last in (False, True):
            net_layout = net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            inp = xb.contiguous(memory_format=torch.channels_last) if channels_last else xb

            def forward(net_layout=net_layout, inp=inp):
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
                    net_layout(inp, tb, None)

            cells.append(rows / timed(forward, setup.device, 2, 10))
        lines += [f"channels_last, church-sized network, eager fp16 forward at {rows} rows: contiguous "
                  f"{cells[0]:.0f} images/s, channels_last {cells[1]:.0f} images/s ({cells[1] / cells[0]:.2f}×). "
                  "Compiled, Inductor chooses the convolutions' layout itself.\n"]
    return lines


def church_section(setup: Setup, deadline: float) -> list[str]:
    peak = _peak(setup.device)
    model = setup.church_model()
    rows = setup.rows("church_p4", model.config)
    gflop = gflops_per_row(model.config)
    jobs, steps = (4, "3") if setup.smoke else (4 * rows, "10")
    specs = setup.specs(model, jobs, "unipc", steps)
    run_engine(model, rows, specs[:rows])  # warm-up
    eager_done: list = []
    eager_s = run_engine(model, rows, specs, eager_done)
    compilation, compiled_s, done = compiled_burst(setup, model, rows, specs)
    forward = model.forwards[0]
    with torch.inference_mode():  # the compiled code is for inference tensors, as the engine makes them
        x = torch.randn(rows, 3, model.config.res, model.config.res, device=setup.device)
        t = torch.full((rows,), 500, device=setup.device)
        y = torch.zeros(rows, dtype=torch.long, device=setup.device) if model.config.conditional else None

    def one_forward():
        with torch.inference_mode():
            forward(x, t, y)

    forward_ips = rows / timed(one_forward, setup.device, 2, 1 if setup.smoke else 20)
    ips_eager, ips = jobs / eager_s, jobs / compiled_s
    setup.results["church_mfu"] = ips * gflop / 1e3 / peak if peak else None
    return ["## Goal 1: the church_p4-sized network served by default\n",
            f"Random weights, {model.precision}, compile setting `{setup.setting}`, {rows} rows per forward (the "
            f"default for {model.config.res} px), {gflop:.1f} GFLOPs per image; {jobs} one-image jobs (unipc, {steps} "
            f"steps) admitted at once. MFU = images/s × GFLOPs per image / dense fp16 peak"
            + (f" ({peak:.0f} TFLOP/s)" if peak else "") + ".\n",
            "| served | s | images/s | MFU |", "|---|--:|--:|--:|",
            f"| eager | {eager_s:.2f} | {ips_eager:.1f} | {mfu(ips_eager, gflop, peak)} |",
            f"| compiled (engine burst) | {compiled_s:.2f} | {ips:.1f} | {mfu(ips, gflop, peak)} |",
            f"| compiled (one forward of {rows} rows, no sampler) | - | {forward_ips:.1f} | {mfu(forward_ips, gflop, peak)} |",
            "",
            f"Compiled vs eager: {ips / ips_eager:.2f}×; final x0 relative difference {x0_error(done, eager_done):.1e}; "
            f"forward calls by path {dict(forward.calls)}. Goal ≥ 40 % MFU at the default rows: "
            + ("n/a" if not peak else ("MET" if ips * gflop / 1e3 / peak >= 0.40 else "NOT MET")) + ".\n",
            f"Compiled in the background in {compilation.seconds or 0:.1f} s:\n", *bucket_lines(compilation), ""]


def demo_section(setup: Setup, deadline: float) -> list[str]:
    model = setup.demo_model()
    rows = setup.rows(setup.demo, model.config)
    jobs, steps = (8, "3") if setup.smoke else (512, "20")
    specs = setup.specs(model, jobs, "dpmpp_2m", steps)
    before_rows = 4 if setup.smoke else 128
    run_engine(model, before_rows, specs)  # warm-up
    eager_128 = run_engine(model, before_rows, specs)
    eager_rows = run_engine(model, rows, specs)
    compilation, compiled_s, _ = compiled_burst(setup, model, rows, specs)
    d = model.defaults
    own = setup.specs(model, jobs, d.sampler, d.timesteps)
    run_engine(model, rows, own)
    own_s = run_engine(model, rows, own)
    ips_before, ips = jobs / eager_128, jobs / compiled_s
    setup.results["demo_engine"] = {"ips": ips, "jobs": jobs, "steps": steps, "rows": rows}
    return ["## Goal 2: the demo model served by default\n",
            f"{jobs} one-image jobs (dpmpp_2m, {steps} steps, unguided) admitted at once; {model.precision}. "
            f"Before = eager at {before_rows} rows per forward (the earlier default); served = compile setting "
            f"`{setup.setting}` at the default {rows} rows.\n",
            "| served | rows | s | images/s | vs before |", "|---|--:|--:|--:|--:|",
            f"| eager (before) | {before_rows} | {eager_128:.2f} | {ips_before:.1f} | 1.00 |",
            f"| eager | {rows} | {eager_rows:.2f} | {jobs / eager_rows:.1f} | {eager_128 / eager_rows:.2f} |",
            f"| compiled (served by default) | {rows} | {compiled_s:.2f} | {ips:.1f} | {ips / ips_before:.2f} |",
            f"| compiled, the model's own defaults ({d.sampler}, {d.timesteps}) | {rows} | {own_s:.2f} | {jobs / own_s:.1f} | |",
            "",
            f"Goal ≥ 4× the eager engine: {ips / ips_before:.2f}× in this run "
            f"({ips / EARLIER_DEMO_IPS:.2f}× the earlier check's {EARLIER_DEMO_IPS} images/s): "
            + ("MET" if ips / ips_before >= 4 else "NOT MET") + ".\n",
            f"Compiled in the background in {compilation.seconds or 0:.1f} s:\n", *bucket_lines(compilation), ""]


class WorkerProcess:
    """`python -m worker` with its output read line by line, each line stamped on arrival."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.lines: list[tuple[float, str]] = []
        self.log = log_path.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "worker"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.started, line.rstrip()))
            self.log.write(line)
            self.log.flush()

    def seen(self, text: str) -> tuple[float, str] | None:
        return next(((s, line) for s, line in list(self.lines) if text in line), None)

    def wait_for(self, text: str, timeout: float) -> tuple[float, str] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            found = self.seen(text)
            if found:
                return found
            time.sleep(0.1)
        return self.seen(text)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(5)
        self.log.close()
        return self.proc.returncode

    def tail(self, n: int = 15) -> list[str]:
        return [line for _, line in self.lines[-n:]]


def wait_finished(jobs, ids: list[str], timeout: float) -> dict:
    """Poll the job records until every job ended (or the timeout); returns {id: record}."""
    deadline = time.monotonic() + timeout
    records: dict = {}
    pending = list(ids)
    while pending and time.monotonic() < deadline:
        still = []
        for job_id in pending:
            record = jobs.get(job_id)
            if record is not None and record.ended:
                records[job_id] = record
            else:
                still.append(job_id)
        pending = still
        if pending:
            time.sleep(0.1)
    for job_id in pending:
        records[job_id] = jobs.get(job_id)
    return records


def worker_run(setup: Setup, label: str, url: str, cache_dir: Path, burst: list[GenerationSpec] | None,
               ready_timeout: float) -> dict:
    """One worker process from start to stop: a trickle of one-image jobs from its start until a few
    seconds after its compile finished; then (given `burst`) a warm-up burst and a timed burst."""
    import redis

    from patchdiff_core.service.jobs import JobStore

    settings = Settings(redis_url=url, store_dir=setup.work / "results", device=str(setup.device), log_format="text",
                        weights_dir=setup.weights_dir, worker_models=[setup.demo])
    jobs = JobStore(redis.Redis.from_url(url), settings)
    env = {**os.environ, "PATCHDIFF_REDIS_URL": url, "PATCHDIFF_STORE_DIR": str(setup.work / "results"),
           "PATCHDIFF_DEVICE": setup.device.type, "PATCHDIFF_WORKER_MODELS": setup.demo, "PATCHDIFF_LOG_FORMAT": "text",
           "PATCHDIFF_WEIGHTS_DIR": str(setup.weights_dir), "PATCHDIFF_COMPILE_CACHE_DIR": str(cache_dir),
           "PATCHDIFF_ENGINE_COMPILE": setup.setting}
    d = get_model(setup.demo, setup.weights_dir).defaults
    trickle_spec = lambda i: GenerationSpec(model=setup.demo, num_images=1, seed=1000 + i, sampler=d.sampler,  # noqa: E731
                                            timesteps=d.timesteps, class_labels=[i % 10])
    worker = WorkerProcess(env, setup.work / f"worker-{label}.log")
    trickle: list[tuple[str, float]] = []  # (job id, seconds after the worker's start when submitted)
    stop_trickle = threading.Event()

    def submit_trickle():
        i = 0
        while not stop_trickle.is_set():
            trickle.append((jobs.submit(trickle_spec(i))[0].id, time.monotonic() - worker.started))
            i += 1
            stop_trickle.wait(1.0 if setup.smoke else 0.25)

    submitter = threading.Thread(target=submit_trickle, daemon=True)
    submitter.start()
    out: dict = {"label": label}
    try:
        ready = worker.wait_for("compile finished", ready_timeout)
        stop_trickle.wait(3)
        stop_trickle.set()
        submitter.join()
        serving = worker.seen("worker serving")
        out["serving_s"] = serving[0] if serving else None
        out["ready_s"] = ready[0] if ready else None
        if ready:
            m = re.search(r"compile cache: (\d+) hits, (\d+) misses", ready[1])
            out["cache"] = f"{m.group(1)} / {m.group(2)}" if m else "?"
            m = re.search(r"in ([0-9.]+) s", ready[1])
            out["compile_s"] = float(m.group(1)) if m else None
        records = wait_finished(jobs, [i for i, _ in trickle], 120)
        finished = [(records[i], at) for i, at in trickle if records[i] is not None and records[i].status == "finished"]
        out["trickle"] = len(trickle)
        out["trickle_finished"] = len(finished)
        out["first_s"] = min((r.finished_at - worker.started_wall for r, _ in finished), default=None)
        # While compiling: submitted once the worker served (before, a job also waits for the start-up).
        serving_s, ready_s = out["serving_s"] or 0.0, out["ready_s"]
        during = [r.finished_at - r.created_at for r, at in finished if at >= serving_s and (ready_s is None or at < ready_s)]
        after = [r.finished_at - r.created_at for r, at in finished if ready_s is not None and at >= ready_s]
        out["during"], out["after"] = during, after
        if burst is not None and ready:
            ids = [jobs.submit(spec)[0].id for spec in burst]  # warm-up (CUDA graphs of the large buckets)
            wait_finished(jobs, ids, 300)
            start_wall = time.time()
            ids = [jobs.submit(spec)[0].id for spec in burst]
            records = wait_finished(jobs, ids, 300)
            ends = [r.finished_at for r in records.values() if r is not None and r.status == "finished"]
            out["burst_finished"] = len(ends)
            out["burst_s"] = max(ends) - start_wall if ends else None
    finally:
        stop_trickle.set()
        out["exit"] = worker.stop()
        out["tail"] = worker.tail()
    return out


def _fmt(v, unit: str = " s") -> str:
    return "-" if v is None else f"{v:.1f}{unit}"


def _lat(values: list[float]) -> str:
    return "-" if not values else f"{statistics.median(values):.2f} / {max(values):.2f}"


def worker_section(setup: Setup, deadline: float) -> list[str]:
    from patchdiff_core.service.serve import _wait_for_socket, embedded_redis

    redis_child, url = embedded_redis(setup.work / "redis", {}, REPO)
    redis_child.start()
    runs = []
    try:
        _wait_for_socket(url)
        cache = setup.work / "worker-compile-cache"
        model = SamplingModel.load(setup.demo, weights_dir=setup.weights_dir, device="cpu")
        engine = setup.results.get("demo_engine")
        jobs = engine["jobs"] if engine else (8 if setup.smoke else 512)
        steps = engine["steps"] if engine else ("3" if setup.smoke else "20")
        burst = setup.specs(model, jobs, "dpmpp_2m", steps)
        ready_timeout = max(60.0, deadline - time.monotonic())
        runs.append(worker_run(setup, "cold", url, cache, None, ready_timeout))
        runs.append(worker_run(setup, "warm", url, cache, burst, max(60.0, deadline - time.monotonic())))
    finally:
        redis_child.terminate()
        redis_child.wait_or_kill(time.monotonic() + 5)
    lines = ["## Goal 3: worker start to full speed, cold and warm\n",
             f"`python -m worker` serving `{setup.demo}` (compile setting `{setup.setting}`), an embedded Redis; the "
             "compile cache folder empty (cold), then as the cold run left it (warm). A one-image job (the model's "
             f"defaults) is submitted every {'1' if setup.smoke else '0.25'} s from the process start until 3 s "
             "after every bucket is compiled. Seconds from the process start; latency = finished − submitted.\n",
             "| run | serving | first job finished | all buckets compiled | compile s | cache hits / misses | "
             "jobs during compile | their latency median / max | latency after | worker exit |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in runs:
        lines.append(f"| {r['label']} | {_fmt(r.get('serving_s'))} | {_fmt(r.get('first_s'))} | {_fmt(r.get('ready_s'))} | "
                     f"{_fmt(r.get('compile_s'), '')} | {r.get('cache', '-')} | {len(r.get('during', []))} | "
                     f"{_lat(r.get('during', []))} | {_lat(r.get('after', []))} | {r.get('exit')} |")
    lines.append("")
    warm = runs[-1] if len(runs) == 2 else {}
    waited = [r for r in runs if r.get("during") and max(r["during"]) > 2.0]
    lines.append(f"Goal warm ≤ 30 s to full speed: {_fmt(warm.get('ready_s'))} — "
                 + ("MET" if warm.get("ready_s") is not None and warm["ready_s"] <= 30 else "NOT MET") + ". "
                 "No job waits for compilation (every job submitted between serving and the end of the compile "
                 "finished within 2 s, while a compile takes the seconds above): "
                 + ("NOT MET" if waited or not all(r.get("ready_s") for r in runs) else "MET") + ".\n")
    for r in runs:
        if r.get("ready_s") is None or r.get("trickle_finished") != r.get("trickle"):
            lines += [f"{r['label']} run: the worker's last lines:\n", "```", *r["tail"], "```", ""]
    engine = setup.results.get("demo_engine")
    service_ips = warm["burst_finished"] / warm["burst_s"] if warm.get("burst_s") else None
    lines += ["## Goal 4: a service burst against the engine alone\n",
              f"{len(burst)} one-image jobs (dpmpp_2m, {steps} steps) submitted at once through `JobStore.submit` to the "
              "warm worker (after a warm-up burst), until the last is finished with its PNGs in the store; the "
              "engine alone is the demo section's compiled burst (same model, rows, jobs) in this process.\n",
              "| path | images/s |", "|---|--:|",
              f"| engine alone | {engine['ips']:.1f} |" if engine else "| engine alone | - |",
              f"| worker + Redis + store | {service_ips:.1f} |" if service_ips else "| worker + Redis + store | - |"]
    if engine and service_ips:
        ratio = service_ips / engine["ips"]
        lines += ["", f"Ratio {ratio:.2f} (goal ≥ 0.9): " + ("MET" if ratio >= 0.9 else "NOT MET") + "."]
    return lines + [""]


def precision_section(setup: Setup, deadline: float) -> list[str]:
    cuda = setup.device.type == "cuda"
    candidates = ["fp16", "bf16", "fp32"] if cuda else ["fp32", "bf16"]
    lines = ["## Precision per model\n",
             "Each precision compiled as served (one bucket: the default rows), forward images/s, and the relative "
             "error of x0 against true fp32 (TF32 off) on the same inputs (timesteps spread over 0..999); fp32 runs "
             f"with TF32 tensor cores. Suggested: the fastest within {PRECISION_TOL:g} of fp32.\n",
             "| network | rows | precision | images/s | x0 error vs fp32 | compile s |", "|---|--:|---|--:|--:|--:|"]
    suggestions = []
    for label, factory, name in (("demo", setup.demo_model, setup.demo), ("church-sized", setup.church_model, "church_p4")):
        base = factory("fp32")
        rows = setup.rows(name, base.config)
        g = torch.Generator(device=setup.device).manual_seed(0)
        with torch.inference_mode():  # the compiled code is for inference tensors, as the engine makes them
            x = torch.randn(rows, 3, base.config.res, base.config.res, device=setup.device, generator=g)
            t = torch.linspace(0, 999, rows, device=setup.device).long()
            y = (torch.arange(rows, device=setup.device) % 10) if base.config.conditional else None
        with true_fp32(), torch.inference_mode():
            ref = base.forwards[0](x, t, y)[0]
        measured = {}
        for precision in candidates:
            if time.monotonic() > deadline:
                lines.append(f"| {label} | {rows} | {precision} | skipped (time) | | |")
                continue
            model = dataclasses.replace(base, precision=precision)
            model.__dict__.pop("forwards", None)  # the cached eager forwards are the fp32 ones
            graph = compile_plan(base.config, setup.device, rows, setup.setting).buckets[-1].graph if cuda else False
            plan = setup.plan(base.config, rows, buckets=(Bucket(rows, graph),))
            with tf32(precision == "fp32") if cuda else nullcontext():
                try:
                    compilation = model.compile(rows, plan=plan)
                    forward = model.forwards[0]

                    def call(forward=forward):
                        with torch.inference_mode():
                            return forward(x, t, y)

                    ips = rows / timed(call, setup.device, 2, 1 if setup.smoke else 20)
                    err = rel(call()[0], ref)
                except Exception as exc:  # noqa: BLE001 - report it, measure the rest
                    lines.append(f"| {label} | {rows} | {precision} | error: {type(exc).__name__}: {str(exc)[:80]} | | |")
                    continue
            measured[precision] = (ips, err)
            lines.append(f"| {label} | {rows} | {precision} | {ips:.1f} | {err:.1e} | {compilation.seconds or 0:.1f} |")
        within = {p: v for p, v in measured.items() if v[1] <= PRECISION_TOL}
        if within:
            best = max(within, key=lambda p: within[p][0])
            suggestions.append(f"`{label}`: {best} ({within[best][0]:.0f} images/s)")
    lines += ["", "Suggested `cuda_precision`: " + ("; ".join(suggestions) if suggestions else "none measured") + ".", ""]
    return lines


def buckets_section(setup: Setup, deadline: float) -> list[str]:
    lines = ["## Buckets: CUDA graphs and the dynamic batch dimension\n",
             "Forward images/s of the compiled network (default precision), with and without a CUDA graph per "
             "bucket size (one dynamic-batch compile), then a static-shape compile of the default rows against "
             "the dynamic one (each measured after `torch._dynamo.reset()`, so that neither reuses the other's code).\n",
             "| network | rows | GFLOPs per forward | compiled | + CUDA graph | graph gain |", "|---|--:|--:|--:|--:|--:|"]
    static_lines = ["", "| network | rows | dynamic batch | static shapes | static / dynamic |", "|---|--:|--:|--:|--:|"]
    cuda = setup.device.type == "cuda"
    iters = 1 if setup.smoke else 20
    for label, factory, name, sizes in (("demo", setup.demo_model, setup.demo, [8, 64, 512]),
                                        ("church-sized", setup.church_model, "church_p4", [8, 16, 64])):
        model = factory()
        rows = setup.rows(name, model.config)
        sizes = sorted({min(s, rows) for s in sizes} | {rows})
        gflop = gflops_per_row(model.config)
        inputs = {}
        with torch.inference_mode():  # the compiled code is for inference tensors, as the engine makes them
            for size in sizes:
                inputs[size] = (torch.randn(size, 3, model.config.res, model.config.res, device=setup.device),
                                torch.full((size,), 500, device=setup.device),
                                torch.zeros(size, dtype=torch.long, device=setup.device) if model.config.conditional else None)
        if time.monotonic() > deadline:
            lines.append(f"| {label} | | | skipped (time) | | |")
            continue
        dtype, channels_last = PRECISIONS[model.precision], cuda
        plan = setup.plan(model.config, rows, buckets=tuple(Bucket(s, cuda) for s in sizes))
        torch._dynamo.reset()
        forward = CompiledForward(model.networks[0], dtype, channels_last, plan)
        for size in sizes:
            forward.compile_bucket(size, setup.device, model.config.res, model.config.conditional)
        plain = {}
        for size in sizes:
            x, t, y = inputs[size]

            def no_graph(x=x, t=t, y=y):
                with torch.inference_mode():
                    forward._call_compiled(x, t, y)

            def with_graph(x=x, t=t, y=y):
                with torch.inference_mode():
                    forward(x, t, y)

            plain[size] = size / timed(no_graph, setup.device, 2, iters)
            graphed = size / timed(with_graph, setup.device, 2, iters) if cuda else None
            lines.append(f"| {label} | {size} | {size * gflop:.0f} | {plain[size]:.1f} | "
                         f"{'-' if graphed is None else f'{graphed:.1f}'} | "
                         f"{'-' if graphed is None else f'{graphed / plain[size]:.2f}'} |")
        if time.monotonic() > deadline:
            static_lines.append(f"| {label} | {rows} | {plain[rows]:.1f} | skipped (time) | |")
            continue
        torch._dynamo.reset()
        static = CompiledForward(model.networks[0], dtype, channels_last,
                                 dataclasses.replace(plan, dynamic=False, buckets=(Bucket(rows, False),)))
        static.compile_bucket(rows, setup.device, model.config.res, model.config.conditional)
        x, t, y = inputs[rows]

        def static_call(x=x, t=t, y=y):
            with torch.inference_mode():
                static._call_compiled(x, t, y)

        static_ips = rows / timed(static_call, setup.device, 2, iters)
        static_lines.append(f"| {label} | {rows} | {plain[rows]:.1f} | {static_ips:.1f} | {static_ips / plain[rows]:.2f} |")
        torch._dynamo.reset()
    return lines + static_lines + [""]


SECTIONS = {"attention": attention_section, "church": church_section, "demo": demo_section,
            "worker": worker_section, "precision": precision_section, "buckets": buckets_section}
# Each section's latest start, as a share of the budget (later cells are skipped past it).
SHARE = {"attention": 0.05, "church": 0.3, "demo": 0.45, "worker": 0.75, "precision": 0.9, "buckets": 1.0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny network, few jobs and steps (a CPU smoke run)")
    parser.add_argument("--out", type=Path, help="append each section here as it finishes (also printed)")
    parser.add_argument("--budget", type=float, default=400, help="seconds; later cells are skipped past it")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, from: " + ", ".join(SECTIONS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="patchdiff-serving-") as tmp:
        work = Path(tmp)
        smoke = args.smoke
        setup = Setup(device=device, smoke=smoke,
                      weights_dir=tiny_weights(work / "weights") if smoke else Settings().weights_dir,
                      demo="tiny" if smoke else "digits",
                      setting="auto" if device.type == "cuda" else "default", work=work)
        use_compile_cache(work / "compile-cache", device)  # this process's compiles: fresh, apart from the workers'
        header = [f"## Serving at full speed ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n",
                  f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}; "
                  f"torch {torch.__version__}; python {platform.python_version()}; "
                  f"{'smoke run (tiny network)' if smoke else 'full run'}\n"]
        emit(args.out, header)
        failed = 0
        for name in [s.strip() for s in args.sections.split(",") if s.strip()]:
            began = time.monotonic()
            try:
                lines = SECTIONS[name](setup, start + SHARE[name] * args.budget)
            except Exception:  # noqa: BLE001 - one broken section must not cost the others
                failed += 1
                lines = [f"## {name}: FAILED\n", "```", traceback.format_exc(), "```", ""]
            if device.type == "cuda":
                sync(device)
                torch.cuda.empty_cache()
            print(f"[{name}: {time.monotonic() - began:.1f} s]", file=sys.stderr, flush=True)
            emit(args.out, lines)
    return 1 if failed else 0


def emit(out: Path | None, lines: list[str]) -> None:
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    sys.exit(main())
