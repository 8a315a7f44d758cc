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
