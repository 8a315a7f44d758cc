"""Redis clients for the API and the workers: how each behaves while Redis is away. Torch-free.

- The API fails fast (1 s connect timeout, one immediate retry on a fresh connection, so a pooled
  connection that Redis closed while it restarted costs no error): with Redis away a request answers
  503 at once, and requests reconnect by themselves when it is back.
- Workers retry every command forever (exponential backoff up to `redis_retry_max_s`), so an outage
  of any length only pauses them: a running job waits at its next Redis call and goes on. Each
  attempt logs one line, not a traceback. redis-py's own `Retry` does the work; the subclass only
  adds that line.
"""

from __future__ import annotations

import logging

import redis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from patchdiff_core.service.settings import Settings

log = logging.getLogger("patchdiff.redis")


class LoggedRetry(Retry):
    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        def logged_fail(error, failures):
            log.warning("Redis unreachable (%s): reconnect attempt %d in %.1f s",
                        str(error).splitlines()[0][:200], failures, self._backoff.compute(failures))
            return fail(error, failures) if with_failure_count else fail(error)

        return super().call_with_retry(do, logged_fail, is_retryable, with_failure_count=True)


def api_redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=3, health_check_interval=10,
                                retry=Retry(NoBackoff(), 1),
                                retry_on_error=[redis.ConnectionError, redis.TimeoutError])


def api_redis_async(url: str):
    import redis.asyncio

    return redis.asyncio.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=3, health_check_interval=10,
                                        retry=AsyncRetry(NoBackoff(), 1),
                                        retry_on_error=[redis.ConnectionError, redis.TimeoutError])


def worker_redis(settings: Settings) -> redis.Redis:
    retry = LoggedRetry(ExponentialBackoff(cap=settings.redis_retry_max_s, base=0.25), retries=-1,
                        supported_errors=(redis.ConnectionError, redis.TimeoutError))
    return redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, health_check_interval=30, retry=retry,
                                retry_on_error=[redis.ConnectionError, redis.TimeoutError])
