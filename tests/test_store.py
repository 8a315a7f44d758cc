import pytest

from patchdiff_core.service.store import LocalStore, S3Store, result_key

JOB = "0123456789abcdef0123456789abcdef"


def test_result_keys_come_from_job_ids_only():
    assert result_key(JOB, "grid.png") == f"{JOB}/grid.png"
    assert result_key(JOB, "images/12.png") == f"{JOB}/images/12.png"
    for bad_id in ("../etc", "", "X" * 32, JOB + "/x", JOB.upper()):
        with pytest.raises(ValueError):
            result_key(bad_id, "grid.png")
    for bad_name in ("../grid.png", "passwd", "images/../../x.png", "images/1.png/.."):
        with pytest.raises(ValueError):
            result_key(JOB, bad_name)


def test_local_store(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.check()
    key = result_key(JOB, "grid.png")
    assert store.get(key) is None
    store.put(key, b"png-bytes", "image/png")
    assert store.get(key) == b"png-bytes"
    assert (tmp_path / "store" / JOB / "grid.png").read_bytes() == b"png-bytes"
    with pytest.raises(ValueError):
        store.put("../outside.txt", b"x", "text/plain")


def test_s3_store_against_moto(monkeypatch):
    import boto3
    import moto  # a test dependency (pyproject's `test` extra): missing it is a failure, not a skip
    from botocore.exceptions import ClientError

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with moto.mock_aws():
        client = boto3.client("s3")
        client.create_bucket(Bucket="results")
        store = S3Store("results", prefix="jobs", client=client)
        store.check()
        key = result_key(JOB, "images/0.png")
        assert store.get(key) is None
        store.put(key, b"\x89PNG...", "image/png")
        assert store.get(key) == b"\x89PNG..."
        head = client.head_object(Bucket="results", Key=f"jobs/{key}")
        assert head["ContentType"] == "image/png"
        with pytest.raises(ClientError, match="404|Not Found|NoSuchBucket"):
            S3Store("missing-bucket", client=client).check()
