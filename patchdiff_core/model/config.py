"""The architecture of one patched U-Net, as the original constructor took it.

Torch-free on purpose: the API validates requests against model configs without importing torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

HEAD_CHANNELS = 64  # the original's attention always uses 64-channel heads
NORM_GROUPS = 32


class ModelConfig(BaseModel):
    """Arguments of the original `UNet(...)` plus the schedule's `beta_max`.

    Field names follow the golden fixtures' `config.json` (the original constructor's names), so a
    file written for the TensorFlow code can be read as is. Unknown keys (`sample_steps`,
    `n_params`, ...) are ignored.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    res: int = Field(gt=0, description="image side before patching")
    c: int = Field(gt=0, description="base channels")
    n_blocks: int | list[int] = Field(description="residual blocks per level (int or per-level list)")
    attn_resos: list[int] = Field(default_factory=lambda: [16, 8], description="patched resolutions with attention")
    c_mult: list[float] = Field(min_length=1)
    num_classes: int = Field(default=0, ge=0, description="0 = unconditional")
    patch_size: int = Field(default=1, ge=1)
    se: bool = False
    beta_max: float = Field(default=0.02, gt=0, lt=1)

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        # The original configs spell the schedule end `diffusion_beta_max` for some models.
        if isinstance(data, dict) and "beta_max" not in data and "diffusion_beta_max" in data:
            data = {**data, "beta_max": data["diffusion_beta_max"]}
        return data

    @model_validator(mode="after")
    def _check_buildable(self) -> "ModelConfig":
        # Each check below is a configuration the original network cannot build either.
        if self.res % self.patch_size:
            raise ValueError(f"res {self.res} is not divisible by patch_size {self.patch_size}")
        if self.num_classes == 1:
            raise ValueError("num_classes must be 0 (unconditional) or at least 2")
        if self.c % 2:
            raise ValueError("c must be even (sinusoidal encodings use c/2 frequencies)")
        levels = len(self.c_mult)
        if self.patched_res % (2 ** (levels - 1)):
            raise ValueError(f"patched resolution {self.patched_res} cannot be halved {levels - 1} times")
        if isinstance(self.n_blocks, list) and len(self.n_blocks) != levels:
            raise ValueError("n_blocks as a list needs one entry per c_mult level")
        if self.width(0) != self.c:
            raise ValueError("c_mult[0] must give c channels (the first blocks have no shortcut)")
        for level in range(levels):
            width = self.width(level)
            if width % NORM_GROUPS:
                raise ValueError(f"level {level} has {width} channels, not divisible by {NORM_GROUPS} groups")
            # The middle block always has attention, at the deepest level.
            has_attention = self.level_res(level) in self.attn_resos or level == levels - 1
            if has_attention and width % HEAD_CHANNELS:
                raise ValueError(f"attention at level {level} needs a multiple of {HEAD_CHANNELS} channels, got {width}")
        return self

    @property
    def patched_res(self) -> int:
        return self.res // self.patch_size

    @property
    def conditional(self) -> bool:
        return self.num_classes > 1

    @property
    def gated(self) -> bool:
        """Sigmoid-gated (`se`) blocks; the original ignores `se` for unconditional models."""
        return self.se and self.conditional

    @property
    def blocks_per_level(self) -> list[int]:
        if isinstance(self.n_blocks, int):
            return [self.n_blocks] * len(self.c_mult)
        return list(self.n_blocks)

    def width(self, level: int) -> int:
        return int(self.c * self.c_mult[level])

    def level_res(self, level: int) -> int:
        return self.patched_res // (2**level)

    @property
    def time_dim(self) -> int:
        return self.width(len(self.c_mult) - 1)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(), sort_keys=True)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.model_validate(json.loads(Path(path).read_text()))
