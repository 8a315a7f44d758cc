import pytest
import torch
from conftest import TINY_CONFIG

from patchdiff_core.errors import CheckpointError
from patchdiff_core.model.checkpoint import convert_h5, load_model, read_config, save_model
from patchdiff_core.model.config import ModelConfig
from patchdiff_core.model.unet import PatchedUNet


def _inputs(config, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, config.res, config.res, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, config.num_classes + 1, (batch,), generator=g) if config.conditional else None
    return x, t, y


def test_h5_to_safetensors_round_trip_is_bit_identical(golden, tmp_path):
    out = tmp_path / "model.safetensors"
    original = convert_h5(golden.h5, out, ModelConfig(**golden.config))
    loaded = load_model(out)
    assert loaded.config == original.config and not loaded.training
    x, t, y = _inputs(loaded.config)
    with torch.no_grad():
        a, b = original(x, t, y), loaded(x, t, y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_config_is_stored_in_the_file(tiny_model_file):
    assert read_config(tiny_model_file) == ModelConfig(**TINY_CONFIG)


def test_mismatching_safetensors_names_tensor_and_shapes(tmp_path):
    other = PatchedUNet(ModelConfig(**{**TINY_CONFIG, "c": 64, "attn_resos": []}))
    path = tmp_path / "other.safetensors"
    save_model(other, path)
    with pytest.raises(CheckpointError, match=r"tensor 'label_emb.weight' has shape \(11, 128\) but the config expects \(11, 64\)"):
        load_model(path, ModelConfig(**TINY_CONFIG))


def test_mismatching_h5_names_first_tensor_and_both_shapes(golden):
    wrong = ModelConfig(**{**golden.config, "c": 64})
    with pytest.raises(CheckpointError, match=r"tensor #\d+ '.+' has shape \(.+\) but the config expects \(.+\)"):
        load_model(golden.h5, wrong)


def test_h5_with_fewer_layers_than_config(golden):
    deeper = ModelConfig(**{**golden.config, "n_blocks": golden.config["n_blocks"] + 1})
    with pytest.raises(CheckpointError):
        load_model(golden.h5, deeper)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x89HDF\r\n\x1a\n garbage"])
def test_not_a_checkpoint(tmp_path, content):
    for name in ("bad.safetensors", "bad.h5"):
        path = tmp_path / name
        path.write_bytes(content)
        (tmp_path / "config.json").write_text(ModelConfig(**TINY_CONFIG).to_json())
        with pytest.raises(CheckpointError):
            load_model(path)


def test_config_validation_rejects_unbuildable_networks():
    with pytest.raises(ValueError, match="multiple of 64"):
        ModelConfig(**{**TINY_CONFIG, "attn_resos": [8]})  # width 32 at 8x8
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(**{**TINY_CONFIG, "res": 17})
    with pytest.raises(ValueError, match="one entry per"):
        ModelConfig(**{**TINY_CONFIG, "n_blocks": [1, 2, 3]})


def test_original_config_spelling_is_accepted():
    cfg = ModelConfig.model_validate({**TINY_CONFIG, "diffusion_beta_max": 0.025, "n_params": 5, "sample_steps": 8})
    assert cfg.beta_max == 0.025
