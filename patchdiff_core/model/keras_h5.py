"""Reading the authors' Keras `ema_weights.h5` (legacy HDF5 written by `Model.save_weights`).

Variable names carry automatic suffixes that differ from file to file (`conv2d_17` here,
`conv2d_61` there), so weights are matched by order, never by name, and every shape is checked.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from patchdiff_core.errors import CheckpointError


def read_keras_weights(path: str | Path) -> list[tuple[str, np.ndarray]]:
    """All weights of the file as (name, array), in the order Keras would load them."""
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CheckpointError(f"{path}: not an HDF5 file ({exc})") from None
    with f:
        root = f["model_weights"] if "model_weights" in f else f  # full-model saves nest the weights
        if "layer_names" not in root.attrs:
            raise CheckpointError(f"{path}: HDF5 file without Keras 'layer_names': not a Keras weights file")
        weights = []
        for layer in root.attrs["layer_names"]:
            group = root[_text(layer)]
            for name in group.attrs.get("weight_names", []):
                weights.append((_text(name), np.asarray(group[_text(name)])))
        return weights


def _text(value: bytes | str) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _keras_shape(module: nn.Module, param: torch.Tensor) -> tuple[int, ...]:
    """The shape the Keras variable has for this PyTorch parameter."""
    if isinstance(module, nn.Conv2d) and param.ndim == 4:
        out, cin, kh, kw = param.shape
        return (cin, out) if (kh, kw) == (1, 1) else (kh, kw, cin, out)
    if isinstance(module, nn.Linear) and param.ndim == 2:
        return tuple(param.shape[::-1])
    return tuple(param.shape)


def _to_torch_layout(module: nn.Module, array: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array)).float()
    if isinstance(module, nn.Conv2d) and tensor.ndim == 4:
        return tensor.permute(3, 2, 0, 1).contiguous()  # [kh, kw, in, out] -> [out, in, kh, kw]
    if isinstance(module, nn.Conv2d) and tensor.ndim == 2:
        return tensor.t().contiguous()[:, :, None, None]  # a Dense applied per pixel
    if isinstance(module, nn.Linear) and tensor.ndim == 2:
        return tensor.t().contiguous()
    return tensor


def keras_state_dict(model: nn.Module, weights: list[tuple[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Map Keras weights (in file order) onto `model.named_parameters()` (in creation order)."""
    params = list(model.named_parameters())
    state = {}
    for index, ((name, param), (kname, array)) in enumerate(zip(params, weights)):
        module = model.get_submodule(name.rsplit(".", 1)[0])
        expected = _keras_shape(module, param)
        if tuple(array.shape) != expected:
            raise CheckpointError(
                f"tensor #{index} '{kname}' has shape {tuple(array.shape)} but the config expects "
                f"{expected} (for {name})"
            )
        state[name] = _to_torch_layout(module, array)
    if len(weights) != len(params):
        missing = params[len(weights)][0] if len(weights) < len(params) else None
        first_extra = weights[len(params)][0] if len(weights) > len(params) else None
        detail = f"first missing: {missing}" if missing else f"first extra: '{first_extra}'"
        raise CheckpointError(
            f"the file has {len(weights)} tensors but the config expects {len(params)} ({detail})"
        )
    return state
