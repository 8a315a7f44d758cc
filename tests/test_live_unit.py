"""Live progress pieces on their own: previews, webhook target checks and the webhook sender.
(Events are written by the scripts that move jobs: tests/test_jobs.py.)"""

from __future__ import annotations

import io

import numpy as np
import pytest
import redis
from PIL import Image
from webhook_receiver import Receiver

from patchdiff_core.generation.images import to_uint8
from patchdiff_core.generation.preview import preview_png, shrink_for_preview
from patchdiff_core.service.settings import Settings
from patchdiff_core.service.webhooks import WebhookRefused, absolute_links, check_events, check_target


def test_preview_png_is_a_downscaled_grid():
    images = np.full((64, 32, 32, 3), 200, np.uint8)
    image = Image.open(io.BytesIO(preview_png(images, max_side=256)))
    assert image.format == "PNG" and image.size == (256, 256)  # 8x8 grid of 34 px + 2 = 274 -> 256
    small = Image.open(io.BytesIO(preview_png(images[:4], max_side=256)))
    assert small.size == (70, 70)  # never enlarged


@pytest.mark.parametrize("url", ["http://127.0.0.1/x", "http://10.1.2.3/", "http://172.16.0.1/", "http://192.168.0.1/",
                                 "http://169.254.169.254/latest/meta-data", "http://[::1]/", "http://[::ffff:127.0.0.1]/",
                                 "http://[fd00::1]/", "http://0.0.0.0/", "http://localhost:8080/", "http://224.0.0.1/"])
def test_private_targets_are_refused_by_default(url):
    with pytest.raises(WebhookRefused, match="private, loopback or reserved"):
        check_target(url, Settings())
    if "224.0.0.1" not in url and "0.0.0.0" not in url:
        check_target(url, Settings(webhook_allow_private=True))  # the setting lets them through


@pytest.mark.parametrize("url, message", [("ftp://8.8.8.8/", "http"), ("http:///path", "no host"),
                                          ("http://user:pw@8.8.8.8/", "credentials"), ("http://8.8.8.8:99999/", "port"),
                                          ("http://8.8.8.8/" + "a" * 2100, "longer than")])
def test_malformed_targets_are_refused(url, message):
    with pytest.raises(WebhookRefused, match=message):
        check_target(url, Settings())


def test_public_literal_address_is_accepted():
    assert check_target("https://8.8.8.8/hook", Settings()) == ["8.8.8.8"]  # a literal address: no DNS, no traffic


def test_event_filter_and_links():
    assert check_events(None) == ["queued", "started", "finished", "failed", "cancelled"]
    assert check_events(["finished", "finished"]) == ["finished"]
    with pytest.raises(WebhookRefused):
        check_events([])
    data = {"links": {"grid": "/jobs/a/grid.png", "images": ["/jobs/a/images/0.png"]}, "preview": {"url": "/jobs/a/preview.png"}}
    out = absolute_links(data, "http://h:1")
    assert out["links"] == {"grid": "http://h:1/jobs/a/grid.png", "images": ["http://h:1/jobs/a/images/0.png"]}
    assert out["preview"]["url"] == "http://h:1/jobs/a/preview.png" and data["links"]["grid"] == "/jobs/a/grid.png"


def test_live_routes_need_the_api_key_and_the_page_does_not(redis_url, tmp_path):
    from fastapi.testclient import TestClient

    from api.main import create_app

    settings = Settings(redis_url=redis_url, api_keys="k1", store_dir=tmp_path)
    with TestClient(create_app(settings)) as client:
        for path in ["/jobs/" + "a" * 32 + "/events", "/jobs/" + "a" * 32 + "/preview.png"]:
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"X-API-Key": "k1"}).status_code == 404, path
        for path in ["/", "/docs", "/redoc", "/static/app.js", "/static/app.css", "/static/docs/swagger-ui-bundle.js",
                     "/static/docs/redoc.standalone.js"]:
            response = client.get(path)
            assert response.status_code == 200 and len(response.content) > 500, path
        assert "default-src 'self'" in client.get("/").headers["content-security-policy"]
        for path in ["/static/index.html", "/static/..%2Fweb.py", "/static/docs/..%2F..%2Fweb.py", "/static/docs/consts.py"]:
            assert client.get(path).status_code == 404, path


SECRET = "whsec_" + "MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTI="


def run_sender(redis_url: str, settings: Settings, until, timeout: float = 20.0) -> None:
    """Run a WebhookSender's own loop (as the API does) until `until()` holds."""
    import asyncio
    import time

    import redis.asyncio as aioredis

    from patchdiff_core.service.webhooks import WebhookSender

    async def main():
        conn = aioredis.Redis.from_url(redis_url)
        task = asyncio.create_task(WebhookSender(conn, settings, "test").run())
        deadline = time.monotonic() + timeout
        try:
            while not until():
                assert time.monotonic() < deadline, "the sender did not get there in time"
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await conn.aclose()

    asyncio.run(main())


def _job_with_webhook(redis_url: str, settings: Settings, url: str):
    from patchdiff_core.generation.spec import GenerationSpec
    from patchdiff_core.service.jobs import JobStore

    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    jobs = JobStore(conn, settings)
    record, _ = jobs.submit(GenerationSpec(model="tiny", num_images=1, seed=1), webhook=url, webhook_events=["queued"])
    return jobs, record


def _settings(redis_url: str, **extra) -> Settings:
    return Settings(redis_url=redis_url, webhook_secret=SECRET, webhook_allow_private=True, public_url="http://api:1",
                    webhook_backoff_s=0.01, **extra)


def test_the_sender_delivers_signed_events_and_acknowledges_them(redis_url):
    """A job's selected event goes from the stream through the sender's own loop to the receiver:
    to the checked address with the Host kept, signed, its outcome recorded, the entry acknowledged."""
    from standardwebhooks.webhooks import Webhook

    from patchdiff_core.service.webhooks import GROUP

    receiver = Receiver()
    settings = _settings(redis_url)
    try:
        jobs, record = _job_with_webhook(redis_url, settings, f"http://localhost:{receiver.port}/hook")
        run_sender(redis_url, settings, lambda: jobs.webhook_deliveries(record.id))
    finally:
        receiver.close()
    request, = receiver.at("/hook")
    headers, body = request["headers"], request["body"]
    headers = {k.lower(): v for k, v in headers.items()}
    assert headers["host"] == f"localhost:{receiver.port}" and headers["webhook-id"].startswith(f"{record.id}.")
    payload = Webhook(SECRET).verify(body, headers)
    assert payload["type"] == "job.queued" and payload["data"]["job_id"] == record.id
    status, = jobs.webhook_deliveries(record.id)
    assert status["status"] == "delivered" and status["http_status"] == 204 and status["attempts"] == 1
    assert jobs.redis.xpending(jobs.keys.webhooks, GROUP)["pending"] == 0


@pytest.mark.parametrize("failure", ["http 500", "crash"])
def test_a_failing_delivery_gives_up_after_its_attempts_and_is_acknowledged(redis_url, monkeypatch, failure):
    """Whatever goes wrong in an attempt (an error answer, or an exception nobody expected), the
    delivery is retried at most `webhook_max_attempts` times in all, then marked failed."""
    from patchdiff_core.service import webhooks

    receiver = Receiver(status=500)
    settings = _settings(redis_url, webhook_max_attempts=3)
    if failure == "crash":
        async def explode(self, delivery, address):
            raise RuntimeError("a bug in the sender")

        monkeypatch.setattr(webhooks.WebhookSender, "_post", explode)
    try:
        jobs, record = _job_with_webhook(redis_url, settings, f"http://127.0.0.1:{receiver.port}/hook")
        run_sender(redis_url, settings, lambda: any(d["status"] == "failed" for d in jobs.webhook_deliveries(record.id)))
    finally:
        receiver.close()
    status, = jobs.webhook_deliveries(record.id)
    assert status["attempts"] == 3 and status["status"] == "failed", status
    assert len(receiver.at("/hook")) == (3 if failure == "http 500" else 0)
    assert jobs.redis.zcard(jobs.keys.webhook_retries) == 0
    assert jobs.redis.xpending(jobs.keys.webhooks, webhooks.GROUP)["pending"] == 0


def test_the_sender_tries_every_resolved_address(redis_url, monkeypatch):
    """A host with two addresses, the first refusing connections, still gets its delivery."""
    from patchdiff_core.service import webhooks

    receiver = Receiver()
    settings = _settings(redis_url)

    async def two_addresses(url, settings):
        webhooks.check_url_syntax(url, settings)
        return ["127.0.0.2", "127.0.0.1"]  # nothing listens on 127.0.0.2: connection refused

    monkeypatch.setattr(webhooks, "resolve_targets", two_addresses)
    try:
        jobs, record = _job_with_webhook(redis_url, settings, f"http://hooks.example:{receiver.port}/hook")
        run_sender(redis_url, settings, lambda: jobs.webhook_deliveries(record.id))
    finally:
        receiver.close()
    assert len(receiver.at("/hook")) == 1 and jobs.webhook_deliveries(record.id)[0]["status"] == "delivered"


def test_previews_shrink_on_the_device_before_copying():
    import torch

    small = shrink_for_preview(torch.zeros(16, 3, 256, 256), num_images=64, max_side=256)
    assert small.shape == (16, 3, 29, 29)  # 8 columns: (256 - 2) // 8 - 2
    assert shrink_for_preview(torch.zeros(4, 3, 32, 32), num_images=4).shape[-1] == 32  # never enlarged
    canvas = np.zeros((64, 29, 29, 3), np.uint8)
    canvas[:16] = to_uint8(small)
    image = Image.open(io.BytesIO(preview_png(canvas, max_side=256)))
    assert image.size == (8 * 31 + 2, 8 * 31 + 2) and max(image.size) <= 256
