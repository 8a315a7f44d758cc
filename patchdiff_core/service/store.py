"""Where finished results live: a local directory by default, or any S3-compatible store (MinIO).

Torch-free. Keys are built here from a validated job id only (`result_key`), never from user text.

A full disk: `put` raises the OSError (ENOSPC) and leaves nothing behind (no temp file, never a
partial result); `check` writes, reads back and compares a real probe of `PROBE_BYTES`, so it fails
on a full disk (an empty file would still be created); `free_bytes` says how much room is left
(None for S3, which has no such limit); `delete_prefix` removes an attempt's partial files.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from patchdiff_core.service.settings import Settings

JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def job_prefix(job_id: str) -> str:
    """`<id>/`: everything of one job, every attempt."""
    if not JOB_ID.match(job_id):
        raise ValueError(f"invalid job id {job_id!r}")
    return f"{job_id}/"


def attempt_prefix(job_id: str, attempt: int) -> str:
    """`<id>/a<attempt>/`: one attempt's results. Each attempt writes its own, so a stale worker
    (one whose job was requeued) can never overwrite the files of the attempt that is published."""
    if not (isinstance(attempt, int) and 0 < attempt < 1_000_000):
        raise ValueError(f"invalid attempt {attempt!r}")
    return f"{job_prefix(job_id)}a{attempt}/"


def result_key(job_id: str, name: str, attempt: int) -> str:
    """`<id>/a<attempt>/<name>` for a job id (32 hex digits) and a name this code chose."""
    if not re.fullmatch(r"(grid\.png|record\.json|images/\d{1,6}\.png)", name):
        raise ValueError(f"invalid result name {name!r}")
    return attempt_prefix(job_id, attempt) + name


PROBE_BYTES = 4096  # `check`'s probe: more than fits in the slack of an almost full disk's last block


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...
    def get(self, key: str) -> bytes | None: ...
    def check(self) -> None: ...
    def free_bytes(self) -> int | None: ...
    def delete_prefix(self, prefix: str) -> int: ...


@dataclass(frozen=True)
class StoreStatus:
    ok: bool
    free_bytes: int | None  # None: unknown or unlimited (S3)
    detail: str  # "ok", or why results cannot be written


def store_status(store: ObjectStore) -> StoreStatus:
    """The probe (`check`) and the free space, as one answer that never raises (for readiness)."""
    try:
        free = store.free_bytes()
    except OSError:
        free = None
    try:
        store.check()
    except Exception as exc:  # noqa: BLE001 - any failure means results cannot be written
        return StoreStatus(False, free, f"{type(exc).__name__}: {exc}"[:300])
    return StoreStatus(True, free, "ok")


def _write_temp(directory: Path, data: bytes, prefix: str, sync: bool = False) -> Path:
    """A new file in `directory` holding `data`; if any step fails (ENOSPC) it is removed again."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix)
    try:
        try:
            view = memoryview(data)
            while view:  # a write may take fewer bytes than given
                view = view[os.write(fd, view):]
            if sync:
                os.fsync(fd)  # some filesystems report a full disk only when data is flushed
        finally:
            os.close(fd)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return Path(tmp)


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class LocalStore:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:  # belt and braces: keys are already validated
            raise ValueError(f"key {key!r} escapes the store")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Write then rename, so a reader never sees half a file; on failure (a full disk) the temp
        file is removed and the error raised: nothing is left behind."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _write_temp(path.parent, data, ".tmp-")
        try:
            os.replace(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() else None

    def check(self) -> None:
        """Raise unless results can be written here: a probe of `PROBE_BYTES` random bytes is
        written, flushed to disk, read back, compared and removed."""
        self.root.mkdir(parents=True, exist_ok=True)
        expected = os.urandom(PROBE_BYTES)
        probe = _write_temp(self.root, expected, ".probe-", sync=True)
        try:
            if probe.read_bytes() != expected:
                raise OSError(f"the store's probe {probe} read back different bytes")
        finally:
            _unlink_quietly(probe)

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the store's filesystem."""
        existing = self.root
        while not existing.exists() and existing != existing.parent:  # the root is made on first write
            existing = existing.parent
        return shutil.disk_usage(existing).free

    def delete_prefix(self, prefix: str) -> int:
        """Delete every file under a job or attempt prefix; returns how many were removed."""
        path = self._path(prefix.rstrip("/"))
        if not path.exists():
            return 0
        count = sum(1 for p in path.rglob("*") if p.is_file())
        shutil.rmtree(path, ignore_errors=True)
        return count


class S3Store:
    def __init__(self, bucket: str, prefix: str = "jobs", endpoint_url: str | None = None, client=None):
        import boto3

        self.bucket, self.prefix = bucket, prefix.strip("/")
        # Credentials come from the standard AWS_* environment variables (or an instance role).
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type)

    def get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def check(self) -> None:
        """Raise unless results can be written: a probe object of `PROBE_BYTES` is put, read back,
        compared and deleted (its own key: processes probing at once must not read each other's)."""
        probe, expected = self._key(f".probe-{uuid.uuid4().hex}"), os.urandom(PROBE_BYTES)
        self.client.put_object(Bucket=self.bucket, Key=probe, Body=expected)
        try:
            if self.client.get_object(Bucket=self.bucket, Key=probe)["Body"].read() != expected:
                raise OSError(f"the store's probe s3://{self.bucket}/{probe} read back different bytes")
        finally:
            self.client.delete_object(Bucket=self.bucket, Key=probe)

    def free_bytes(self) -> None:
        """Unknown: a bucket has no free space to report (quotas, if any, are the provider's)."""

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under a job or attempt prefix (1,000 per request)."""
        count = 0
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
                count += len(keys)
        return count


def lifecycle_days(job_ttl_s: float) -> int:
    """Days after which an S3 lifecycle rule expires results: a day after the janitor deletes them
    (`job_ttl_s` after their job ended), so the rule only catches files whose record was lost."""
    return math.ceil(job_ttl_s / 86400) + 1


def make_store(settings: Settings) -> ObjectStore:
    if settings.store_s3_bucket:
        return S3Store(settings.store_s3_bucket, settings.store_s3_prefix, settings.store_s3_endpoint_url)
    return LocalStore(settings.store_dir)
