"""A client that no one here wrote: `openapi-python-client` generates one from the running service's
`/openapi.json`, and the generated code submits a job, polls it and downloads its grid.

What it relies on: stable operation ids (the method names `generate`, `get_job`, `get_grid`), PNG
answers declared as binary strings, and a schema the generator parses without dropping a route.
The generator maps content types it knows (JSON, text, octet-stream); `image/png` is mapped to
bytes by its documented `content_type_overrides` setting (CLIENT_CONFIG, as the docs show)."""

from __future__ import annotations

import importlib
import io
import os
import pkgutil
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image
from service_harness import running_service, write_weights_dir

pytestmark = pytest.mark.slow

CLIENT_CONFIG = """\
package_name_override: patchdiff_client
content_type_overrides:
  image/png: application/octet-stream
"""
KEY = "client-test-key"


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model_file):
    tmp = tmp_path_factory.mktemp("client")
    weights = write_weights_dir(tmp / "weights", tiny_model_file, "tiny", defaults={"timesteps": "4"})
    with running_service(tmp, weights, PATCHDIFF_API_KEYS=KEY) as (url, _, procs):
        yield url, procs


@pytest.fixture(scope="module")
def client_package(service, tmp_path_factory):
    """Generate the client from the live schema, as a user would, and import it."""
    url, _ = service
    out = tmp_path_factory.mktemp("generated")
    (out / "openapi.json").write_bytes(httpx.get(f"{url}/openapi.json").content)
    (out / "config.yaml").write_text(CLIENT_CONFIG)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}  # its ruff
    run = subprocess.run([sys.executable, "-m", "openapi_python_client", "generate", "--path", "openapi.json",
                          "--config", "config.yaml", "--meta", "none", "--output-path", "patchdiff_client"],
                         cwd=out, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    # Every route of the schema made it into the client: nothing dropped as unparsable.
    assert "Cannot parse" not in run.stdout + run.stderr and "WARNING" not in run.stdout + run.stderr, run.stdout
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module("patchdiff_client")
    finally:
        sys.path.remove(str(out))
        for name in [n for n in sys.modules if n == "patchdiff_client" or n.startswith("patchdiff_client.")]:
            del sys.modules[name]


def test_generated_client_submits_polls_and_downloads(service, client_package):
    url, _ = service
    routes = importlib.import_module("patchdiff_client.api.default")
    from patchdiff_client import AuthenticatedClient, Client
    from patchdiff_client.api.default import generate, get_grid, get_image, get_job
    from patchdiff_client.api.info import get_limits
    from patchdiff_client.models import GenerateRequest, HTTPValidationError, JobView, JobViewStatus, Limits

    methods = {m.name for m in pkgutil.iter_modules(routes.__path__)}  # one module per route, named by its id
    assert {"generate", "get_job", "cancel_job", "get_grid", "get_image", "get_record", "list_models"} <= methods
    with AuthenticatedClient(base_url=url, token=KEY, raise_on_unexpected_status=True) as client:
        submitted = generate.sync_detailed(client=client, body=GenerateRequest(num_images=3, timesteps=4, seed=7,
                                                                               class_label=2))
        assert submitted.status_code == 202, submitted.content
        job = submitted.parsed
        assert isinstance(job, JobView) and job.request.timesteps == "4" and job.request.seed == 7

        deadline = time.monotonic() + 120
        while job.status not in (JobViewStatus.FINISHED, JobViewStatus.FAILED, JobViewStatus.CANCELLED):
            assert time.monotonic() < deadline, f"job {job.id} still {job.status}"
            time.sleep(0.2)
            job = get_job.sync(job.id, client=client)
            assert isinstance(job, JobView)
        assert job.status == JobViewStatus.FINISHED, job.error

        grid = get_grid.sync(job.id, client=client)
        data = grid.payload.read()
        assert data == httpx.get(f"{url}/jobs/{job.id}/grid.png", headers={"X-API-Key": KEY}).content
        assert Image.open(io.BytesIO(data)).format == "PNG"
        image = get_image.sync(job.id, 2, client=client)
        assert Image.open(image.payload).size == (16, 16)

        # A refused request comes back as the generated error model, naming the field.
        refused = generate.sync_detailed(client=client, body=GenerateRequest(num_images=0))
        assert refused.status_code == 422 and isinstance(refused.parsed, HTTPValidationError)
        assert refused.parsed.detail[0].loc == ["body", "num_images"]

    with Client(base_url=url, raise_on_unexpected_status=True) as anonymous:
        limits = get_limits.sync(client=anonymous)
        assert isinstance(limits, Limits) and limits.max_images_per_job >= 1
