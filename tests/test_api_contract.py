"""The OpenAPI schema, both ways: every status code it documents for an operation is produced by a
real request here, and those requests produce nothing else (the schemathesis fuzz in
test_api_fuzz.py checks the other direction on generated requests: every answer is documented).

A new documented code without a recipe here, or a recipe whose answer differs, fails the test."""

from __future__ import annotations

import io
import json
import time

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image
from service_harness import announce_worker, finish_next_job, free_port

from api.main import create_app
from patchdiff_core.model.config import ModelConfig
from patchdiff_core.service.settings import Settings
from patchdiff_core.service.store import result_key

TINY = ModelConfig(res=16, c=32, n_blocks=1, attn_resos=[4], c_mult=[1, 2], num_classes=10, patch_size=2)
KEY, CAPPED = {"X-API-Key": "main-key"}, {"X-API-Key": "capped-key"}
UNKNOWN = "0" * 32


def _settings(redis_url: str, tmp_path, **overrides) -> Settings:
    return Settings(redis_url=redis_url, store_dir=tmp_path / "store", default_model="tiny", heartbeat_ttl_s=600,
                    redis_prefix=f"contract-{time.monotonic_ns()}", api_keys="main-key,capped-key",
                    max_body_bytes=4096, max_queued_cost_per_key=150, sse_max_streams=2, **overrides)


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 4)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def up(redis_url, tmp_path):
    """The app with Redis, a fake live worker for 'tiny' (none for the registered 'digits'), and a
    queued and a finished job (the finished one with results in the store and a preview)."""
    redis.Redis.from_url(redis_url).flushdb()
    with TestClient(create_app(_settings(redis_url, tmp_path))) as client:
        jobs, store = client.app.state.jobs, client.app.state.store
        info = {"name": "tiny", "config": TINY.model_dump(), "classes": [], "defaults": {"timesteps": "10"}}
        link = announce_worker(jobs, "fake", {"tiny": info})
        body = {"num_images": 1, "timesteps": "10"}
        done = client.post("/generate", json=body, headers=KEY).json()["id"]
        for name in ("grid.png", "images/0.png"):
            store.put(result_key(done, name, 1), _png(), "image/png")
        store.put(result_key(done, "record.json", 1), b"{}", "application/json")
        jobs.redis.set(jobs.keys.preview(done), _png())
        assert finish_next_job(link, 1) == done
        queued = client.post("/generate", json=body, headers=KEY).json()["id"]
        client.ids = {"queued": queued, "done": done}
        yield client


@pytest.fixture
def down(tmp_path):
    """The app with its Redis gone (a port nothing listens on)."""
    with TestClient(create_app(_settings(f"redis://127.0.0.1:{free_port()}/0", tmp_path))) as client:
        yield client


def _fill_streams(client) -> None:
    slots = client.app.state.sse_streams
    while slots.acquire() is not None:
        pass


def recipes(up: TestClient, down: TestClient) -> dict[tuple[str, str, int], callable]:
    done, queued = up.ids["done"], up.ids["queued"]
    job = "/jobs/{job_id}"
    body = {"num_images": 1, "timesteps": "10"}

    def capped_twice():
        up.post("/generate", json={"num_images": 10, "timesteps": "10"}, headers=CAPPED)  # 100 of 150 units
        return up.post("/generate", json={"num_images": 10, "timesteps": "10"}, headers=CAPPED)

    def idempotent(second: dict):
        up.post("/generate", json={**body, "idempotency_key": "same"}, headers=KEY)
        return up.post("/generate", json={**second, "idempotency_key": "same"}, headers=KEY)

    def full_streams():
        _fill_streams(up)
        return up.get(f"/jobs/{done}/events", headers=KEY)

    r: dict[tuple[str, str, int], callable] = {
        ("post", "/generate", 202): lambda: up.post("/generate", json=body, headers=KEY),
        ("post", "/generate", 200): lambda: idempotent(body),
        ("post", "/generate", 409): lambda: idempotent({**body, "num_images": 2}),
        ("post", "/generate", 400): lambda: up.post("/generate", content=b'{"num_images": "\xff"}',
                                                          headers={**KEY, "content-type": "application/json"}),
        ("post", "/generate", 401): lambda: up.post("/generate", json=body),
        ("post", "/generate", 413): lambda: up.post("/generate", json={**body, "pad": "x" * 5000}, headers=KEY),
        ("post", "/generate", 415): lambda: up.post("/generate", content=b'{"num_images": 1}',
                                                          headers={**KEY, "content-type": "text/plain"}),
        ("post", "/generate", 422): lambda: up.post("/generate", json={"num_images": 0}, headers=KEY),
        ("post", "/generate", 429): capped_twice,
        ("post", "/generate", 503): lambda: up.post("/generate", json={**body, "model": "digits"}, headers=KEY),
        ("get", "/models", 200): lambda: up.get("/models", headers=KEY),
        ("get", "/models", 401): lambda: up.get("/models"),
        ("get", "/models", 503): lambda: down.get("/models", headers=KEY),
        ("get", "/healthz", 200): lambda: down.get("/healthz"),
        ("get", "/limits", 200): lambda: down.get("/limits"),  # the settings: no Redis, no key
        ("get", "/autoscale", 200): lambda: up.get("/autoscale"),  # no key: an autoscaler reads it
        ("get", "/autoscale", 503): lambda: down.get("/autoscale"),
        ("get", "/readyz", 200): lambda: up.get("/readyz"),
        ("get", "/readyz", 503): lambda: down.get("/readyz"),
        ("get", "/readyz", 422): lambda: down.get("/readyz?require_worker=maybe"),
        ("get", "/metrics", 200): lambda: down.get("/metrics"),  # even with Redis gone
        ("delete", job, 202): lambda: up.delete(f"/jobs/{queued}", headers=KEY),
        ("delete", job, 409): lambda: up.delete(f"/jobs/{done}", headers=KEY),
        ("get", f"{job}/images/{{index}}.png", 422): lambda: up.get(f"/jobs/{done}/images/first.png", headers=KEY),
        ("get", f"{job}/events", 200): lambda: up.get(f"/jobs/{done}/events", headers=KEY),
        ("get", f"{job}/events", 422): lambda: up.get(f"/jobs/{done}/events", headers={**KEY, "Last-Event-ID": "x"}),
        ("get", f"{job}/events", 429): full_streams,
        ("get", f"{job}/preview.png", 422): lambda: up.get(f"/jobs/{done}/preview.png?step=-1", headers=KEY),
    }
    gets = [job, f"{job}/grid.png", f"{job}/images/{{index}}.png", f"{job}/record.json", f"{job}/preview.png",
            f"{job}/events"]
    for method, path in [("get", p) for p in gets] + [("delete", job)]:
        def call(client, job_id, headers, method=method, path=path):
            return client.request(method, path.replace("{index}", "0").format(job_id=job_id), headers=headers)

        r[(method, path, 401)] = lambda call=call: call(up, done, {})
        r[(method, path, 404)] = lambda call=call: call(up, UNKNOWN, KEY)
        r[(method, path, 503)] = lambda call=call: call(down, done, KEY)
        if method == "get":
            r.setdefault((method, path, 200), lambda call=call: call(up, done, KEY))
    return r


def documented(app) -> set[tuple[str, str, int]]:
    return {(method, path, int(code)) for path, ops in app.openapi()["paths"].items()
            for method, op in ops.items() for code in op["responses"]}


def test_every_documented_code_is_real_and_nothing_else_answers(up, down):
    table = recipes(up, down)
    assert set(table) == documented(up.app), "recipes and documented codes differ"
    wrong = {}
    for (method, path, code), call in sorted(table.items(), key=lambda kv: (kv[0][2] == 429, kv[0])):
        response = call()
        if response.status_code != code:
            wrong[(method, path, code)] = (response.status_code, response.text[:200])
    assert not wrong, json.dumps({f"{m.upper()} {p} {c}": got for (m, p, c), got in wrong.items()}, indent=1)
