"""Where finished results live: a local directory by default, or any S3-compatible store (MinIO).

Torch-free. Keys are built here from a validated job id only (`result_key`), never from user text.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
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


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...
    def get(self, key: str) -> bytes | None: ...
    def check(self) -> None: ...
    def delete_prefix(self, prefix: str) -> int: ...


class LocalStore:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:  # belt and braces: keys are already validated
            raise ValueError(f"key {key!r} escapes the store")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() else None

    def check(self) -> None:
        """Raise unless results can be written here (a probe file is written and removed)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=self.root, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)

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
        """Raise unless results can be written: a probe object is put and deleted."""
        probe = self._key(".probe")
        self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"")
        self.client.delete_object(Bucket=self.bucket, Key=probe)

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


def make_store(settings: Settings) -> ObjectStore:
    if settings.store_s3_bucket:
        return S3Store(settings.store_s3_bucket, settings.store_s3_prefix, settings.store_s3_endpoint_url)
    return LocalStore(settings.store_dir)
