"""End to end: a real redis-server, real worker processes and the API under uvicorn."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from service_harness import (
    Processes,
    RedisServer,
    free_port,
    running_service,
    service_env,
    wait_until,
    write_weights_dir,
)

from patchdiff_core.model.checkpoint import save_model
from patchdiff_core.model.config import ModelConfig
from patchdiff_core.model.unet import PatchedUNet

pytestmark = pytest.mark.slow
TERMINAL = ("finished", "failed", "cancelled")


def _uncond_model_file(path):
    torch.manual_seed(1)
    model = PatchedUNet(ModelConfig(res=16, c=32, n_blocks=1, attn_resos=[], c_mult=[1, 2], patch_size=2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_model(model, path, {"model": "tinyu"})
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_model_file):
    root = tmp_path_factory.mktemp("weights")
    write_weights_dir(root, tiny_model_file, "tiny")
    # A second, unconditional model in the same manifest.
    import json

    uncond = _uncond_model_file(root / "tinyu.safetensors")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["models"].append({"name": "tinyu", "description": "unconditional test model",
                               "config": json.loads(ModelConfig(res=16, c=32, n_blocks=1, attn_resos=[], c_mult=[1, 2], patch_size=2).to_json()),
                               "files": [uncond.name]})
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def service(tmp_path_factory, weights):
    tmp = tmp_path_factory.mktemp("service")
    # One job at a time, so that a second job stays queued (test_service_batching.py has the engine
    # holding many jobs at once).
    with running_service(tmp, weights, PATCHDIFF_WORKER_MODELS="tiny,tinyu", PATCHDIFF_ENGINE_MAX_JOBS="1") as service:
        yield service


def wait_job(url: str, job_id: str, timeout: float = 60, until=TERMINAL) -> dict:
    return wait_until(lambda: (lambda j: j if j["status"] in until else None)(httpx.get(f"{url}/jobs/{job_id}").json()),
                      timeout, f"job {job_id} to reach {until}")


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics").text
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_submit_poll_download_matches_cli_bytes(service, weights, tmp_path):
    url, env, _ = service
    response = httpx.post(url + "/generate", json={"model": "tiny", "num_images": 5, "class_label": 3, "seed": 42,
                                                   "timesteps": "12", "guidance": 1.5})
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == job["links"]["self"] == f"{url}/jobs/{job['id']}"
    assert job["status"] in ("queued", "running") and job["request"]["seed"] == 42
    # The 202 tells where the job stands: a queued job always has a position (0 = next).
    assert isinstance(job["queue_position"], int) if job["status"] == "queued" else job["queue_position"] is None
    # Results do not exist yet (or the job is very fast): either way never a 500.
    early = httpx.get(f"{url}/jobs/{job['id']}/grid.png")
    assert early.status_code in (200, 404)

    done = wait_job(url, job["id"])
    assert done["status"] == "finished", done
    # Progress counts network evaluations image by image: 5 images x 12 steps.
    assert done["progress"] == {"step": 60, "total": 60, "fraction": 1.0, "images_done": 5}
    assert done["timings"]["run_s"] > 0 and done["attempts"] == 1
    grid = httpx.get(done["links"]["grid"])
    assert grid.status_code == 200 and grid.headers["content-type"] == "image/png"
    images = [httpx.get(link) for link in done["links"]["images"]]
    assert len(images) == 5 and all(r.status_code == 200 and r.content[:4] == b"\x89PNG" for r in images)
    record = httpx.get(done["links"]["record"]).json()
    assert record["seed"] == 42 and record["labels"] == [3] * 5 and len(record["model"]["sha256"][0]) == 64
    assert httpx.get(f"{url}/jobs/{job['id']}/images/5.png").status_code == 404

    out = tmp_path / "cli.png"
    subprocess.run(
        [sys.executable, "-m", "patchdiff_core.cli", "sample", "--model", "tiny", "--num-images", "5",
         "--class-label", "3", "--seed", "42", "--timesteps", "12", "--guidance", "1.5", "--out", str(out), "--quiet"],
        env=env, check=True, capture_output=True,
    )
    # The same pictures as the CLI, to within one grey level: the engine batches the 5 images in
    # other groups than the CLI does, and batched convolutions may round differently.
    ours, theirs = (np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
                    for data in (out.read_bytes(), grid.content))
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1


def test_random_seed_is_reported_and_defaults_apply(service):
    url, _, _ = service
    job = httpx.post(url + "/generate", json={"num_images": 2}).json()
    assert job["request"]["model"] == "tiny" and job["request"]["timesteps"] == "10"
    assert isinstance(job["request"]["seed"], int)
    assert len(job["request"]["class_labels"]) == 2  # random labels drawn from that seed
    assert wait_job(url, job["id"])["status"] == "finished"


def test_unknown_job_is_404(service):
    url, _, _ = service
    for path in ("/jobs/0123456789abcdef0123456789abcdef", "/jobs/not-a-job", "/jobs/..%2F..%2Fetc/grid.png",
                 "/jobs/0123456789abcdef0123456789abcdef/grid.png", "/jobs/0123456789abcdef0123456789abcdef/images/0.png"):
        assert httpx.get(url + path).status_code == 404, path
    assert httpx.delete(url + "/jobs/0123456789abcdef0123456789abcdef").status_code == 404


@pytest.mark.parametrize(
    "body, field",
    [
        ({"model": "nope"}, "model"),
        ({"model": 5}, "model"),
        ({"num_images": 0}, "num_images"),
        ({"num_images": 1000}, "num_images"),
        ({"num_images": "many"}, "num_images"),
        ({"class_label": 10}, "class_label"),
        ({"class_label": -1}, "class_label"),
        ({"class_labels": [1, 2], "num_images": 3}, "class_labels"),
        ({"class_labels": [1, 99], "num_images": 2}, "class_labels"),
        ({"model": "tinyu", "class_label": 1}, "class_label"),
        ({"timesteps": "0"}, "timesteps"),
        ({"timesteps": "2000"}, "timesteps"),
        ({"timesteps": "fast"}, "timesteps"),
        ({"sampler": "euler"}, "sampler"),
        ({"guidance": 0.5}, "guidance"),
        ({"guidance": 100}, "guidance"),
        ({"model": "tinyu", "guidance": 2.0}, "guidance"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_invalid_fields_are_422_naming_the_field(service, body, field):
    url, _, _ = service
    response = httpx.post(url + "/generate", json=body)
    assert response.status_code == 422, response.text
    locs = [d["loc"] for d in response.json()["detail"]]
    assert any(field in loc for loc in locs), locs


def test_both_label_fields_is_422(service):
    url, _, _ = service
    response = httpx.post(url + "/generate", json={"class_label": 1, "class_labels": [1]})
    assert response.status_code == 422 and "class_label" in response.text


def test_not_json_is_422(service):
    url, _, _ = service
    assert httpx.post(url + "/generate", content=b"{nope", headers={"content-type": "application/json"}).status_code == 422


def test_idempotency_key(service):
    url, _, _ = service
    body = {"num_images": 1, "idempotency_key": f"k-{time.time_ns()}"}
    first = httpx.post(url + "/generate", json=body)
    again = httpx.post(url + "/generate", json=body)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = httpx.post(url + "/generate", json={**body, "num_images": 2})
    assert other.status_code == 409


def test_cancel_queued_and_running(service):
    url, _, _ = service
    cancelled_before = metric(url, "patchdiff_jobs_completed_total", '{state="cancelled"}')
    long = {"model": "tiny", "num_images": 4, "timesteps": "1000", "seed": 1}
    running = httpx.post(url + "/generate", json=long).json()
    wait_until(lambda: httpx.get(f"{url}/jobs/{running['id']}").json()["progress"]["step"] > 0, 60, "the job to run")
    queued = httpx.post(url + "/generate", json={**long, "seed": 2}).json()
    status = httpx.get(f"{url}/jobs/{queued['id']}").json()
    assert status["status"] == "queued" and status["queue_position"] == 0

    response = httpx.delete(f"{url}/jobs/{queued['id']}")
    assert response.status_code == 202 and response.json()["status"] == "cancelled"
    response = httpx.delete(f"{url}/jobs/{running['id']}")
    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    stopped = wait_job(url, running["id"], timeout=30)
    assert stopped["status"] == "cancelled" and 0 < stopped["progress"]["step"] < 1000

    # The worker is free again and the cancelled queued job never ran.
    after = httpx.post(url + "/generate", json={"num_images": 1, "seed": 3}).json()
    assert wait_job(url, after["id"])["status"] == "finished"
    never = httpx.get(f"{url}/jobs/{queued['id']}").json()
    assert never["status"] == "cancelled" and never["attempts"] == 0 and never["timings"]["started_at"] is None
    assert httpx.delete(f"{url}/jobs/{queued['id']}").status_code == 409
    assert httpx.get(f"{url}/jobs/{queued['id']}/grid.png").status_code == 404
    assert metric(url, "patchdiff_jobs_completed_total", '{state="cancelled"}') == cancelled_before + 2


def test_models_readyz_healthz(service):
    url, _, _ = service
    models = {m["name"]: m for m in httpx.get(url + "/models").json()}
    assert models["tiny"]["served"] and models["tiny"]["installed"] and models["tiny"]["num_classes"] == 10
    assert models["tiny"]["parameters"] > 100_000 and models["church_p4"]["parameters"] is None
    assert models["tinyu"]["served"] and models["tinyu"]["num_classes"] == 0
    assert not models["church_p4"]["served"] and not models["church_p4"]["installed"]
    assert httpx.get(url + "/healthz").json()["status"] == "ok"
    ready = httpx.get(url + "/readyz").json()
    assert ready["status"] == "ready" and ready["workers"] == 1


def test_metrics_count_what_happened(service):
    url, _, _ = service
    names = [("patchdiff_jobs_submitted_total", ""), ("patchdiff_jobs_completed_total", '{state="finished"}'),
             ("patchdiff_images_generated_total", ""), ("patchdiff_step_duration_seconds_count", ""),
             ("patchdiff_job_duration_seconds_count", "")]

    def read() -> dict[str, float]:
        return {name: metric(url, name, labels) for name, labels in names}

    # Workers flush their latency histograms with their heartbeat (every 0.5 s here): wait until
    # the earlier tests' observations have all arrived.
    def settled() -> dict[str, float] | None:
        first = read()
        time.sleep(1.2)
        return first if read() == first else None

    before = wait_until(settled, 30, "the metrics to settle")
    job = httpx.post(url + "/generate", json={"num_images": 3, "timesteps": "7"}).json()
    assert wait_job(url, job["id"])["status"] == "finished"
    # One job of 3 images and 7 steps (all 3 images in every step: 7 step observations).
    expected = dict(zip([n for n, _ in names], [1, 1, 3, 7, 1]))
    wait_until(lambda: read() == {n: before[n] + expected[n] for n in expected}, 30,
               f"the metrics to count the job ({read()} vs {before} + {expected})")
    assert metric(url, "patchdiff_workers") == 1 and metric(url, "patchdiff_redis_up") == 1
    assert metric(url, "patchdiff_queue_depth") == 0


def test_worker_killed_mid_job_is_requeued_and_finishes_elsewhere(tmp_path, weights):
    redis_server = RedisServer(tmp_path / "redis").start()
    env = service_env(redis_server.url, weights, tmp_path / "store")
    procs = Processes(env, tmp_path / "logs")
    try:
        first = procs.worker()
        url = procs.api(free_port())
        wait_until(lambda: httpx.get(url + "/readyz").status_code == 200, 60, "the first worker")
        job = httpx.post(url + "/generate", json={"num_images": 4, "timesteps": "500", "seed": 7}).json()
        running = wait_until(lambda: (lambda j: j if j["progress"]["step"] > 5 else None)(
            httpx.get(f"{url}/jobs/{job['id']}").json()), 60, "the job to run")
        second = procs.worker()
        wait_until(lambda: httpx.get(url + "/readyz").json().get("workers") == 2, 60, "the second worker")
        assert f"-{first.pid}-" in running["worker"]
        os.kill(first.pid, signal.SIGKILL)
        killed_at = time.monotonic()

        # Requeued and taken by the second worker within seconds (TTL 3 s); then it runs 1000 steps,
        # which on a busy 2-core machine can take minutes.
        wait_until(lambda: f"-{second.pid}-" in (httpx.get(f"{url}/jobs/{job['id']}").json()["worker"] or ""),
                   30, "the second worker to take the job")
        assert time.monotonic() - killed_at < 30
        done = wait_job(url, job["id"], timeout=300)
        assert done["status"] == "finished", (done, procs.logs())
        assert done["attempts"] == 2 and f"-{second.pid}-" in done["worker"]
        assert "requeued" in (done["error"] or "") or done["error"] is None
        assert metric(url, "patchdiff_jobs_requeued_total") == 1
    finally:
        procs.stop_all()
        redis_server.stop()


def test_redis_down_gives_503_then_recovers(tmp_path, weights):
    redis_server = RedisServer(tmp_path / "redis").start()
    env = service_env(redis_server.url, weights, tmp_path / "store")
    procs = Processes(env, tmp_path / "logs")
    try:
        procs.worker()
        url = procs.api(free_port())
        wait_until(lambda: httpx.get(url + "/readyz").status_code == 200, 60, "a worker")
        redis_server.stop()
        for method, path, body in [("POST", "/generate", {"num_images": 1}), ("GET", "/jobs/" + "a" * 32, None),
                                   ("DELETE", "/jobs/" + "a" * 32, None), ("GET", "/models", None)]:
            started = time.monotonic()
            response = httpx.request(method, url + path, json=body, timeout=10)
            assert response.status_code == 503, (path, response.text)
            assert "Redis" in response.json()["detail"] and time.monotonic() - started < 5
        assert httpx.get(url + "/readyz").status_code == 503
        assert httpx.get(url + "/healthz").status_code == 200
        assert "patchdiff_redis_up 0.0" in httpx.get(url + "/metrics").text

        redis_server = RedisServer(tmp_path / "redis", port=redis_server.port).start()  # same address, empty data
        wait_until(lambda: httpx.get(url + "/readyz").status_code == 200, 60, "recovery")
        job = httpx.post(url + "/generate", json={"num_images": 1}).json()
        assert wait_job(url, job["id"])["status"] == "finished", procs.logs()
    finally:
        procs.stop_all()
        redis_server.stop()


def test_generate_command_downloads_the_same_grid_as_sample(service, tmp_path):
    url, env, _ = service
    common = ["--model", "tiny", "--num-images", "3", "--class-label", "2", "--seed", "5", "--timesteps", "6", "--quiet"]
    cli = [sys.executable, "-m", "patchdiff_core.cli"]
    remote = subprocess.run([*cli, "generate", "--server", url, *common, "--poll", "0.1", "--out", str(tmp_path / "r.png")],
                            env=env, capture_output=True, text=True)
    assert remote.returncode == 0, remote.stderr
    subprocess.run([*cli, "sample", *common, "--out", str(tmp_path / "l.png")], env=env, check=True, capture_output=True)
    assert (tmp_path / "r.png").read_bytes() == (tmp_path / "l.png").read_bytes()

    bad = subprocess.run([*cli, "generate", "--server", url, "--model", "tiny", "--class-label", "99", "--quiet"],
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "class_label" in bad.stderr and "Traceback" not in bad.stderr
    down = subprocess.run([*cli, "generate", "--server", "http://127.0.0.1:9", "--quiet"], env=env, capture_output=True, text=True)
    assert down.returncode == 2 and "cannot reach" in down.stderr


def _redis_servers_using(data_dir) -> list[int]:
    """Pids of redis-server processes whose command line names `data_dir` (via /proc)."""
    pids = []
    for proc in os.listdir("/proc"):
        if proc.isdigit():
            try:
                cmdline = open(f"/proc/{proc}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if cmdline and b"redis-server" in cmdline[0] and str(data_dir).encode() in b" ".join(cmdline):
                pids.append(int(proc))
    return pids


def test_one_command_serve_with_embedded_redis(tmp_path, weights):
    """`patchdiff serve` with no PATCHDIFF_REDIS_URL: embedded Redis, API and a worker. A killed
    redis-server is restarted on the same data; Ctrl-C stops everything, Redis included."""
    port = free_port()
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHDIFF_")}
    env.update({"PATCHDIFF_WEIGHTS_DIR": str(weights), "PATCHDIFF_DEFAULT_MODEL": "tiny",
                "PATCHDIFF_STORE_DIR": str(data / "results"), "PATCHDIFF_DEVICE": "cpu",
                "PATCHDIFF_HEARTBEAT_TTL_S": "3", "PATCHDIFF_HEARTBEAT_INTERVAL_S": "0.5",
                "PATCHDIFF_REDIS_RETRY_MAX_S": "0.5", "OMP_NUM_THREADS": "1"})
    proc = subprocess.Popen([sys.executable, "-m", "patchdiff_core.cli", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(url), 90, "patchdiff serve")
        job = httpx.post(url + "/generate", json={"num_images": 2, "seed": 3}).json()
        assert wait_job(url, job["id"])["status"] == "finished"
        assert httpx.get(f"{url}/jobs/{job['id']}/grid.png").status_code == 200
        assert list((data / "results" / job["id"]).glob("a*/grid.png"))

        # Kill the embedded Redis while a job runs and others wait: serve restarts it from its AOF.
        [redis_pid] = _redis_servers_using(data)
        ids = [httpx.post(url + "/generate", json={"num_images": 1, "timesteps": "200", "seed": i}).json()["id"]
               for i in range(4)]
        wait_until(lambda: httpx.get(f"{url}/jobs/{ids[0]}").json()["status"] == "running", 60, "a job to run")
        os.kill(redis_pid, signal.SIGKILL)
        wait_until(lambda: (lambda p: p and p != [redis_pid])(_redis_servers_using(data)), 30, "a new redis-server")
        final = [wait_job(url, i, timeout=180) for i in ids]
        assert [j["status"] for j in final] == ["finished"] * 4, final
        assert httpx.get(f"{url}/jobs/{job['id']}").json()["status"] == "finished"  # older data survived too
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output
    # The embedded Redis kept its data beside the results (append-only file and/or snapshot)...
    assert {p.name for p in data.iterdir()} & {"redis.rdb", "appendonly.aof", "appendonlydir"}
    assert f"patchdiff API on http://127.0.0.1:{port}" in output and "embedded Redis" in output
    # ...and no redis-server outlives serve.
    assert _redis_servers_using(data) == []


def test_serve_killed_leaves_no_redis_server(tmp_path, weights):
    """Even a SIGKILLed serve takes its redis-server with it (PR_SET_PDEATHSIG)."""
    port = free_port()
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHDIFF_")}
    env.update({"PATCHDIFF_WEIGHTS_DIR": str(weights), "PATCHDIFF_DEFAULT_MODEL": "tiny",
                "PATCHDIFF_STORE_DIR": str(data / "results"), "PATCHDIFF_DEVICE": "cpu", "OMP_NUM_THREADS": "1"})
    proc = subprocess.Popen([sys.executable, "-m", "patchdiff_core.cli", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: _redis_servers_using(data), 30, "the embedded redis-server")
        wait_until(lambda: _ready(f"http://127.0.0.1:{port}"), 90, "patchdiff serve")
    finally:
        proc.kill()
        proc.wait(10)
    wait_until(lambda: _redis_servers_using(data) == [], 10, "the redis-server to stop")
    # the API and worker children go too (they also got SIGTERM); clean up anything left regardless
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
