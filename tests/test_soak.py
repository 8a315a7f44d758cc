"""The standing soak, 60 seconds (`make soak` runs 5 minutes): jobs from 8 clients against a real
service (its own redis-server, the API under uvicorn, 2 workers) while a worker is SIGKILLed every
15 s and Redis is SIGKILLed once and restarted from its append-only file, with SSE readers that
stall. No job may be lost, stuck, finished twice or end without its terminal event, and every
result file must decode.
Failed jobs are allowed (a job whose runs are killed `max_attempts` times fails, as documented);
the script prints them by cause."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def test_soak_60_seconds(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "soak.py"), "--seconds", "60", "--kill-every", "15",
         "--drain", "240", "--json", "--keep", str(tmp_path / "soak")],
        capture_output=True, text=True, timeout=900, cwd=REPO, check=False)
    print(done.stdout[-4000:])  # the soak's report, shown with -s or on failure
    lines = done.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("{"), f"no result (rc {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result = json.loads(lines[-1])
    assert result["worker_kills"] >= 3 and result["redis_restarts"] == 1  # the faults really happened
    assert result["jobs"] >= 50, result
    assert result["lost"] == 0, result["examples"]
    assert result["stuck"] == 0, result["examples"]
    assert result["duplicated"] == 0, result["examples"]
    assert result["ended_without_event"] == 0, result["examples"]
    assert result["files_invalid"] == 0 and result["files_valid"] > 0, result
    counts = result["client_counts"]
    # Stalled readers of one key never cost another key a stream: followers are never refused with 429.
    assert not any("follower" in name and "429" in name for name in counts), counts
    assert counts.get("follower saw an event twice or out of order", 0) == 0, counts
    assert counts.get("follower streams broken (cut response)", 0) == 0, counts
    assert done.returncode == 0
