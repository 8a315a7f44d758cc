"""A small Server-Sent Events reader for tests (httpx streaming), strict about the wire format."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx


@dataclass
class Event:
    id: str | None
    event: str
    data: dict


def read_events(url: str, last_event_id: str | None = None, stop=None, timeout: float = 60,
                headers: dict | None = None) -> list[Event]:
    """Events from `url` until the server closes the stream or `stop(events)` is true; at most `timeout`
    seconds in all (keep-alive comments would otherwise keep a stuck stream open forever)."""
    send = {"Accept": "text/event-stream", **(headers or {})}
    if last_event_id:
        send["Last-Event-ID"] = last_event_id
    events: list[Event] = []
    deadline = time.monotonic() + timeout
    with httpx.stream("GET", url, headers=send, timeout=httpx.Timeout(timeout)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}: no end of stream after {timeout} s; got {[e.event for e in events]}")
            if line == "":
                if "data" in fields:
                    events.append(Event(fields.get("id"), fields.get("event", "message"), json.loads(fields["data"])))
                    if stop is not None and stop(events):
                        return events
                fields = {}
            elif line.startswith(":"):
                continue  # keep-alive comment
            else:
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value
    return events
