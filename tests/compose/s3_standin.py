"""S3 stand-in for `make compose-test` only: moto's S3 server (PyPI `moto[server]`) on port 8333,
with its state kept on the /data volume across container restarts.

Why a stand-in: the real S3 server of docker-compose.yml (SeaweedFS, `chrislusf/seaweedfs`) is only
published as a container image, and no registry can be reached on the machine that runs the test.
moto keeps everything in memory, so this wrapper dumps the buckets (objects, content types,
lifecycle rules) to STANDIN_STATE_DIR when the container stops (SIGTERM: `docker compose down`,
`restart`) and loads them back at start. A SIGKILL loses what came after the last stop. Arguments
(the SeaweedFS command line of docker-compose.yml) are ignored.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from urllib.parse import quote

import boto3
from moto.server import ThreadedMotoServer

PORT = int(os.environ.get("STANDIN_PORT", "8333"))
STATE = Path(os.environ.get("STANDIN_STATE_DIR", "/data/moto-state"))


def client():
    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{PORT}", region_name="us-east-1",
                        aws_access_key_id="standin", aws_secret_access_key="standin")


def restore(s3) -> int:
    n = 0
    if not STATE.is_dir():
        return 0
    for bdir in sorted(p for p in STATE.iterdir() if p.is_dir()):
        meta = json.loads((bdir / "bucket.json").read_text())
        s3.create_bucket(Bucket=meta["name"])
        if meta.get("lifecycle"):
            s3.put_bucket_lifecycle_configuration(Bucket=meta["name"], LifecycleConfiguration={"Rules": meta["lifecycle"]})
        for key, content_type in meta["objects"].items():
            body = (bdir / "objects" / quote(key, safe="")).read_bytes()
            s3.put_object(Bucket=meta["name"], Key=key, Body=body, ContentType=content_type)
            n += 1
    return n


def dump(s3) -> int:
    tmp = STATE.with_name(STATE.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    n = 0
    for i, b in enumerate(s3.list_buckets()["Buckets"]):
        name = b["Name"]
        bdir = tmp / f"{i:04d}"
        (bdir / "objects").mkdir(parents=True)
        try:
            lifecycle = s3.get_bucket_lifecycle_configuration(Bucket=name)["Rules"]
        except s3.exceptions.ClientError:
            lifecycle = []
        objects = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
            for obj in page.get("Contents", []):
                got = s3.get_object(Bucket=name, Key=obj["Key"])
                (bdir / "objects" / quote(obj["Key"], safe="")).write_bytes(got["Body"].read())
                objects[obj["Key"]] = got.get("ContentType") or "binary/octet-stream"
                n += 1
        (bdir / "bucket.json").write_text(json.dumps({"name": name, "lifecycle": lifecycle, "objects": objects},
                                                     default=str))
    shutil.rmtree(STATE, ignore_errors=True)
    tmp.rename(STATE)
    return n


def main() -> int:
    if len(sys.argv) > 1:
        print(f"s3-standin: ignoring arguments {sys.argv[1:]}", flush=True)
    server = ThreadedMotoServer(ip_address="0.0.0.0", port=PORT, verbose=False)
    server.start()
    s3 = client()
    print(f"s3-standin: moto S3 on :{PORT}, restored {restore(s3)} objects from {STATE}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    print(f"s3-standin: stopping, saved {dump(s3)} objects to {STATE}", flush=True)
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
