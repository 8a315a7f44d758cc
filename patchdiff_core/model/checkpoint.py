"""Model files: our safetensors format (config in the metadata) and the authors' Keras h5 files.

Weights are never unpickled: safetensors and HDF5 hold plain arrays only.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from patchdiff_core.errors import CheckpointError
from patchdiff_core.model.config import ModelConfig
from patchdiff_core.model.keras_h5 import keras_state_dict, read_keras_weights
from patchdiff_core.model.unet import PatchedUNet

FORMAT = "patchdiff/1"


def save_model(model: PatchedUNet, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write the weights as safetensors, with the config (and any extra strings) in the metadata."""
    tensors = {name: p.detach().float().cpu().contiguous() for name, p in model.state_dict().items()}
    meta = {"format": FORMAT, "config": model.config.to_json(), **{k: str(v) for k, v in (metadata or {}).items()}}
    save_file(tensors, str(path), metadata=meta)


def read_metadata(path: str | Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a safetensors checkpoint ({exc})") from None
    if "config" not in meta:
        raise CheckpointError(f"{path}: safetensors file without a patchdiff config in its metadata")
    return meta


def read_config(path: str | Path) -> ModelConfig:
    """The config of a model file; for an `.h5` file, from the `config.json` beside it."""
    path = Path(path)
    try:
        if path.suffix == ".h5":
            sidecar = path.with_name("config.json")
            if not sidecar.is_file():
                raise CheckpointError(f"{path}: an .h5 file carries no config; put config.json beside it")
            return ModelConfig.from_file(sidecar)
        return ModelConfig.model_validate_json(read_metadata(path)["config"])
    except ValueError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: invalid model config: {exc}") from None


def load_state_dict(path: str | Path, model: PatchedUNet) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".h5":
        return keras_state_dict(model, read_keras_weights(path))
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a safetensors checkpoint ({exc})") from None
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            raise CheckpointError(f"{path}: tensor '{name}' is missing (the config expects {tuple(tensor.shape)})")
        if state[name].shape != tensor.shape:
            raise CheckpointError(
                f"{path}: tensor '{name}' has shape {tuple(state[name].shape)} "
                f"but the config expects {tuple(tensor.shape)}"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor '{extra[0]}' (and {len(extra) - 1} more)")
    return state


def load_model(path: str | Path, config: ModelConfig | None = None, device: str | torch.device = "cpu") -> PatchedUNet:
    """The network stored in `path`, in eval mode; its config comes from the file unless given."""
    model = PatchedUNet(config or read_config(path))
    model.load_state_dict(load_state_dict(path, model))
    return model.to(device).eval()


def convert_h5(h5_path: str | Path, out_path: str | Path, config: ModelConfig, metadata: dict[str, str] | None = None) -> PatchedUNet:
    model = load_model(h5_path, config)
    save_model(model, out_path, {"source": Path(h5_path).name, **(metadata or {})})
    return model


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

