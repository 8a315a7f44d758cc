"""Where finished results live: a local directory by default, or any S3-compatible store (MinIO).

Torch-free. Keys are built here from a validated job id only (`result_key`), never from user text.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Protocol

from patchdiff_core.service.settings import Settings

JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def result_key(job_id: str, name: str) -> str:
    """`jobs/<id>/<name>` for a job id (32 hex digits) and a name this code chose."""
    if not JOB_ID.match(job_id):
        raise ValueError(f"invalid job id {job_id!r}")
    if not re.fullmatch(r"(grid\.png|record\.json|images/\d{1,6}\.png)", name):
        raise ValueError(f"invalid result name {name!r}")
    return f"{job_id}/{name}"


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...
    def get(self, key: str) -> bytes | None: ...
    def check(self) -> None: ...


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
        self.root.mkdir(parents=True, exist_ok=True)


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
        self.client.head_bucket(Bucket=self.bucket)


def make_store(settings: Settings) -> ObjectStore:
    if settings.store_s3_bucket:
        return S3Store(settings.store_s3_bucket, settings.store_s3_prefix, settings.store_s3_endpoint_url)
    return LocalStore(settings.store_dir)
