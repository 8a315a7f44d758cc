import errno
import os
from pathlib import Path

import pytest

from patchdiff_core.service.store import (
    PROBE_BYTES,
    LocalStore,
    S3Store,
    attempt_prefix,
    job_prefix,
    result_key,
    store_status,
)

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
        assert client.list_objects_v2(Bucket="results").get("KeyCount") == 0  # the probe is gone
        assert store.free_bytes() is None and store_status(store).ok
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


# -- A full disk ---------------------------------------------------------------------------------

def _files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def small_fs(tmp_path):
    """A real 64 KiB filesystem (tmpfs) that the test can fill. Mounting needs root with
    CAP_SYS_ADMIN; where that is missing the test is skipped (the os.write test below still runs)."""
    import shutil
    import subprocess

    if shutil.which("mount") is None:
        pytest.skip("no `mount` command here to make a small tmpfs")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(path, chunk: int = 1024) -> None:
    """Write `path` until the filesystem is full (another program filling the disk)."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"x" * chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_full_disk_results_leave_nothing_behind_and_check_tells(small_fs):
    store = LocalStore(small_fs / "results")
    store.check()
    assert 0 < store.free_bytes() <= 64 * 1024
    status = store_status(store)
    assert status.ok and status.detail == "ok" and status.free_bytes == store.free_bytes()
    data = os.urandom(12 * 1024)  # incompressible, like a PNG
    written = []
    with pytest.raises(OSError) as failed:  # a job writes its images until the disk is full
        for i in range(100):
            key = result_key(JOB, f"images/{i}.png", 1)
            store.put(key, data, "image/png")
            written.append(key)
    assert failed.value.errno == errno.ENOSPC
    assert 1 <= len(written) < 6
    # No temp file, no partial image: exactly the complete images written before.
    assert _files(small_fs) == sorted(f"results/{key}" for key in written)
    assert all(store.get(key) == data for key in written)
    assert store.get(result_key(JOB, f"images/{len(written)}.png", 1)) is None

    _fill(small_fs / "filler")  # now nothing fits: an empty file could still be created, the probe cannot
    assert store.free_bytes() < PROBE_BYTES
    with pytest.raises(OSError) as probe_failed:
        store.check()
    assert probe_failed.value.errno == errno.ENOSPC
    status = store_status(store)
    assert not status.ok and "No space left" in status.detail and status.free_bytes < PROBE_BYTES
    assert not [f for f in _files(small_fs) if ".probe-" in f or ".tmp-" in f]

    # The failed attempt's partial files are removed at once: the disk has room again.
    (small_fs / "filler").unlink()
    assert store.delete_prefix(attempt_prefix(JOB, 1)) == len(written)
    assert _files(small_fs) == []
    store.check()
    store.put(result_key(JOB, "grid.png", 2), data, "image/png")
    assert store.get(result_key(JOB, "grid.png", 2)) == data


def test_a_failed_write_removes_its_temp_file(tmp_path, monkeypatch):
    """The same promise without a small filesystem: os.write fails half-way with ENOSPC."""
    store = LocalStore(tmp_path / "results")
    store.put(result_key(JOB, "images/0.png", 1), b"first", "image/png")
    real_write = os.write
    calls = []

    def write_half_then_enospc(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))  # a short write: the loop goes on
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", write_half_then_enospc)
        with pytest.raises(OSError) as failed:
            store.put(result_key(JOB, "images/1.png", 1), b"y" * 10_000, "image/png")
        assert failed.value.errno == errno.ENOSPC and calls == [10_000, 5_000]
        calls.clear()
        with pytest.raises(OSError):
            store.check()
        assert not store_status(store).ok
    assert _files(tmp_path / "results") == [f"{JOB}/a1/images/0.png"]  # nothing half written, no .tmp-*
    store.check()


def test_check_compares_what_it_reads_back(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "results")
    monkeypatch.setattr(Path, "read_bytes", lambda self: b"\0" * PROBE_BYTES)  # a disk that loses writes
    with pytest.raises(OSError, match="read back different bytes"):
        store.check()
    assert _files(tmp_path / "results") == []


def test_free_bytes(tmp_path):
    import shutil

    store = LocalStore(tmp_path / "not" / "yet" / "made")  # measured on the filesystem it will be made on
    assert abs(store.free_bytes() - shutil.disk_usage(tmp_path).free) < 64 * 1024 * 1024
    assert S3Store("any", client=object()).free_bytes() is None
