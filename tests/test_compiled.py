"""torch.compile in the engine (PATCHDIFF_ENGINE_COMPILE): padded buckets give each real row what the
eager forward gives, and the engine's pictures do not change (on the CPU here; the GPU check measures
the speed)."""

import numpy as np
import pytest
import torch
from test_engine import MIXED, run_until_idle

from patchdiff_core.generation.compiled import CompiledForward, buckets
from patchdiff_core.generation.engine import BatchEngine, images_uint8
from patchdiff_core.generation.pipeline import SamplingModel, generate


def test_buckets():
    assert buckets(4) == [4]
    assert buckets(8) == [8]
    assert buckets(20) == [8, 16, 20]
    assert buckets(512) == [8, 16, 32, 64, 128, 256, 512]


@pytest.fixture(scope="module")
def tiny(tiny_model_file):
    return SamplingModel.load(weights=[tiny_model_file], device="cpu")


def test_padded_rows_match_the_eager_forward(tiny):
    net = tiny.networks[0]
    forward = CompiledForward(net, None, False, max_rows=16, mode="default")
    eager = tiny.forwards[0]
    g = torch.Generator().manual_seed(0)
    for rows in (3, 8, 11, 16, 20):  # padded to 8, exact, padded to 16, exact, beyond the largest (eager)
        x = torch.randn(rows, 3, 16, 16, generator=g)
        t = torch.randint(0, 1000, (rows,), generator=g)
        y = torch.randint(0, 11, (rows,), generator=g)
        (x0, v), (ref_x0, ref_v) = forward(x, t, y), eager(x, t, y)
        assert x0.shape == ref_x0.shape == (rows, 3, 16, 16)
        for ours, ref in ((x0, ref_x0), (v, ref_v)):
            assert float((ours - ref).norm() / ref.norm()) < 1e-4, rows


def test_engine_pictures_do_not_change_when_compiled(tiny_model_file):
    compiled = SamplingModel.load(weights=[tiny_model_file], device="cpu")
    compiled.compile(max_rows=8, mode="default", warm_up=False)
    assert isinstance(compiled.forwards[0], CompiledForward)
    engine = BatchEngine({"tiny": compiled}, {"tiny": 8})
    requests = {name: MIXED[name] for name in ("a", "b", "e", "f")}  # ancestral, DDIM, DPM-Solver++, UniPC
    finished = run_until_idle(engine, {0: [("a", requests["a"]), ("b", requests["b"])], 2: [("e", requests["e"])],
                                       3: [("f", requests["f"])]})
    eager = SamplingModel.load(weights=[tiny_model_file], device="cpu")
    for name, spec in requests.items():
        alone = generate(eager, spec, batch_size=spec.num_images).images
        assert np.abs(images_uint8(finished[name][1]).astype(int) - alone).max() <= 1, name
