"""Which GPU a worker uses when several share a machine.

- `patchdiff serve --workers N` gives worker i the device `cuda:i` (`serve.worker_envs`);
- Kubernetes gives each pod its own GPU (`nvidia.com/gpu: 1`): it sees one, `cuda`;
- `docker compose up --scale worker=N` starts N identical containers that see every GPU: with
  `PATCHDIFF_GPU_LOCK_DIR` (a folder all of them mount) each claims the first GPU that no other holds,
  by an exclusive lock on `gpu-<i>.lock`. The kernel releases the lock when the worker's process
  ends, however it ends, so a restarted worker can claim the GPU again at once.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger("patchdiff.worker.gpus")


class GpuClaim:
    """A claimed GPU: its index, held until `release()` or the process ends."""

    def __init__(self, index: int, handle):
        self.index, self._handle = index, handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def claim_gpu(lock_dir: Path, count: int) -> GpuClaim | None:
    """The first of `count` GPUs that no other process holds, or None if all are held."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        handle = open(lock_dir / f"gpu-{index}.lock", "a+")  # noqa: SIM115 - held open while the GPU is ours
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        return GpuClaim(index, handle)
    return None


def choose_device(device: str, lock_dir: Path | None, count: int) -> tuple[str, GpuClaim | None]:
    """The device a worker should use (`settings.device` with a GPU claimed when asked), and the claim
    to hold for its life. An explicit `cuda:N`, the CPU, or one visible GPU need no claim."""
    if lock_dir is None or device not in ("auto", "cuda") or count < 2:
        return device, None
    claim = claim_gpu(lock_dir, count)
    if claim is None:
        raise SystemExit(f"all {count} GPUs are claimed by other workers ({lock_dir}); start fewer workers")
    log.info("claimed GPU %d of %d (%s)", claim.index, count, lock_dir)
    return f"cuda:{claim.index}", claim
