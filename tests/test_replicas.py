"""Several API replicas on one Redis: the service-wide job metrics are exported by one of them (so a
Prometheus sum over replicas counts each job once), another takes over when it goes; the
autoscaling signal counts queued and running work per model."""

from __future__ import annotations

import re
import time

import pytest
import redis
from conftest import TINY_CONFIG
from fastapi.testclient import TestClient
from service_harness import announce_worker

from api.main import create_app
from patchdiff_core.model.config import ModelConfig
from patchdiff_core.service.events import started_template
from patchdiff_core.service.settings import Settings

INFO = {"name": "tiny", "config": ModelConfig(**TINY_CONFIG).model_dump(), "classes": [], "defaults": {"timesteps": "10"}}


def exported(client: TestClient, name: str) -> float | None:
    match = re.search(rf"^{re.escape(name)} (\S+)$", client.get("/metrics").text, re.M)
    return float(match.group(1)) if match else None


@pytest.fixture
def replicas(redis_url, tmp_path, monkeypatch):
    monkeypatch.setattr("api.main.METRICS_LEASE_S", 0.5)
    redis.Redis.from_url(redis_url).flushdb()
    settings = Settings(redis_url=redis_url, store_dir=tmp_path, default_model="tiny", heartbeat_ttl_s=600)
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        yield a, b


def test_job_metrics_are_exported_by_one_replica_at_a_time(replicas):
    a, b = replicas
    announce_worker(a.app.state.jobs, "fake", {"tiny": INFO})
    for client in (a, b, a):
        assert client.post("/generate", json={"num_images": 1}).status_code == 202
    counts = [exported(c, "patchdiff_jobs_submitted_total") for c in (a, b)]
    assert counts == [3.0, None]  # the first scraped holds the role; the sum over replicas is right
    assert exported(b, "patchdiff_redis_up") == 1.0  # every replica says whether it reaches Redis
    time.sleep(0.7)  # `a` is no longer scraped (it went away): its lease lapses
    assert exported(b, "patchdiff_jobs_submitted_total") == 3.0 and exported(a, "patchdiff_jobs_submitted_total") is None


def test_the_autoscaling_signal_counts_queued_and_running_work(replicas):
    a, _ = replicas
    jobs = a.app.state.jobs
    link = announce_worker(jobs, "fake", {"tiny": INFO})
    for n in (1, 2, 3):
        assert a.post("/generate", json={"num_images": n, "timesteps": "10"}).status_code == 202
    link.start(link.report([], take=1).taken, started_template("fake").to_json())  # one runs, two wait
    signal = a.get("/autoscale").json()
    assert signal == {"outstanding_cost": 60,
                      "models": {"tiny": {"outstanding_cost": 60, "queued_jobs": 2, "live_workers": 1}}}
    text = a.get("/metrics").text
    assert 'patchdiff_outstanding_cost{model="tiny"} 60.0' in text and 'patchdiff_queued_jobs{model="tiny"} 2.0' in text
