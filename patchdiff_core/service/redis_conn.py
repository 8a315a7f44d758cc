"""Redis clients for the API and the workers: how each finds Redis and behaves while it is away.
Torch-free.

Where: `redis_url`, or, with `redis_sentinels` set, the master the Sentinels name
(`redis_sentinel_master`), found again after a failover: redis-py's Sentinel pools ask the
Sentinels for the master's address whenever they connect, and drop connections to an old master.

While Redis is away (or read-only during a failover, or out of memory):

- The API fails fast (1 s connect timeout, one immediate retry on a fresh connection, so a pooled
  connection that Redis closed while it restarted costs no error): a request answers 503 with
  Retry-After at once (`UNAVAILABLE` below), and requests reconnect by themselves when it is back.
- Workers retry a command a few times (exponential backoff up to `redis_retry_max_s`), then give the
  error to their control loop, which keeps everything it has to say and tries again, for as long as
  Redis is away (`worker/control.py`). A finite retry matters: with infinite retries, redis-py keeps
  retrying the address it had, so a client could hang on a dead master forever after a failover.
  Each attempt logs one line, not a traceback. redis-py's own `Retry` does the work; the subclass
  only adds that line.
"""

from __future__ import annotations

import logging

import redis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from patchdiff_core.service.settings import Settings

log = logging.getLogger("patchdiff.redis")

# Redis cannot serve the request now, but may soon: away, slow, loading, out of memory, a replica
# during a failover. The API answers these with 503 and Retry-After; anything else is a bug.
UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError, redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError, redis.exceptions.MasterDownError, redis.exceptions.TryAgainError,
)
WORKER_RETRIES = 3
_RETRYABLE = [redis.ConnectionError, redis.TimeoutError]


class LoggedRetry(Retry):
    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        def logged_fail(error, failures):
            log.warning("Redis unreachable (%s): reconnect attempt %d in %.1f s",
                        str(error).splitlines()[0][:200], failures, self._backoff.compute(failures))
            return fail(error, failures) if with_failure_count else fail(error)

        return super().call_with_retry(do, logged_fail, is_retryable, with_failure_count=True)


def _secret(value) -> str | None:
    return value.get_secret_value() if value is not None else None


def _client(settings: Settings, asyncio: bool = False, **kwargs):
    """A client of the master: from `redis_url`, or through the Sentinels."""
    if not settings.redis_sentinels:
        if not settings.redis_url:
            raise RuntimeError("Redis is not configured: set PATCHDIFF_REDIS_URL or PATCHDIFF_REDIS_SENTINELS")
        module = redis.asyncio if asyncio else redis
        return module.Redis.from_url(settings.redis_url, **kwargs)
    if asyncio:
        from redis.asyncio.sentinel import Sentinel
    else:
        from redis.sentinel import Sentinel
    hosts = []
    for address in settings.redis_sentinels:
        host, _, port = address.rpartition(":")
        hosts.append((host.strip("[]") or address, int(port or 26379)))
    # Asking a Sentinel must fail fast too: a dead one is skipped for the next.
    sentinel_kwargs = {"socket_connect_timeout": 1, "socket_timeout": 1,
                       "password": _secret(settings.redis_sentinel_password)}
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs, password=_secret(settings.redis_password))
    return sentinel.master_for(settings.redis_sentinel_master, **kwargs)


def api_redis(settings: Settings) -> redis.Redis:
    return _client(settings, socket_connect_timeout=1, socket_timeout=3, health_check_interval=10,
                   retry=Retry(NoBackoff(), 1), retry_on_error=_RETRYABLE)


def api_redis_async(settings: Settings, **pool_kwargs):
    return _client(settings, asyncio=True, socket_connect_timeout=1, socket_timeout=3, health_check_interval=10,
                   retry=AsyncRetry(NoBackoff(), 1), retry_on_error=_RETRYABLE, **pool_kwargs)


def worker_redis(settings: Settings, **pool_kwargs) -> redis.Redis:
    retry = LoggedRetry(ExponentialBackoff(cap=settings.redis_retry_max_s, base=0.25), retries=WORKER_RETRIES,
                        supported_errors=(redis.ConnectionError, redis.TimeoutError))
    # socket_timeout: a server that stops answering mid-command (a paused or partitioned master)
    # costs a timeout, never a hang; longer than the longest blocking call (BLPOP, 1 s).
    return _client(settings, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30, retry=retry,
                   retry_on_error=_RETRYABLE, **pool_kwargs)


def events_redis_async(settings: Settings, max_connections: int, socket_timeout: float):
    """The API's pool for event streams and the webhook sender: a blocked XREAD holds a connection
    while it waits, so the pool is bounded (and waits up to 5 s for a free connection, with a URL)."""
    kwargs = {"max_connections": max_connections, "socket_connect_timeout": 1, "socket_timeout": socket_timeout}
    if settings.redis_sentinels:
        return _client(settings, asyncio=True, **kwargs)
    import redis.asyncio as aioredis

    return aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(settings.redis_url, timeout=5, **kwargs))
