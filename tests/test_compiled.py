"""Compiled networks in the engine (PATCHDIFF_ENGINE_COMPILE), on the CPU: the bucket and CUDA-graph
rule, padded rows equal to the eager forward, the background compile (eager until a bucket is ready,
no request waiting for it, compiled after, the same pictures), and the persistent compile cache
through the worker's model cache (a second load finds the compiled code instead of compiling). The
GPU check measures the speed (benchmarks/gpu_serving_check.py)."""

import dataclasses
import json
import threading

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG
from test_engine import MIXED, run_until_idle

from patchdiff_core.generation.compiled import (
    Bucket,
    CompiledForward,
    bucket_sizes,
    compile_plan,
    gflops_per_row,
)
from patchdiff_core.generation.engine import BatchEngine, images_uint8
from patchdiff_core.generation.pipeline import SamplingModel, generate
from patchdiff_core.generation.registry import RELEASED
from patchdiff_core.model.config import ModelConfig
from patchdiff_core.model.unet import PatchedUNet
from patchdiff_core.service.settings import Settings
from worker.models import ModelCache

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device name only: the plan needs no GPU
REQUESTS = {name: MIXED[name] for name in ("a", "b", "e", "f")}  # ancestral, DDIM, DPM-Solver++, UniPC (guided)


def eager_backend(gm, example_inputs):
    """Dynamo's graph run as it is: the compiled path without Inductor's minute of compiling."""
    return gm.forward


def same_pictures_as_alone(finished: dict, eager: SamplingModel) -> None:
    for name, spec in REQUESTS.items():
        alone = generate(eager, spec, batch_size=spec.num_images).images
        assert np.abs(images_uint8(finished[name][1]).astype(int) - alone).max() <= 1, name


def test_buckets_and_the_cuda_graph_rule():
    assert bucket_sizes(4) == [4]
    assert bucket_sizes(20) == [8, 16, 20]
    assert bucket_sizes(512) == [8, 16, 32, 64, 128, 256, 512]
    assert bucket_sizes(64, dense_from=16) == [8, 16, 24, 32, 48, 64]  # 1.5x steps where padding costs compute

    demo = ModelConfig(res=32, c=64, n_blocks=2, attn_resos=[4], c_mult=[1, 2, 2], num_classes=10, patch_size=4)
    church = next(e for e in RELEASED if e.name == "church_p4").config
    assert 100 < gflops_per_row(church) < 160 < 1000 * gflops_per_row(demo)  # ~132 and ~0.2 GFLOPs per image

    assert compile_plan(demo, CPU, 4, "auto") is None  # the CPU serves eagerly by default
    assert compile_plan(demo, CUDA, 512, "off") is None
    # The demo model is launch-bound: every bucket a CUDA graph, powers of two.
    plan = compile_plan(demo, CUDA, 512, "auto")
    assert plan.dynamic and plan.inductor_mode == "default"
    assert plan.buckets == tuple(Bucket(s, True) for s in [8, 16, 32, 64, 128, 256, 512])
    # A church-sized forward is compute-bound above ~15 rows: graphs for the smallest bucket only,
    # and 1.5x steps between the others.
    plan = compile_plan(church, CUDA, 64, "auto")
    assert [(b.size, b.graph) for b in plan.buckets] == [(8, True), (16, False), (24, False), (32, False),
                                                         (48, False), (64, False)]
    assert all(b.graph for b in compile_plan(church, CUDA, 64, "reduce-overhead").buckets)
    assert not any(b.graph for b in compile_plan(demo, CUDA, 512, "default").buckets)
    assert compile_plan(demo, CUDA, 512, "max-autotune").inductor_mode == "max-autotune-no-cudagraphs"
    assert not any(b.graph for b in compile_plan(demo, CPU, 8, "reduce-overhead").buckets)  # no CUDA graphs on a CPU
    with pytest.raises(ValueError, match="expected one of"):
        compile_plan(demo, CPU, 8, "fast")


@pytest.fixture(scope="module")
def tiny(tiny_model_file):
    return SamplingModel.load(weights=[tiny_model_file], device="cpu")


def test_padded_rows_match_the_eager_forward(tiny):
    plan = dataclasses.replace(compile_plan(tiny.config, CPU, 16, "default"), backend=eager_backend)
    forward = CompiledForward(tiny.networks[0], None, False, plan)
    for size in plan.sizes:
        forward.compile_bucket(size, CPU, 16, True)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rows in (3, 8, 11, 16, 20):  # padded to 8, exact, padded to 12, exact, beyond the largest (eager)
            x = torch.randn(rows, 3, 16, 16, generator=g)
            t = torch.randint(0, 1000, (rows,), generator=g)
            y = torch.randint(0, 11, (rows,), generator=g)
            (x0, v), (ref_x0, ref_v) = forward(x, t, y), forward.eager(x, t, y)
            assert x0.shape == ref_x0.shape == (rows, 3, 16, 16)
            for ours, ref in ((x0, ref_x0), (v, ref_v)):
                assert float((ours - ref).norm() / ref.norm()) < 1e-4, rows
    assert forward.calls == {"compiled": 4, "eager": 1}  # no guard missed (no "fallback")

    # Another network of the same architecture (a split model's pair) finds that compiled code and
    # runs it with its own weights: they are inputs of the graph.
    torch.manual_seed(1)
    other = PatchedUNet(tiny.config).eval()
    with torch.no_grad():  # (a fresh network's output layers are zero)
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    second = CompiledForward(other, None, False, plan)
    second.ready.update(plan.sizes)  # compiled nothing itself
    with torch.inference_mode():
        x, t, y = torch.randn(8, 3, 16, 16, generator=g), torch.full((8,), 300), torch.arange(8)
        (x0, _), compiled = second._call_compiled(x, t, y)
        ref = second.eager(x, t, y)[0]
    assert compiled and float((x0 - ref).norm() / ref.norm()) < 1e-4


def test_background_compile_serves_eagerly_until_ready_then_compiled(tiny_model_file):
    """While the compile thread is held inside the compiler, requests run to the end eagerly; once it
    is released every forward runs the compiled code; the pictures are the library's either way."""
    release, entered = threading.Event(), threading.Event()

    def held_backend(gm, example_inputs):
        entered.set()
        assert release.wait(60), "the test never released the compiler"
        return gm.forward

    model = SamplingModel.load(weights=[tiny_model_file], device="cpu")
    plan = dataclasses.replace(compile_plan(model.config, CPU, 8, "default"), backend=held_backend)
    compilation = model.compile(8, background=True, plan=plan)
    forward = model.forwards[0]
    assert isinstance(forward, CompiledForward) and entered.wait(60)

    engine = BatchEngine({"tiny": model}, {"tiny": 8})
    try:
        with torch.inference_mode():
            before = run_until_idle(engine, {0: [("a", REQUESTS["a"]), ("b", REQUESTS["b"])]})
        assert not compilation.done.is_set()  # still compiling: these requests did not wait for it
        assert forward.calls["eager"] > 0 and forward.calls["compiled"] == 0
    finally:
        release.set()
    with torch.inference_mode():
        assert compilation.wait(60) and not any(r.error for r in compilation.reports)
        eager_calls = forward.calls["eager"]
        after = run_until_idle(engine, {0: [("e", REQUESTS["e"])], 1: [("f", REQUESTS["f"])]})
    assert forward.calls["eager"] == eager_calls and forward.calls["compiled"] > 0
    assert forward.calls["fallback"] == 0
    same_pictures_as_alone({**before, **after}, SamplingModel.load(weights=[tiny_model_file], device="cpu"))


@pytest.fixture
def weights_dir(tmp_path, tiny_model_file):
    """A weights folder whose manifest serves the tiny model as "tiny" (as a worker reads it)."""
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "tiny.safetensors").write_bytes(tiny_model_file.read_bytes())
    entry = {"name": "tiny", "description": "test", "config": TINY_CONFIG, "files": ["tiny.safetensors"]}
    (folder / "manifest.json").write_text(json.dumps({"models": [entry]}))
    return folder


@pytest.fixture
def restore_inductor_cache_dir(monkeypatch):
    # use_compile_cache points this process's Inductor at the test's folder: put it back afterwards.
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # (monkeypatch restores what was set)
    yield
    from torch._inductor.utils import clear_caches

    clear_caches()


def test_worker_compiles_into_the_cache_and_a_second_load_finds_it(weights_dir, tmp_path, tiny_model_file,
                                                                   restore_inductor_cache_dir):
    """Inductor for real: the first worker's model cache compiles (cache misses, written to
    PATCHDIFF_COMPILE_CACHE_DIR), serves the library's pictures, and a second model cache with the same
    folder, as a restarted worker, loads the compiled graph (hits) and compiles nothing (no misses)."""
    settings = Settings(weights_dir=weights_dir, device="cpu", worker_models=["tiny"], engine_compile="default",
                        compile_cache_dir=tmp_path / "compile-cache")
    first = ModelCache(settings)
    first.load_all()
    compilation = first.start_compiling({"tiny": 8})
    assert compilation.wait(600)
    [report] = compilation.reports
    assert (report.size, report.error, report.cache_hits) == (8, None, 0) and report.cache_misses >= 1
    folder = tmp_path / "compile-cache" / f"torch-{torch.__version__}" / "cpu"
    assert any(folder.rglob("*")), "nothing was written to the compile cache"

    model = first.models["tiny"]
    with torch.inference_mode():
        finished = run_until_idle(BatchEngine({"tiny": model}, {"tiny": 8}),
                                  {0: list(REQUESTS.items())})
    assert model.forwards[0].calls["compiled"] > 0 and model.forwards[0].calls["fallback"] == 0
    same_pictures_as_alone(finished, SamplingModel.load(weights=[tiny_model_file], device="cpu"))

    second = ModelCache(settings)
    second.load_all()
    compilation = second.start_compiling({"tiny": 8})
    assert compilation.wait(600)
    [report] = compilation.reports
    assert report.error is None and report.cache_hits >= 1 and report.cache_misses == 0
