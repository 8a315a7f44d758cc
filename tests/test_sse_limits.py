"""SSE streams stay bounded whatever the client does: real processes (redis-server, a worker, two API
processes under uvicorn) and real clients that stop reading (raw sockets with a small receive
buffer that never read past the response head).

- a client that reads nothing is dropped after the send timeout (two keep-alive intervals) and its
  slot freed, long before the stream's deadline;
- one API key cannot take the slots of another: a cap per key as well as per process;
- the deadline (`sse_max_stream_s`) holds even when the send timeout is longer;
- event ids out of Redis' range are a 422 naming the header or parameter;
- an error after the stream started (Redis killed) ends it with an `error` event, not a broken
  response, and no traceback in the log.
"""

from __future__ import annotations

import json
import socket
import sys
from urllib.parse import urlsplit

import httpx
import pytest
from service_harness import Processes, RedisServer, free_port, service_env, wait_until, write_weights_dir
from sse_client import read_events

from api.sse import MAX_STREAM_ID_PART, StreamSlots, send_timeout_s

pytestmark = pytest.mark.slow

KEY_A, KEY_B = {"X-API-Key": "key-a"}, {"X-API-Key": "key-b"}
# Every step of a 64-image job publishes its preview inline (a ~70 KB event): a job's history is
# megabytes, far more than the socket buffers between the API and a client that does not read.
BIG_EVENTS = {
    "PATCHDIFF_PROGRESS_EVENT_INTERVAL_S": "0",
    "PATCHDIFF_PREVIEW_EVERY_STEPS": "1",
    "PATCHDIFF_PREVIEW_MIN_INTERVAL_S": "0",
    "PATCHDIFF_PREVIEW_INLINE_MAX_BYTES": "1000000",
    "PATCHDIFF_ENGINE_MAX_BATCH": "64",
}
# API "fast": the send timeout (4 s) is far shorter than the deadline (120 s).
FAST = {"PATCHDIFF_SSE_MAX_STREAMS": "4", "PATCHDIFF_SSE_MAX_STREAMS_PER_KEY": "2",
        "PATCHDIFF_SSE_KEEPALIVE_S": "2", "PATCHDIFF_SSE_MAX_STREAM_S": "120"}
# API "deadline": the deadline (4 s) is far shorter than the send timeout (60 s).
DEADLINE = {"PATCHDIFF_SSE_MAX_STREAMS": "2", "PATCHDIFF_SSE_MAX_STREAMS_PER_KEY": "2",
            "PATCHDIFF_SSE_KEEPALIVE_S": "30", "PATCHDIFF_SSE_MAX_STREAM_S": "4"}


class Service:
    def __init__(self, redis_server: RedisServer, procs: Processes, fast: str, deadline: str):
        self.redis, self.procs, self.fast, self.deadline = redis_server, procs, fast, deadline
        self.big_job = self.small_job = ""

    def api_log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.procs.logdir.glob("api*.log")))


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model_file):
    tmp = tmp_path_factory.mktemp("sse-limits")
    weights = write_weights_dir(tmp / "weights", tiny_model_file, "tiny")
    redis_server = RedisServer(tmp / "redis", appendonly=True).start()
    env = service_env(redis_server.url, weights, tmp / "store", PATCHDIFF_API_KEYS="key-a,key-b", **BIG_EVENTS)
    procs = Processes(env, tmp / "logs")
    try:
        procs.worker()
        urls = []
        for tag, extra in (("api-fast", FAST), ("api-deadline", DEADLINE)):
            port = free_port()
            procs.spawn([sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--host", "127.0.0.1",
                         "--port", str(port), "--log-level", "info", "--no-access-log"], tag, **extra)
            urls.append(f"http://127.0.0.1:{port}")
            wait_until(lambda u=urls[-1]: _status(u + "/readyz") == 200, 60, f"{tag} and a live worker")
        service = Service(redis_server, procs, *urls)
        service.big_job = submit(service.fast, KEY_A, num_images=64, timesteps="100", seed=1)
        service.small_job = submit(service.fast, KEY_B, num_images=1, timesteps="10", seed=2)
        for job, key in ((service.big_job, KEY_A), (service.small_job, KEY_B)):
            wait_until(lambda j=job, k=key: httpx.get(f"{service.fast}/jobs/{j}", headers=k).json()["status"] == "finished",
                       120, f"job {job} to finish")
        yield service
    finally:
        procs.stop_all()
        redis_server.stop()


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


def submit(url: str, key: dict, **body) -> str:
    response = httpx.post(url + "/generate", json={"model": "tiny", **body}, headers=key)
    assert response.status_code == 202, response.text
    return response.json()["id"]


class StalledClient:
    """Sends its request, reads the response head byte by byte, and never reads again. Its receive
    buffer is small, so the server's socket buffers fill after a few hundred KB."""

    def __init__(self, url: str, path: str, headers: dict):
        parts = urlsplit(url)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(10)
        self.sock.connect((parts.hostname, parts.port))
        lines = [f"GET {path} HTTP/1.1", f"Host: {parts.netloc}", "Accept: text/event-stream",
                 *(f"{k}: {v}" for k, v in headers.items())]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            byte = self.sock.recv(1)
            assert byte, f"connection closed in the response head: {head!r}"
            head += byte
        self.status = int(head.split()[1])

    def close(self) -> None:
        self.sock.close()


def _opens(url: str, key: dict) -> bool:
    with httpx.stream("GET", url, headers=key, timeout=httpx.Timeout(30)) as response:
        return response.status_code == 200


def test_clients_that_stop_reading_are_dropped_and_one_key_cannot_take_anothers_slots(service):
    events = f"/jobs/{service.big_job}/events"
    stalled = [StalledClient(service.fast, events, KEY_A) for _ in range(4)]  # the process cap is 4
    try:
        # Key A gets its 2 streams (its cap), not the process's 4.
        assert [c.status for c in stalled] == [200, 200, 429, 429]
        refused = httpx.get(service.fast + events, headers=KEY_A)
        assert refused.status_code == 429 and "per API key" in refused.json()["detail"]
        # Key B still gets its stream while A's clients hang, and reads it to the end.
        mine = read_events(f"{service.fast}/jobs/{service.small_job}/events", headers=KEY_B, timeout=30)
        assert mine[-1].event == "finished"
        # A's stalled clients are dropped after the send timeout (4 s), long before the deadline
        # (120 s): A can open a stream again.
        wait_until(lambda: _opens(service.fast + events, KEY_A), 30, "a stalled client's slot to be freed")
        for _ in range(2):
            assert _opens(service.fast + events, KEY_A)  # both of A's slots came back
    finally:
        for client in stalled:
            client.close()
    assert "dropped: the client read nothing for 4 s" in service.api_log()


def test_the_deadline_holds_whatever_the_client_does(service):
    """API "deadline": a send may block for 60 s, but streams end at 4 s all the same."""
    events = f"/jobs/{service.big_job}/events"
    stalled = [StalledClient(service.deadline, events, KEY_A) for _ in range(2)]
    try:
        assert [c.status for c in stalled] == [200, 200]
        assert httpx.get(service.deadline + events, headers=KEY_A).status_code == 429  # the process cap: 2
        wait_until(lambda: _opens(service.deadline + events, KEY_A), 30, "the deadline to free a slot")
    finally:
        for client in stalled:
            client.close()
    assert "s after its deadline" in service.api_log()
    # A reading client gets a clean end of stream at the deadline, while its job still runs.
    long_job = submit(service.deadline, KEY_A, num_images=64, timesteps="1000", seed=3)
    try:
        got = read_events(f"{service.deadline}/jobs/{long_job}/events", headers=KEY_A, timeout=30)
        assert got[0].event == "queued" and got[-1].event not in ("finished", "failed", "cancelled")
        assert httpx.get(f"{service.deadline}/jobs/{long_job}", headers=KEY_A).json()["status"] in ("queued", "running")
    finally:
        httpx.delete(f"{service.deadline}/jobs/{long_job}", headers=KEY_A)


@pytest.mark.parametrize("bad", ["99999999999999999999-0", "18446744073709551616-0", "0-18446744073709551616"])
def test_event_ids_out_of_range_are_422_naming_the_field(service, bad):
    events = f"{service.fast}/jobs/{service.small_job}/events"
    by_header = httpx.get(events, headers={**KEY_B, "Last-Event-ID": bad})
    assert by_header.status_code == 422
    assert by_header.json()["detail"][0]["loc"] == ["header", "Last-Event-ID"]
    assert "2^64-1" in json.dumps(by_header.json())
    by_query = httpx.get(events, params={"after": bad}, headers=KEY_B)
    assert by_query.status_code == 422 and by_query.json()["detail"][0]["loc"] == ["query", "after"]


def test_the_largest_event_id_is_served(service):
    largest = f"{MAX_STREAM_ID_PART}-{MAX_STREAM_ID_PART}"
    got = read_events(f"{service.fast}/jobs/{service.small_job}/events", last_event_id=largest, headers=KEY_B,
                      timeout=30)
    assert [e.event for e in got] == ["finished"] and got[0].id is None  # nothing after it; the end, restated


def test_an_error_after_the_stream_started_ends_it_with_an_error_event(service):
    """Redis is killed under an open stream: the client gets an `error` event and a clean end of the
    response (httpx raises on a broken chunked body), and the log has no traceback. Then Redis is
    restarted from its append-only file. Last in this module: the service is back, but shaken."""
    job = submit(service.fast, KEY_B, num_images=1, timesteps="10", seed=5)
    wait_until(lambda: httpx.get(f"{service.fast}/jobs/{job}", headers=KEY_B).json()["status"] == "finished", 60, "job")
    url = f"{service.fast}/jobs/{job}/events"
    last = read_events(url, headers=KEY_B)[-1].id
    try:
        # After the last event of an ended job the stream waits a while for more: kill Redis under it.
        with httpx.stream("GET", url, params={"after": last}, headers=KEY_B, timeout=httpx.Timeout(30)) as response:
            assert response.status_code == 200
            service.redis.kill()
            body = response.read().decode()  # raises httpx.RemoteProtocolError on a broken chunked body
    finally:
        service.redis.start()
    assert "event: error" in body and "retry: " in body
    data = json.loads(next(line[5:] for line in body.splitlines() if line.startswith("data:")))
    assert data["job_id"] == job and "reconnect" in data["reason"]
    log = service.api_log()
    assert "Exception in ASGI application" not in log and "api/events.py" not in log, log[-3000:]  # no traceback
    assert f"event stream of job {job} ended by" in log


def test_stream_slots_count_per_process_and_per_key():
    slots = StreamSlots(limit=3, per_key=2)
    a1, a2 = slots.acquire("a"), slots.acquire("a")
    assert a1 and a2 and slots.acquire("a") is None and "per API key" in slots.refusal("a")
    b1 = slots.acquire("b")
    assert b1 and slots.acquire("c") is None and "at most 3" in slots.refusal("c")
    slots.release(a1)
    slots.release(a1)  # idempotent
    assert slots.acquire("b") is not None and slots.acquire("a") is None  # the process is full again
    open_ = StreamSlots(limit=3, per_key=1)
    assert all(open_.acquire("") for _ in range(3))  # auth off: no key cap


def test_send_timeout_is_two_keepalive_intervals():
    assert send_timeout_s(15.0) == 30.0 and send_timeout_s(1) == 2
