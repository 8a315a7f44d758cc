"""The service's worker on a GPU, end to end (`benchmarks/gpu_check.sh` calls this after gpu_check.py).

An embedded redis-server (as `patchdiff serve` starts it), a burst of mixed jobs submitted through the
job contract the API uses (`JobStore.submit`), and the real worker (`worker.main.run_worker`, burst
mode: it exits once the queues are empty) on the device at its default precision (the model's
`cuda_precision`, fp16 unless the registry says otherwise) with its default rows per forward, and
eager (`engine_compile="off"`: a burst this short ends before a compile would, and the compiled
forwards' pictures are compared with eager ones by `gpu_serving_check.py`). Then every job must have
finished with its PNGs in the store, and each picture is compared with the library's `generate` in
fp32 on the same device (same seeds, so the same noise): the mean and worst grey-level difference.

    python benchmarks/gpu_worker_check.py --out benchmarks/results/gpu_check.md   # appends a section
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from patchdiff_core.generation.pipeline import SamplingModel, generate
from patchdiff_core.generation.registry import get_model
from patchdiff_core.generation.spec import GenerationSpec
from patchdiff_core.model.device import resolve_precision
from patchdiff_core.service.jobs import JobStore
from patchdiff_core.service.redis_conn import worker_redis
from patchdiff_core.service.serve import _wait_for_socket, embedded_redis
from patchdiff_core.service.settings import Settings
from patchdiff_core.service.store import make_store, result_key
from worker.main import run_worker

REPO = Path(__file__).resolve().parent.parent


def mixed_burst(quick: bool = False) -> list[GenerationSpec]:
    """One-image and few-image jobs over every sampler, guided and not, and one large job."""
    specs = []
    samplers = [("ancestral", "50"), ("ddim", "20"), ("dpmpp_2m", "10"), ("dpmpp_2m_sde", "20"), ("dpmpp_2m", "logsnr8")]
    for i in range(40):
        sampler, steps = samplers[i % len(samplers)]
        specs.append(GenerationSpec(model="digits", num_images=1 + i % 3, seed=100 + i, sampler=sampler, timesteps=steps,
                                    guidance=1.0 if i % 2 else 2.0, class_labels=[i % 10] * (1 + i % 3)))
    if quick:  # a smoke run on the CPU
        return specs[:6]
    specs.append(GenerationSpec(model="digits", num_images=64, seed=7, sampler="ancestral", timesteps="100",
                                guidance=1.5, class_labels=[i % 10 for i in range(64)]))
    return specs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="six small jobs (a smoke run of the script)")
    parser.add_argument("--out", type=Path, help="append the Markdown section here (also printed)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        redis_child, url = embedded_redis(data / "redis", {}, REPO)
        redis_child.start()
        try:
            _wait_for_socket(url)
            settings = Settings(redis_url=url, store_dir=data / "results", device=args.device, log_format="text",
                                worker_models=["digits"], engine_compile="off")
            jobs = JobStore(worker_redis(settings), settings)
            specs = mixed_burst(args.quick)
            ids = [jobs.submit(spec)[0].id for spec in specs]
            start = time.perf_counter()
            run_worker(settings, burst=True, name="gpu-check")
            seconds = time.perf_counter() - start
            records = [jobs.get(i) for i in ids]
            store = make_store(settings)
            reference = SamplingModel.load("digits", weights_dir=settings.weights_dir, device=args.device, precision="fp32")
            served_precision = resolve_precision(  # what the worker served at
                "auto", reference.device, cuda_default=get_model("digits", settings.weights_dir).cuda_precision or "fp16")
            statuses: dict[str, int] = {}
            diffs, missing = [], 0
            for record, spec in zip(records, specs):
                statuses[record.status] = statuses.get(record.status, 0) + 1
                if record.status != "finished":
                    continue
                with torch.inference_mode():
                    ours_fp32 = generate(reference, spec).images  # uint8 [N, R, R, 3]
                for i in range(spec.num_images):
                    png = store.get(result_key(record.id, f"images/{i}.png", record.attempt))
                    if png is None:
                        missing += 1
                        continue
                    served = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
                    diffs.append(np.abs(served - ours_fp32[i].astype(int)))
        finally:
            redis_child.terminate()
            redis_child.wait_or_kill(time.monotonic() + 5)
    images = sum(s.num_images for s in specs)
    all_diffs = np.stack([d.mean() for d in diffs]) if diffs else np.array([np.nan])
    worst = max((int(d.max()) for d in diffs), default=-1)
    ok = statuses.get("finished", 0) == len(specs) and missing == 0
    lines = ["## The worker on the device, end to end\n",
             f"{len(specs)} jobs ({images} images: every sampler, guided and not, 1-3 images each, plus one 64-image "
             f"guided 100-step job{'; quick: the first 6' if args.quick else ''}) submitted through `JobStore.submit`, run by `run_worker` (burst) on {args.device} "
             f"at {served_precision}, default rows per forward ({settings.engine_rows('digits', torch.device(args.device).type, reference.config.res)}).\n",
             "| what | value |", "|---|--:|",
             f"| job statuses | {', '.join(f'{k}: {v}' for k, v in sorted(statuses.items()))} |",
             f"| images missing from the store | {missing} |",
             f"| worker wall time (incl. model load) | {seconds:.1f} s ({images / seconds:.1f} images/s) |",
             f"| grey levels vs library fp32 on the same device: mean per image (median / worst) | "
             f"{np.median(all_diffs):.3f} / {all_diffs.max():.3f} |",
             f"| grey levels vs library fp32: worst pixel | {worst} |",
             f"| verdict | {'PASS' if ok else 'FAIL'} (every job finished with its images) |", ""]
    text = "\n".join(lines)
    print(text, flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.write("\n" + text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
