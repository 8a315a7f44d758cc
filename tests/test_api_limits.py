"""Limits and tenants through the real app (TestClient) with a fake live worker's heartbeat:
body size, non-finite numbers, rate limit, queued-work caps, job cost ceiling, tenant isolation."""

import os
import subprocess
import sys

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from service_harness import announce_worker, free_port, wait_until

from api.main import create_app
from patchdiff_core.model.config import ModelConfig
from patchdiff_core.service.jobs import JobStore
from patchdiff_core.service.settings import Settings

TINY = ModelConfig(res=16, c=32, n_blocks=1, attn_resos=[4], c_mult=[1, 2], num_classes=10, patch_size=2)


def _fake_worker(jobs: JobStore) -> None:
    """A heartbeat as a worker serving 'tiny' would publish it (no process needed to accept jobs)."""
    info = {"name": "tiny", "config": TINY.model_dump(), "classes": [], "defaults": {"timesteps": "10"}}
    announce_worker(jobs, "fake", {"tiny": info})


def _client(redis_url, tmp_path, **overrides):
    redis.Redis.from_url(redis_url).flushdb()
    settings = Settings(redis_url=redis_url, store_dir=tmp_path, default_model="tiny", heartbeat_ttl_s=600,
                        **overrides)
    app = create_app(settings)
    _fake_worker(app.state.jobs)
    return TestClient(app)


@pytest.fixture
def tenants(redis_url, tmp_path):
    with _client(redis_url, tmp_path, api_keys="alice-key,bob-key", admin_keys="admin-key") as client:
        yield client


A, B, ADMIN = ({"X-API-Key": k} for k in ("alice-key", "bob-key", "admin-key"))


def test_jobs_belong_to_their_key(tenants):
    job = tenants.post("/generate", json={"num_images": 1}, headers=A).json()
    job_id = job["id"]
    for method, path in [("GET", f"/jobs/{job_id}"), ("GET", f"/jobs/{job_id}/grid.png"),
                         ("GET", f"/jobs/{job_id}/images/0.png"), ("GET", f"/jobs/{job_id}/record.json"),
                         ("DELETE", f"/jobs/{job_id}")]:
        other = tenants.request(method, path, headers=B)
        assert other.status_code == 404, (method, path, other.text)
        unknown = tenants.request(method, path.replace(job_id, "0" * 32), headers=B)
        assert other.json() == {"detail": f"no job {job_id!r}"} and unknown.status_code == 404  # same answer
    assert tenants.get(f"/jobs/{job_id}", headers=A).status_code == 200
    assert tenants.get(f"/jobs/{job_id}", headers=ADMIN).status_code == 200  # admin keys see all
    assert tenants.delete(f"/jobs/{job_id}", headers=B).status_code == 404
    assert tenants.delete(f"/jobs/{job_id}", headers=A).status_code == 202


def test_idempotency_keys_are_per_tenant(tenants):
    body = {"num_images": 1, "idempotency_key": "same"}
    first = tenants.post("/generate", json=body, headers=A)
    theirs = tenants.post("/generate", json=body, headers=B)
    assert first.status_code == theirs.status_code == 202 and first.json()["id"] != theirs.json()["id"]
    assert tenants.post("/generate", json=body, headers=A).json()["id"] == first.json()["id"]
    conflict = tenants.post("/generate", json={**body, "num_images": 2}, headers=B)
    assert conflict.status_code == 409
    assert first.json()["id"] not in conflict.text and theirs.json()["id"] not in conflict.text


@pytest.mark.parametrize("raw, field", [
    (b'{"guidance": NaN}', "guidance"), (b'{"guidance": Infinity}', "guidance"),
    (b'{"guidance": -Infinity}', "guidance"), (b'{"guidance": 1e400}', "guidance"),
    (b'{"num_images": 1e400}', "num_images"), (b'{"seed": NaN}', "seed"),
    (b'{"class_label": Infinity}', "class_label"), (b'{"class_labels": [1, NaN]}', "class_labels"),
])
def test_non_finite_numbers_are_422_naming_the_field(tenants, raw, field):
    response = tenants.post("/generate", content=raw, headers={**A, "content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert any(field in error["loc"] for error in response.json()["detail"]), response.text


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/octet-stream"])
@pytest.mark.parametrize("body", [b'{"num_images": 1}', b'{"num_images": "\xff\xfe"}'])
def test_a_body_without_a_json_content_type_is_415_saying_what_to_send(tenants, content_type, body):
    """Without a JSON content type FastAPI does not parse the body (its own answer: "Input should be
    a valid dictionary or object"); the answer names the header to send. Bytes that are not UTF-8
    once broke the error's encoding (500). With a JSON content type such bytes are the documented 400."""
    headers = {**A, **({"content-type": content_type} if content_type else {})}
    response = tenants.post("/generate", content=body, headers=headers)
    assert response.status_code == 415, response.text
    assert "content-type: application/json" in response.json()["detail"]
    as_json = tenants.post("/generate", content=b'{"num_images": "\xff"}', headers={**A, "content-type": "application/json"})
    assert as_json.status_code == 400, as_json.text
    with_charset = tenants.post("/generate", content=b'{"num_images": 1}',
                                headers={**A, "content-type": "application/json; charset=utf-8"})
    assert with_charset.status_code == 202, with_charset.text


def _field_errors(response) -> dict[str, str]:
    assert response.status_code == 422, response.text
    return {".".join(str(p) for p in error["loc"][1:]): error["msg"] for error in response.json()["detail"]}


# What Python's int() and pydantic's lax mode let through, none of which the contract documents.
@pytest.mark.parametrize("timesteps", ["t:٥,٩٩٩", "t:५,९९९", "t:５,９９９", "t:+5,999", "t:-0,999", "t:1_0,999",
                                       "t: 5 , 999 ", "+250", "ddim+50", "karras1_0", "90, 60,60,20,20", True])
def test_lenient_timesteps_are_422_naming_timesteps(tenants, timesteps):
    errors = _field_errors(tenants.post("/generate", json={"num_images": 1, "timesteps": timesteps}, headers=A))
    assert list(errors) == ["timesteps"], errors


@pytest.mark.parametrize("field, value", [
    ("guidance", "2"), ("guidance", True), ("guidance", "2.0"), ("num_images", "2"), ("num_images", True),
    ("num_images", 2.0), ("seed", "42"), ("seed", True), ("seed", 4.0), ("class_label", "3"), ("class_label", True),
    ("class_labels", ["1"]), ("class_labels", [True]),
])
def test_numbers_are_strict_no_strings_or_booleans(tenants, field, value):
    body = {"num_images": 1, field: value} if field != "num_images" else {field: value}
    errors = _field_errors(tenants.post("/generate", json=body, headers=A))
    assert all(name.split(".")[0] == field for name in errors) and errors, errors


def test_what_lenient_parsing_still_accepts(tenants):
    """An integer guidance is a number; an integer timesteps is its decimal form; sampler names
    are case-insensitive."""
    job = tenants.post("/generate", json={"num_images": 1, "guidance": 2, "timesteps": 20, "sampler": "DDIM"},
                       headers=A)
    assert job.status_code == 202, job.text
    request = job.json()["request"]
    assert request["timesteps"] == "20" and request["sampler"] == "ddim" and request["guidance"] == 2.0
    assert tenants.post("/generate", json={"num_images": 1, "sampler": "UniPC_BH1"}, headers=A).json()["request"][
        "sampler"] == "unipc_bh1"
    errors = _field_errors(tenants.post("/generate", json={"num_images": 1, "sampler": "euler"}, headers=A))
    assert list(errors) == ["sampler"], errors


@pytest.mark.parametrize("typo, meant", [("num_image", "num_images"), ("numImages", "num_images"),
                                         ("class", "class_label"), ("classlabels", "class_labels"),
                                         ("steps", "timesteps"), ("sede", "seed")])
def test_an_unknown_field_names_the_nearest_valid_one(tenants, typo, meant):
    errors = _field_errors(tenants.post("/generate", json={typo: 1}, headers=A))
    assert f"did you mean `{meant}`?" in errors[typo], errors


def test_an_unknown_field_with_no_near_name_lists_the_fields(tenants):
    errors = _field_errors(tenants.post("/generate", json={"zzzzzz": 1}, headers=A))
    assert "num_images" in errors["zzzzzz"] and "did you mean" not in errors["zzzzzz"], errors


def test_a_known_model_without_weights_is_422_with_the_convert_command(tenants):
    """church_p4 is a released model whose weights are neither in this server's weights directory
    nor announced by a worker: retrying cannot help (no 503 + Retry-After); the answer says how to
    install it, as the CLI does."""
    response = tenants.post("/generate", json={"model": "church_p4", "num_images": 1}, headers=A)
    errors = _field_errors(response)
    assert "Retry-After" not in response.headers
    assert list(errors) == ["model"] and "not installed" in errors["model"], errors
    assert "patchdiff convert ema_weights.h5 weights/church_p4.safetensors --model church_p4" in errors["model"], errors
    # An unknown name is a 422 that lists the models there are.
    errors = _field_errors(tenants.post("/generate", json={"model": "churchp4", "num_images": 1}, headers=A))
    assert list(errors) == ["model"] and "tiny" in errors["model"], errors


def test_an_installed_model_whose_workers_are_down_is_503(tenants):
    """digits' weights are in the weights directory (the repository's): its workers may come back."""
    response = tenants.post("/generate", json={"model": "digits", "num_images": 1}, headers=A)
    assert response.status_code == 503 and int(response.headers["retry-after"]) > 0, response.text


def test_body_over_the_limit_is_413_before_auth(redis_url, tmp_path):
    with _client(redis_url, tmp_path, api_keys="k", max_body_bytes=4096) as client:
        big = b'{"idempotency_key": "' + b"x" * 10_000 + b'"}'
        for headers in ({}, {"X-API-Key": "k"}, {"X-API-Key": "wrong"}):
            response = client.post("/generate", content=big, headers={**headers, "content-type": "application/json"})
            assert response.status_code == 413, response.text

        def chunks():  # no Content-Length: counted as it streams
            for _ in range(10):
                yield b"x" * 1000

        response = client.post("/generate", content=chunks(), headers={"X-API-Key": "k", "content-type": "application/json"})
        assert response.status_code == 413
        assert client.post("/generate", json={"num_images": 1}, headers={"X-API-Key": "k"}).status_code == 202


def test_rate_limit_is_429_with_retry_after(redis_url, tmp_path):
    with _client(redis_url, tmp_path, api_keys="k1,k2", submit_rate_per_minute=3) as client:
        codes = [client.post("/generate", json={"num_images": 1}, headers={"X-API-Key": "k1"}).status_code for _ in range(4)]
        assert codes == [202, 202, 202, 429]
        limited = client.post("/generate", json={"num_images": 1}, headers={"X-API-Key": "k1"})
        assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 60
        assert client.post("/generate", json={"num_images": 1}, headers={"X-API-Key": "k2"}).status_code == 202
        assert client.get("/models", headers={"X-API-Key": "k1"}).status_code == 200  # reads are not limited


def test_queued_work_caps_are_429_and_job_ceiling_422(redis_url, tmp_path):
    # 10 images × 10 steps = 100 cost units per job.
    with _client(redis_url, tmp_path, api_keys="k1,k2", max_queued_cost_per_key=250, max_queued_cost=450,
                 max_job_cost=1000) as client:
        k1, k2 = {"X-API-Key": "k1"}, {"X-API-Key": "k2"}
        body = {"num_images": 10, "timesteps": "10"}
        assert [client.post("/generate", json=body, headers=k1).status_code for _ in range(3)] == [202, 202, 429]
        over = client.post("/generate", json=body, headers=k1)
        assert "Retry-After" in over.headers and "your" in over.json()["detail"]
        assert [client.post("/generate", json=body, headers=k2).status_code for _ in range(3)] == [202, 202, 429]
        ceiling = client.post("/generate", json={"num_images": 10, "timesteps": "200"}, headers=k2)
        assert ceiling.status_code == 422 and ceiling.json()["detail"][0]["loc"] == ["body", "num_images"]
        guided = client.post("/generate", json={"num_images": 10, "timesteps": "60", "guidance": 2.0}, headers=k2)
        assert guided.status_code == 422  # 10 × 60 × 2 = 1200 > 1000


def test_queued_work_cap_per_model(redis_url, tmp_path):
    """A model's backlog is capped on its own ("*" for models not named), so it cannot fill the
    global cap and shut out the others; an ended job gives its cost back."""
    with _client(redis_url, tmp_path, max_queued_cost_per_model={"tiny": 250, "*": 150}) as client:
        info = {"name": "other", "config": TINY.model_dump(), "classes": [], "defaults": {"timesteps": "10"}}
        announce_worker(client.app.state.jobs, "fake-other", {"other": info})
        body = {"num_images": 10, "timesteps": "10"}  # 100 cost units
        tiny = [client.post("/generate", json=body) for _ in range(3)]
        assert [r.status_code for r in tiny] == [202, 202, 429]
        assert "model 'tiny'" in tiny[2].json()["detail"] and "Retry-After" in tiny[2].headers
        other = [client.post("/generate", json={**body, "model": "other"}) for _ in range(2)]
        assert [r.status_code for r in other] == [202, 429]  # the "*" cap, counted apart from tiny's
        assert client.delete(f"/jobs/{tiny[0].json()['id']}").status_code == 202  # cancelled: cost released
        assert client.post("/generate", json=body).status_code == 202


def test_auth_off_behaves_as_before(redis_url, tmp_path, caplog):
    with _client(redis_url, tmp_path) as client:
        job = client.post("/generate", json={"num_images": 1}).json()
        assert client.get(f"/jobs/{job['id']}").status_code == 200
        assert client.get(f"/jobs/{job['id']}", headers={"X-API-Key": "anything"}).status_code == 200


def test_readyz_needs_a_writable_store(redis_url, tmp_path):
    (tmp_path / "file").write_text("x")
    with _client(redis_url, tmp_path / "file") as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["store"] == "unwritable" and "Retry-After" in ready.headers


@pytest.mark.slow
def test_200_mb_body_does_not_grow_the_api(redis_url, tmp_path):
    """A real uvicorn process: 200 MB bodies without and with a key → 413; RSS grows < 50 MB."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHDIFF_")}
    env.update({"PATCHDIFF_REDIS_URL": redis_url, "PATCHDIFF_API_KEYS": "k", "PATCHDIFF_STORE_DIR": str(tmp_path)})
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--port", str(port),
                             "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _ok(url + "/healthz"), 30, "the API")
        before = _rss_mb(proc.pid)

        def body():
            chunk = b"x" * (1 << 20)
            for _ in range(200):
                yield chunk

        for headers in ({}, {"X-API-Key": "k"}):
            try:
                response = httpx.post(url + "/generate", content=body(), headers=headers, timeout=60)
                assert response.status_code == 413
            except httpx.HTTPError:
                pass  # the server may close the connection after its 413, while we still send
            declared = httpx.post(url + "/generate", content=b"x" * 5_000_000, headers=headers, timeout=60)
            assert declared.status_code == 413
        assert _rss_mb(proc.pid) - before < 50
    finally:
        proc.terminate()
        proc.wait(10)


def _ok(url):
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_access_log_and_http_and_process_metrics(tenants, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="patchdiff.access"):
        tenants.get("/jobs/" + "0" * 32, headers=A)
    line = next(r for r in caplog.records if r.name == "patchdiff.access")
    assert line.status == 404 and line.route == "/jobs/{job_id}" and line.method == "GET" and line.duration_ms >= 0
    text = tenants.get("/metrics").text
    assert 'patchdiff_http_requests_total{method="GET",route="/jobs/{job_id}",status="404"} 1.0' in text
    assert "patchdiff_http_request_duration_seconds_bucket" in text
    assert "process_resident_memory_bytes" in text and "python_gc_objects_collected_total" in text
