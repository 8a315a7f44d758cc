"""Fuzz the OpenAPI schema with schemathesis (a bounded number of examples per operation): no 5xx,
every answered status code documented, content types and bodies as documented."""

import time

import pytest
import schemathesis
from conftest import TINY_CONFIG
from service_harness import announce_worker
from hypothesis import HealthCheck, settings
from schemathesis import checks as generic_checks
from schemathesis.specs.openapi import checks as openapi_checks

from api.main import create_app
from patchdiff_core.model.config import ModelConfig
from patchdiff_core.service.settings import Settings


def _app():
    import tempfile
    from pathlib import Path

    from service_harness import RedisServer

    tmp = Path(tempfile.mkdtemp(prefix="fuzz-"))
    server = RedisServer(tmp / "redis").start()
    app = create_app(Settings(redis_url=server.url, store_dir=tmp / "store", default_model="tiny",
                              heartbeat_ttl_s=3600, redis_prefix=f"fuzz-{time.monotonic_ns()}",
                              max_queued_cost=0, max_queued_cost_per_key=0))
    info = {"name": "tiny", "config": ModelConfig(**TINY_CONFIG).model_dump(), "classes": [],
            "defaults": {"timesteps": "10"}}
    # A live worker for 'tiny' and for the schema's example model, so that a valid request is accepted
    # (a known model with no live worker is a documented 503, which the no-5xx check would count).
    announce_worker(app.state.jobs, "fake", {"tiny": info, "digits": {**info, "name": "digits"}})
    app.state.fuzz_redis = server
    return app


APP = _app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
CHECKS = [generic_checks.not_a_server_error, openapi_checks.status_code_conformance,
          openapi_checks.content_type_conformance, openapi_checks.response_schema_conformance]


@pytest.fixture(scope="module", autouse=True)
def _stop_redis():
    yield
    APP.state.fuzz_redis.stop()


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_fuzz(case):
    case.call_and_validate(checks=CHECKS)
