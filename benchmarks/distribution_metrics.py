"""Distribution distances between two sets of feature vectors: the Fréchet distance (as FID computes
it) and improved precision / recall (Kynkäänniemi et al. 2019). Pure numpy / scipy; the features
come from `digits_quality.FeatureNet`.
"""

from __future__ import annotations

import numpy as np

PR_NEIGHBOURS = 3  # k of the k-NN radius, as in the paper


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of the Gaussians fitted to rows of a, b."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr((S_a S_b)^(1/2)) = sum of the square roots of the eigenvalues of S_a S_b (real and >= 0 for
    # two covariance matrices, up to rounding), which needs no matrix square root.
    eigenvalues = np.linalg.eigvals(cov_a @ cov_b)
    tr_covmean = np.sqrt(np.clip(eigenvalues.real, 0.0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance of every row to its k-th nearest other row."""
    from scipy.spatial.distance import cdist

    d = cdist(x, x)
    return np.sort(d, axis=1)[:, k]  # column 0 is the row itself


def _covered(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """For each point: does it lie in any ball (centre, radius)?"""
    from scipy.spatial.distance import cdist

    return (cdist(points, centres) <= radii[None, :]).any(axis=1)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_NEIGHBOURS) -> tuple[float, float]:
    """Precision: the share of generated samples inside the real manifold (union of k-NN balls of the
    real samples); fidelity. Recall: the share of real samples inside the generated manifold; coverage."""
    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    precision = _covered(fake, real, _knn_radii(real, k)).mean()
    recall = _covered(real, fake, _knn_radii(fake, k)).mean()
    return float(precision), float(recall)
