"""Smoke tests of the pure parts of benchmarks/digits_quality.py (no trained model needed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import needs

needs("sklearn")
needs("scipy")
needs("torch")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(script: str = "digits_quality"):
    """A script of benchmarks/ (not a package) as a module."""
    name = f"patchdiff_benchmarks_{script}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


dq = _load()


@pytest.fixture(scope="module")
def reference():
    return dq.build_reference()


def test_classifier_held_out_accuracy(reference):
    assert reference.held_out_accuracy > 0.9
    assert len(reference.test_index) == pytest.approx(0.25 * len(reference.labels), abs=1)


def test_round_trip_through_training_images(reference):
    """A real digit as the model is trained on it (digits_dataset at 32 px), downscaled back."""
    images, labels = dq.real_digits_uint8(32)
    assert images.shape == (len(reference.labels), 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(labels, reference.labels)
    x8 = dq.to_digit_scale(images)
    assert x8.shape == (len(labels), 64)
    assert x8.min() >= 0.0 and x8.max() <= 16.0
    # Close to the original 8x8 digit (0..16 scale): bicubic up + box down only blurs a little.
    err = np.abs(x8 - reference.data)
    assert err.mean() < 1.0 and err.max() < 6.0
    # The same round trip computed independently: PIL's bicubic up and box (area) down in float mode.
    from PIL import Image
    from sklearn.datasets import load_digits

    raw = load_digits().images[:20]
    up = [Image.fromarray((d / 16.0 * 255).astype(np.uint8)).resize((32, 32), Image.BICUBIC) for d in raw]
    down = np.stack([np.asarray(Image.fromarray(np.asarray(u, np.float32), "F").resize((8, 8), Image.BOX)) for u in up])
    np.testing.assert_allclose(reference.round_trip[:20], down.reshape(20, 64) / 255 * 16, rtol=1e-5, atol=1e-4)
    # The first held-out digit of every class is classified correctly, and nearly all of them are.
    test = reference.test_index
    first = [test[labels[test] == c][0] for c in range(10)]
    assert list(reference.predict(x8[first])) == list(range(10))
    assert (reference.predict(x8[test]) == labels[test]).mean() > 0.95


def test_to_digit_scale_is_channel_mean_and_box_average():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(2, 32, 32), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    expected = grey.reshape(2, 8, 4, 8, 4).astype(float).mean(axis=(2, 4)).reshape(2, 64) / 255 * 16
    np.testing.assert_allclose(dq.to_digit_scale(rgb), expected)
    np.testing.assert_allclose(dq.to_digit_scale(grey), expected)
    assert dq.to_digit_scale(np.full((1, 32, 32, 3), 255, np.uint8)).max() == 16.0
    with pytest.raises(ValueError):
        dq.to_digit_scale(np.zeros((1, 30, 30, 3), np.uint8))


def test_diversity(reference):
    labels = np.repeat(np.arange(10), 5)
    identical = np.repeat(reference.round_trip[:1], len(labels), axis=0)
    score, per_class = dq.diversity(identical, labels, reference.mean_distance)
    assert score == 0.0 and set(per_class) == set(range(10))
    # The real (round-tripped) digits against themselves: exactly 1 for every class.
    score, per_class = dq.diversity(reference.round_trip, reference.labels, reference.mean_distance)
    assert score == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in per_class.values())
    assert dq.mean_pairwise_distance(np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])) == pytest.approx(10 / 3)


def test_accuracy_and_settings():
    overall, per_class = dq.accuracy(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]))
    assert overall == 0.75 and per_class == {0: 1.0, 1: 0.5, 2: 1.0}
    settings = dq.parse_settings(dq.DEFAULT_SETTINGS)
    assert settings[0] == dq.Setting("ancestral", "250", 1.0)
    assert dq.Setting("ancestral", "100", 1.5) in settings  # the guided reference
    assert {s.sampler for s in settings} == {"ancestral", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "unipc_bh1"}
    assert dq.parse_settings("ddim:ddim50:2") == [dq.Setting("ddim", "ddim50", 2.0)]
    # An explicit schedule keeps its commas: they separate its steps, not settings.
    assert dq.parse_settings("ancestral:250:1.0, unipc_bh1:t:126,361,516,686,999:1.0,ddim:20:1.5") == [
        dq.Setting("ancestral", "250", 1.0), dq.Setting("unipc_bh1", "t:126,361,516,686,999", 1.0),
        dq.Setting("ddim", "20", 1.5),
    ]
    for bad in ("ddim:20", "euler:20:1.0", "", "ddim:20:x", "ddim:20:1.0,ddim:10"):
        with pytest.raises(ValueError):
            dq.parse_settings(bad)


def test_markdown_table(reference):
    row = dq.real_row(reference)
    text = dq.render_markdown({"model": "x"}, [row])
    header, rule, line = text.splitlines()[2:5]
    assert header.count("|") == rule.count("|") == line.count("|") == 11
    assert "real digits" in line and f"{row.fd:.2f}" in line


def test_network_evaluations_and_ratios():
    assert dq.network_evaluations(10, 1.0) == 10
    assert dq.network_evaluations(10, 1.5) == 19  # guided steps are double, the last pass is plain
    rows = [
        dq.Row("a", "ancestral", "250", 1.0, 250, 10, 1.0, {}, 1.0, 1.0, fd=2.0),
        dq.Row("b", "ddim", "10", 1.0, 10, 10, 1.0, {}, 1.0, 1.0, fd=3.0),
        dq.Row("c", "ddim", "10", 1.5, 10, 10, 1.0, {}, 1.0, 1.0, fd=3.0),
        dq.Row("d", "ancestral", "10", 1.0, 10, 10, 1.0, {}, 1.0, 1.0, fd=8.0),
    ]
    dq.add_ratios(rows)
    # The reference is the ancestral row with the most steps, whatever the order of the rows.
    assert rows[0].fd_ratio == 1.0 and rows[1].fd_ratio == 1.5 and rows[3].fd_ratio == 4.0
    assert rows[2].fd_ratio != rows[2].fd_ratio  # no guided ancestral row in this run: no ratio (nan)


def test_real_vs_real_floor_and_feature_net(reference):
    """The FD network classifies held-out real digits well, the floor is small but not zero, and FD
    grows with the noise or blur added to real digits (what the 8x8 measures could not see)."""
    from PIL import Image, ImageFilter

    assert reference.feature_net_accuracy > 0.9
    assert len(set(reference.fd_train_index) & set(reference.fd_reference_index)) == 0
    floor = dq.real_row(reference)
    assert 0 < floor.fd < 10 and floor.precision > 0.8 and floor.recall > 0.8
    images, _ = dq.real_digits_uint8(32)
    held_out = images[reference.fd_reference_index]
    rng = np.random.default_rng(0)

    def fd(x):
        return dq.distribution_scores(reference.feature_net.features(x), reference.fd_reference)["fd"]

    noisy = [np.clip(held_out + rng.normal(0, sd, held_out.shape), 0, 255).astype(np.uint8) for sd in (5, 20, 40)]
    scores = [fd(held_out)] + [fd(x) for x in noisy]
    assert scores[0] < 1e-6 and scores == sorted(scores) and scores[-1] > floor.fd, scores
    blurred = np.stack([np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(1.5))) for x in held_out])
    assert fd(blurred) > floor.fd
    # Another class's digits are far: FD between the zeros and the ones of the reference.
    labels = reference.labels[reference.fd_reference_index]
    zeros, ones = reference.fd_reference[labels == 0], reference.fd_reference[labels == 1]
    assert dq._load_metrics().frechet_distance(zeros, ones) > 10 * floor.fd


def _run(seed: int, fds: dict[str, float]) -> dict:
    rows = [{"setting": "real", "sampler": "-", "guidance": None, "steps": 0, "nfe": 0, "fd": 2.5, "images": 0}]
    for name, fd in fds.items():
        sampler, steps = name.split()
        rows.append({"setting": name, "sampler": sampler, "guidance": 1.0, "steps": int(steps), "nfe": int(steps),
                     "fd": fd, "fd_ratio": fd / fds["ancestral 250"], "images": 100})  # as add_ratios writes it
    return {"seed": seed, "rows": rows}


def test_seed_summary_ratios_worst_and_pooled(tmp_path):
    seeds = _load("digits_quality_seeds")
    runs = [_run(0, {"ancestral 250": 1.0, "unipc 5": 1.2, "ddim 10": 3.0}),
            _run(1, {"ancestral 250": 2.0, "unipc 5": 1.0})]  # ddim 10 is missing in one run: left out
    summary = seeds.summarise(runs)
    by_name = {s["setting"]: s for s in summary}
    assert set(by_name) == {"ancestral 250", "unipc 5"}
    unipc = by_name["unipc 5"]
    assert unipc["ratio"] == pytest.approx([1.2, 0.5]) and unipc["worst"] == pytest.approx(1.2)
    assert unipc["pooled"] == pytest.approx(2.2 / 3.0)
    assert by_name["ancestral 250"]["ratio"] == [1.0, 1.0]
    table = seeds.render(summary)
    assert "| unipc 5 | 5 | 1.20 (1.20×) | 1.00 (0.50×) | 1.20× | 0.73× |" in table
    paths = []
    for run in runs:
        paths.append(tmp_path / f"q{run['seed']}.json")
        paths[-1].write_text(__import__("json").dumps(run))
    assert seeds.main([str(p) for p in paths]) == 0
