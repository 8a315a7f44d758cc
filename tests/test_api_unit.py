"""API behaviour that needs no worker process: auth, torch-free import, OpenAPI contract."""

import subprocess
import sys

import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from patchdiff_core.service.settings import Settings


@pytest.fixture
def app_with_keys(redis_url, tmp_path):
    redis.Redis.from_url(redis_url).flushdb()
    settings = Settings(redis_url=redis_url, api_keys="k1,k2", store_dir=tmp_path)
    with TestClient(create_app(settings)) as client:
        yield client


def test_api_keys(app_with_keys):
    client = app_with_keys
    for method, path in [("post", "/generate"), ("get", "/jobs/" + "a" * 32), ("delete", "/jobs/" + "a" * 32),
                         ("get", "/models"), ("get", "/jobs/" + "a" * 32 + "/grid.png")]:
        response = client.request(method.upper(), path, json={} if method == "post" else None)
        assert response.status_code == 401, path
    assert client.get("/models", headers={"X-API-Key": "k2"}).status_code == 200
    assert client.get("/models", headers={"Authorization": "Bearer k1"}).status_code == 200
    assert client.get("/models", headers={"X-API-Key": "wrong"}).status_code == 401
    # Probes and metrics stay open.
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_no_live_worker_is_503_with_retry_after(app_with_keys):
    response = app_with_keys.post("/generate", json={"num_images": 1}, headers={"X-API-Key": "k1"})
    assert response.status_code == 503 and int(response.headers["retry-after"]) > 0
    assert "no live worker" in response.json()["detail"]
    ready = app_with_keys.get("/readyz")
    assert ready.status_code == 503 and "no live worker" in ready.json()["detail"]


def test_api_never_imports_torch():
    code = "import api.main, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_openapi_describes_the_contract(app_with_keys):
    spec = app_with_keys.get("/openapi.json").json()
    assert {"/generate", "/jobs/{job_id}", "/jobs/{job_id}/grid.png", "/models", "/metrics"} <= set(spec["paths"])
    fields = spec["components"]["schemas"]["GenerateRequest"]["properties"]
    assert {"model", "num_images", "class_label", "class_labels", "timesteps", "sampler", "guidance", "seed",
            "idempotency_key", "webhook", "webhook_events"} == set(fields)
    assert {"/jobs/{job_id}/events", "/jobs/{job_id}/preview.png"} <= set(spec["paths"])


def test_a_model_is_installed_if_its_files_are_here_or_a_worker_announced_it(tmp_path):
    """Which models answer 503 (retry: their workers may come back) and which 422 (retrying cannot
    help). The API's image carries no weights, so a worker's announcement counts as installed."""
    from api.schemas import GenerateRequest
    from api.service import NotServed, build_spec
    from patchdiff_core.generation.registry import all_models
    from patchdiff_core.generation.spec import SpecError

    settings = Settings(weights_dir=tmp_path, default_model="church_p4")
    request = GenerateRequest(num_images=1)
    for known in (all_models(tmp_path), set(all_models(tmp_path))):  # entries, or names as main.py passes
        with pytest.raises(SpecError) as refused:
            build_spec(request, settings, {}, known)
        assert refused.value.field == "model" and "not installed" in str(refused.value)
        assert "`patchdiff convert ema_weights.h5 weights/church_p4.safetensors --model church_p4`" in str(refused.value)
        with pytest.raises(NotServed):
            build_spec(request, settings, {}, known, announced={"church_p4"})
        with pytest.raises(SpecError) as unknown:
            build_spec(GenerateRequest(model="church", num_images=1), settings, {}, known)
        assert unknown.value.field == "model" and "church_p4" in str(unknown.value)
    with pytest.raises(NotServed):  # a model only a worker knows, announced once
        build_spec(GenerateRequest(model="own", num_images=1), settings, {}, set(), announced={"own"})
    (tmp_path / "church_p4.safetensors").write_bytes(b"")
    with pytest.raises(NotServed):  # the files are on this host
        build_spec(request, settings, {}, all_models(tmp_path))


def test_every_operation_id_is_its_function_name(app_with_keys):
    """Stable method names for generated clients (FastAPI's default is `get_job_jobs__job_id__get`)."""
    spec = app_with_keys.get("/openapi.json").json()
    ids = {(path, method): op["operationId"] for path, ops in spec["paths"].items() for method, op in ops.items()}
    assert len(set(ids.values())) == len(ids), ids
    assert {("/generate", "post"): "generate", ("/jobs/{job_id}", "get"): "get_job",
            ("/jobs/{job_id}", "delete"): "cancel_job", ("/jobs/{job_id}/grid.png", "get"): "get_grid",
            ("/jobs/{job_id}/images/{index}.png", "get"): "get_image", ("/jobs/{job_id}/record.json", "get"): "get_record",
            ("/jobs/{job_id}/events", "get"): "job_events", ("/jobs/{job_id}/preview.png", "get"): "job_preview",
            ("/models", "get"): "list_models", ("/limits", "get"): "get_limits"}.items() <= ids.items(), ids
    assert all(name.isidentifier() and not name.endswith(("_get", "_post", "_delete")) for name in ids.values()), ids


def test_png_answers_are_binary_strings(app_with_keys):
    spec = app_with_keys.get("/openapi.json").json()
    png = {path: ops["get"]["responses"]["200"]["content"]["image/png"] for path, ops in spec["paths"].items()
           if "image/png" in ops.get("get", {}).get("responses", {}).get("200", {}).get("content", {})}
    assert set(png) == {"/jobs/{job_id}/grid.png", "/jobs/{job_id}/images/{index}.png", "/jobs/{job_id}/preview.png"}
    assert all(body["schema"] == {"type": "string", "format": "binary"} for body in png.values()), png
    generate = spec["paths"]["/generate"]["post"]["responses"]
    assert "content-type: application/json" in generate["415"]["description"]


def test_limits_come_from_the_settings(redis_url, tmp_path):
    settings = Settings(redis_url=redis_url, api_keys="k", store_dir=tmp_path, max_images_per_job=7, max_timesteps=60,
                        min_guidance=1.0, max_guidance=4.5, allowed_samplers="ddim,unipc", max_job_cost=999)
    with TestClient(create_app(settings)) as client:
        limits = client.get("/limits").json()  # open, as /openapi.json: limits are no tenant's secret
    assert limits == {"max_images_per_job": 7, "max_timesteps": 60, "timesteps_max_length": 100, "min_guidance": 1.0,
                      "max_guidance": 4.5, "allowed_samplers": ["ddim", "unipc"], "max_job_cost": 999,
                      "max_seed": 2**63 - 1, "submit_rate_per_minute": 120}
