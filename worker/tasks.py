"""The RQ job: a plain function of a job id and the attempt it is for (the fencing token).
Everything else it needs is in the job record.

A patchdiff worker (`worker.main`) does not call it: it pops these jobs itself and runs them in its
batching engine, many at once (`worker.runner`). This function is the same work for one job, for
anything that executes RQ jobs one by one; it needs a process set up by `worker.main`.
"""

from __future__ import annotations

from .runner import EngineRunner

_runner: EngineRunner | None = None


def configure(runner: EngineRunner) -> None:
    global _runner
    _runner = runner


def run_generation(job_id: str, attempt: int) -> str:
    """Run one attempt of a job to its end; returns the job's status afterwards."""
    if _runner is None:
        raise RuntimeError("run_generation needs a patchdiff worker process (patchdiff worker)")
    if not _runner.accept(job_id, attempt):
        return "skipped"
    while job_id in _runner.held:
        _runner.step()
    future = _runner.publishing.get(job_id)
    if future is not None:
        future.result()
    record = _runner.jobs.get(job_id)
    return record.status if record else "expired"
