"""Which GPU each worker of a machine uses: `serve --workers N` gives worker i GPU i; scaled
containers claim distinct GPUs through lock files (no GPU is needed to test the claiming)."""

import subprocess
import sys
import textwrap

import pytest

from patchdiff_core.service.serve import worker_envs
from worker.gpus import choose_device, claim_gpu

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from worker.gpus import claim_gpu
    claim = claim_gpu(Path(sys.argv[1]), int(sys.argv[2]))
    print(claim.index if claim else "none", flush=True)
    time.sleep(60)
""")


def holder(lock_dir, count):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock_dir), str(count)], stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def test_workers_claim_distinct_gpus_and_a_dead_one_frees_its_own(tmp_path):
    first, got_first = holder(tmp_path, 3)
    second, got_second = holder(tmp_path, 3)
    try:
        assert (got_first, got_second) == ("0", "1")
        mine = claim_gpu(tmp_path, 3)
        assert mine.index == 2 and claim_gpu(tmp_path, 3) is None  # all three are held
        first.kill()
        first.wait()
        again = claim_gpu(tmp_path, 3)  # the kernel dropped the dead worker's lock
        assert again.index == 0
        mine.release()
        assert claim_gpu(tmp_path, 3).index == 2
    finally:
        for proc in (first, second):
            proc.kill()
            proc.wait()


def test_choose_device(tmp_path):
    assert choose_device("cpu", tmp_path, 4) == ("cpu", None)
    assert choose_device("cuda:3", tmp_path, 4) == ("cuda:3", None)  # explicit: no claim
    assert choose_device("cuda", None, 4) == ("cuda", None)  # no lock folder: GPU 0, as always
    assert choose_device("auto", tmp_path, 1) == ("auto", None)  # one GPU: nothing to choose
    device, claim = choose_device("cuda", tmp_path, 2)
    assert device == "cuda:0" and claim.index == 0
    device2, _ = choose_device("auto", tmp_path, 2)
    assert device2 == "cuda:1"
    with pytest.raises(SystemExit, match="all 2 GPUs are claimed"):
        choose_device("cuda", tmp_path, 2)


def test_serve_gives_worker_i_gpu_i():
    env = {"X": "1"}
    assert [e.get("PATCHDIFF_DEVICE") for e in worker_envs(env, "auto", 4, 4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert [e.get("PATCHDIFF_DEVICE") for e in worker_envs(env, "cuda", 3, 2)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert [e.get("PATCHDIFF_DEVICE") for e in worker_envs(env, "auto", 2, 1)] == [None, None]  # one GPU
    assert [e.get("PATCHDIFF_DEVICE") for e in worker_envs(env, "cpu", 2, 4)] == [None, None]
    assert all(e["X"] == "1" for e in worker_envs(env, "auto", 2, 2))
