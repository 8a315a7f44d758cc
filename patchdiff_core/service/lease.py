"""Elected roles: work that any process could do, done by one at a time. Torch-free.

Every API process and every worker can run the reaper; every API process can run the janitor and
export the service-wide job metrics. Each of these is held by one process at a time through a lease
(a Redis key naming its holder, with an expiry the holder renews when it works); the others stand
by, and one of them takes over within the lease's TTL of the holder's end. A lease also spaces the
work: only its holder does it, once per its own interval.
"""

from __future__ import annotations

import redis

from patchdiff_core.service.keys import Keys

# KEYS: the lease. ARGV: holder, TTL ms. Returns 1 if `holder` holds it now (taken or renewed).
HOLD = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# KEYS: the lease. ARGV: holder. Gives the lease up if `holder` holds it.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    def __init__(self, conn: redis.Redis, keys: Keys, role: str, holder: str, ttl_s: float):
        self.key, self.holder, self.ttl_ms = keys.lease(role), holder, max(100, int(ttl_s * 1000))
        self._hold = conn.register_script(HOLD)
        self._release = conn.register_script(RELEASE)

    def hold(self) -> bool:
        """Take or renew the lease; True while this process holds it (raises on Redis errors)."""
        return bool(self._hold(keys=[self.key], args=[self.holder, self.ttl_ms]))

    def release(self) -> None:
        """Give the lease up (a process that stops): another takes it at once, not a TTL later."""
        try:
            self._release(keys=[self.key], args=[self.holder])
        except redis.RedisError:
            pass  # it lapses by itself
