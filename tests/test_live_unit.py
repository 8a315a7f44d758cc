"""Live progress pieces on their own: previews, event publishing and throttling, webhook target checks."""

from __future__ import annotations

import io

import numpy as np
import pytest
import redis
from PIL import Image

from patchdiff_core.generation.images import to_uint8
from patchdiff_core.generation.preview import preview_png, shrink_for_preview
from patchdiff_core.service.events import WEBHOOK_STREAM, JobEvents, stream_key
from patchdiff_core.service.jobs import new_job_id
from patchdiff_core.service.settings import Settings
from patchdiff_core.service.webhooks import WebhookRefused, absolute_links, check_events, check_target


def test_preview_png_is_a_downscaled_grid():
    images = np.full((64, 32, 32, 3), 200, np.uint8)
    image = Image.open(io.BytesIO(preview_png(images, max_side=256)))
    assert image.format == "PNG" and image.size == (256, 256)  # 8x8 grid of 34 px + 2 = 274 -> 256
    small = Image.open(io.BytesIO(preview_png(images[:4], max_side=256)))
    assert small.size == (70, 70)  # never enlarged


@pytest.fixture
def events(redis_url):
    conn = redis.Redis.from_url(redis_url)
    return JobEvents(conn, Settings(redis_url=redis_url, progress_event_interval_s=3600, preview_inline_max_bytes=100))


def test_progress_events_are_throttled_and_carry_previews(events):
    job_id = new_job_id()
    published = {s: events.progress(job_id, s, 10) for s in range(1, 6)}
    assert published[1] is not None and all(published[s] is None for s in (2, 3, 4, 5))
    big, small = b"\x89PNG" + b"x" * 200, b"\x89PNGsmall"
    assert events.progress(job_id, 6, 10, preview_png=big) is not None  # a preview is always sent
    assert events.progress(job_id, 7, 10, preview_png=small) is not None
    assert events.progress(job_id, 10, 10) is not None  # the last step always
    history = events.history(job_id)
    assert [e.data["step"] for e in history] == [1, 6, 7, 10]
    assert "png_base64" not in history[1].data["preview"] and history[2].data["preview"]["png_base64"]
    assert history[1].data["preview"]["url"] == f"/jobs/{job_id}/preview.png?step=6"
    assert events.preview(job_id) == small
    assert events.history(job_id, after=history[1].id)[0].id == history[2].id
    assert 0 < events.redis.ttl(stream_key(job_id)) <= events.settings.job_ttl_s


def test_only_selected_events_queue_a_webhook(events):
    job_id = new_job_id()
    events.redis.hset(f"patchdiff:job:{job_id}", mapping={"webhook": "https://example.com/h", "webhook_events": "started,finished"})
    for name in ("queued", "started", "progress", "finished"):
        events.publish(job_id, name, {"status": name})
    queued = [f for _, f in events.redis.xrange(WEBHOOK_STREAM) if f[b"job_id"] == job_id.encode()]
    assert [f[b"event"] for f in queued] == [b"started", b"finished"]
    assert all(f[b"url"] == b"https://example.com/h" for f in queued)
    other = new_job_id()  # no webhook: nothing queued
    events.publish(other, "finished", {"status": "finished"})
    assert not [f for _, f in events.redis.xrange(WEBHOOK_STREAM) if f[b"job_id"] == other.encode()]
    with pytest.raises(ValueError):
        events.publish(job_id, "exploded", {})


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
    check_target("https://8.8.8.8/hook", Settings())  # a literal address: no DNS, no traffic


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


def test_sender_connects_to_the_checked_address_and_signs(redis_url):
    """One delivery through WebhookSender: to the resolved address, Host kept, signature valid, status kept."""
    import asyncio
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import redis.asyncio as aioredis
    from standardwebhooks.webhooks import Webhook

    from patchdiff_core.service.webhooks import WebhookSender, delivery_status

    got = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            got.append((dict(self.headers), self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    secret = "whsec_" + "MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTI="
    settings = Settings(redis_url=redis_url, webhook_secret=secret, webhook_allow_private=True, public_url="http://api:1")
    job_id = new_job_id()
    delivery = {"job_id": job_id, "event_id": "5-0", "event": "finished", "attempt": 1,
                "url": f"http://localhost:{port}/hook",
                "data": json.dumps({"job_id": job_id, "status": "finished", "links": {"grid": f"/jobs/{job_id}/grid.png"}})}

    async def deliver():
        conn = aioredis.Redis.from_url(redis_url)
        sender = WebhookSender(conn, settings, "test")
        try:
            await sender._attempt(delivery)
        finally:
            await sender.http.aclose()
            await conn.aclose()

    try:
        asyncio.run(deliver())
    finally:
        server.shutdown()
    (headers, body), = got
    headers = {k.lower(): v for k, v in headers.items()}
    assert headers["host"] == f"localhost:{port}" and headers["webhook-id"] == f"{job_id}.5-0"
    payload = Webhook(secret).verify(body, headers)
    assert payload["type"] == "job.finished" and payload["data"]["links"]["grid"] == f"http://api:1/jobs/{job_id}/grid.png"
    status, = delivery_status(redis.Redis.from_url(redis_url), job_id)
    assert status["status"] == "delivered" and status["http_status"] == 200 and status["attempts"] == 1


def test_previews_shrink_on_the_device_before_copying():
    import torch

    small = shrink_for_preview(torch.zeros(16, 3, 256, 256), num_images=64, max_side=256)
    assert small.shape == (16, 3, 29, 29)  # 8 columns: (256 - 2) // 8 - 2
    assert shrink_for_preview(torch.zeros(4, 3, 32, 32), num_images=4).shape[-1] == 32  # never enlarged
    canvas = np.zeros((64, 29, 29, 3), np.uint8)
    canvas[:16] = to_uint8(small)
    image = Image.open(io.BytesIO(preview_png(canvas, max_side=256)))
    assert image.size == (8 * 31 + 2, 8 * 31 + 2) and max(image.size) <= 256
