"""The GPU checks in one run (`benchmarks/gpu_check.sh` calls this): a Markdown report under
`benchmarks/results/`.

1. fp16 (+ channels_last) against fp32: relative error of x0 over a whole guided trajectory of the
   demo model (same noise), and of one forward of a church_p4-sized network.
2. Forward throughput (images/s) of the demo model and of a church_p4-sized network (random weights)
   at batch 1..256 in fp32, fp16, fp16 + channels_last, and fp16 + channels_last under
   `torch.compile` (mode "max-autotune-no-cudagraphs") and with CUDA graphs (mode "reduce-overhead"),
   with the model FLOP utilisation from `flops.py`'s counts against the card's dense fp16 peak.
3. The batching engine under a burst: 64 one-image jobs of the demo model (20 steps) admitted at
   once, against the same 64 images as one job; images/s.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.md
    python benchmarks/gpu_check.py --device cpu --quick      # a smoke run of the script itself
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
from pathlib import Path

import torch

from patchdiff_core.diffusion.samplers import make_denoiser, sample
from patchdiff_core.generation.engine import BatchEngine
from patchdiff_core.generation.pipeline import SamplingModel
from patchdiff_core.generation.registry import RELEASED
from patchdiff_core.generation.spec import GenerationSpec
from patchdiff_core.model.unet import PatchedUNet

# Dense fp16 tensor-core peaks (TFLOP/s, without sparsity) of cards we may be lent.
PEAK_FP16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def _flops():
    spec = importlib.util.spec_from_file_location("patchdiff_bench_flops", Path(__file__).with_name("flops.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def precision_check(device, steps: int, quick: bool = False) -> list[str]:
    fp32 = SamplingModel.load("digits", device=str(device), precision="fp32")
    low = "fp16" if device.type == "cuda" else "bf16"
    half = SamplingModel.load("digits", device=str(device), precision=low)
    labels = torch.arange(8, device=device) % 10
    gen = torch.Generator(device=device).manual_seed(0)
    x_T = torch.randn(8, 3, 32, 32, device=device, generator=gen)
    noise = [torch.randn(8, 3, 32, 32, device=device, generator=gen) for _ in range(steps)]
    timesteps = list(range(0, 1000, 1000 // steps))
    out = {}
    for name, model in (("fp32", fp32), (low, half)):
        channels_last = device.type == "cuda" and name != "fp32"
        dtype = None if name == "fp32" else (torch.float16 if name == "fp16" else torch.bfloat16)
        denoise = make_denoiser(model.networks[0], labels, 1.5, dtype, channels_last)
        with torch.inference_mode():
            out[name] = sample("ancestral", denoise, x_T.clone(), timesteps, model.schedule, noise=list(noise))
    lines = [
        "## Reduced precision against fp32\n",
        "| what | relative error |\n|---|--:|",
        f"| demo model, x0 after {steps} guided ancestral steps (w=1.5), {low}{' + channels_last' if device.type == 'cuda' else ''} | {rel(out[low], out['fp32']):.2e} |",
    ]
    if quick:  # the smoke run skips the 256 px network
        return lines + [""]
    church = PatchedUNet(next(e for e in RELEASED if e.name == "church_p4").config).to(device).eval()
    x = torch.randn(2, 3, 256, 256, device=device)
    t = torch.tensor([100, 700], device=device)
    with torch.inference_mode():
        ref = church(x, t, None)[0]
        with torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16):
            lowp = church(x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x, t, None)[0]
    return lines + [f"| church_p4-sized network (random weights), one forward, x0 | {rel(lowp, ref):.2e} |", ""]


def throughput(device, batch_sizes: list[int], quick: bool) -> list[str]:
    flops = _flops()
    configs = {"digits (demo, 32 px)": SamplingModel.load("digits", device="cpu").config}
    if not quick:
        configs["church_p4-sized (256 px)"] = next(e for e in RELEASED if e.name == "church_p4").config
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = next((v for k, v in PEAK_FP16_TFLOPS.items() if k in name), None)
    variants = ["fp32", "fp16", "fp16+channels_last"] if device.type == "cuda" else ["fp32", "bf16"]
    if device.type == "cuda" and not quick:
        variants += ["fp16+cl+compile", "fp16+cl+cudagraphs"]
    lines = ["## Forward throughput (images/s; MFU = achieved / dense fp16 peak"
             + (f" {peak:.0f} TFLOP/s" if peak else ", peak unknown") + ")\n"]
    for label, cfg in configs.items():
        gflop = flops.count(cfg, 1).gflops
        lines += [f"### {label}: {gflop:.2f} GFLOPs per image\n",
                  "| batch | " + " | ".join(variants) + " |", "|--:|" + "--:|" * len(variants)]
        net = PatchedUNet(cfg).to(device).eval()
        compiled = {}
        for batch in batch_sizes:
            cells = []
            for variant in variants:
                try:
                    x = torch.randn(batch, 3, cfg.res, cfg.res, device=device)
                    t = torch.full((batch,), 500, device=device)
                    model = net
                    if "channels_last" in variant or "+cl" in variant:
                        model = net.to(memory_format=torch.channels_last)
                        x = x.contiguous(memory_format=torch.channels_last)
                    if "compile" in variant or "cudagraphs" in variant:
                        mode = "max-autotune-no-cudagraphs" if "compile" in variant else "reduce-overhead"
                        model = compiled.setdefault(mode, torch.compile(model, mode=mode))
                    dtype = {"fp32": None, "bf16": torch.bfloat16}.get(variant, torch.float16)

                    def run():
                        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                            model(x, t, None)

                    seconds = timed(run, device, warmup=1 if quick else 3, iters=1 if quick else 10)
                    ips = batch / seconds
                    mfu = f" ({100 * ips * gflop / 1e3 / peak:.1f}%)" if peak else ""
                    cells.append(f"{ips:.1f}{mfu}")
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    cells.append("OOM")
                except Exception as exc:  # noqa: BLE001 - report what broke, keep measuring
                    cells.append(f"error: {type(exc).__name__}")
            lines.append(f"| {batch} | " + " | ".join(cells) + " |")
        lines.append("")
        del net, compiled
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return lines


def engine_burst(device, jobs: int, steps: int, rows: int) -> list[str]:
    model = SamplingModel.load("digits", device=str(device))

    def run(requests: list[GenerationSpec]) -> float:
        engine = BatchEngine({"digits": model}, {"digits": rows})
        for i, spec in enumerate(requests):
            engine.add(f"r{i}", spec)
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            while not engine.idle:
                engine.step()
        sync(device)
        return time.perf_counter() - start

    small = [GenerationSpec(model="digits", num_images=1, timesteps=str(steps), seed=i, class_labels=[i % 10])
             for i in range(jobs)]
    one = [GenerationSpec(model="digits", num_images=jobs, timesteps=str(steps), seed=0,
                          class_labels=[i % 10 for i in range(jobs)])]
    run(one[:1])  # warm-up
    burst, single = run(small), run(one)
    return ["## The batching engine under a burst (demo model)\n",
            f"{jobs} one-image jobs of {steps} ancestral steps admitted at once vs one {jobs}-image job, "
            f"{rows} rows per forward, {model.precision}:\n",
            "| work | s | images/s |\n|---|--:|--:|",
            f"| {jobs} × 1-image jobs | {burst:.2f} | {jobs / burst:.1f} |",
            f"| one {jobs}-image job | {single:.2f} | {jobs / single:.1f} |",
            f"| ratio | {burst / single:.2f} | |", ""]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, one timed iteration (smoke run)")
    parser.add_argument("--out", type=Path, help="write the Markdown report here (also printed)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batch_sizes = [1, 2] if args.quick else [1, 4, 16, 64, 256]
    header = [f"# GPU check ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n",
              f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
              f"torch {torch.__version__}; python {platform.python_version()}\n"]
    sections = [header, precision_check(device, 5 if args.quick else 50, args.quick), throughput(device, batch_sizes, args.quick),
                engine_burst(device, 4 if args.quick else 64, 3 if args.quick else 20, 4 if args.quick else 64)]
    report = "\n".join(line for section in sections for line in section)
    print(report, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)


if __name__ == "__main__":
    sys.exit(main())
