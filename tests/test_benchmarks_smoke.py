"""Smoke tests of benchmarks/flops.py and benchmarks/forward.py on a tiny config (structure, not timings)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from patchdiff_core.generation.registry import ModelEntry  # noqa: E402
from patchdiff_core.model.config import ModelConfig  # noqa: E402
from patchdiff_core.model.unet import PatchedUNet  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# Two levels (8×8 and 4×4 patched), attention at 4×4 and in the middle: every kind of layer, tiny.
TINY = ModelConfig(res=16, c=32, n_blocks=1, attn_resos=[4], c_mult=[1, 2], patch_size=2)
TINY_ENTRY = ModelEntry(name="tiny", description="smoke-test config", config=TINY, files=["tiny.safetensors"])


def _load(name: str, filename: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / filename)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny networks gain nothing from threads, and on a busy machine OpenMP threads competing
    # for cores make them many times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def flops():
    # Same module name forward.py loads it under, so both share one module.
    return _load("patchdiff_benchmarks_flops", "flops.py")


@pytest.fixture(scope="module")
def forward(flops):
    return _load("patchdiff_benchmarks_forward", "forward.py")


def test_counter_books_two_flops_per_multiply_add(flops):
    assert flops.flops_per_multiply_add() == 2


def test_count_meta_matches_real_cpu(flops):
    meta = flops.count(TINY)
    cpu = flops.count(TINY, batch=2, device="cpu")
    assert meta.params == sum(p.numel() for p in PatchedUNet(TINY).parameters())
    assert meta.flops_per_image > 0
    # Attention is counted on the meta device (bmm) and on real CPU tensors (the fused kernel,
    # which FlopCounterMode alone would count as 0).
    assert 0 < meta.attention_flops_per_image < meta.flops_per_image
    assert cpu == meta


def test_compare_patching_structure(flops):
    rows = flops.compare_patching(TINY)
    assert [(r.res, r.patch_size, r.patched_res, r.attn_resos) for r in rows] == [
        (16, 2, 8, [4]),
        (8, 1, 8, [4]),
        (16, 1, 16, [8]),
    ]
    assert rows[0].ratio == 1.0
    assert 0.5 < rows[1].ratio < 1.5  # the same U-Net on the same grid: only the stem and heads differ
    assert rows[2].ratio > 3  # 4× the positions at every level


def test_flops_main_markdown_and_json(flops, monkeypatch, capsys):
    monkeypatch.setattr(flops, "RELEASED", [TINY_ENTRY])
    assert flops.main(["--compare", "tiny"]) == 0
    md = capsys.readouterr().out
    assert "| model | resolution | patch size |" in md
    assert "1 MAC = 2 FLOPs" in md
    assert "| tiny | 16×16 | 2 | 8×8 |" in md
    assert "ratio to patched" in md and "| 1.000 |" in md

    assert flops.main(["--json", "--compare", "tiny"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["flops_per_multiply_add"] == 2
    assert [r["name"] for r in data["released"]] == ["tiny"]
    assert len(data["comparisons"]["tiny"]) == 3


@pytest.mark.parametrize("precision, channels_last", [("fp32", False), ("bf16", True)])
def test_bench_config_structure(forward, precision, channels_last):
    results = forward.bench_config(
        "tiny", TINY, [1, 2], torch.device("cpu"), warmup=0, iters=1, precision=precision, channels_last=channels_last
    )
    assert [r.batch for r in results] == [1, 2]
    for r in results:
        assert (r.model, r.device, r.precision, r.channels_last, r.iters) == (
            "tiny",
            "cpu",
            precision,
            channels_last,
            1,
        )
        assert r.median_s > 0 and r.min_s <= r.median_s
        assert r.images_per_s == pytest.approx(r.batch / r.median_s)
        assert r.gflops_per_s > 0 and r.note == ""
    md = forward.render_markdown(forward.machine_info(torch.device("cpu")), results)
    assert "- torch: " in md and "- cpu: " in md
    assert md.count("| tiny | 16×16 | 2 | cpu |") == 2


def test_forward_main(forward, monkeypatch, capsys):
    monkeypatch.setattr(forward, "RELEASED", [TINY_ENTRY])
    args = ["--device", "cpu", "--models", "tiny", "--batch-sizes", "1", "--iters", "1", "--warmup", "0"]
    assert forward.main(args + ["--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "torch threads" in json.loads(lines[0])["machine"]
    rows = [json.loads(line) for line in lines[1:]]
    assert [(r["model"], r["batch"], r["precision"], r["channels_last"]) for r in rows] == [("tiny", 1, "fp32", False)]

    assert forward.main(args) == 0
    assert "## Forward-pass throughput" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_section(tmp_path):
    """`benchmarks/gpu_check.sh --smoke`: every section of the prepared GPU check, tiny, on the CPU, so
    that the script a GPU machine runs cannot rot. The numbers are not judged, except what holds on
    any device: the golden fixtures pass in fp32, and a worker restarted with the compile cache its
    first start filled loads the compiled graph (hits, no misses) instead of compiling it again."""
    import os
    import re
    import subprocess

    env = {**os.environ, "PY": sys.executable, "OUT_DIR": str(tmp_path)}
    run = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--smoke"], env=env, capture_output=True,
                         text=True, timeout=1500, check=False)
    report = (tmp_path / "gpu_check.md").read_text()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + report[-3000:]
    assert "FAILED" not in report, report
    for heading in ("## Golden fixtures on the device", "## Attention and layout",
                    "## Goal 1: the church_p4-sized network served by default",
                    "## Goal 2: the demo model served by default",
                    "## Goal 3: worker start to full speed, cold and warm",
                    "## Goal 4: a service burst against the engine alone",
                    "## Precision per model", "## Buckets: CUDA graphs and the dynamic batch dimension",
                    "## The worker on the device, end to end"):
        assert heading in report
    assert report.count("| PASS |") == 3  # the three golden fixtures in fp32
    cache = dict(re.findall(r"^\| (cold|warm) \|(?:[^|]*\|){4} (\d+ / \d+) \|", report, re.MULTILINE))
    hits, misses = (int(n) for n in cache["cold"].split(" / "))
    assert hits == 0 and misses >= 1, cache
    hits, misses = (int(n) for n in cache["warm"].split(" / "))
    assert hits >= 1 and misses == 0, cache
    assert (tmp_path / "gpu_sample.png").stat().st_size > 0
