"""What defines a training run (torch-free, so the command line reads its defaults without torch)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from patchdiff_core.model.config import ModelConfig


class TrainConfig(BaseModel):
    """Everything that defines a run; stored in the run directory and checked on resume."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelConfig
    data: str = "digits"
    class_folders: bool = False
    batch_size: int = Field(default=64, ge=1)
    steps: int = Field(default=10_000, ge=1)
    lr: float = Field(default=2e-4, gt=0)
    adam_betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = Field(default=500, ge=0)
    ema_rate: float = Field(default=0.999, ge=0, lt=1)
    ema_every: int = Field(default=1, ge=1)
    label_dropout: float = Field(default=0.1, ge=0, le=1)
    min_snr: float | None = Field(default=None, gt=0)
    max_snr: float | None = Field(default=None, gt=0)
    seed: int = 0
    precision: str = "auto"  # fp32 | bf16 (autocast) | auto: bf16 on CUDA, fp32 on CPU
