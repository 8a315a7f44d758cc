"""Forward-pass throughput (images/s) of the released patched U-Nets.

Usage::

    python benchmarks/forward.py                      # every released config, on CUDA if available
    python benchmarks/forward.py --quick              # smoke run: church_p8 at batch 1, 1 warm-up + 1 timed
    python benchmarks/forward.py --device cpu --models church_p4 church_p8 --batch-sizes 1

The networks are randomly initialised (no weights needed: the cost does not depend on them) and run
under `torch.inference_mode()` with a fixed timestep (and the "no label" class for ImageNet); a
two-network model (imagenet) is timed as one network, which is what one sampling step runs.

- CPU: fp32, contiguous (NCHW) tensors. Defaults: batch sizes 1 and 4, 1 warm-up + 2 timed
  iterations. Every released config at those sizes is about 22 TFLOPs in all (ffhq at 1024 px is over
  half of it): a few minutes on a modern many-core CPU, more on a small or busy one.
- CUDA: fp16 autocast and channels_last (model and input). Defaults: batch sizes 1, 8 and 32,
  3 warm-up + 10 timed iterations, `torch.cuda.synchronize()` around each one. A batch that runs out of
  memory is reported as OOM and the run goes on.

Each row gives the median over the timed iterations, the fastest one, and the achieved GFLOP/s
(FLOPs as `flops.py` counts them, 1 multiply-add = 2 FLOPs).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from patchdiff_core.generation.registry import RELEASED
from patchdiff_core.model.config import ModelConfig
from patchdiff_core.model.unet import PatchedUNet

QUICK_MODELS = ["church_p8"]
DEFAULTS = {
    # device type: (batch sizes, warm-up iterations, timed iterations, precision, channels_last)
    "cpu": ([1, 4], 1, 2, "fp32", False),
    "cuda": ([1, 8, 32], 3, 10, "fp16", True),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _load_flops():
    """`flops.py` from this directory (benchmarks/ is not a package)."""
    name = "patchdiff_benchmarks_flops"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("flops.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, str]:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu cores (os)": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
    }
    if hasattr(os, "getloadavg"):  # other work on the machine skews CPU timings
        info["load average (1/5/15 min, at start)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
        info["cuda"] = str(torch.version.cuda)
        info["cudnn"] = str(torch.backends.cudnn.version())
    return info


@dataclass(frozen=True)
class Result:
    model: str
    res: int
    patch_size: int
    device: str
    precision: str
    channels_last: bool
    batch: int
    warmup: int
    iters: int
    median_s: float | None  # seconds per forward pass of the whole batch; None when it did not run
    min_s: float | None
    images_per_s: float | None
    gflops_per_s: float | None  # achieved, FLOPs as flops.py counts them
    note: str = ""


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def bench_config(
    name: str,
    cfg: ModelConfig,
    batch_sizes: list[int],
    device: torch.device,
    warmup: int,
    iters: int,
    precision: str = "fp32",
    channels_last: bool = False,
    flops_per_image: int | None = None,
) -> list[Result]:
    """Times `iters` forward passes (after `warmup` untimed ones) for each batch size."""
    if flops_per_image is None:
        flops_per_image = _load_flops().count(cfg).flops_per_image
    model = PatchedUNet(cfg).eval().to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    results = []
    for batch in batch_sizes:
        common = dict(
            model=name,
            res=cfg.res,
            patch_size=cfg.patch_size,
            device=str(device),
            precision=precision,
            channels_last=channels_last,
            batch=batch,
            warmup=warmup,
            iters=iters,
        )
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, cfg.res, cfg.res, generator=gen).clamp(-1, 1)
        x = x.to(device).contiguous(memory_format=memory_format)
        t = torch.full((batch,), 500, dtype=torch.long, device=device)
        y = torch.full((batch,), cfg.num_classes, dtype=torch.long, device=device) if cfg.conditional else None
        times: list[float] = []
        out_of_memory = False
        try:
            with torch.inference_mode(), _autocast(device, precision):
                for i in range(warmup + iters):
                    _synchronize(device)
                    start = time.perf_counter()
                    model(x, t, y)
                    _synchronize(device)
                    if i >= warmup:
                        times.append(time.perf_counter() - start)
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError in newer versions, same class
            out_of_memory = True
        del x, t, y
        if out_of_memory:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results.append(
                Result(**common, median_s=None, min_s=None, images_per_s=None, gflops_per_s=None, note="OOM")
            )
            continue
        median = statistics.median(times)
        results.append(
            Result(
                **common,
                median_s=median,
                min_s=min(times),
                images_per_s=batch / median,
                gflops_per_s=flops_per_image * batch / median / 1e9,
            )
        )
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def render_markdown(info: dict[str, str], results: list[Result]) -> str:
    lines = ["## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += [
        "",
        "## Forward-pass throughput",
        "",
        "Median over the timed iterations (after the warm-up ones); GFLOP/s achieved, counting FLOPs as "
        "benchmarks/flops.py does (1 multiply-add = 2 FLOPs).",
        "",
        "| model | resolution | P | device | precision | channels_last | batch | warm-up + timed "
        "| median ms/batch | min ms/batch | images/s | GFLOP/s |",
        "|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.median_s is None:
            timing = f"{r.note} | {r.note} | – | –"
        else:
            timing = f"{r.median_s * 1e3:.1f} | {r.min_s * 1e3:.1f} | {r.images_per_s:.3g} | {r.gflops_per_s:.0f}"
        lines.append(
            f"| {r.model} | {r.res}×{r.res} | {r.patch_size} | {r.device} | {r.precision} "
            f"| {'yes' if r.channels_last else 'no'} | {r.batch} | {r.warmup} + {r.iters} | {timing} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    names = [e.name for e in RELEASED]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=names, metavar="MODEL", help=f"subset of {', '.join(names)}")
    p.add_argument("--batch-sizes", nargs="+", type=int, metavar="N", help="default: 1 4 on CPU, 1 8 32 on CUDA")
    p.add_argument("--iters", type=int, help="timed iterations (default: 2 on CPU, 10 on CUDA)")
    p.add_argument("--warmup", type=int, help="untimed warm-up iterations (default: 1 on CPU, 3 on CUDA)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        help="fp32, or autocast to fp16/bf16 (default: fp32 on CPU, fp16 on CUDA)",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="model and input in channels_last (default: on for CUDA, off for CPU)",
    )
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the CPU (default: torch's)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {', '.join(QUICK_MODELS)} at batch 1, 1 + 1 iters")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="Markdown (default)")
    fmt.add_argument("--json", action="store_true", help="JSON lines, one per result, after the machine line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in DEFAULTS:
        raise SystemExit(f"unsupported device {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes, warmup, iters, precision, channels_last = DEFAULTS[device.type]
    models = [e.name for e in RELEASED]
    if args.quick:
        models, batch_sizes, warmup, iters = QUICK_MODELS, [1], 1, 1
    models = args.models or models
    batch_sizes = args.batch_sizes or batch_sizes
    warmup = args.warmup if args.warmup is not None else warmup
    iters = args.iters or iters
    precision = args.precision or precision
    channels_last = channels_last if args.channels_last is None else args.channels_last
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    info = machine_info(device)
    by_name = {e.name: e for e in RELEASED}
    flops = _load_flops()
    results: list[Result] = []
    for name in models:
        cfg = by_name[name].config
        print(f"timing {name} (batch {', '.join(map(str, batch_sizes))}) ...", file=sys.stderr, flush=True)
        results += bench_config(
            name,
            cfg,
            batch_sizes,
            device,
            warmup,
            iters,
            precision=precision,
            channels_last=channels_last,
            flops_per_image=flops.count(cfg).flops_per_image,
        )
    if args.json:
        print(json.dumps({"machine": info}))
        for r in results:
            print(json.dumps(asdict(r)))
    else:
        print(render_markdown(info, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
