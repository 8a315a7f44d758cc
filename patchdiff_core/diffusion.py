"""The linear noise schedule of the original code, kept in float32 as it was."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .respacing import NUM_TIMESTEPS


@dataclass(frozen=True)
class Schedule:
    betas: torch.Tensor  # [T] float32
    alphas: torch.Tensor  # [T] cumulative product of (1 - beta)
    b_tilde: torch.Tensor  # [T] posterior variance

    @classmethod
    def linear(cls, beta_max: float, num_timesteps: int = NUM_TIMESTEPS) -> "Schedule":
        betas = torch.linspace(1e-4, beta_max, num_timesteps, dtype=torch.float32)
        alphas = torch.cumprod(1 - betas, dim=0)
        # The original sets alpha_prev[0] = alpha[0] (not 1) so that log(b_tilde[0]) stays finite.
        alphas_prev = torch.cat([alphas[:1], alphas[:-1]])
        return cls(betas, alphas, betas * (1 - alphas_prev) / (1 - alphas))

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def snr(self) -> torch.Tensor:
        return self.alphas / (1 - self.alphas)

    def timestep_for_snr(self, snr: float) -> int:
        """The timestep whose SNR is closest to `snr` in log space (the original's rule)."""
        log_snr = np.log(self.snr().double().numpy())
        return int(np.argmin(np.abs(log_snr - np.log(snr))))
