"""The GPU checks in one run (`benchmarks/gpu_check.sh` calls this): a Markdown report under
`benchmarks/results/`, written section by section (a run cut short keeps what it measured).

0. The golden fixtures (tests/fixtures/golden) on the device in fp32 with TF32 off: forward pass,
   the library's ancestral trajectory and the batching engine's, against the original code's
   outputs; and the same trajectories in the device's reduced precision.
1. fp16 (+ channels_last) against fp32: relative error of x0 over a whole guided trajectory of the
   demo model (same noise), and of one forward of a church_p4-sized network.
2. Forward throughput (images/s) of the demo model and of a church_p4-sized network (random weights)
   at batch 1..256 in fp32, fp16, fp16 + channels_last, and fp16 + channels_last under
   `torch.compile` (mode "default") and with CUDA graphs (mode "reduce-overhead"),
   with the model FLOP utilisation from `flops.py`'s counts against the card's dense fp16 peak.
3. The batching engine: images/s of a burst of one-image jobs of the demo model by rows per forward
   (what the CUDA default, `settings.auto_engine_rows`, should be), and the burst against the same
   images as one job.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.md
    python benchmarks/gpu_check.py --device cpu --quick      # a smoke run of the script itself
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import flops  # benchmarks/flops.py: this script's folder is on sys.path
import numpy as np
import torch

from patchdiff_core.diffusion.samplers import make_denoiser, sample
from patchdiff_core.diffusion.schedule import Schedule
from patchdiff_core.generation.engine import BatchEngine
from patchdiff_core.generation.pipeline import SamplingModel
from patchdiff_core.generation.registry import RELEASED
from patchdiff_core.generation.spec import GenerationSpec
from patchdiff_core.model.checkpoint import load_model
from patchdiff_core.model.unet import PatchedUNet

# Dense fp16 tensor-core peaks (TFLOP/s, without sparsity) of cards we may be lent.
PEAK_FP16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}
GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "golden"
FORWARD_TOL, TRAJECTORY_TOL = 1e-5, 1e-4  # as tests/conftest.py


@contextmanager
def tf32(enabled: bool):
    """TF32 on or off for matmuls and cuDNN convolutions (cuDNN's default is on), restored afterwards."""
    served = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = served


def true_fp32():
    """TF32 off: the golden fixtures' tolerances are for real fp32."""
    return tf32(False)


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
    a, b = np.asarray(torch.as_tensor(a).double().cpu()), np.asarray(torch.as_tensor(b).double().cpu())
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def nchw(a: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous().to(device)


def golden_check(device) -> list[str]:
    """The fixtures on this device: fp32 with TF32 off must match as on the CPU (1e-5 forward, 1e-4
    trajectory); the reduced-precision trajectory is reported, not judged."""
    low = "fp16" if device.type == "cuda" else "bf16"
    lines = ["## Golden fixtures on the device\n",
             f"fp32 (TF32 off) must match the original code as on the CPU (forward ≤ {FORWARD_TOL:g}, trajectory ≤ "
             f"{TRAJECTORY_TOL:g}); {low} is reported. Engine = every fixture image as its own request beside a stranger.\n",
             f"| case | forward x0 | forward v | library trajectory (worst step) | engine trajectory (worst step) | {low} engine, final x0 | fp32 verdict |",
             "|---|--:|--:|--:|--:|--:|---|"]
    for case in sorted(p.name for p in GOLDEN.iterdir() if p.is_dir()):
        lines.append(_golden_case(case, device, low))
    return lines + [""]


@true_fp32()
def _golden_case(case: str, device, low: str) -> str:
    """One fixture's table row."""
    cfg = json.loads((GOLDEN / case / "config.json").read_text())
    ref = dict(np.load(GOLDEN / case / "reference.npz"))
    net = load_model(GOLDEN / case / "ema_weights.h5", device=device)
    conditional = net.config.conditional
    with torch.inference_mode():
        y = torch.from_numpy(ref["y"]).long().to(device) if conditional else None
        x0, v = net(nchw(ref["x"], device), torch.from_numpy(ref["t"]).long().to(device), y)
    fwd_x0, fwd_v = rel(x0.permute(0, 2, 3, 1), ref["mean"]), rel(v.permute(0, 2, 3, 1), ref["var"])

    labels = torch.from_numpy(ref["sample_y"]).long().to(device) if conditional else None
    trajectory = []
    with torch.inference_mode():
        final = sample("ancestral", make_denoiser(net, labels, cfg["guidance"]), nchw(ref["sample_xT"], device),
                       ref["sample_timesteps"].tolist(), Schedule.linear(cfg["beta_max"]),
                       noise=[nchw(n, device) for n in ref["sample_noise"]],
                       callback=lambda info: trajectory.append(info["x"].permute(0, 2, 3, 1)))
    steps = [rel(ours, theirs) for ours, theirs in zip(trajectory, ref["sample_trajectory"])]
    lib_worst = max(steps + [rel(final.permute(0, 2, 3, 1), ref["sample_x0"])])

    engine_err = {}
    for precision in ("fp32", low):
        model = SamplingModel(name=case, config=net.config, networks=[net], schedule=Schedule.linear(cfg["beta_max"]),
                              device=device, precision=precision)
        B = ref["sample_xT"].shape[0]
        xT, noise = nchw(ref["sample_xT"], device), [nchw(n, device) for n in ref["sample_noise"]]
        per_image: dict[int, list] = {b: [] for b in range(B)}
        n_steps = len(ref["sample_trajectory"])

        def record(request, index, x, x0, per_image=per_image, n_steps=n_steps):
            if request.id.startswith("fixture"):
                seen = per_image[int(request.id[7:])]
                seen.append(x0 if len(seen) == n_steps - 1 else x)

        engine = BatchEngine({case: model}, {case: 2 * B + 1}, on_image_step=record)
        for b in range(B):
            draws = iter([xT[b]] + [n[b] for n in noise])
            engine.add(f"fixture{b}", GenerationSpec(
                model=case, num_images=1, timesteps=str(cfg["sample_steps"]), seed=0, guidance=cfg["guidance"],
                class_labels=[int(ref["sample_y"][b])] if conditional else None),
                noise_for=lambda i, draws=draws: (lambda: next(draws)))
        engine.add("stranger", GenerationSpec(model=case, num_images=2, timesteps="7", seed=5, guidance=1.0,
                                              class_labels=[1, 2] if conditional else None))
        with torch.inference_mode():
            while not engine.idle:
                assert not engine.step().failed
        if precision == "fp32":
            engine_err[precision] = max(
                rel(per_image[b][s][None].permute(0, 2, 3, 1), ref["sample_trajectory"][s, b][None])
                for b in range(B) for s in range(n_steps))
        else:
            ours = torch.stack([per_image[b][-1] for b in range(B)]).permute(0, 2, 3, 1)
            engine_err[precision] = rel(ours, ref["sample_x0"])
    ok = fwd_x0 <= FORWARD_TOL and fwd_v <= FORWARD_TOL and lib_worst <= TRAJECTORY_TOL and engine_err["fp32"] <= TRAJECTORY_TOL
    return (f"| {case} | {fwd_x0:.1e} | {fwd_v:.1e} | {lib_worst:.1e} | {engine_err['fp32']:.1e} | "
            f"{engine_err[low]:.1e} | {'PASS' if ok else 'FAIL'} |")


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
    with true_fp32():  # the reference is true fp32 (cuDNN's default would be TF32)
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
    with true_fp32(), torch.inference_mode():
        ref = church(x, t, None)[0]
    with torch.inference_mode():
        with torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16):
            lowp = church(x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x, t, None)[0]
    return lines + [f"| church_p4-sized network (random weights), one forward, x0 | {rel(lowp, ref):.2e} |", ""]


def _configs(quick: bool) -> dict:
    configs = {"digits (demo, 32 px)": SamplingModel.load("digits", device="cpu").config}
    if not quick:
        configs["church_p4-sized (256 px)"] = next(e for e in RELEASED if e.name == "church_p4").config
    return configs


def _peak(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return next((v for k, v in PEAK_FP16_TFLOPS.items() if k in name), None)


def _forward_ips(net, cfg, device, batch: int, variant: str, quick: bool) -> float:
    x = torch.randn(batch, 3, cfg.res, cfg.res, device=device)
    t = torch.full((batch,), 500, device=device)
    model = net
    if "channels_last" in variant or "+cl" in variant:
        model = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if "compile" in variant or "cudagraphs" in variant:
        torch._dynamo.reset()
        model = torch.compile(model, mode="default" if "compile" in variant else "reduce-overhead")
    dtype = {"fp32": None, "bf16": torch.bfloat16}.get(variant, torch.float16)

    def run():
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            model(x, t, None)

    return batch / timed(run, device, warmup=1 if quick else 3, iters=1 if quick else 10)


def _cell(fn, gflop: float, peak) -> str:
    try:
        ips = fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"
    except Exception as exc:  # noqa: BLE001 - report what broke, keep measuring
        return f"error: {type(exc).__name__}: {str(exc)[:60]}"
    return f"{ips:.1f}" + (f" ({100 * ips * gflop / 1e3 / peak:.1f}%)" if peak else "")


def throughput(device, batch_sizes: list[int], quick: bool, deadline: float) -> list[str]:
    """Eager forwards by batch size and precision; cells past the deadline are skipped."""
    peak = _peak(device)
    variants = ["fp32", "fp16", "fp16+channels_last"] if device.type == "cuda" else ["fp32", "bf16"]
    lines = ["## Forward throughput (images/s; MFU = achieved / dense fp16 peak"
             + (f" {peak:.0f} TFLOP/s" if peak else ", peak unknown") + ")\n",
             "fp32 as served (cuDNN may use TF32 for convolutions; matmul TF32 off).\n"]
    for label, cfg in _configs(quick).items():
        gflop = flops.count(cfg, 1).gflops
        lines += [f"### {label}: {gflop:.2f} GFLOPs per image\n",
                  "| batch | " + " | ".join(variants) + " |", "|--:|" + "--:|" * len(variants)]
        net = PatchedUNet(cfg).to(device).eval()
        for batch in batch_sizes:
            cells = [("skipped (time)" if time.monotonic() > deadline else
                      _cell(lambda: _forward_ips(net, cfg, device, batch, variant, quick), gflop, peak)) for variant in variants]
            lines.append(f"| {batch} | " + " | ".join(cells) + " |")
        lines.append("")
        del net
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return lines


def compiled_throughput(device, batch: int, quick: bool, deadline: float) -> list[str]:
    """torch.compile (default mode) and CUDA graphs (mode "reduce-overhead") against eager, at one
    batch size (each shape compiles anew). Last in the run: compiling is slow and may be cut short."""
    peak = _peak(device)
    variants = ["fp16+channels_last", "fp16+cl+compile", "fp16+cl+cudagraphs"]
    lines = [f"## torch.compile and CUDA graphs, batch {batch} (images/s, MFU)\n",
             "| network | " + " | ".join(variants) + " |", "|---|" + "--:|" * len(variants)]
    for label, cfg in _configs(quick).items():
        gflop = flops.count(cfg, 1).gflops
        net = PatchedUNet(cfg).to(device).eval()
        cells = [("skipped (time)" if time.monotonic() > deadline else
                  _cell(lambda: _forward_ips(net, cfg, device, batch, variant, quick), gflop, peak)) for variant in variants]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        del net
    return lines + [""]


def run_engine(model: SamplingModel, rows: int, requests: list[GenerationSpec], done: list | None = None) -> float:
    """Seconds for the engine to finish `requests`, all admitted at once; `done` receives them."""
    engine = BatchEngine({model.name: model}, {model.name: rows})
    added = [engine.add(f"r{i}", spec) for i, spec in enumerate(requests)]
    if done is not None:
        done.extend(added)
    sync(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        while not engine.idle:
            assert not engine.step().failed
    sync(model.device)
    return time.perf_counter() - start


def engine_rows(device, jobs: int, rows_options: list[int], deadline: float) -> list[str]:
    """A burst of one-image jobs at the demo model's defaults (sampler, steps) through the engine by
    rows per forward, unguided and guided (2 rows per image): where images/s stops growing is the
    device's default."""
    model = SamplingModel.load("digits", device=str(device))
    d = model.defaults
    plain = [GenerationSpec(model="digits", num_images=1, seed=i, class_labels=[i % 10], sampler=d.sampler,
                            timesteps=d.timesteps, guidance=1.0) for i in range(jobs)]
    guided = [s.model_copy(update={"guidance": 2.0}) for s in plain]
    run_engine(model, max(rows_options), guided[:8])  # warm-up (kernels, allocator)
    lines = ["## Batching engine: rows per forward (demo model)\n",
             f"{jobs} one-image jobs admitted at once, {d.sampler} {d.timesteps} steps, {model.precision}; "
             "a guided image takes 2 rows:\n",
             "| max rows | unguided s | unguided images/s | guided (w=2) s | guided images/s |", "|--:|--:|--:|--:|--:|"]
    for rows in rows_options:
        if time.monotonic() > deadline:
            lines.append(f"| {rows} | skipped (time) | | | |")
            continue
        a, b = run_engine(model, rows, plain), run_engine(model, rows, guided)
        lines.append(f"| {rows} | {a:.2f} | {jobs / a:.1f} | {b:.2f} | {jobs / b:.1f} |")
    return lines + [""]


def engine_burst(device, jobs: int, rows: int) -> list[str]:
    """Issue 9's question on this device: a burst of one-image jobs against the same images as one job."""
    model = SamplingModel.load("digits", device=str(device))
    d = model.defaults
    small = [GenerationSpec(model="digits", num_images=1, seed=i, class_labels=[i % 10], sampler=d.sampler,
                            timesteps=d.timesteps, guidance=d.guidance) for i in range(jobs)]
    one = [GenerationSpec(model="digits", num_images=jobs, seed=0, class_labels=[i % 10 for i in range(jobs)],
                          sampler=d.sampler, timesteps=d.timesteps, guidance=d.guidance)]
    run_engine(model, rows, one)  # warm-up
    burst, single = run_engine(model, rows, small), run_engine(model, rows, one)
    return ["## The batching engine under a burst (demo model)\n",
            f"{jobs} one-image jobs admitted at once vs one {jobs}-image job, demo defaults ({d.sampler}, {d.timesteps} "
            f"steps, guidance {d.guidance}), {rows} rows per "
            f"forward, {model.precision}:\n",
            "| work | s | images/s |\n|---|--:|--:|",
            f"| {jobs} × 1-image jobs | {burst:.2f} | {jobs / burst:.1f} |",
            f"| one {jobs}-image job | {single:.2f} | {jobs / single:.1f} |",
            f"| ratio | {burst / single:.2f} | |", ""]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, one timed iteration (smoke run)")
    parser.add_argument("--out", type=Path, help="write the Markdown report here (also printed)")
    parser.add_argument("--budget", type=float, default=400, help="seconds; later cells are skipped past it")
    parser.add_argument("--sections", help="comma-separated names of the sections to run (default: all): "
                        "header, golden, precision, engine rows, engine burst, throughput, compiled")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    start = time.monotonic()
    deadline = lambda share: start + share * args.budget  # noqa: E731 - each section's latest start
    quick = args.quick
    sections = [
        ("header", lambda: [f"# GPU check ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n",
                            f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
                            f"torch {torch.__version__}; python {platform.python_version()}\n"]),
        ("golden", lambda: golden_check(device)),
        ("precision", lambda: precision_check(device, 5 if quick else 50, quick)),
        ("engine rows", lambda: engine_rows(device, 8 if quick else 512, [2, 4] if quick else [16, 32, 64, 128, 256, 512],
                                            deadline(0.4))),
        ("engine burst", lambda: engine_burst(device, 4 if quick else 128, 4 if quick else 128)),
        ("throughput", lambda: throughput(device, [1, 2] if quick else [1, 4, 16, 64, 256], quick, deadline(0.7))),
        ("compiled", lambda: compiled_throughput(device, 2 if quick else 64, quick, deadline(0.85))),
    ]
    if args.sections:
        wanted = {name.strip() for name in args.sections.split(",")}
        unknown = wanted - {name for name, _ in sections}
        if unknown:
            parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
        sections = [(name, section) for name, section in sections if name in wanted]
    report: list[str] = []
    for name, section in sections:
        began = time.monotonic()
        try:
            report += section()
        except Exception:  # noqa: BLE001 - one broken section must not cost the others
            report += [f"## {name}: FAILED\n", "```", traceback.format_exc(), "```", ""]
        print(f"[{name}: {time.monotonic() - began:.1f} s]", file=sys.stderr, flush=True)
        if args.out:  # after every section: a run cut short keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("\n".join(report))
    print("\n".join(report), flush=True)


if __name__ == "__main__":
    sys.exit(main())
