"""The batching engine eager vs each compile setting (`PATCHDIFF_ENGINE_COMPILE`) on a GPU, side by side
in one run: images/s of a burst of one-image jobs, for the demo model and for a 256 px
church_p4-sized network (random weights, fp16), and how far the compiled pictures are from the eager
ones (relative error of the final x0, same seeds). Every bucket is compiled before the bursts (the
compile seconds are reported apart); the timed burst is the second one (the first captures the CUDA
graphs). `gpu_serving_check.py` measures the default setting through the whole service.

    python benchmarks/gpu_compile_check.py --out benchmarks/results/gpu_check.md   # appends a section
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from gpu_check import run_engine

from patchdiff_core.diffusion.schedule import Schedule
from patchdiff_core.generation.pipeline import SamplingModel
from patchdiff_core.generation.registry import RELEASED
from patchdiff_core.generation.spec import GenerationSpec
from patchdiff_core.model.unet import PatchedUNet


def burst(model: SamplingModel, jobs: int, rows: int, sampler: str, steps: str) -> tuple[float, torch.Tensor]:
    specs = [GenerationSpec(model=model.name, num_images=1, seed=i, sampler=sampler, timesteps=steps,
                            class_labels=[i % 10] if model.config.conditional else None) for i in range(jobs)]
    done: list = []
    seconds = run_engine(model, rows, specs, done)
    return seconds, torch.cat([r.x0_images() for r in done])


def church_sized(device: torch.device) -> SamplingModel:
    config = next(e for e in RELEASED if e.name == "church_p4").config
    torch.manual_seed(0)
    net = PatchedUNet(config).to(device).eval().to(memory_format=torch.channels_last)
    with torch.no_grad():  # the zero-initialised output layers of a fresh network would make x0 trivial
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return SamplingModel(name="church_sized", config=config, networks=[net], schedule=Schedule.linear(config.beta_max),
                         device=device, precision="fp16")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, help="append the Markdown section here (also printed)")
    parser.add_argument("--quick", action="store_true", help="the demo model only, 8 jobs (a CPU smoke run)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cases = [  # (label, model factory, jobs, rows, modes)
        ("digits (demo, 32 px)", lambda: SamplingModel.load("digits", device=str(device)), 512, 128,
         ["auto", "reduce-overhead", "default"]),
        ("church_p4-sized (256 px, random weights)", lambda: church_sized(device), 64, 64, ["auto", "default"]),
    ]
    if args.quick:
        cases = [("digits (demo, 32 px)", lambda: SamplingModel.load("digits", device=str(device)), 8, 8, ["default"])]
    lines = ["## The engine compiled (PATCHDIFF_ENGINE_COMPILE) against eager\n",
             "A burst of one-image jobs (unipc, 10 steps, unguided), all admitted at once; compile = seconds to "
             "compile every bucket up to the rows, timed = the second burst.\n",
             "| network | jobs, rows | mode | compile, s | timed, s | images/s | vs eager | final x0 vs eager |",
             "|---|---|---|--:|--:|--:|--:|--:|"]
    for label, factory, jobs, rows, modes in cases:
        eager_model = factory()
        burst(eager_model, jobs, rows, "unipc", "10")  # warm-up
        eager_s, eager_x0 = burst(eager_model, jobs, rows, "unipc", "10")
        lines.append(f"| {label} | {jobs}, {rows} | eager | - | {eager_s:.2f} | {jobs / eager_s:.0f} | 1.00 | - |")
        print(lines[-1], flush=True)
        for mode in modes:
            model = None
            try:
                model = factory()
                compilation = model.compile(rows, mode)
                burst(model, jobs, rows, "unipc", "10")
                seconds, x0 = burst(model, jobs, rows, "unipc", "10")
                err = float((x0.float() - eager_x0.float()).norm() / eager_x0.float().norm())
                lines.append(f"| {label} | {jobs}, {rows} | {mode} | {compilation.seconds:.1f} | {seconds:.2f} | "
                             f"{jobs / seconds:.0f} | {eager_s / seconds:.2f} | {err:.1e} |")
            except Exception as exc:  # noqa: BLE001 - report it, measure the rest
                lines.append(f"| {label} | {jobs}, {rows} | {mode} | error: {type(exc).__name__}: {str(exc)[:80]} | | | | |")
            print(lines[-1], flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
