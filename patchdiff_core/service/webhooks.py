"""Webhook deliveries: signed (Standard Webhooks), retried with backoff, never in the sampling path.

The script that appends a job's event (`scripts.py`) also queues a delivery on the stream
`webhooks` (`keys.Keys`) when the job's webhook selected that event. `WebhookSender` runs as an
asyncio task in each API process and reads that stream through one consumer group, so each
delivery is taken by one process; a process that dies with deliveries in hand leaves them pending,
and another claims them after `CLAIM_IDLE_MS`. A delivery is acknowledged after its first attempt,
whatever happened in it (a crash included); a failed attempt is scheduled again in a sorted set
(score = when) after `webhook_backoff_s` · 2^(attempt-1), and the delivery gives up after
`webhook_max_attempts` attempts, whatever went wrong in them. Each delivery's latest outcome is kept
in `webhook-status:<job id>` (shown in `GET /jobs/{id}` as `webhook.deliveries`).

Requests are signed with HMAC-SHA256 over `<webhook-id>.<webhook-timestamp>.<body>` by the
`standardwebhooks` package (headers `webhook-id`, `webhook-timestamp`, `webhook-signature`). The
`webhook-id` is `<job id>.<event id>`: the same for every retry, so receivers can deduplicate.

SSRF: a target is refused unless every address its host resolves to is public (`addresses.py`;
checked when the job is submitted and again before every attempt, which then connects to a
checked address, trying each in turn); redirects are not followed; `webhook_allow_private` lifts
the address check (tests, private deployments).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis
from standardwebhooks.webhooks import Webhook

from patchdiff_core.service.addresses import is_public_address
from patchdiff_core.service.events import EVENT_NAMES
from patchdiff_core.service.keys import Keys
from patchdiff_core.service.settings import Settings

log = logging.getLogger("patchdiff.webhooks")

GROUP = "senders"
CLAIM_IDLE_MS = 60_000
DEFAULT_EVENTS = ["queued", "started", "finished", "failed", "cancelled"]  # all but progress


class WebhookRefused(ValueError):
    """A webhook target this server will not call; the message says why."""


def _public(address: str) -> bool:
    return is_public_address(address)  # the rule and its tests live in addresses.py


def check_url_syntax(url: str, settings: Settings) -> tuple[str, int]:
    """Scheme, length and host of a webhook URL; returns (host, port)."""
    if len(url) > settings.webhook_max_url_length:
        raise WebhookRefused(f"webhook URL longer than {settings.webhook_max_url_length} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise WebhookRefused("webhook URL must be http:// or https://")
    if not parts.hostname:
        raise WebhookRefused("webhook URL has no host")
    if parts.username or parts.password:
        raise WebhookRefused("webhook URL must not carry credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise WebhookRefused("webhook URL has an invalid port") from None
    return parts.hostname, port


def check_addresses(host: str, addresses: list[str], settings: Settings) -> None:
    if not addresses:
        raise WebhookRefused(f"webhook host {host!r} does not resolve")
    if settings.webhook_allow_private:
        return
    blocked = [a for a in addresses if not _public(a)]
    if blocked:
        raise WebhookRefused(
            f"webhook host {host!r} resolves to a private, loopback or reserved address ({blocked[0]}); "
            "set PATCHDIFF_WEBHOOK_ALLOW_PRIVATE=true to allow it"
        )


def check_target(url: str, settings: Settings) -> list[str]:
    """The addresses the server may call for `url`; raises `WebhookRefused` unless it may call it
    (blocking DNS: call from a thread)."""
    host, port = check_url_syntax(url, settings)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        infos = []
    addresses = sorted({info[4][0] for info in infos})
    check_addresses(host, addresses, settings)
    return addresses


async def resolve_targets(url: str, settings: Settings) -> list[str]:
    """The checked addresses to connect to for `url`, in the resolver's order (the request then
    goes to one of those addresses, so a DNS answer that changes between the check and the
    connection cannot redirect it)."""
    host, port = check_url_syntax(url, settings)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        infos = []
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    check_addresses(host, addresses, settings)
    return addresses


def check_events(events: list[str] | None) -> list[str]:
    chosen = list(dict.fromkeys(events if events is not None else DEFAULT_EVENTS))
    unknown = [e for e in chosen if e not in EVENT_NAMES]
    if unknown or not chosen:
        raise WebhookRefused(f"webhook_events must be a non-empty subset of {list(EVENT_NAMES)}")
    return chosen


def absolute_links(data: dict[str, Any], base_url: str) -> dict[str, Any]:
    """Event data with its API-relative links (`/jobs/...`) made absolute."""
    out = dict(data)
    if isinstance(out.get("links"), dict):
        out["links"] = {k: ([base_url + v for v in val] if isinstance(val, list) else base_url + val)
                        for k, val in out["links"].items()}
    if isinstance(out.get("preview"), dict) and "url" in out["preview"]:
        out["preview"] = {**out["preview"], "url": base_url + out["preview"]["url"]}
    return out


class WebhookSender:
    """Sends queued deliveries until cancelled; one per API process."""

    def __init__(self, aconn, settings: Settings, consumer: str):
        if settings.webhook_secret is None:
            raise ValueError("WebhookSender needs PATCHDIFF_WEBHOOK_SECRET")
        self.redis, self.settings, self.consumer = aconn, settings, consumer
        self.keys = Keys(settings.redis_prefix)
        self.signer = Webhook(settings.webhook_secret.get_secret_value())
        self.slots = asyncio.Semaphore(settings.webhook_max_concurrency)
        self.tasks: set[asyncio.Task] = set()
        self.http = httpx.AsyncClient(timeout=settings.webhook_timeout_s, follow_redirects=False)

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.webhooks, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self) -> None:
        next_claim = 0.0
        group_ready = False
        try:
            while True:
                try:
                    if not group_ready:
                        await self._ensure_group()
                        group_ready = True
                    if time.monotonic() >= next_claim:
                        await self._claim_stale()
                        next_claim = time.monotonic() + CLAIM_IDLE_MS / 4000
                    await self._due_retries()
                    await self._new_deliveries()
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    log.warning("webhook sender: Redis unavailable (%s); retrying", exc)
                    await asyncio.sleep(1)
                except redis.ResponseError as exc:  # e.g. NOGROUP after Redis came back empty
                    log.warning("webhook sender: %s; setting up again", exc)
                    group_ready = False
                    await asyncio.sleep(1)
                except redis.RedisError as exc:  # e.g. READONLY during a failover
                    log.warning("webhook sender: %s; retrying", exc)
                    await asyncio.sleep(1)
        finally:
            for task in self.tasks:
                task.cancel()
            await self.http.aclose()

    async def _new_deliveries(self) -> None:
        await self.slots.acquire()  # wait for a free slot before taking work from the stream
        self.slots.release()
        reply = await self.redis.xreadgroup(GROUP, self.consumer, {self.keys.webhooks: ">"},
                                            count=self.settings.webhook_max_concurrency, block=500)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                self._spawn(self._first_attempt(entry_id, fields))

    async def _claim_stale(self) -> None:
        reply = await self.redis.xautoclaim(self.keys.webhooks, GROUP, self.consumer, CLAIM_IDLE_MS, "0-0", count=100)
        for entry_id, fields in reply[1]:
            if fields:  # None: trimmed away meanwhile
                self._spawn(self._first_attempt(entry_id, fields))
            else:
                await self.redis.xack(self.keys.webhooks, GROUP, entry_id)

    async def _due_retries(self) -> None:
        due = await self.redis.zrangebyscore(self.keys.webhook_retries, 0, time.time(), start=0,
                                             num=self.settings.webhook_max_concurrency)
        for member in due:
            if await self.redis.zrem(self.keys.webhook_retries, member):  # whoever removes it sends it
                self._spawn(self._attempt(json.loads(member)))

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(self._bounded(coro))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _bounded(self, coro) -> None:
        async with self.slots:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - one bad delivery must not stop the sender
                log.exception("webhook delivery crashed")

    async def _first_attempt(self, entry_id, fields: dict) -> None:
        try:
            text = {k.decode(): v.decode() for k, v in fields.items()}
            delivery = {"job_id": text["job_id"], "event_id": text["event_id"], "event": text["event"],
                        "data": text["data"], "url": text["url"], "attempt": 1}
            await self._attempt(delivery)
        finally:
            # From here on, retries live in the retry set: acknowledged whatever happened above,
            # so a delivery that crashes the sender is not claimed and crashed again forever.
            await self.redis.xack(self.keys.webhooks, GROUP, entry_id)

    async def _attempt(self, delivery: dict) -> None:
        """One attempt; never raises for the delivery's own sake: any failure counts as a failed
        attempt, scheduled again until `webhook_max_attempts`."""
        attempt = delivery["attempt"]
        outcome: dict[str, Any] = {"event_id": delivery["event_id"], "event": delivery["event"], "attempts": attempt,
                                   "at": time.time(), "http_status": None, "error": None}
        try:
            addresses = await resolve_targets(delivery["url"], self.settings)  # again: DNS may have changed
            response = await self._post_to_any(delivery, addresses)
            outcome["http_status"] = response.status_code
            if 200 <= response.status_code < 300:
                outcome["status"] = "delivered"
                await self._record(delivery["job_id"], outcome)
                return
            outcome["error"] = f"HTTP {response.status_code}"
        except WebhookRefused as exc:
            outcome.update(status="refused", error=str(exc))
            await self._record(delivery["job_id"], outcome)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a network error, or anything else: a failed attempt
            outcome["error"] = f"{type(exc).__name__}: {exc}"[:300]
            if not isinstance(exc, httpx.HTTPError):
                log.exception("webhook delivery attempt crashed", extra={"job_id": delivery["job_id"]})
        if attempt >= self.settings.webhook_max_attempts:
            outcome["status"] = "failed"
        else:
            delay = self.settings.webhook_backoff_s * 2 ** (attempt - 1)
            outcome.update(status="retrying", next_attempt_at=time.time() + delay)
            await self.redis.zadd(self.keys.webhook_retries,
                                  {json.dumps({**delivery, "attempt": attempt + 1}): time.time() + delay})
        await self._record(delivery["job_id"], outcome)

    async def _post_to_any(self, delivery: dict, addresses: list[str]) -> httpx.Response:
        """POST to the first checked address that accepts a connection (a host with an IPv6 and an
        IPv4 address, one of them unreachable, still gets its delivery)."""
        for i, address in enumerate(addresses):
            try:
                return await self._post(delivery, address)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                if i == len(addresses) - 1:
                    raise
        raise WebhookRefused(f"webhook host of {delivery['url']!r} has no address")

    async def _post(self, delivery: dict, address: str) -> httpx.Response:
        data = absolute_links(json.loads(delivery["data"]), self.settings.base_url)
        data.get("preview", {}).pop("png_base64", None)  # a link is enough; keeps bodies small
        now = datetime.now(timezone.utc)
        body = json.dumps({"type": f"job.{delivery['event']}", "timestamp": now.isoformat(), "data": data},
                          separators=(",", ":"))
        msg_id = f"{delivery['job_id']}.{delivery['event_id']}"
        headers = {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self.signer.sign(msg_id, now, body),
            "user-agent": "patchdiff-webhooks",
        }
        # Connect to the checked address; the Host header and TLS (SNI, certificate) keep the name.
        url = httpx.URL(delivery["url"])
        headers["host"] = url.netloc.decode("ascii")
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        return await self.http.post(url.copy_with(host=address), content=body.encode(), headers=headers,
                                    extensions=extensions)

    async def _record(self, job_id: str, outcome: dict[str, Any]) -> None:
        key = self.keys.webhook_status(job_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, outcome["event_id"], json.dumps(outcome))
            pipe.expire(key, self.settings.job_ttl_s * 2 + 3600)  # the janitor deletes it with the job
            await pipe.execute()
