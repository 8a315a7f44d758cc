"""The networks the batching engine runs, through `torch.compile`, compiled in the background.

**Serving never waits for compiling.** `CompiledForward` stands in for a network's eager forward from
the start. Its row buckets are compiled one by one by a `Compilation` (a background thread in the
worker, largest bucket first); a forward whose bucket is not ready yet runs eagerly, at its real row
count, and each bucket switches to the compiled code the moment it is ready. Compiled pictures equal
eager ones to within the reordering of floating-point sums that any batch size change brings.

**Buckets and shapes.** The engine's row count changes from one step to the next (jobs arrive and
finish, a guided image takes two rows), so rows are padded up to a bucket: powers of two from
`MIN_BUCKET` up to the engine's `max_rows` (and `max_rows` itself), plus the midpoint 1.5× between
two buckets whose forward is compute-bound (there padding costs real work). Padding rows repeat the
last real row and are sliced off; every row of the U-Net is independent of the others. The batch
dimension is compiled *dynamic* (`torch._dynamo.maybe_mark_dynamic`): one Dynamo/Inductor graph
serves every bucket (a few more where a backend's choice depends on the batch size, e.g. the CPU's
convolution backend), instead of one compile per bucket; `CompilePlan.dynamic=False` compiles each
bucket as its own static graph. The GPU check (`benchmarks/gpu_serving_check.py`, "buckets")
measures what the dynamic dimension costs against static shapes.

**CUDA graphs where they help.** A small network is bound by kernel launches, not by arithmetic (on
an H200 the 32 px demo model went from 5,839 to 46,558 images/s at batch 64 with CUDA graphs, while a
256 px church-sized network gained 2 %). So on CUDA a bucket is replayed as a CUDA graph when its
forward costs at most `GRAPH_MAX_GFLOP` (FLOPs counted once per config on the meta device): every
bucket of the demo model, only the smallest ones of a 256 px model. The graphs are our own
(`torch.cuda.CUDAGraph` around the Inductor-compiled forward), not Inductor's "reduce-overhead"
mode, because Inductor's CUDA-graph trees are kept per thread (`cudagraph_trees` holds its tree
managers in thread-local storage): graphs recorded by the compile thread could not be replayed by
the serving thread, which would record them again itself. All buckets of a network share one graph
memory pool (a replay's outputs are copied at once, so no graph reads another's memory later).

**Threads.** Dynamo's frame hook is per thread, so the compile thread traces while the serving
thread runs the same module eagerly; the serving thread calls compiled code only through
`torch._dynamo.run` (run-only: it uses code compiled before and never compiles, so a guard that
does not match runs eagerly instead of stalling a request, counted as a "fallback"). The code is
compiled for inference tensors, as the worker's engine steps make them (under
`torch.inference_mode`); other inputs take the eager path. Run-only takes any compiled entry whose
guards match, also one compiled for another network of the same architecture, which is right: the
weights are inputs of the graph. Dynamo's compile saves and restores the global RNG states around a
trace; the engine draws every image's noise from that image's own `torch.Generator`, so no picture
depends on them. GPU work of both threads goes to the default stream, so it is ordered (no
cross-stream hazard on the shared weights). A CUDA graph is captured by the serving thread (the
first time a ready graph bucket is used: one warm-up forward on the capture stream, then the
capture) in `thread_local` capture mode, and only while it holds `capture_lock` without waiting for
it; the compile thread holds that lock while it compiles and warms a bucket (Triton's autotuning may
synchronise the device, which would break a capture). When the lock is taken the forward runs
compiled without a graph, and the capture is tried again at the next use. The compile thread's
Python work (tracing, code generation) shares the GIL with the serving thread, so serving slows down
while a bucket compiles but never stops; Inductor compiles kernels in its own worker processes. A
worker that exits while a bucket compiles leaves at once (`Compilation.start(exit_guard=True)`): an
interpreter that finalizes under a running torch.compile aborts.

**Which compile, by `PATCHDIFF_ENGINE_COMPILE`:** "auto" (the default) is off on the CPU and on CUDA
Inductor's default mode with CUDA graphs by the FLOP rule; "default" never uses graphs;
"reduce-overhead" puts every bucket in a graph; "max-autotune" is Inductor's
"max-autotune-no-cudagraphs" with graphs by the FLOP rule; "off" serves eagerly.

**The compile cache** (`use_compile_cache`, `PATCHDIFF_COMPILE_CACHE_DIR`): see its docstring.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from patchdiff_core.diffusion.samplers import network_forward
from patchdiff_core.model.config import ModelConfig
from patchdiff_core.model.unet import PatchedUNet

log = logging.getLogger(__name__)

MIN_BUCKET = 8
COMPILE_SETTINGS = ("auto", "off", "default", "reduce-overhead", "max-autotune")
# A bucket whose forward costs at most this many GFLOPs is replayed as a CUDA graph under "auto". At
# the ~380 TFLOP/s a compiled church-sized forward reached on an H200 (39 % of its fp16 peak), 2,000
# GFLOPs are ~5 ms of work; our estimate of the launch overhead of one compiled U-Net forward (a few
# hundred kernels) is of that order. The GPU check (benchmarks/gpu_serving_check.py, section
# "buckets") prints graph vs no graph per bucket size: set this from it.
GRAPH_MAX_GFLOP = 2000.0

# The compile thread holds this while it compiles and warms a bucket; the serving thread captures a
# CUDA graph only when it gets it without waiting.
capture_lock = threading.Lock()

# Set by every compiled graph when it runs, per thread: under `torch._dynamo.run` a call that finds no
# matching compiled entry runs eagerly, and this tells the caller which happened. One flag for all
# networks: Dynamo's run-only lookup takes any entry whose guards match (compiled for another network
# of the same architecture too, which is right: the weights are inputs of the graph).
_compiled_ran = threading.local()


@dataclass(frozen=True)
class Bucket:
    size: int  # rows of the padded batch
    graph: bool  # replayed as a CUDA graph


@dataclass(frozen=True)
class CompilePlan:
    setting: str  # the PATCHDIFF_ENGINE_COMPILE value it was made for
    inductor_mode: str  # torch.compile's mode for Inductor
    dynamic: bool  # one graph with a dynamic batch dimension, rather than one static graph per bucket
    buckets: tuple[Bucket, ...]  # ascending sizes
    backend: str | Callable = "inductor"  # tests pass a cheap counting backend

    @property
    def sizes(self) -> list[int]:
        return [b.size for b in self.buckets]


@functools.lru_cache(maxsize=32)
def _gflops_per_row(config_json: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    config = ModelConfig.model_validate_json(config_json)
    with torch.device("meta"):
        net = PatchedUNet(config).eval()
        x = torch.zeros(1, 3, config.res, config.res)
        t = torch.zeros(1, dtype=torch.long)
        y = torch.zeros(1, dtype=torch.long) if config.conditional else None
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, t, y)
    return counter.get_total_flops() / 1e9


def gflops_per_row(config: ModelConfig) -> float:
    """Convolution, matmul and attention FLOPs of one row of a forward (the meta device: no weights)."""
    return _gflops_per_row(config.model_dump_json())


def bucket_sizes(max_rows: int, dense_from: int | None = None) -> list[int]:
    """Powers of two from MIN_BUCKET up to `max_rows`, then `max_rows`; from `dense_from` rows up,
    also 1.5× each power of two (there a bucket's padding costs compute)."""
    sizes, size = [], MIN_BUCKET
    while size < max_rows:
        sizes.append(size)
        mid = size * 3 // 2
        if dense_from is not None and mid >= dense_from and mid < max_rows:
            sizes.append(mid)
        size *= 2
    return sizes + [max_rows]


def compile_plan(config: ModelConfig, device: torch.device, max_rows: int, setting: str = "auto",
                 dynamic: bool = True) -> CompilePlan | None:
    """What to compile for a model served `max_rows` rows per forward on `device`; None: eager."""
    if setting not in COMPILE_SETTINGS:
        raise ValueError(f"engine compile setting {setting!r}: expected one of {COMPILE_SETTINGS}")
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    cuda = device.type == "cuda"
    if not cuda or setting == "default":
        graph_rows = 0
    elif setting == "reduce-overhead":
        graph_rows = max_rows
    else:  # "auto", "max-autotune": graphs while a forward is cheap
        graph_rows = int(GRAPH_MAX_GFLOP // gflops_per_row(config))
    sizes = bucket_sizes(max_rows, dense_from=graph_rows + 1)
    inductor_mode = "max-autotune-no-cudagraphs" if setting == "max-autotune" else "default"
    return CompilePlan(setting, inductor_mode, dynamic, tuple(Bucket(s, s <= graph_rows) for s in sizes))


def _served_forward(net: PatchedUNet, dtype: torch.dtype | None, channels_last: bool):
    """`network_forward`'s computation as one function for torch.compile (layout change, autocast
    and the float32 outputs inside the graph). Called under inference mode."""
    device_type = next(net.parameters()).device.type

    def forward(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext():
            x0, v = net(x, t, y)
        return x0.float(), v.float()

    return forward


def _raise_recompile_limit(entries: int) -> None:
    # Dynamo keeps compiled entries per code object; every served network shares the code of
    # `_served_forward`'s closure, so the default limit (8) would silently turn later ones eager.
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), entries))


class _CountingBackend:
    """Wraps the real backend so that each thread can tell whether its call ran compiled code or
    fell back to eager (a guard that did not match under `torch._dynamo.run`)."""

    def __init__(self, backend: str | Callable, mode: str):
        self.backend, self.mode = backend, mode

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        if self.backend == "inductor":
            from torch._inductor import list_mode_options
            from torch._inductor.compile_fx import compile_fx

            compiled = compile_fx(gm, example_inputs, config_patches=list_mode_options(self.mode))
        else:
            compiled = self.backend(gm, example_inputs)

        def run(*args):  # Dynamo calls a backend's result with the graph's inputs as arguments
            _compiled_ran.value = True
            return compiled(*args)

        return run


class _Graph:
    """One bucket's CUDA graph: static inputs, the captured forward, its outputs."""

    def __init__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, graph, x0, v):
        self.x, self.t, self.y, self.graph, self.x0, self.v = x, t, y, graph, x0, v

    def __call__(self, x, t, y, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.x.shape[0]
        self.x[:rows].copy_(x)
        self.t[:rows].copy_(t)
        if rows < size:  # padding rows repeat the last real row
            self.x[rows:].copy_(x[-1:].expand(size - rows, *x.shape[1:]))
            self.t[rows:].copy_(t[-1:].expand(size - rows))
        if self.y is not None:
            self.y[:rows].copy_(y)
            if rows < size:
                self.y[rows:].copy_(y[-1:].expand(size - rows))
        self.graph.replay()
        # Copies: the graph's outputs are overwritten by its next replay.
        return self.x0[:rows].clone(), self.v[:rows].clone()


class CompiledForward:
    """`forward(x, t, y)` like `network_forward`'s: eager until the row count's bucket is compiled,
    then through the compiled network (or its CUDA graph), rows padded to the bucket."""

    def __init__(self, net: PatchedUNet, dtype: torch.dtype | None, channels_last: bool, plan: CompilePlan):
        self.plan = plan
        self.sizes = plan.sizes
        self.graph_sizes = {b.size for b in plan.buckets if b.graph}
        self.eager = network_forward(net, dtype, channels_last)
        _raise_recompile_limit(256)
        backend = _CountingBackend(plan.backend, plan.inductor_mode)
        self.compiled = torch.compile(_served_forward(net, dtype, channels_last), backend=backend,
                                      dynamic=None if plan.dynamic else False)
        self._run_only = torch._dynamo.run(self.compiled)
        self.ready: set[int] = set()  # buckets the compile thread finished (set once, read by the server)
        self.graphs: dict[int, _Graph] = {}
        self._graph_failed: set[int] = set()
        self._pool = None  # one CUDA graph memory pool for all buckets (their outputs are copied at once)
        self.calls: Counter[str] = Counter()  # eager / compiled / graph / fallback (a guard missed: eager)
        self._warned: set[int] = set()

    def bucket(self, rows: int) -> int | None:
        return next((size for size in self.sizes if size >= rows), None)

    # -- the serving thread ------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = x.shape[0]
        size = self.bucket(rows)
        # Compiled for inference tensors (the worker steps under inference mode): others would not
        # match the compiled code's guards.
        if size is None or size not in self.ready or not x.is_inference():
            self.calls["eager"] += 1
            return self.eager(x, t, y)
        if size in self.graph_sizes and size not in self._graph_failed:
            graph = self.graphs.get(size) or self._capture(size, x, t, y)
            if graph is not None:
                self.calls["graph"] += 1
                return graph(x, t, y, rows)
        xp, tp, yp = _pad(x, t, y, size)
        (x0, v), compiled = self._call_compiled(xp, tp, yp)
        if compiled:
            self.calls["compiled"] += 1
        else:
            self.calls["fallback"] += 1
            if size not in self._warned:
                self._warned.add(size)
                log.warning("compiled forward of %d rows did not match its guards: ran eagerly", size)
        return x0[:rows], v[:rows]

    def _call_compiled(self, x, t, y):
        """The compiled forward through Dynamo's run-only mode; also whether compiled code ran."""
        _compiled_ran.value = False
        out = self._run_only(x, t, y)
        return out, _compiled_ran.value

    def _capture(self, size: int, x, t, y) -> _Graph | None:
        """Capture bucket `size` as a CUDA graph, unless the compile thread is busy (then later)."""
        if not capture_lock.acquire(blocking=False):
            return None
        try:
            with torch.inference_mode():
                static_x = torch.zeros((size, *x.shape[1:]), dtype=x.dtype, device=x.device)
                static_t = torch.full((size,), 500, dtype=t.dtype, device=t.device)
                static_y = None if y is None else torch.zeros(size, dtype=y.dtype, device=y.device)
                stream = torch.cuda.Stream(device=x.device)
                stream.wait_stream(torch.cuda.current_stream(x.device))
                with torch.cuda.stream(stream):  # warm-up on the capture stream, as CUDA graphs want
                    _, compiled = self._call_compiled(static_x, static_t, static_y)
                torch.cuda.current_stream(x.device).wait_stream(stream)
                if not compiled:
                    raise RuntimeError("the compiled forward did not match its guards on the capture stream")
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
                    (x0, v), _ = self._call_compiled(static_x, static_t, static_y)
                self._pool = graph.pool()
            self.graphs[size] = _Graph(static_x, static_t, static_y, graph, x0, v)
            log.info("captured a CUDA graph of %d rows", size)
            return self.graphs[size]
        except Exception:  # noqa: BLE001 - a bucket without a graph still runs compiled
            self._graph_failed.add(size)
            log.exception("CUDA graph capture of %d rows failed; that bucket runs compiled without a graph", size)
            return None
        finally:
            capture_lock.release()

    # -- the compile thread ------------------------------------------------------------------------
    def compile_bucket(self, size: int, device: torch.device, res: int, conditional: bool) -> None:
        """Compile (or load from the compile cache) and warm bucket `size`, then mark it ready."""
        with torch.inference_mode():
            x = torch.zeros(size, 3, res, res, device=device)
            t = torch.full((size,), 500, dtype=torch.long, device=device)
            y = torch.zeros(size, dtype=torch.long, device=device) if conditional else None
            if self.plan.dynamic:
                for tensor in (x, t, y):
                    if tensor is not None:
                        torch._dynamo.maybe_mark_dynamic(tensor, 0)
            self.compiled(x, t, y)  # compiles, then runs once (Triton autotuning, lazy initialisation)
            _, compiled = self._call_compiled(x, t, y)  # what the serving thread will call
        if not compiled:
            raise RuntimeError(f"the compiled forward of {size} rows does not match its own guards")
        self.ready.add(size)


def _pad(x, t, y, size: int):
    rows = x.shape[0]
    if size == rows:
        return x, t, y
    pad = size - rows
    x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
    t = torch.cat([t, t[-1:].expand(pad)])
    y = None if y is None else torch.cat([y, y[-1:].expand(pad)])
    return x, t, y


@dataclass
class CompileTarget:
    label: str  # e.g. "digits" or "imagenet[1]"
    forward: CompiledForward
    device: torch.device
    res: int
    conditional: bool


@dataclass
class BucketReport:
    label: str
    size: int
    graph: bool
    seconds: float
    cache_hits: int  # Inductor FX-graph cache hits while compiling it (loaded, not compiled)
    cache_misses: int
    error: str | None = None


@dataclass
class Compilation:
    """Compiles the buckets of some networks, largest first (the sizes a busy worker runs), in a
    background thread (`start`) or now (`run`). A bucket that fails to compile stays eager."""

    targets: list[CompileTarget]
    reports: list[BucketReport] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    seconds: float | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self, exit_guard: bool = False) -> Compilation:
        """Compile in a daemon thread. `exit_guard` (a worker process): at interpreter exit while a
        bucket is still compiling, exit at once (`_exit_if_compiling`)."""
        self._thread = threading.Thread(target=self.run, name="patchdiff-compile", daemon=True)
        if exit_guard:
            # Registered before the first compile, so it runs after the handlers torch registers then.
            atexit.register(self._exit_if_compiling)
        self._thread.start()
        return self

    def _exit_if_compiling(self) -> None:
        """A process that finalizes while a thread is inside torch.compile aborts ("terminate called
        without an active exception", SIGABRT). When this runs the worker has stopped: its jobs were
        handed back and its results written, so it leaves without finalizing; the bucket being
        compiled is lost (the ones done are in the compile cache)."""
        if self._thread is None or not self._thread.is_alive():
            return
        self._stopping.set()
        log.info("exiting while compiling: the bucket being compiled is dropped")
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        # The interpreter sets sys.last_exc / last_value when the program ended with an uncaught error.
        os._exit(1 if getattr(sys, "last_exc", None) or getattr(sys, "last_value", None) else 0)

    def stop(self) -> None:
        """No further buckets (the one being compiled finishes)."""
        self._stopping.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def run(self) -> None:
        started = time.perf_counter()
        try:
            for target in self.targets:
                for bucket in sorted(target.forward.plan.buckets, key=lambda b: -b.size):
                    if self._stopping.is_set():
                        return
                    self.reports.append(self._compile(target, bucket))
            self.seconds = time.perf_counter() - started
            hits, misses = sum(r.cache_hits for r in self.reports), sum(r.cache_misses for r in self.reports)
            log.info("compile finished: %d buckets of %s in %.1f s (compile cache: %d hits, %d misses)",
                     len(self.reports), ", ".join(t.label for t in self.targets), self.seconds, hits, misses)
        finally:
            self.done.set()

    def _compile(self, target: CompileTarget, bucket: Bucket) -> BucketReport:
        from torch._dynamo.utils import counters

        before = Counter(counters["inductor"])
        started = time.perf_counter()
        error = None
        try:
            with capture_lock:
                target.forward.compile_bucket(bucket.size, target.device, target.res, target.conditional)
        except Exception as exc:  # noqa: BLE001 - that bucket stays eager; the worker serves on
            error = f"{type(exc).__name__}: {exc}"
            log.exception("compiling %s, %d rows failed: it runs eagerly", target.label, bucket.size)
        after = Counter(counters["inductor"])
        report = BucketReport(target.label, bucket.size, bucket.graph, time.perf_counter() - started,
                              after["fxgraph_cache_hit"] - before["fxgraph_cache_hit"],
                              after["fxgraph_cache_miss"] - before["fxgraph_cache_miss"], error)
        if error is None:
            log.info("compiled %s, %d rows%s in %.1f s (compile cache: %d hits, %d misses)", target.label,
                     bucket.size, " (CUDA graph)" if bucket.graph else "", report.seconds, report.cache_hits,
                     report.cache_misses)
        return report


# -- the persistent compile cache ------------------------------------------------------------------
def device_kind(device: torch.device) -> str:
    """"cpu", or the GPU's name and compute capability, e.g. "NVIDIA-H200-sm90" (a folder name)."""
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", torch.cuda.get_device_name(device)).strip("-") + f"-sm{major}{minor}"


def use_compile_cache(folder: Path | None, device: torch.device) -> Path | None:
    """Keep Inductor's on-disk caches in `folder/torch-<version>/<device kind>/` (call before compiling).

    PyTorch offers two ways to persist compiled code: its "modular" on-disk caches, which Inductor
    keeps under `TORCHINDUCTOR_CACHE_DIR` (the FX-graph cache of compiled graphs with their Triton
    kernels bundled in, the AOTAutograd cache, autotuning results; a temp folder by default), and
    the "mega-cache" `torch.compiler.save_cache_artifacts()` / `load_cache_artifacts()`, which packs
    the same entries into one blob to carry to another machine. We point the modular caches at a
    persistent folder, because:
    - every compile reads and writes it by itself, atomically (several workers can share it);
      `save_cache_artifacts` returns everything compiled in the process so far, so one blob per
      model or bucket would need torch-private calls (`CacheArtifactManager`) to keep apart, and it
      has to be saved after compiling, which a killed worker never does;
    - its keys are content hashes of the traced graph (so of the architecture, the precision, the
      bucket's shapes), of the torch and Triton versions, and of the device's properties: a model
      file's weights are inputs of the graph, not part of it, so two models of one architecture share
      entries correctly, and a changed torch or GPU misses instead of loading stale code.
    The folder is split by torch version and device kind only to make pruning easy (remove the
    folders of torch versions no longer deployed). The cache spares Inductor's code generation and
    Triton's compiles (most of the time); Dynamo still traces each network at start-up (seconds).
    Returns the folder used, or None (not writable: Inductor's default temp folder is used).
    """
    if folder is None:
        return None
    where = Path(folder) / f"torch-{torch.__version__}" / device_kind(device)
    try:
        where.mkdir(parents=True, exist_ok=True)
        probe = where / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        log.warning("compile cache %s is not writable (%s): compiled code is cached in a temp folder", where, exc)
        return None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(where)
    try:  # paths derived from the old folder may be memoised
        from torch._inductor.utils import clear_caches

        clear_caches()
    except ImportError:
        pass
    log.info("compile cache: %s", where)
    return where
