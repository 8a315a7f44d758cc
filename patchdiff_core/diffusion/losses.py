"""The paper's training objective: sqrt(SNR)-weighted x0 loss plus the variational term for the variance."""

from __future__ import annotations

import torch

from patchdiff_core.diffusion.schedule import Schedule


def hybrid_loss(
    x0: torch.Tensor, pred_x0: torch.Tensor, v: torch.Tensor, t: torch.Tensor, schedule: Schedule
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_simple, L_vlb) as the original `hybrid_lossfn` computes them.

    L_simple: batch mean of sqrt(SNR_t)·Σ_pixels (x̂0 − x0)².
    L_vlb: batch *sum* of the KL between the true posterior q(x_{t−1}|x_t, x0) and the model's,
    with x̂0 detached so that this term trains only the variance output; masked out at t = 0.
    """
    shape = (-1, 1, 1, 1)
    alpha = schedule.alphas_cumprod.to(t.device)[t].view(shape)
    beta = schedule.betas.to(t.device)[t].view(shape)
    b_tilde = schedule.b_tilde.to(t.device)[t].view(shape)
    root_snr = torch.sqrt(alpha / (1 - alpha)).flatten()

    squared = (pred_x0.float() - x0).square().sum(dim=(1, 2, 3))
    l_simple = (squared * root_snr).mean()

    pred_var = torch.exp(Schedule.log_variance(v.float(), beta, b_tilde))
    # alpha·β² / ((1−β)(1−alpha)²) is the squared x0 coefficient of the posterior mean over the variance.
    gamma = alpha * beta.square() / (pred_var * (1 - beta) * (1 - alpha).square())
    kl = 0.5 * (gamma * (pred_x0.detach().float() - x0).square() + torch.log(pred_var / b_tilde) + b_tilde / pred_var - 1)
    l_vlb = (kl.sum(dim=(1, 2, 3)) * (t > 0).float()).sum()
    return l_simple, l_vlb
