import pytest

from patchdiff_core.service.store import LocalStore, S3Store, job_prefix, result_key

JOB = "0123456789abcdef0123456789abcdef"


def test_result_keys_come_from_job_ids_only():
    assert result_key(JOB, "grid.png", 1) == f"{JOB}/a1/grid.png"
    assert result_key(JOB, "images/12.png", 3) == f"{JOB}/a3/images/12.png"
    for bad_id in ("../etc", "", "X" * 32, JOB + "/x", JOB.upper()):
        with pytest.raises(ValueError):
            result_key(bad_id, "grid.png", 1)
    for bad_name in ("../grid.png", "passwd", "images/../../x.png", "images/1.png/.."):
        with pytest.raises(ValueError):
            result_key(JOB, bad_name, 1)
    for bad_attempt in (0, -1, "1", None):
        with pytest.raises(ValueError):
            result_key(JOB, "grid.png", bad_attempt)


def test_local_store(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.check()
    key = result_key(JOB, "grid.png", 1)
    assert store.get(key) is None
    store.put(key, b"png-bytes", "image/png")
    store.put(result_key(JOB, "images/0.png", 2), b"png", "image/png")
    assert store.get(key) == b"png-bytes"
    assert (tmp_path / "store" / JOB / "a1" / "grid.png").read_bytes() == b"png-bytes"
    with pytest.raises(ValueError):
        store.put("../outside.txt", b"x", "text/plain")
    assert store.delete_prefix(job_prefix(JOB)) == 2
    assert not (tmp_path / "store" / JOB).exists() and store.get(key) is None
    assert store.delete_prefix(job_prefix(JOB)) == 0


def test_local_store_check_fails_when_unwritable(tmp_path):
    # (Not a read-only mode: tests may run as root, who writes anyway.) A file where the root should be.
    (tmp_path / "not-a-dir").write_text("x")
    with pytest.raises(OSError):
        LocalStore(tmp_path / "not-a-dir").check()


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
        key = result_key(JOB, "images/0.png", 1)
        assert store.get(key) is None
        store.put(key, b"\x89PNG...", "image/png")
        store.put(result_key(JOB, "grid.png", 2), b"g", "image/png")
        store.put(result_key("f" * 32, "grid.png", 1), b"other job", "image/png")
        assert store.get(key) == b"\x89PNG..."
        head = client.head_object(Bucket="results", Key=f"jobs/{key}")
        assert head["ContentType"] == "image/png"
        assert store.delete_prefix(job_prefix(JOB)) == 2
        assert store.get(key) is None and store.get(result_key("f" * 32, "grid.png", 1)) == b"other job"
        with pytest.raises(ClientError, match="404|Not Found|NoSuchBucket"):
            S3Store("missing-bucket", client=client).check()
