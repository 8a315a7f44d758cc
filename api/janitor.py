"""Retention: a job's record and every file it wrote (all attempts) are deleted `job_ttl_s` after the
job ended. The expiry index is a sorted set, so a pass reads only what is due."""

from __future__ import annotations

import logging

from patchdiff_core.service.jobs import JobStore
from patchdiff_core.service.store import ObjectStore, job_prefix

log = logging.getLogger("patchdiff.janitor")


def delete_expired(jobs: JobStore, store: ObjectStore, batch: int = 500) -> int:
    """Delete the records and results of jobs past their retention; returns how many jobs."""
    done = 0
    while True:
        due = jobs.expired_jobs(batch)
        if not due:
            return done
        for job_id in due:
            files = store.delete_prefix(job_prefix(job_id))  # files first: a crash here is retried next pass
            jobs.forget_expired(job_id)
            log.info("deleted expired job (%d files)", files, extra={"job_id": job_id})
        done += len(due)
        if len(due) < batch:
            return done
