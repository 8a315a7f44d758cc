"""What the service costs on top of the library: the same job in-process and through HTTP + Redis + a worker.

    python benchmarks/service_overhead.py                # demo model, 16 images, 100 steps
    python benchmarks/service_overhead.py --repeats 5 --poll-requests 2000

Runs the in-process job and the service job alternately (so machine noise hits both alike) and
prints medians and their ratio (target <= 1.10 for a job of a few seconds). The service time is
what a client sees: from POST /generate to the poll that reports "finished", results written.
Then it measures GET /jobs/{id} throughput with a bounded number of requests on loopback.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from service_harness import Processes, free_port, wait_until  # noqa: E402


def run_in_process(model, spec, batch_size: int) -> float:
    import torch

    from patchdiff_core.generation.images import make_grid, png_bytes
    from patchdiff_core.generation.pipeline import generate

    started = time.perf_counter()
    with torch.inference_mode():
        result = generate(model, spec, batch_size)
    png_bytes(make_grid(result.images))
    return time.perf_counter() - started


def run_through_service(client: httpx.Client, body: dict, poll_s: float) -> tuple[float, str]:
    started = time.perf_counter()
    job = client.post("/generate", json=body).json()
    while True:
        status = client.get(f"/jobs/{job['id']}").json()
        if status["status"] in ("finished", "failed", "cancelled"):
            break
        time.sleep(poll_s)
    elapsed = time.perf_counter() - started
    if status["status"] != "finished":
        raise RuntimeError(f"job ended {status['status']}: {status['error']}")
    return elapsed, job["id"]


def poll_throughput(url: str, job_id: str, requests: int, clients: int) -> float:
    per_client = requests // clients

    def hammer():
        with httpx.Client(base_url=url) as client:
            for _ in range(per_client):
                client.get(f"/jobs/{job_id}").raise_for_status()

    threads = [threading.Thread(target=hammer) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return per_client * clients / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits")
    parser.add_argument("--weights-dir", type=Path, default=REPO / "weights")
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--timesteps", default="100")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="torch threads, the same for the in-process run and the worker")
    parser.add_argument("--poll-interval", type=float, default=0.02, help="client poll period (s)")
    parser.add_argument("--poll-requests", type=int, default=2000)
    parser.add_argument("--poll-clients", type=int, default=4)
    args = parser.parse_args(argv)
    if os.environ.get("OMP_NUM_THREADS") != str(args.threads):
        # The thread count must be fixed before torch starts (torch.set_num_threads afterwards ran
        # 2-3x slower here than OMP_NUM_THREADS), and be the same as the worker's: re-exec.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        os.execv(sys.executable, [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)])

    import torch

    from patchdiff_core.generation.pipeline import SamplingModel
    from patchdiff_core.generation.spec import GenerationSpec
    from patchdiff_core.service.serve import start_embedded_redis, stop_embedded_redis

    model = SamplingModel.load(args.model, weights_dir=args.weights_dir, device="cpu")
    body = {"model": args.model, "num_images": args.num_images, "timesteps": args.timesteps, "seed": 1234}
    labels = None
    if model.config.conditional:
        body["class_label"] = 1
        labels = [1] * args.num_images
    spec = GenerationSpec(model=model.name, num_images=args.num_images, class_labels=labels,
                          timesteps=args.timesteps, sampler=model.defaults.sampler, guidance=model.defaults.guidance,
                          seed=1234)

    with tempfile.TemporaryDirectory() as tmp:
        redis_server = start_embedded_redis(Path(tmp) / "redis")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHDIFF_")}
        env.update({
            "PATCHDIFF_REDIS_URL": f"unix://{redis_server.socket_file}",
            "PATCHDIFF_WEIGHTS_DIR": str(args.weights_dir),
            "PATCHDIFF_STORE_DIR": str(Path(tmp) / "store"),
            "PATCHDIFF_WORKER_MODELS": args.model,
            "PATCHDIFF_ENGINE_MAX_BATCH": str(args.batch_size),
            "PATCHDIFF_DEVICE": "cpu",
            "OMP_NUM_THREADS": str(args.threads),
        })
        procs = Processes(env, Path(tmp) / "logs")
        try:
            procs.worker()
            url = procs.api(free_port())
            wait_until(lambda: httpx.get(url + "/readyz").status_code == 200, 120, "a live worker")
            with httpx.Client(base_url=url, timeout=600) as client:
                run_in_process(model, spec, args.batch_size)  # warm-up, both sides
                run_through_service(client, body, args.poll_interval)
                local, remote, job_id = [], [], None
                for _ in range(args.repeats):
                    local.append(run_in_process(model, spec, args.batch_size))
                    elapsed, job_id = run_through_service(client, body, args.poll_interval)
                    remote.append(elapsed)
            rps = poll_throughput(url, job_id, args.poll_requests, args.poll_clients)
        finally:
            procs.stop_all()
            stop_embedded_redis(redis_server)

    local_s, remote_s = statistics.median(local), statistics.median(remote)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} torch thread(s); model {args.model}, "
          f"{args.num_images} images x {args.timesteps} steps, batch {args.batch_size}, {args.repeats} repeats\n")
    print("| path | median s | runs (s) |")
    print("|---|---:|---|")
    print(f"| in-process `generate` + grid PNG | {local_s:.3f} | {', '.join(f'{x:.3f}' for x in local)} |")
    print(f"| service: POST, worker, store, poll until finished | {remote_s:.3f} | {', '.join(f'{x:.3f}' for x in remote)} |")
    print(f"\nservice / in-process = **{remote_s / local_s:.3f}** (target <= 1.10)")
    print(f"status polls: {args.poll_requests} GET /jobs/{{id}} from {args.poll_clients} keep-alive clients: "
          f"**{rps:.0f} requests/s**")


if __name__ == "__main__":
    main()
