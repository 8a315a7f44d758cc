"""One-shot set-up of the results bucket, run by the compose stack's `s3-init` service (API image).

Waits for the S3 server, creates PATCHDIFF_STORE_S3_BUCKET if it is missing, and sets its retention
rule: objects under PATCHDIFF_STORE_S3_PREFIX/ expire a day after the janitor should have deleted
them (`store.lifecycle_days`, from PATCHDIFF_JOB_TTL_S: one setting for both, so they cannot
disagree; the rule only catches files whose record was lost). Idempotent: safe on every `docker
compose up`. Only the plain S3 API is used
(CreateBucket, PutBucketLifecycleConfiguration), so any S3-compatible server that implements
lifecycle expiration works. Exits non-zero, with the reason, if anything fails.
"""

from __future__ import annotations

import os
import sys
import time

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from patchdiff_core.service.settings import Settings
from patchdiff_core.service.store import lifecycle_days


def main() -> int:
    bucket = os.environ["PATCHDIFF_STORE_S3_BUCKET"]
    prefix = os.environ.get("PATCHDIFF_STORE_S3_PREFIX", "jobs").strip("/")
    days = lifecycle_days(Settings().job_ttl_s)
    endpoint = os.environ.get("PATCHDIFF_STORE_S3_ENDPOINT_URL") or None
    timeout = float(os.environ.get("S3_INIT_TIMEOUT_S", "120"))
    s3 = boto3.client("s3", endpoint_url=endpoint,
                      config=Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 1}))

    deadline = time.monotonic() + timeout
    while True:
        try:
            s3.list_buckets()
            break
        except (BotoCoreError, ClientError) as exc:
            if time.monotonic() > deadline:
                print(f"s3-init: no S3 server at {endpoint} after {timeout:.0f} s: {exc}", file=sys.stderr)
                return 1
            time.sleep(1)

    try:
        s3.head_bucket(Bucket=bucket)
        print(f"s3-init: bucket {bucket} exists")
    except ClientError:
        s3.create_bucket(Bucket=bucket)
        print(f"s3-init: created bucket {bucket}")

    rule = {"ID": f"patchdiff-results-{days}d", "Status": "Enabled",
            "Filter": {"Prefix": f"{prefix}/" if prefix else ""}, "Expiration": {"Days": days}}
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [rule]})
    for r in s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]:
        f = r.get("Filter", {}).get("Prefix", r.get("Prefix", ""))
        print(f"s3-init: lifecycle rule: prefix {f!r} expires after {r.get('Expiration', {}).get('Days')} days")
    return 0


if __name__ == "__main__":
    sys.exit(main())
