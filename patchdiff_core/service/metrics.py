"""Latency histograms of the workers, kept in Redis so that `/metrics` covers every worker. Torch-free.

A worker observes into an in-process buffer and flushes the increments with its heartbeat (no Redis
work per step); the API reads the hashes `hist:<name>` at scrape time (`api/metrics.py`).
"""

from __future__ import annotations

import threading
from collections import Counter

# Bucket upper bounds (seconds) of the histograms exported on /metrics.
HISTOGRAMS: dict[str, tuple[float, ...]] = {
    "step_seconds": (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    "job_seconds": (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
}
# The order the worker's report script knows them by (1-based there).
HISTOGRAM_ORDER = ("step_seconds", "job_seconds")


class HistogramBuffer:
    """Observations not yet flushed to Redis (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: Counter = Counter()
        self._sums: Counter = Counter()

    def observe(self, name: str, value: float) -> None:
        buckets = HISTOGRAMS[name]
        index = next((i for i, bound in enumerate(buckets) if value <= bound), len(buckets))
        with self._lock:
            self._counts[(name, f"b{index}")] += 1
            self._counts[(name, "count")] += 1
            self._sums[name] += value

    def take(self) -> list[tuple[int, str, float]]:
        """The increments since the last call, as (histogram number, field, increment)."""
        with self._lock:
            counts, sums = self._counts, self._sums
            self._counts, self._sums = Counter(), Counter()
        out = [(HISTOGRAM_ORDER.index(name) + 1, key, n) for (name, key), n in counts.items()]
        out += [(HISTOGRAM_ORDER.index(name) + 1, "sum", total) for name, total in sums.items()]
        return out

    def put_back(self, increments: list[tuple[int, str, float]]) -> None:
        """Increments whose flush failed: keep them for the next one."""
        with self._lock:
            for which, key, n in increments:
                name = HISTOGRAM_ORDER[which - 1]
                if key == "sum":
                    self._sums[name] += n
                else:
                    self._counts[(name, key)] += n
