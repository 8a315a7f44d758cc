"""Live progress end to end: SSE events, previews and signed webhooks through real processes
(redis-server, a worker, the API under uvicorn) and a real HTTP receiver on loopback."""

from __future__ import annotations

import io
import json
import time

import httpx
import pytest
from PIL import Image
from service_harness import (
    Processes,
    free_port,
    running_service,
    wait_until,
    write_weights_dir,
)
from sse_client import read_events
from webhook_receiver import Receiver
from standardwebhooks.webhooks import Webhook

pytestmark = pytest.mark.slow
SECRET = "whsec_" + "dGVzdC1zZWNyZXQtZm9yLXBhdGNoZGlmZi13ZWJob29rcw=="  # base64 of a test secret
LIVE_ENV = {
    "PATCHDIFF_ENGINE_MAX_JOBS": "1",  # one job at a time, so that a second one waits in the queue
    "PATCHDIFF_PROGRESS_EVENT_INTERVAL_S": "0",  # every step: the tests count them
    "PATCHDIFF_PREVIEW_EVERY_STEPS": "4",
    "PATCHDIFF_PREVIEW_MIN_INTERVAL_S": "0",
    "PATCHDIFF_SSE_KEEPALIVE_S": "1",
    "PATCHDIFF_WEBHOOK_SECRET": SECRET,
    "PATCHDIFF_WEBHOOK_BACKOFF_S": "0.2",
    "PATCHDIFF_SSE_MAX_STREAMS": "2",
}


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_model_file):
    tmp = tmp_path_factory.mktemp("live")
    weights = write_weights_dir(tmp / "weights", tiny_model_file, "tiny")
    with running_service(tmp, weights, PATCHDIFF_WEBHOOK_ALLOW_PRIVATE="true", **LIVE_ENV) as service:
        yield service


def submit(url: str, **body) -> dict:
    response = httpx.post(url + "/generate", json={"model": "tiny", **body})
    assert response.status_code == 202, response.text
    return response.json()


def wait_status(url: str, job_id: str, statuses=("finished", "failed", "cancelled"), timeout: float = 60) -> dict:
    return wait_until(lambda: (lambda j: j if j["status"] in statuses else None)(httpx.get(f"{url}/jobs/{job_id}").json()),
                      timeout, f"job {job_id} to reach {statuses}")


def decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG"
    return image


def test_events_queued_progress_previews_finished(live):
    url, _, procs = live
    job = submit(url, num_images=4, class_label=7, seed=3, timesteps="24")
    events = read_events(f"{url}/jobs/{job['id']}/events")
    # While the job waits, position updates (queued events without an id) may come in between.
    names = [e.event for e in events if e.id is not None]
    assert names[0] == "queued" and names[1] == "started" and names[-1] == "finished", names
    assert all(e.event == "queued" and "queue_position" in e.data for e in events if e.id is None)
    assert set(names[2:-1]) == {"progress"}, names
    stored = [e for e in events if e.id is not None]
    assert [e.id for e in stored] == sorted({e.id for e in stored}, key=lambda i: tuple(map(int, i.split("-"))))
    assert all(e.data["job_id"] == job["id"] for e in events)

    steps = [e.data["step"] for e in events if e.event == "progress"]
    # Interval 0: an event at every report of the worker (one per engine step, or fewer when steps
    # come faster than Redis calls; the finished event may stand for the last ones); progress counts
    # network evaluations image by image, and the 4 images share every step (4 rows per forward).
    assert steps == sorted(set(steps)) and set(steps) <= set(range(4, 4 * 24 + 1, 4)), steps
    assert len(steps) >= 6 and steps[-1] >= 4 * 20, steps
    assert all(e.data["total"] == 4 * 24 for e in events if e.event == "progress")
    previews = [e.data["preview"] for e in events if e.event == "progress" and "preview" in e.data]
    assert 3 <= len(previews) <= 8  # every 4 steps (plus none between): 24 steps -> about 6
    for preview in previews:
        image = decode_png(__import__("base64").b64decode(preview["png_base64"]))
        assert image.size == (2 + 2 * 18, 2 + 2 * 18)  # a 2x2 grid of 16-pixel images with 2-pixel gaps
        assert preview["url"].startswith(f"{url}/jobs/{job['id']}/preview.png")
    live_preview = httpx.get(previews[-1]["url"])
    assert live_preview.status_code == 200 and live_preview.headers["content-type"] == "image/png"
    decode_png(live_preview.content)

    finished = events[-1].data
    assert finished["num_results"] == 4 and finished["links"]["grid"] == f"{url}/jobs/{job['id']}/grid.png"
    grid = httpx.get(finished["links"]["grid"])
    assert grid.status_code == 200 and decode_png(grid.content).size == (38, 38)
    # After the end, the whole history is still there and the stream closes by itself.
    again = read_events(f"{url}/jobs/{job['id']}/events", timeout=10)
    assert [(e.id, e.event) for e in again] == [(e.id, e.event) for e in stored]


def test_reconnect_with_last_event_id_loses_nothing(live):
    url, _, _ = live
    job = submit(url, num_images=1, seed=5, timesteps="200")
    first = read_events(f"{url}/jobs/{job['id']}/events",
                        stop=lambda evs: sum(e.event == "progress" for e in evs) >= 5)
    time.sleep(0.3)  # events go on while this client is away
    assert httpx.get(f"{url}/jobs/{job['id']}").json()["status"] == "running"  # reconnecting mid-job
    last_id = [e.id for e in first if e.id][-1]
    second = read_events(f"{url}/jobs/{job['id']}/events", last_event_id=last_id)
    assert second[-1].event == "finished"
    everything = read_events(f"{url}/jobs/{job['id']}/events")
    got = [(e.id, e.event, e.data.get("step")) for e in first + second if e.id]
    assert got == [(e.id, e.event, e.data.get("step")) for e in everything if e.id]
    assert len([e for e in second if e.event == "progress"]) > 5  # the reconnect really was mid-job


def test_queue_position_changes_while_waiting(live):
    url, _, _ = live
    long = {"num_images": 2, "timesteps": "1000"}
    running = submit(url, seed=1, **long)
    wait_until(lambda: httpx.get(f"{url}/jobs/{running['id']}").json()["status"] == "running", 30, "the first job to run")
    ahead = submit(url, seed=2, **long)
    watched = submit(url, seed=3, **long)
    seen: list = []

    def cancel_ahead_once_seen(events):
        positions = [e.data["queue_position"] for e in events if e.event == "queued" and "queue_position" in e.data]
        if positions == [1] and not seen:
            seen.append(True)
            assert httpx.delete(f"{url}/jobs/{ahead['id']}").status_code == 202
        return 0 in positions

    events = read_events(f"{url}/jobs/{watched['id']}/events", stop=cancel_ahead_once_seen, timeout=30)
    positions = [e.data["queue_position"] for e in events if "queue_position" in e.data]
    assert positions == [1, 0] and all(e.id is None for e in events if "queue_position" in e.data)
    # Cancelling the waiting job ends its stream with a cancelled event written by the API.
    assert httpx.delete(f"{url}/jobs/{watched['id']}").status_code == 202
    rest = read_events(f"{url}/jobs/{watched['id']}/events", last_event_id=events[0].id, timeout=10)
    assert rest[-1].event == "cancelled" and rest[-1].data["reason"] == "cancelled by request"
    httpx.delete(f"{url}/jobs/{running['id']}")
    wait_status(url, running["id"])


def test_events_and_preview_errors(live):
    url, _, _ = live
    unknown = "0123456789abcdef0123456789abcdef"
    assert httpx.get(f"{url}/jobs/{unknown}/events").status_code == 404
    assert httpx.get(f"{url}/jobs/{unknown}/preview.png").status_code == 404
    assert httpx.get(f"{url}/jobs/..%2F..%2Fetc/preview.png").status_code == 404
    job = submit(url, num_images=1, seed=9, timesteps="5")
    bad = httpx.get(f"{url}/jobs/{job['id']}/events", headers={"Last-Event-ID": "yesterday"})
    assert bad.status_code == 422 and "Last-Event-ID" in json.dumps(bad.json()["detail"][0]["loc"])
    wait_status(url, job["id"])


def test_concurrent_streams_are_bounded(live):
    url, _, _ = live
    job = submit(url, num_images=1, seed=8, timesteps="1000")
    events_url = f"{url}/jobs/{job['id']}/events"
    timeout = httpx.Timeout(30)
    with httpx.stream("GET", events_url, timeout=timeout) as one, httpx.stream("GET", events_url, timeout=timeout) as two:
        assert one.status_code == two.status_code == 200
        third = httpx.get(events_url, timeout=timeout)
        assert third.status_code == 429 and third.headers["retry-after"]
    # Closed streams free their slots (the server notices the disconnect).
    wait_until(lambda: _stream_opens(events_url), 10, "a free slot")
    httpx.delete(f"{url}/jobs/{job['id']}")
    wait_status(url, job["id"])


def _stream_opens(events_url: str) -> bool:
    with httpx.stream("GET", events_url, timeout=httpx.Timeout(30)) as response:
        return response.status_code == 200


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def verified(request: dict) -> dict:
    """The payload if the Standard Webhooks signature is valid (raises otherwise)."""
    headers = {k.lower(): v for k, v in request["headers"].items()}
    return Webhook(SECRET).verify(request["body"], headers)


def test_webhook_gets_every_selected_event_signed(live, receiver):
    url, _, _ = live
    job = submit(url, num_images=2, seed=4, timesteps="10", webhook=receiver.url + "/hook",
                 webhook_events=["started", "progress", "finished"])
    assert job["webhook"]["url"] == receiver.url + "/hook"
    assert job["webhook"]["events"] == ["started", "progress", "finished"]
    assert wait_status(url, job["id"])["status"] == "finished"
    stream = [e for e in read_events(f"{url}/jobs/{job['id']}/events") if e.event in ("started", "progress", "finished")]
    # Deliveries run concurrently: wait until every selected event of the stream has come.
    wait_until(lambda: sorted(verified(r)["type"] for r in receiver.at("/hook")) == sorted(f"job.{e.event}" for e in stream),
               20, "a delivery of every selected event")
    payloads = [verified(r) for r in receiver.at("/hook")]
    hooked = sorted(p["data"]["step"] for p in payloads if p["type"] == "job.progress")
    assert hooked and set(hooked) <= set(range(2, 21, 2)), hooked
    assert sorted(p["type"] for p in payloads) == sorted(f"job.{e.event}" for e in stream)
    finished = next(p for p in payloads if p["type"] == "job.finished")
    assert finished["data"]["links"]["grid"].endswith(f"/jobs/{job['id']}/grid.png")
    ids = [r["headers"]["webhook-id"] for r in receiver.at("/hook")]
    assert len(set(ids)) == len(ids) and all(i.startswith(job["id"] + ".") for i in ids)
    # A tampered body fails verification: the check above is real.
    tampered = {**receiver.at("/hook")[0], "body": receiver.at("/hook")[0]["body"].replace(b"job.", b"jab.")}
    with pytest.raises(Exception):
        verified(tampered)
    view = wait_until(lambda: (lambda j: j if len(j["webhook"]["deliveries"]) == len(stream) else None)(
        httpx.get(f"{url}/jobs/{job['id']}").json()), 10, "delivery status on the job")
    assert {d["status"] for d in view["webhook"]["deliveries"]} == {"delivered"}


def test_webhook_retried_until_it_succeeds(live, receiver):
    url, _, _ = live
    job = submit(url, num_images=1, seed=6, timesteps="4", webhook=receiver.url + "/flaky", webhook_events=["finished"])
    wait_until(lambda: len(receiver.at("/flaky")) >= 3, 30, "three attempts")
    attempts = receiver.at("/flaky")
    assert len({r["headers"]["webhook-id"] for r in attempts}) == 1  # the same message, retried
    assert all(verified(r)["type"] == "job.finished" for r in attempts)
    view = wait_until(lambda: (lambda j: j if j["webhook"]["deliveries"] and j["webhook"]["deliveries"][0]["status"] == "delivered"
                               else None)(httpx.get(f"{url}/jobs/{job['id']}").json()), 10, "delivered status")
    delivery = view["webhook"]["deliveries"][0]
    assert delivery["attempts"] == 3 and delivery["http_status"] == 204 and delivery["event"] == "finished"
    time.sleep(1)  # (nothing to wait for: checking that nothing more comes)
    assert len(receiver.at("/flaky")) == 3  # no delivery after the success


def test_private_webhook_targets_refused_by_default(live, tmp_path):
    url, env, _ = live
    strict_env = {k: v for k, v in env.items() if k != "PATCHDIFF_WEBHOOK_ALLOW_PRIVATE"}
    procs = Processes(strict_env, tmp_path / "logs")
    try:
        strict = procs.api(free_port())
        for target in ["http://127.0.0.1:9/x", "http://10.0.0.1/x", "http://169.254.169.254/latest", "http://[::1]/x",
                       "http://192.168.1.1/", "http://localhost/x", "https://0.0.0.0/"]:
            response = httpx.post(strict + "/generate", json={"num_images": 1, "webhook": target})
            assert response.status_code == 422, (target, response.text)
            assert response.json()["detail"][0]["loc"] == ["body", "webhook"], target
        for target, field in [("ftp://example.com/x", "webhook"), ("http://" + "a" * 3000 + ".com/", "webhook"),
                              ("http://user:pw@example.com/", "webhook")]:
            response = httpx.post(strict + "/generate", json={"num_images": 1, "webhook": target})
            assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", field], target
        response = httpx.post(strict + "/generate", json={"num_images": 1, "webhook_events": ["finished"]})
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "webhook_events"]
        response = httpx.post(strict + "/generate", json={"num_images": 1, "webhook": "http://127.0.0.1:9/",
                                                          "webhook_events": ["done"]})
        assert response.status_code == 422 and "webhook_events" in response.json()["detail"][0]["loc"]
    finally:
        procs.stop_all()
