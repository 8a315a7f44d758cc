"""The linear noise schedule of the original code, kept in float32 as it was, and the variance math
that the sampler and the training loss share."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from patchdiff_core.diffusion.respacing import NUM_TIMESTEPS


@dataclass(frozen=True)
class Schedule:
    betas: torch.Tensor  # [T] float32
    alphas_cumprod: torch.Tensor  # [T] cumulative product of (1 - beta): the original's `alpha_set`
    b_tilde: torch.Tensor  # [T] posterior variance

    @classmethod
    def linear(cls, beta_max: float, num_timesteps: int = NUM_TIMESTEPS) -> "Schedule":
        betas = torch.linspace(1e-4, beta_max, num_timesteps, dtype=torch.float32)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        # The original sets alpha_prev[0] = alpha[0] (not 1) so that log(b_tilde[0]) stays finite.
        alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[:-1]])
        return cls(betas, alphas_cumprod, betas * (1 - alphas_prev) / (1 - alphas_cumprod))

    def snr(self) -> torch.Tensor:
        return self.alphas_cumprod / (1 - self.alphas_cumprod)

    def timestep_for_snr(self, snr: float) -> int:
        """The timestep whose SNR is closest to `snr` in log space (the original's rule)."""
        log_snr = np.log(self.snr().double().numpy())
        return int(np.argmin(np.abs(log_snr - np.log(snr))))

    @staticmethod
    def step_variances(alpha: torch.Tensor, alpha_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(beta, b_tilde) of a reverse step between two taken steps with cumulative alphas
        `alpha` (current) and `alpha_prev` (the next lower taken step): the respaced process."""
        beta = 1 - alpha / alpha_prev
        return beta, beta * (1 - alpha_prev) / (1 - alpha)

    @staticmethod
    def log_variance(v: torch.Tensor, beta: torch.Tensor, b_tilde: torch.Tensor) -> torch.Tensor:
        """The network's predicted variance: log σ² = v·log b̃ + (1 − v)·log β, v in (0, 1)."""
        return v * torch.log(b_tilde) + (1 - v) * torch.log(beta)
