"""What one caller can cost: the request body size (ASGI middleware) and the submission rate per key.
(Validation errors, which must be encodable whatever the input held, are in `api.errors`.)"""

from __future__ import annotations

import math
import time

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from patchdiff_core.service.jobs import JobStore


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """413 for a request body over `max_bytes`, decided before the body is in memory.

    A pure ASGI middleware (Starlette's BaseHTTPMiddleware would buffer): a declared Content-Length
    over the limit is refused before anything is read, and chunked bodies are counted as they
    stream; past the limit the app's read fails and whatever it answers is replaced by the 413.
    Runs before any route, so before authentication too.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes or declared < 0:
                    await self._refuse(send)
                    return
        seen = 0
        overflowed = False
        response_started = False

        async def counting_receive() -> Message:
            nonlocal seen, overflowed
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    overflowed = True
                    raise BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if overflowed:
                if message["type"] == "http.response.start" and not response_started:
                    response_started = True
                    await self._refuse(send)
                return  # drop whatever the app answered to the truncated body
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except BodyTooLarge:
            if not response_started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = b'{"detail":"request body too large (limit %d bytes)"}' % self.max_bytes
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def check_submit_rate(jobs: JobStore, owner: str, per_minute: int) -> None:
    """A fixed one-minute window per tenant in Redis (shared by every API process): 429 past it."""
    if per_minute <= 0:
        return
    window = int(time.time() // 60)
    key = jobs.keys.rate(owner, window)
    with jobs.redis.pipeline(transaction=False) as pipe:
        pipe.incr(key)
        pipe.expire(key, 61)
        count = pipe.execute()[0]
    if count > per_minute:
        retry_after = max(1, math.ceil((window + 1) * 60 - time.time()))
        raise HTTPException(status_code=429, detail=f"at most {per_minute} submissions per minute per API key",
                            headers={"Retry-After": str(retry_after)})

