"""Bounds on Server-Sent Events streams, whatever the client does. Torch-free, no Redis.

A stream holds a slot (and, while it waits, a Redis connection) until it ends. It ends:

- when its content ends (the job's terminal event, or the stream's deadline: the content stops there);
- when the client disconnects;
- when a send does not complete within the send timeout: a client that stopped reading has filled
  the socket buffers, so the server's send blocks; the stream is dropped (sse-starlette's
  `send_timeout`) and its slot freed;
- at the deadline plus `CLOSE_GRACE_S` in any case: even the stream's closing send can block on a
  client that does not read, so the whole response is cancelled then.

Slots are counted per API process (`sse_max_streams`) and per API key (`sse_max_streams_per_key`),
so one key cannot take every slot of a process. Both caps are per process: behind a load balancer,
R replicas hold at most R × `sse_max_streams` streams, and one key at most R ×
`sse_max_streams_per_key`. With authentication off there are no keys: only the process cap applies.

Why a subclass of `EventSourceResponse`: the library times out sends but lets the timeout escape as
an exception (a traceback per dropped client in the server's log) and has no overall deadline; the
subclass adds both, and releases the slot on every exit path, whether or not the content was ever
iterated.

What the server cannot do from here: close the TCP connection at once. When a stream is dropped the
ASGI server (uvicorn) closes the connection gracefully, after the bytes already queued for the client
are delivered; a client that never reads keeps that socket (and the kernel's send buffer, a few MB)
until it closes or the kernel gives up. The slot, the Redis connection and the stream's task are
freed at once. A reverse proxy with a send timeout (nginx `send_timeout`) bounds the rest.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Annotated

import anyio
from pydantic import AfterValidator, StringConstraints
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

log = logging.getLogger("patchdiff.api.sse")

CLOSE_GRACE_S = 1.0  # after the deadline, time for the stream's own clean close before it is cut
MAX_STREAM_ID_PART = 2**64 - 1  # Redis stream ids are two unsigned 64-bit integers, `<ms>-<seq>`


def _stream_id_in_range(value: str) -> str:
    if any(int(part) > MAX_STREAM_ID_PART for part in value.split("-")):
        raise ValueError(f"each part of an event id is at most 2^64-1 = {MAX_STREAM_ID_PART}")
    return value


# An event id as the client sends it back (Last-Event-ID, ?after=): a Redis stream id.
EventId = Annotated[str, StringConstraints(pattern=r"^\d{1,20}-\d{1,20}$"), AfterValidator(_stream_id_in_range)]


def send_timeout_s(keepalive_s: float) -> float:
    """How long one send may block before the client counts as gone: two keep-alive intervals, in
    which a reading client drains far more than a keep-alive comment."""
    return 2 * keepalive_s


class StreamSlots:
    """Open streams of one process, counted in all and per key; `release` is idempotent, so every
    exit path may call it."""

    def __init__(self, limit: int, per_key: int):
        self.limit, self.per_key = limit, per_key
        self.open: dict[object, str] = {}  # token -> owner
        self.by_owner: Counter[str] = Counter()

    def refusal(self, owner: str = "") -> str | None:
        """Why a new stream of `owner` would be refused, or None. `owner` "" (auth off): no key cap."""
        if len(self.open) >= self.limit:
            return f"at most {self.limit} event streams at once; try again later"
        if owner and self.by_owner[owner] >= self.per_key:
            return f"at most {self.per_key} event streams at once per API key; close one or try again later"
        return None

    def acquire(self, owner: str = "") -> object | None:
        if self.refusal(owner) is not None:
            return None
        token = object()
        self.open[token] = owner
        self.by_owner[owner] += 1
        return token

    def release(self, token: object) -> None:
        owner = self.open.pop(token, None)
        if owner is not None:
            self.by_owner[owner] -= 1
            if not self.by_owner[owner]:
                del self.by_owner[owner]


class BoundedEventSourceResponse(EventSourceResponse):
    """An `EventSourceResponse` with a send timeout, a hard deadline (monotonic time) and a callback
    that runs once, however the response ends (`on_end`: release the stream's slot)."""

    def __init__(self, content, *, deadline: float, send_timeout: float, on_end: Callable[[], None], **kwargs):
        super().__init__(content, send_timeout=send_timeout, **kwargs)
        self.deadline, self.on_end = deadline, on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            with anyio.move_on_after(max(0.0, self.deadline - time.monotonic()) + CLOSE_GRACE_S) as cut:
                await super().__call__(scope, receive, send)
            if cut.cancelled_caught:  # the content stopped at the deadline, but its end could not be sent
                log.info("event stream %s cut %.0f s after its deadline", scope.get("path"), CLOSE_GRACE_S)
        except SendTimeoutError:
            # Not an error of the server: one line, no traceback. The response stays incomplete,
            # so the server closes the connection.
            log.info("event stream %s dropped: the client read nothing for %.0f s", scope.get("path"), self.send_timeout)
        finally:
            self.on_end()
