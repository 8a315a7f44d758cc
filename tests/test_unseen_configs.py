"""The PyTorch network matches the original for configurations the golden fixtures do not cover.

The arbiter is `keras_reference`, an independent NumPy transcription of the original TensorFlow
code. It is first checked against the golden fixtures (so it is known to be faithful), then used
on random weights written in the legacy Keras HDF5 layout for unseen configurations.
"""

import json

import keras_reference as kr
import numpy as np
import pytest
import torch
from conftest import FIXTURES, GOLDEN_CASES, nchw_to_nhwc, nhwc_to_nchw, rel_err

from patchdiff_core.errors import CheckpointError
from patchdiff_core.model.checkpoint import load_model
from patchdiff_core.model.config import ModelConfig

TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: one intra-op thread is much faster than contending with other CPU work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the reference itself -----------------------------------------------------------------------


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_reference_reproduces_golden_outputs(case):
    folder = FIXTURES / case
    cfg = json.loads((folder / "config.json").read_text())
    ref = np.load(folder / "reference.npz")
    mean, var = kr.forward(cfg, kr.read_h5_arrays(folder / "ema_weights.h5"), ref["x"], ref["t"], ref["y"])
    assert rel_err(mean, ref["mean"]) <= TOL
    assert rel_err(var, ref["var"]) <= TOL


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_writer_layout_matches_golden_files(case):
    """The random-weight writer groups and orders variables exactly as Keras did in the fixtures."""
    folder = FIXTURES / case
    cfg = json.loads((folder / "config.json").read_text())
    ours = kr.random_groups(cfg, seed=0)
    theirs = kr.read_h5_groups(folder / "ema_weights.h5")
    assert [kr.layer_kind(name) for name, _ in ours] == [kr.layer_kind(name) for name, _ in theirs]
    assert [[a.shape for _, a in ws] for _, ws in ours] == [[a.shape for _, a in ws] for _, ws in theirs]
    assert sum(a.size for _, ws in ours for _, a in ws) == cfg["n_params"]


# --- unseen configurations ----------------------------------------------------------------------

UNSEEN = {
    # patch size 1 (no patching at all), attention at the lowest level
    "p1": dict(res=8, c=32, n_blocks=1, attn_resos=[4], c_mult=[1, 2], num_classes=0, patch_size=1, se=False),
    # patch size 8: 192 input channels, 4x4 patched image
    "p8": dict(res=32, c=32, n_blocks=1, attn_resos=[2], c_mult=[1, 2], num_classes=0, patch_size=8, se=False),
    # per-level depths
    "blocks_list_1_2_3": dict(
        res=16, c=32, n_blocks=[1, 2, 3], attn_resos=[2], c_mult=[1, 2, 2], num_classes=0, patch_size=2, se=False
    ),
    # fractional multiplier: widths 64, 96, 128; attention at the 64- and 128-wide levels (two levels)
    "c_mult_1_1.5_2": dict(
        res=16, c=64, n_blocks=1, attn_resos=[8, 2], c_mult=[1, 1.5, 2], num_classes=0, patch_size=2, se=False
    ),
    # class-conditional without se: label embedding added to the time embedding
    "classcond_add": dict(
        res=16, c=32, n_blocks=1, attn_resos=[2], c_mult=[1, 2], num_classes=5, patch_size=4, se=False
    ),
    # class-conditional with the sigmoid gate, per-level depths, P=2
    "classcond_se": dict(
        res=16, c=32, n_blocks=[2, 1, 1], attn_resos=[4], c_mult=[1, 2, 2], num_classes=7, patch_size=2, se=True
    ),
    # four levels, attention at two of them (4x4 and 2x2)
    "four_levels": dict(
        res=16, c=32, n_blocks=1, attn_resos=[4, 2], c_mult=[1, 1, 2, 2], num_classes=0, patch_size=1, se=False
    ),
    # se requested on an unconditional model: the original ignores it (plain blocks, no label table)
    "uncond_se_ignored": dict(
        res=8, c=32, n_blocks=1, attn_resos=[], c_mult=[1, 2], num_classes=0, patch_size=2, se=True
    ),
}


def _inputs(cfg: dict, rng: np.random.Generator, batch: int = 3):
    x = rng.standard_normal((batch, cfg["res"], cfg["res"], 3)).astype(np.float32)
    t = rng.integers(0, 1000, size=batch)
    n = cfg["num_classes"]
    y = rng.integers(0, n + 1, size=batch) if n > 1 else np.zeros(batch, dtype=np.int64)
    if n > 1:
        y[-1] = n  # always include the "no label" row
        y[0] = rng.integers(0, n)  # and a real label
    return x, t, y


def _write(tmp_path, cfg: dict, seed: int):
    path = tmp_path / "ema_weights.h5"
    weights = kr.write_random_h5(cfg, path, seed=seed)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return path, weights


def _torch_outputs(model, x, t, y):
    y_t = torch.from_numpy(y).long() if model.config.conditional else None
    with torch.no_grad():
        mean, var = model(nhwc_to_nchw(x), torch.from_numpy(t).long(), y_t)
    return nchw_to_nhwc(mean), nchw_to_nhwc(var)


@pytest.mark.parametrize("name", list(UNSEEN))
def test_unseen_config_matches_reference(name, tmp_path):
    cfg = UNSEEN[name]
    seed = 1000 + list(UNSEEN).index(name)
    rng = np.random.default_rng(seed)
    path, weights = _write(tmp_path, cfg, seed)
    model = load_model(path)
    assert sum(p.numel() for p in model.parameters()) == sum(a.size for a in weights)

    x, t, y = _inputs(cfg, rng)
    ref_mean, ref_var = kr.forward(cfg, kr.read_h5_arrays(path), x, t, y)
    mean, var = _torch_outputs(model, x, t, y)
    assert mean.shape == ref_mean.shape == x.shape
    assert var.shape == ref_var.shape == x.shape
    # guard against degenerate outputs that would compare equal for the wrong reasons
    assert np.std(ref_mean) > 1e-3 and 0.01 < np.std(ref_var) and np.all((ref_var > 0) & (ref_var < 1))
    err_mean, err_var = rel_err(mean, ref_mean), rel_err(var, ref_var)
    assert err_mean <= TOL and err_var <= TOL, f"{name}: mean rel err {err_mean:.3g}, var rel err {err_var:.3g}"


def test_labels_change_the_output_of_a_conditional_model(tmp_path):
    """Guard: the class-conditional cases really exercise the label path."""
    cfg = UNSEEN["classcond_se"]
    rng = np.random.default_rng(7)
    path, weights = _write(tmp_path, cfg, seed=7)
    x, t, y = _inputs(cfg, rng)
    mean_a, _ = kr.forward(cfg, weights, x, t, y)
    mean_b, _ = kr.forward(cfg, weights, x, t, (y + 1) % (cfg["num_classes"] + 1))
    assert rel_err(mean_a, mean_b) > 1e-3


# --- files that do not fit the config -----------------------------------------------------------


@pytest.mark.parametrize(
    "file_cfg, model_cfg",
    [
        # deeper config: the second encoder block's GroupNorm meets the file's downsample kernel
        (UNSEEN["p1"], {**UNSEEN["p1"], "n_blocks": 2}),
        # other patch size: the stem kernel differs
        (UNSEEN["p1"], {**UNSEEN["p1"], "res": 16, "patch_size": 2}),
        # se vs plain blocks: the class projection meets the time projection
        (UNSEEN["classcond_se"], {**UNSEEN["classcond_se"], "se": False}),
    ],
    ids=["n_blocks", "patch_size", "se"],
)
def test_mismatching_file_names_first_bad_tensor(tmp_path, file_cfg, model_cfg):
    path, _ = _write(tmp_path, file_cfg, seed=3)
    file_groups = kr.read_h5_groups(path)
    file_vars = [(n, a.shape) for _, ws in file_groups for n, a in ws]
    model_vars = [a.shape for _, ws in kr.random_groups(model_cfg, seed=0) for _, a in ws]
    first = next(i for i, ((_, fs), ms) in enumerate(zip(file_vars, model_vars)) if fs != ms)
    bad_name, bad_shape = file_vars[first]

    with pytest.raises(CheckpointError) as info:
        load_model(path, ModelConfig.model_validate(model_cfg))
    message = str(info.value)
    assert bad_name in message
    assert str(tuple(bad_shape)) in message
    assert str(tuple(model_vars[first])) in message
