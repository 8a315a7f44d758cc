"""The worker's health check (`python -m worker.health`; the image's HEALTHCHECK and a Kubernetes
liveness probe): healthy while the control loop goes round, which it does at least every second
whether Redis answers or not. Reads one local file: no Redis call, no keyspace scan.

Exit status 0: the file was touched less than `STALE_S` ago; 1 otherwise.
"""

from __future__ import annotations

import os
import sys
import time

LIVENESS_FILE = os.environ.get("PATCHDIFF_WORKER_LIVENESS_FILE", "/tmp/patchdiff-worker-alive")
STALE_S = 60.0


def healthy(path: str = LIVENESS_FILE, stale_s: float = STALE_S) -> bool:
    try:
        return time.time() - os.path.getmtime(path) < stale_s
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(0 if healthy() else 1)
