"""The batching engine: same pictures as the library in any company, golden fixtures through mixed
batches, fairness between requests, cancel, failure isolation, out-of-memory shrinking, bf16."""

import numpy as np
import pytest
import torch
from conftest import TRAJECTORY_TOL, Golden, nchw_to_nhwc, nhwc_to_nchw, rel_err

from patchdiff_core.diffusion.schedule import Schedule
from patchdiff_core.generation.engine import BatchEngine, images_uint8
from patchdiff_core.generation.pipeline import SamplingModel, generate
from patchdiff_core.generation.spec import GenerationSpec
from patchdiff_core.model.checkpoint import load_model


@pytest.fixture(scope="module")
def tiny(tiny_model_file):
    return SamplingModel.load(weights=[tiny_model_file], device="cpu")


def spec(**kw):
    base = dict(model="tiny", num_images=3, timesteps="8", guidance=1.0, seed=7, sampler="ancestral")
    return GenerationSpec(**{**base, **kw})


def run_until_idle(engine, schedule=None, limit=10_000):
    """Step until every request finished; `schedule` maps an iteration to requests to add then."""
    finished, iteration = {}, 0
    schedule = dict(schedule or {})
    while (not engine.idle or schedule) and iteration < limit:
        for request_id, s in schedule.pop(iteration, []):
            engine.add(request_id, s)
        report = engine.step()
        assert not report.failed, report.failed
        for request in report.finished:
            finished[request.id] = (iteration, request)
        iteration += 1
    assert iteration < limit
    return finished


MIXED = {
    "a": spec(num_images=5, class_labels=[0, 1, 2, 3, 4]),
    "b": spec(num_images=2, timesteps="5", sampler="ddim", guidance=2.5, class_labels=[7, 7], seed=3),
    "c": spec(num_images=4, timesteps="12", guidance=1.5, seed=11),  # random labels from the seed
    "d": spec(num_images=1, timesteps="ddim10", sampler="ddim", seed=99, class_labels=[5]),
    # multistep samplers keep per-image history: it must follow each image through mixed batches
    "e": spec(num_images=3, timesteps="logsnr7", sampler="dpmpp_2m", guidance=2.0, class_labels=[1, 2, 3], seed=5),
    "f": spec(num_images=3, timesteps="9", sampler="unipc", guidance=1.5, seed=6),
}


def test_mixed_requests_give_the_library_pictures(tiny):
    """Different steps, samplers, guidance and labels, admitted at different iterations and sharing
    batches of 4 rows, each image at its own timestep: the same pictures as `generate` alone."""
    engine = BatchEngine({"tiny": tiny}, {"tiny": 4})
    finished = run_until_idle(engine, {0: [("a", MIXED["a"])], 2: [("b", MIXED["b"]), ("c", MIXED["c"])],
                                             3: [("f", MIXED["f"])], 5: [("d", MIXED["d"]), ("e", MIXED["e"])]})
    assert set(finished) == set(MIXED)
    for name, s in MIXED.items():
        alone = generate(tiny, s, batch_size=s.num_images).images
        ours = images_uint8(finished[name][1])
        assert ours.shape == alone.shape
        assert np.abs(ours.astype(int) - alone).max() <= 1, name
        assert np.abs(ours.astype(int) - alone).mean() < 0.01, name


def test_a_small_request_does_not_wait_for_a_large_one(tiny):
    engine = BatchEngine({"tiny": tiny}, {"tiny": 4})
    big, small = spec(num_images=40, timesteps="10"), spec(num_images=1, timesteps="10", seed=1)
    finished = run_until_idle(engine, {0: [("big", big)], 3: [("small", small)]})
    # The small request gets a row at the very next step and takes its 10 steps without waiting.
    assert finished["small"][0] == 3 + 10 - 1
    assert finished["big"][0] > 40 * 10 // 4  # the large one still finishes, after it


def test_admission_is_round_robin_and_no_request_starves(tiny):
    engine = BatchEngine({"tiny": tiny}, {"tiny": 3})
    requests = {f"r{i}": spec(num_images=6, timesteps="4", seed=i) for i in range(5)}
    for name, s in requests.items():
        engine.add(name, s)
    engine.step()
    # 3 rows over 5 requests: the 3 oldest get one image each, not the first request three.
    assert sorted(r.id for r in engine.requests.values() if r.running) == ["r0", "r1", "r2"]
    finished = run_until_idle(engine)
    assert set(finished) == set(requests) - set()  # all of them


def test_cancel_leaves_the_others_untouched(tiny):
    engine = BatchEngine({"tiny": tiny}, {"tiny": 6})
    engine.add("keep", MIXED["a"])
    engine.add("drop", spec(num_images=3, seed=5))
    for _ in range(3):
        engine.step()
    assert engine.remove("drop") is not None
    finished = run_until_idle(engine)
    assert set(finished) == {"keep"}
    alone = generate(tiny, MIXED["a"], batch_size=5).images
    assert np.abs(images_uint8(finished["keep"][1]).astype(int) - alone).max() <= 1


def test_a_failing_request_fails_alone(tiny):
    engine = BatchEngine({"tiny": tiny}, {"tiny": 8})
    engine.add("good", MIXED["a"])
    calls = {"n": 0}

    def broken_noise(i):
        def draw():
            calls["n"] += 1
            if calls["n"] > 2:
                raise RuntimeError("noise source broke")
            return torch.randn(3, 16, 16)
        return draw

    engine.add("bad", spec(num_images=1), noise_for=broken_noise)
    failed, finished = [], {}
    while not engine.idle:
        report = engine.step()
        failed += [(r.id, why) for r, why in report.failed]
        finished.update({r.id: r for r in report.finished})
    assert [f[0] for f in failed] == ["bad"] and "noise source broke" in failed[0][1]
    alone = generate(tiny, MIXED["a"], batch_size=5).images
    assert np.abs(images_uint8(finished["good"]).astype(int) - alone).max() <= 1


def _own_noise(tiny, s, fail_first_with=None):
    """`noise_for` drawing what the engine's default would (image i's own generator), whose very
    first draw (an x_T) raises `fail_first_with` once, before it consumes any randomness."""
    from patchdiff_core.generation.pipeline import image_noise

    state = {"failed": fail_first_with is None}

    def noise_for(i):
        draw = image_noise(s.seed, i, (3, 16, 16), tiny.device)

        def guarded():
            if not state["failed"]:
                state["failed"] = True
                raise fail_first_with
            return draw()
        return guarded
    return noise_for


def test_a_failing_start_noise_fails_its_request_alone(tiny):
    """The start noise x_T is drawn inside the engine's failure isolation: a request whose very first
    draw fails is failed alone, and the others go on with unchanged pictures."""
    engine = BatchEngine({"tiny": tiny}, {"tiny": 8})
    engine.add("good", MIXED["a"])
    engine.add("bad", spec(num_images=2), noise_for=_own_noise(tiny, spec(num_images=2), RuntimeError("no noise")))
    failed, finished = [], {}
    while not engine.idle:
        report = engine.step()
        failed += [(r.id, why) for r, why in report.failed]
        finished.update({r.id: r for r in report.finished})
    assert [f[0] for f in failed] == ["bad"] and "no noise" in failed[0][1]
    alone = generate(tiny, MIXED["a"], batch_size=5).images
    assert np.abs(images_uint8(finished["good"]).astype(int) - alone).max() <= 1


def test_out_of_memory_while_drawing_start_noise_shrinks_the_batch(tiny):
    """An out-of-memory error anywhere in a step (here: drawing an x_T) halves the rows and retries;
    no request fails and the pictures do not change."""
    engine = BatchEngine({"tiny": tiny}, {"tiny": 8})
    s = MIXED["a"]
    engine.add("a", s, noise_for=_own_noise(tiny, s, torch.cuda.OutOfMemoryError("simulated")))
    finished = run_until_idle(engine)
    assert engine.max_rows["tiny"] == 4
    alone = generate(tiny, s, batch_size=5).images
    assert np.abs(images_uint8(finished["a"][1]).astype(int) - alone).max() <= 1


def test_a_batched_step_that_fails_is_retried_request_by_request(tiny, monkeypatch):
    """`_advance_one_by_one`: when a batched forward raises, each request is run on its own; only the
    one that fails on its own fails, the others keep their pictures."""
    engine = BatchEngine({"tiny": tiny}, {"tiny": 8})
    forward = tiny.forwards[0]
    calls = {"batched": 0, "alone": 0}

    def picky(x, t, y):
        if y is not None and (y == 9).any():  # only the rows of the "bad" request carry label 9
            raise RuntimeError("the network chokes on label 9")
        calls["alone" if x.shape[0] <= 5 else "batched"] += 1
        return forward(x, t, y)

    monkeypatch.setattr(tiny, "forwards", [picky])
    finished = {}
    failed = []
    engine.add("good", MIXED["a"])
    engine.add("bad", spec(num_images=2, class_labels=[9, 9]))
    while not engine.idle:
        report = engine.step()
        failed += [(r.id, why) for r, why in report.failed]
        finished.update({r.id: r for r in report.finished})
    assert [f[0] for f in failed] == ["bad"] and "label 9" in failed[0][1]
    assert calls["alone"] > 0  # the good request ran on its own after the batched step failed
    alone = generate(tiny, MIXED["a"], batch_size=5).images
    assert np.abs(images_uint8(finished["good"]).astype(int) - alone).max() <= 1


def test_finished_images_own_their_memory(tiny):
    """A result is a copy of its row, not a view that keeps its step's whole batch alive."""
    engine = BatchEngine({"tiny": tiny}, {"tiny": 4})
    finished = run_until_idle(engine, {0: [("a", MIXED["a"]), ("c", MIXED["c"])]})
    for _, request in finished.values():
        for result in request.results.values():
            assert result.untyped_storage().nbytes() == result.numel() * result.element_size()


def test_out_of_memory_halves_the_batch_and_keeps_the_pictures(tiny, monkeypatch):
    engine = BatchEngine({"tiny": tiny}, {"tiny": 8})
    forward = tiny.forwards[0]

    def limited(x, t, y):
        if x.shape[0] > 3:
            raise torch.cuda.OutOfMemoryError("simulated")
        return forward(x, t, y)

    monkeypatch.setattr(tiny, "forwards", [limited])
    finished = run_until_idle(engine, {0: [("a", MIXED["a"])]})
    assert engine.max_rows["tiny"] == 2
    alone = generate(tiny, MIXED["a"], batch_size=5).images
    assert np.abs(images_uint8(finished["a"][1]).astype(int) - alone).max() <= 1


def test_bf16_autocast_path_runs_and_stays_close(tiny_model_file):
    """The reduced-precision path (fp16 on CUDA) exercised on the CPU under bf16 autocast."""
    fp32 = SamplingModel.load(weights=[tiny_model_file], device="cpu")
    bf16 = SamplingModel.load(weights=[tiny_model_file], device="cpu", precision="bf16")
    s = spec(num_images=4, sampler="ddim", guidance=1.5)
    results = {}
    for name, model in (("fp32", fp32), ("bf16", bf16)):
        engine = BatchEngine({"tiny": model}, {"tiny": 4})
        results[name] = run_until_idle(engine, {0: [("r", s)]})["r"][1].x0_images()
    err = rel_err(results["bf16"].numpy(), results["fp32"].numpy())
    assert 0 < err < 0.1, err


@pytest.mark.parametrize("case", ["classcond_se_p4", "classcond_thresh_p2", "uncond_p2"])
def test_golden_trajectories_through_the_engine(case):
    """The fixtures' images as separate requests admitted at different iterations, so each step's
    batch mixes timesteps (and a stranger request): every image's whole trajectory matches."""
    golden = Golden(case)
    ref, cfg = golden.ref, golden.config
    net = load_model(golden.h5)
    model = SamplingModel(name=case, config=net.config, networks=[net], schedule=Schedule.linear(cfg["beta_max"]),
                          device=torch.device("cpu"), precision="fp32")
    B = ref["sample_xT"].shape[0]
    xT, noise = nhwc_to_nchw(ref["sample_xT"]), [nhwc_to_nchw(n) for n in ref["sample_noise"]]
    trajectories: dict[int, list] = {b: [] for b in range(B)}

    def record(request, index, x, x0):
        if request.id.startswith("fixture"):
            trajectories[int(request.id[7:])].append(x0 if len(trajectories[int(request.id[7:])]) == len(ref["sample_trajectory"]) - 1 else x)

    engine = BatchEngine({case: model}, {case: 2 * B + 1}, on_image_step=record)
    assert golden.ref["sample_timesteps"].tolist() == sorted(engine.add("probe", GenerationSpec(
        model=case, num_images=1, timesteps=str(cfg["sample_steps"]), seed=0, guidance=1.0,
        class_labels=[0] if net.config.conditional else None)).steps)
    engine.remove("probe")

    def fixture_noise(b):
        draws = iter([xT[b]] + [n[b] for n in noise])
        return lambda: next(draws)

    def fixture_spec(b):
        labels = [int(ref["sample_y"][b])] if net.config.conditional else None
        return GenerationSpec(model=case, num_images=1, timesteps=str(cfg["sample_steps"]), seed=0,
                              guidance=cfg["guidance"], class_labels=labels)

    stranger = GenerationSpec(model=case, num_images=2, timesteps="7", seed=5, guidance=1.0,
                              class_labels=[1, 2] if net.config.conditional else None)
    schedule = {b: [(f"fixture{b}", fixture_spec(b))] for b in range(B)}
    schedule[1] = schedule.get(1, []) + [("stranger", stranger)]
    finished, iteration = {}, 0
    while not engine.idle or schedule:
        for request_id, s in schedule.pop(iteration, []):
            b = int(request_id[7:]) if request_id.startswith("fixture") else None
            engine.add(request_id, s, noise_for=(lambda i, b=b: fixture_noise(b)) if b is not None else None)
        report = engine.step()
        assert not report.failed
        finished.update({r.id: r for r in report.finished})
        iteration += 1
    for b in range(B):
        ours = [nchw_to_nhwc(x[None])[0] for x in trajectories[b]]
        assert len(ours) == len(ref["sample_trajectory"])
        for step, (x, theirs) in enumerate(zip(ours, ref["sample_trajectory"][:, b])):
            assert rel_err(x, theirs) <= TRAJECTORY_TOL, (b, step)
        final = nchw_to_nhwc(finished[f"fixture{b}"].x0_images())[0]
        assert rel_err(final, ref["sample_x0"][b]) <= TRAJECTORY_TOL
