"""Known models: the paper's released configurations and the models listed in `weights/manifest.json`.

Torch-free. A model is "installed" when all its weight files are in the weights directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from patchdiff_core.diffusion.names import SamplerName
from patchdiff_core.model.config import ModelConfig

# The ImageNet pair: a low-noise network (trained on SNR >= 0.25) and a high-noise one (SNR < 0.25); the
# original switches networks at the timestep whose SNR is nearest 0.25 (t = 396 for the linear
# schedule). Which released file is which is not settled: see the README ("The authors' checkpoints").
IMAGENET_SPLIT_SNR = 0.25


class SamplingDefaults(BaseModel):
    model_config = ConfigDict(frozen=True)

    timesteps: str = "250"
    sampler: SamplerName = "ancestral"
    guidance: float = 1.0


class ModelEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    description: str
    config: ModelConfig
    # One file, or for a two-network model [low-noise network (SNR >= split_snr), high-noise network].
    files: list[str] = Field(min_length=1, max_length=2)
    split_snr: float | None = None
    classes: list[str] | None = None
    defaults: SamplingDefaults = SamplingDefaults()
    sha256: list[str] | None = None
    # The precision the model is served in on CUDA, chosen by measuring speed and error against fp32
    # (benchmarks/gpu_serving_check.py, section "precision"); None: fp16. "fp32" there means TF32
    # tensor cores for convolutions and matmuls (a worker serving such a model allows TF32 matmuls).
    # The CPU always runs fp32.
    cuda_precision: Literal["fp16", "bf16", "fp32"] | None = None
    # Other manifest keys (e.g. `training_command`, the provenance of a trained model) are for people.

    def paths(self, weights_dir: Path) -> list[Path]:
        return [weights_dir / f for f in self.files]

    def installed(self, weights_dir: Path) -> bool:
        return all(p.is_file() for p in self.paths(weights_dir))

    def class_names(self) -> list[str]:
        return self.classes or [str(i) for i in range(self.config.num_classes)]


def _church(patch: int, c: int, n_blocks: int, c_mult: list[float]) -> ModelEntry:
    return ModelEntry(
        name=f"church_p{patch}",
        description=f"LSUN church 256x256, patch size {patch}",
        config=ModelConfig(res=256, c=c, n_blocks=n_blocks, attn_resos=[16, 8], c_mult=c_mult, patch_size=patch),
        files=[f"church_p{patch}.safetensors"],
    )


RELEASED: list[ModelEntry] = [
    _church(2, 128, 2, [1, 2, 2, 4, 4]),
    _church(4, 256, 2, [1, 1, 2, 2]),
    _church(8, 256, 3, [1, 1.5, 2]),
    ModelEntry(
        name="imagenet",
        description="ImageNet 256x256, class-conditional, two networks split at SNR 0.25",
        config=ModelConfig(
            res=256, c=256, n_blocks=3, attn_resos=[16, 8], c_mult=[1, 2, 2, 2], num_classes=1000, patch_size=4, se=True
        ),
        files=["imagenet_low_noise.safetensors", "imagenet_high_noise.safetensors"],
        split_snr=IMAGENET_SPLIT_SNR,
        defaults=SamplingDefaults(guidance=1.5),
    ),
    ModelEntry(
        name="ffhq",
        description="FFHQ 1024x1024, patch size 4",
        config=ModelConfig(
            res=1024, c=128, n_blocks=2, attn_resos=[16, 8], c_mult=[1, 2, 2, 4, 4, 4], patch_size=4, beta_max=0.025
        ),
        files=["ffhq.safetensors"],
    ),
]


def load_manifest(weights_dir: Path) -> list[ModelEntry]:
    path = weights_dir / "manifest.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return [ModelEntry.model_validate(m) for m in data.get("models", [])]


def all_models(weights_dir: Path) -> dict[str, ModelEntry]:
    models = {m.name: m for m in RELEASED}
    models.update({m.name: m for m in load_manifest(weights_dir)})
    return models


def get_model(name: str, weights_dir: Path) -> ModelEntry:
    models = all_models(weights_dir)
    if name not in models:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(models))}")
    return models[name]
