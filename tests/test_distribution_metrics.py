"""benchmarks/distribution_metrics.py: Fréchet distance and precision/recall on known distributions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import needs

needs("scipy")

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "distribution_metrics.py"


def _load():
    name = "patchdiff_benchmarks_distribution_metrics"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


dm = _load()


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    # For diagonal covariances: FD = |mu_a - mu_b|^2 + sum (s_a - s_b)^2.
    rng = np.random.default_rng(0)
    mu_b, s_a, s_b = np.array([1.0, -2.0, 0.5, 0.0]), np.array([1.0, 2.0, 0.5, 1.0]), np.array([2.0, 1.0, 0.5, 3.0])
    a = rng.normal(0.0, s_a, size=(200_000, 4))
    b = rng.normal(mu_b, s_b, size=(200_000, 4))
    exact = (mu_b**2).sum() + ((s_a - s_b) ** 2).sum()
    assert dm.frechet_distance(a, b) == pytest.approx(exact, rel=0.01)
    assert dm.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # Symmetric.
    assert dm.frechet_distance(b, a) == pytest.approx(dm.frechet_distance(a, b), rel=1e-6)


def test_precision_recall_separate_fidelity_from_coverage():
    rng = np.random.default_rng(1)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    real = np.concatenate([c + rng.normal(size=(200, 2)) for c in centres])
    same = np.concatenate([c + rng.normal(size=(200, 2)) for c in centres])
    collapsed = centres[0] + rng.normal(size=(800, 2))  # faithful but one mode of four
    off = real + 30.0  # nowhere near the data
    p, r = dm.precision_recall(real, same)
    assert p > 0.9 and r > 0.9
    p, r = dm.precision_recall(real, collapsed)
    assert p > 0.9 and 0.15 < r < 0.35
    p, r = dm.precision_recall(real, off)
    assert p == 0.0 and r == 0.0
