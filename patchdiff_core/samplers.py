"""Samplers: plain functions of (denoise, x, timesteps, schedule).

`denoise(x, t, guided)` returns the x0 prediction and the variance interpolation v at taken
timestep `t` (an int, the original 0..999 index). `guided=False` asks for the plain conditional
pass, which the original uses at the last step. Build one with `make_denoiser`.

Every sampler reports each step through `callback(info)` with `info` a dict of `step` (1-based),
`total`, `t`, `x` (the current sample) and `x0` (the current prediction); raising from the callback
(for example `errors.Cancelled`) stops sampling at that step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext

import torch

from .diffusion import Schedule
from .unet import PatchedUNet

Denoise = Callable[[torch.Tensor, int, bool], tuple[torch.Tensor, torch.Tensor]]
Callback = Callable[[dict], None]
NoiseSource = Callable[[], torch.Tensor]

THRESHOLD_PERCENTILE = 99.5


def dynamic_threshold(x0: torch.Tensor, percentile: float = THRESHOLD_PERCENTILE) -> torch.Tensor:
    """Clip each sample to its `percentile` of |x0| (nearest rank, at least 1), then rescale to [-1, 1]."""
    flat = x0.detach().abs().flatten(1).float()
    n = flat.shape[1]
    # tfp.stats.percentile(..., interpolation="nearest"): index round((n - 1) q), ties to even.
    rank = round((n - 1) * percentile / 100.0)
    s = flat.kthvalue(rank + 1, dim=1).values.clamp(min=1.0).to(x0.dtype)
    s = s.view(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def make_denoiser(
    model: PatchedUNet,
    labels: torch.Tensor | None = None,
    guidance: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> Denoise:
    """Wrap a network (with its labels, guidance and precision) as a `denoise` function.

    With guidance W > 1 the conditional and "no label" passes run as one batch of 2B:
    x0 = W·x0(y) − (W−1)·x0(∅), then dynamic thresholding; the variance is the conditional one.
    """
    if guidance != 1.0 and not model.config.conditional:
        raise ValueError("classifier-free guidance needs a class-conditional model")
    device = next(model.parameters()).device
    autocast = (
        (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype is not None else nullcontext
    )

    def forward(x: torch.Tensor, t: int, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        steps = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        with torch.no_grad(), autocast():
            return model(x, steps, y)

    # The conditional and "no label" halves of a guided batch, built once, not at every step.
    guided_labels = None
    if guidance != 1.0:
        if labels is None:
            raise ValueError("classifier-free guidance needs class labels")
        guided_labels = torch.cat([labels, torch.full_like(labels, model.null_label)])

    def denoise(x: torch.Tensor, t: int, guided: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        if not guided or guided_labels is None:
            return forward(x, t, labels)
        mean, var = forward(torch.cat([x, x]), t, guided_labels)
        cond, uncond = mean.chunk(2)
        return dynamic_threshold(guidance * cond - (guidance - 1.0) * uncond), var[: x.shape[0]]

    return denoise


def split_denoiser(low_noise: Denoise, high_noise: Denoise, switch_t: int) -> Denoise:
    """Two-network sampling: `high_noise` for t >= switch_t, `low_noise` below (and at the last step)."""

    def denoise(x: torch.Tensor, t: int, guided: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        return (high_noise if t >= switch_t else low_noise)(x, t, guided)

    return denoise


def _noise_source(noise: Sequence[torch.Tensor] | NoiseSource | None, like: torch.Tensor) -> NoiseSource:
    if noise is None:
        return lambda: torch.randn_like(like)
    if callable(noise):
        return noise
    it = iter(noise)

    def next_noise() -> torch.Tensor:
        try:
            return next(it).to(like)
        except StopIteration:
            raise ValueError("the noise sequence is shorter than the number of steps") from None

    return next_noise


def _report(callback: Callback | None, step: int, total: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
    if callback is not None:
        callback({"step": step, "total": total, "t": t, "x": x, "x0": x0})


def sample_ancestral(
    denoise: Denoise,
    x: torch.Tensor,
    timesteps: Iterable[int],
    schedule: Schedule,
    noise: Sequence[torch.Tensor] | NoiseSource | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """The paper's ancestral sampler with learned variance, over respaced `timesteps` (ascending).

    `x` is the start noise at the highest taken step. `noise` gives the noise of each step but the
    last, consumed from the highest timestep down: a sequence of tensors (to replay a trajectory),
    a callable returning the next tensor, or None for `torch.randn_like`. Returns the final x0
    (unclipped), the plain conditional prediction at the lowest taken step.
    """
    steps = sorted(timesteps, reverse=True)
    next_noise = _noise_source(noise, x)
    alphas = schedule.alphas.tolist()
    x = x.float()
    for i, (t, t_prev) in enumerate(zip(steps, steps[1:])):
        x0, v = denoise(x, t, True)
        x = ancestral_step(x, x0, v, alphas[t], alphas[t_prev], next_noise())
        _report(callback, i + 1, len(steps), t, x, x0)
    x0, _ = denoise(x, steps[-1], False)
    _report(callback, len(steps), len(steps), steps[-1], x0, x0)
    return x0


def ancestral_step(
    x: torch.Tensor, x0: torch.Tensor, v: torch.Tensor, alpha: float, alpha_prev: float, z: torch.Tensor
) -> torch.Tensor:
    """One reverse step from a taken step (cumulative alpha `alpha`) to the previous taken step."""
    alpha_t = torch.tensor(alpha, dtype=torch.float32)
    alpha_p = torch.tensor(alpha_prev, dtype=torch.float32)
    beta = 1 - alpha_t / alpha_p
    b_tilde = beta * (1 - alpha_p) / (1 - alpha_t)
    log_var = v * torch.log(b_tilde) + (1 - v) * torch.log(beta)
    mean = (x - beta * (x - torch.sqrt(alpha_t) * x0) / (1 - alpha_t)) / torch.sqrt(1 - beta)
    return mean + torch.exp(0.5 * log_var) * z


def sample_ddim(
    denoise: Denoise,
    x: torch.Tensor,
    timesteps: Iterable[int],
    schedule: Schedule,
    noise: Sequence[torch.Tensor] | NoiseSource | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) on the same x0 predictions; `noise` is accepted and unused."""
    steps = sorted(timesteps, reverse=True)
    alphas = schedule.alphas.tolist()
    x = x.float()
    for i, (t, t_prev) in enumerate(zip(steps, steps[1:])):
        x0, _ = denoise(x, t, True)
        a, a_prev = alphas[t], alphas[t_prev]
        eps = (x - a**0.5 * x0) / (1 - a) ** 0.5
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        _report(callback, i + 1, len(steps), t, x, x0)
    x0, _ = denoise(x, steps[-1], False)
    _report(callback, len(steps), len(steps), steps[-1], x0, x0)
    return x0


SAMPLERS = {"ancestral": sample_ancestral, "ddim": sample_ddim}
