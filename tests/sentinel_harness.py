"""Real Redis Sentinel for tests and benchmarks: a master (append-only), a replica and 3 Sentinels,
each a `redis-server` process on a free port of 127.0.0.1."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis
from service_harness import RedisServer, free_port, redis_binary, wait_until

MASTER_NAME = "patchdiff"
DOWN_AFTER_MS = 2000


class SentinelSet:
    def __init__(self, workdir: Path, down_after_ms: int = DOWN_AFTER_MS):
        self.workdir, self.down_after_ms = workdir, down_after_ms
        self.master = RedisServer(workdir / "master", appendonly=True)
        self.replica = RedisServer(workdir / "replica", appendonly=True)
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen] = []

    @property
    def addresses(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def env(self) -> dict[str, str]:
        """What the API and the workers need to find the master through the Sentinels."""
        return {"PATCHDIFF_REDIS_SENTINELS": self.addresses, "PATCHDIFF_REDIS_SENTINEL_MASTER": MASTER_NAME}

    def start(self) -> "SentinelSet":
        self.master.start()
        self.replica.start()
        redis.Redis(port=self.replica.port).replicaof("127.0.0.1", self.master.port)
        wait_until(lambda: redis.Redis(port=self.master.port).info("replication")["connected_slaves"] == 1, 30,
                   "the replica to connect")
        for i, port in enumerate(self.sentinel_ports):
            folder = self.workdir / f"sentinel{i}"
            folder.mkdir(parents=True, exist_ok=True)
            conf = folder / "sentinel.conf"  # Sentinels rewrite their configuration: one file each
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} 2\n"
                            f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}\n"
                            f"sentinel failover-timeout {MASTER_NAME} 10000\n"
                            f"sentinel parallel-syncs {MASTER_NAME} 1\n")
            self.sentinels.append(subprocess.Popen([redis_binary(), str(conf), "--sentinel"],
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_until(self._all_sentinels_ready, 30, "the Sentinels to see each other and the replica")
        # The replica resynchronises once the Sentinels took charge: wait until it is linked again.
        wait_until(self._replica_linked, 30, "the replica's link to be up")
        return self

    def _replica_linked(self) -> bool:
        try:
            return redis.Redis(port=self.replica.port).info("replication").get("master_link_status") == "up" and \
                len(redis.Redis(port=self.master.port).execute_command("ROLE")[2]) == 1
        except redis.RedisError:
            return False

    def _all_sentinels_ready(self) -> bool:
        try:
            for port in self.sentinel_ports:
                state = redis.Redis(port=port).sentinel_master(MASTER_NAME)
                if state["num-other-sentinels"] < 2 or state["num-slaves"] < 1:
                    return False
            return True
        except redis.RedisError:
            return False

    def master_port(self) -> int:
        """The port of the master the Sentinels name now."""
        host, port = redis.Redis(port=self.sentinel_ports[0]).sentinel_get_master_addr_by_name(MASTER_NAME)
        return int(port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.master_port()}/0"

    def kill_master(self) -> int:
        """SIGKILL the current master; returns its port."""
        port = self.master_port()
        server = self.master if port == self.master.port else self.replica
        server.kill()
        return port

    def stop(self) -> None:
        for proc in self.sentinels:
            proc.kill()
            proc.wait(10)
        for server in (self.master, self.replica):
            if server.proc and server.proc.poll() is None:
                server.stop()


def wait_for_failover(cluster: SentinelSet, old_port: int, timeout: float = 30) -> float:
    """Seconds until the Sentinels name a new master."""
    started = time.monotonic()
    wait_until(lambda: _safe(lambda: cluster.master_port() != old_port), timeout, "the failover")
    return time.monotonic() - started


def _safe(predicate) -> bool:
    try:
        return predicate()
    except redis.RedisError:
        return False
