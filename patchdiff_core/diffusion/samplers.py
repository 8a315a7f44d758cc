"""Samplers: plain functions of (denoise, x, timesteps, schedule), built on one per-sample step each.

`denoise(x, t, guided)` returns the x0 prediction and the variance interpolation v at taken
timestep `t` (an int, the original 0..999 index). `guided=False` asks for the plain conditional
pass, which the original uses at the last step. Build one with `make_denoiser`.

**The step contract** (in the spirit of diffusers' `scheduler.step`, but per sample, so that images at
different timesteps, of different requests, share a batch): a `Sampler` turns the current sample `x`
and the network's prediction at its taken step into the sample at the next lower taken step:

    x_next, state = sampler.step(x, x0, v, alpha, alpha_next, state, noise, last)

with every argument batched over the first dimension, one row per image: `alpha` and `alpha_next`
[B] are the cumulative alphas of the current and the next taken step, `state` the sampler's
per-image memory (a dict of [B, ...] tensors from `sampler.init_state(x)`; a multistep sampler keeps
its history there), `noise` [B, ...] the image's next noise draw when `sampler.needs_noise` (else
None) and `last` [B] bool whether the step lands on the lowest taken step. `sample()` below drives it
for one batch that moves in lockstep; the worker's batching engine drives the same `step` for images
that do not. The final x0 is then the plain conditional pass at the lowest taken step, as the original.

Every sampler reports each step through `callback(info)` with `info` a dict of `step` (1-based),
`total`, `t`, `x` (the current sample) and `x0` (the current prediction); raising from the callback
(for example `errors.Cancelled`) stops sampling at that step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch

from patchdiff_core.diffusion.names import NOISY_SAMPLERS, SAMPLER_NAMES
from patchdiff_core.diffusion.schedule import Schedule
from patchdiff_core.model.unet import PatchedUNet

Denoise = Callable[[torch.Tensor, int, bool], tuple[torch.Tensor, torch.Tensor]]
Callback = Callable[[dict], None]
NoiseSource = Callable[[], torch.Tensor]
State = dict[str, torch.Tensor]

THRESHOLD_PERCENTILE = 99.5


# -- guidance ---------------------------------------------------------------------------------------
def dynamic_threshold(x0: torch.Tensor, percentile: float = THRESHOLD_PERCENTILE) -> torch.Tensor:
    """Clip each sample to its `percentile` of |x0| (nearest rank, at least 1), then rescale to [-1, 1]."""
    flat = x0.detach().abs().flatten(1).float()
    n = flat.shape[1]
    # tfp.stats.percentile(..., interpolation="nearest"): index round((n - 1) q), ties to even.
    rank = round((n - 1) * percentile / 100.0)
    s = flat.kthvalue(rank + 1, dim=1).values.clamp(min=1.0).to(x0.dtype)
    s = s.view(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def guided_x0(cond: torch.Tensor, uncond: torch.Tensor, guidance: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance, x0 = W·x0(y) − (W−1)·x0(∅), then dynamic thresholding.

    `guidance` is a number or one weight per sample ([B]); every guided path calls this.
    """
    if isinstance(guidance, torch.Tensor):
        guidance = guidance.to(cond).view(-1, *([1] * (cond.ndim - 1)))
    return dynamic_threshold(guidance * cond - (guidance - 1.0) * uncond)


def make_denoiser(
    model: PatchedUNet,
    labels: torch.Tensor | None = None,
    guidance: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> Denoise:
    """Wrap a network (with its labels, guidance and precision) as a `denoise` function.

    With guidance W > 1 the conditional and "no label" passes run as one batch of 2B (`guided_x0`);
    the variance is the conditional one.
    """
    if guidance != 1.0 and not model.config.conditional:
        raise ValueError("classifier-free guidance needs a class-conditional model")
    forward = network_forward(model, autocast_dtype, channels_last)

    # The conditional and "no label" halves of a guided batch, built once, not at every step.
    guided_labels = None
    if guidance != 1.0:
        if labels is None:
            raise ValueError("classifier-free guidance needs class labels")
        guided_labels = torch.cat([labels, torch.full_like(labels, model.null_label)])

    def denoise(x: torch.Tensor, t: int, guided: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        steps = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        if not guided or guided_labels is None:
            return forward(x, steps, labels)
        x0, v = forward(torch.cat([x, x]), torch.cat([steps, steps]), guided_labels)
        cond, uncond = x0.chunk(2)
        return guided_x0(cond, uncond, guidance), v[: x.shape[0]]

    return denoise


def network_forward(
    model: PatchedUNet, autocast_dtype: torch.dtype | None = None, channels_last: bool = False
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]:
    """`forward(x, t, y)` with per-sample `t` [B], under the given precision: the one place a sampling
    path calls the network (the plain denoiser and the batching engine both use it)."""
    device = next(model.parameters()).device
    autocast = (
        (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype is not None else nullcontext
    )

    def forward(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast():
            x0, v = model(x, t, y)
        return x0.float(), v.float()

    return forward


def split_denoiser(low_noise: Denoise, high_noise: Denoise, switch_t: int) -> Denoise:
    """Two-network sampling: `high_noise` for t >= switch_t, `low_noise` below (and at the last step)."""

    def denoise(x: torch.Tensor, t: int, guided: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        return (high_noise if t >= switch_t else low_noise)(x, t, guided)

    return denoise


# -- per-sample steps ------------------------------------------------------------------------------
def _rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] per-sample scalars as [B, 1, 1, 1] float32, to broadcast over images."""
    return values.to(device=like.device, dtype=torch.float32).view(-1, *([1] * (like.ndim - 1)))


def ancestral_step(
    x: torch.Tensor, x0: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, alpha_prev: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    """The paper's reverse step with learned variance from a taken step (cumulative alpha `alpha`)
    to the next lower taken step (`alpha_prev`); `alpha`, `alpha_prev` broadcast against x."""
    beta, b_tilde = Schedule.step_variances(alpha, alpha_prev)
    mean = (x - beta * (x - torch.sqrt(alpha) * x0) / (1 - alpha)) / torch.sqrt(1 - beta)
    return mean + torch.exp(0.5 * Schedule.log_variance(v, beta, b_tilde)) * z


def ddim_step(x: torch.Tensor, x0: torch.Tensor, alpha: torch.Tensor, alpha_prev: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0): keep the implied noise, move x0 to the next taken step."""
    eps = (x - torch.sqrt(alpha) * x0) / torch.sqrt(1 - alpha)
    return torch.sqrt(alpha_prev) * x0 + torch.sqrt(1 - alpha_prev) * eps


def half_log_snr(alpha: torch.Tensor) -> torch.Tensor:
    """lambda = log(sqrt(alpha) / sqrt(1 - alpha)), DPM-Solver's time variable, in float64."""
    alpha = alpha.double()
    return 0.5 * (torch.log(alpha) - torch.log1p(-alpha))


def dpmpp_2m_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    alpha: torch.Tensor,
    alpha_next: torch.Tensor,
    x0_prev: torch.Tensor,
    h_prev: torch.Tensor,
    first_order: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++(2M) step in x0 form (Lu et al. 2022, Alg. 2), per sample; with `noise`, the
    SDE-DPM-Solver++(2M) step (midpoint form, as diffusers' "sde-dpmsolver++").

    `alpha`, `alpha_next`, `h_prev` and `first_order` are [B]; `x0_prev` is the previous step's x0
    and `h_prev` its step size in lambda. Rows with `first_order` (no history yet, or the lower-order
    final step) take the first-order update, which for the ODE is exactly DDIM. Returns (x_next, h).
    """
    lam, lam_next = half_log_snr(alpha), half_log_snr(alpha_next)
    h = lam_next - lam
    # D = x0 + (x0 - x0_prev) / (2 r) with r = h_prev / h: the linear extrapolation of x0 in lambda
    # to the step's midpoint, which makes the exponential integrator second order.
    multistep = ~first_order & (h_prev != 0)
    safe_h_prev = torch.where(multistep, h_prev.double(), torch.ones_like(h))
    ratio = torch.where(multistep, h / (2 * safe_h_prev), torch.zeros_like(h))
    d = x0 + _rows(ratio, x) * (x0 - x0_prev)
    sigma_ratio = torch.sqrt((1 - alpha_next.double()) / (1 - alpha.double()))
    if noise is None:
        # x_next = (sigma_next / sigma) x + alpha_next (1 - e^{-h}) D
        x_next = _rows(sigma_ratio, x) * x + _rows(torch.sqrt(alpha_next.double()) * -torch.expm1(-h), x) * d
    else:
        # x_next = (sigma_next / sigma) e^{-h} x + alpha_next (1 - e^{-2h}) D + sigma_next sqrt(1 - e^{-2h}) z
        one_minus = -torch.expm1(-2 * h)
        x_next = (
            _rows(sigma_ratio * torch.exp(-h), x) * x
            + _rows(torch.sqrt(alpha_next.double()) * one_minus, x) * d
            + _rows(torch.sqrt((1 - alpha_next.double()) * one_minus), x) * noise
        )
    return x_next, h.to(torch.float32)


def _exp_integrator_terms(lam: torch.Tensor, lam_next: torch.Tensor, variant: str = "bh2"):
    """For a data-prediction (x0) step from lambda to lambda_next: h, hh = -h, h*phi_1 = e^{-h} - 1
    and UniPC's B(h): "bh1" -h, "bh2" e^{-h} - 1 (Zhao et al. 2023, sec. 3.3), all [B] float64."""
    h = lam_next - lam
    hh = -h
    h_phi_1 = torch.expm1(hh)
    return h, hh, h_phi_1, (hh if variant == "bh1" else h_phi_1)


def unipc_corrector(
    x_prev: torch.Tensor, x0_prev: torch.Tensor, x0_prev2: torch.Tensor, x0: torch.Tensor,
    alpha_prev: torch.Tensor, alpha_prev2: torch.Tensor, alpha: torch.Tensor, order: torch.Tensor, variant: str = "bh2",
) -> torch.Tensor:
    """UniC (Zhao et al. 2023, data prediction, B(h) of `variant`), per sample: re-take the last step
    from `x_prev` (at `alpha_prev`) to `alpha` using the new x0 at its end, which costs no network
    evaluation. `order` [B] is the order of the step being corrected (1 or 2; 2 also uses `x0_prev2`
    at `alpha_prev2`). Returns the corrected sample at `alpha`."""
    lam_prev, lam = half_log_snr(alpha_prev), half_log_snr(alpha)
    h, hh, h_phi_1, b_h = _exp_integrator_terms(lam_prev, lam, variant)
    x = x_prev
    x_ = _rows(torch.sqrt((1 - alpha.double()) / (1 - alpha_prev.double())), x) * x \
        - _rows(torch.sqrt(alpha.double()) * h_phi_1, x) * x0_prev
    # b_k = h phi_{k+1}(h) k! / B(h) (the UniPC coefficients); with R = [[1, 1], [r, 1]] the order-2
    # corrector solves R rho = b for the weights of the older difference and of the new one.
    phi_k1 = h_phi_1 / hh - 1
    b1 = phi_k1 / b_h
    b2 = (phi_k1 / hh - 0.5) * 2 / b_h
    second = order >= 2
    lam_prev2 = half_log_snr(torch.where(second, alpha_prev2.double(), torch.full_like(alpha_prev.double(), 0.5)))
    r = torch.where(second, (lam_prev2 - lam_prev) / h, torch.full_like(h, 2.0))
    rho_old = torch.where(second, (b1 - b2) / (1 - r), torch.zeros_like(h))
    rho_new = torch.where(second, b1 - rho_old, torch.full_like(h, 0.5))
    d1 = (x0_prev2 - x0_prev) / _rows(r, x)
    correction = _rows(rho_old, x) * d1 + _rows(rho_new, x) * (x0 - x0_prev)
    return x_ - _rows(torch.sqrt(alpha.double()) * b_h, x) * correction


def unipc_predictor(
    x: torch.Tensor, x0: torch.Tensor, x0_prev: torch.Tensor, alpha: torch.Tensor, alpha_prev: torch.Tensor,
    alpha_next: torch.Tensor, order: torch.Tensor, variant: str = "bh2",
) -> torch.Tensor:
    """UniP (data prediction, B(h) of `variant`), per sample, from `alpha` to `alpha_next`; rows with
    `order` 2 use the previous x0 (at `alpha_prev`) with weight 1/2, as diffusers' order-2 UniP."""
    lam, lam_next = half_log_snr(alpha), half_log_snr(alpha_next)
    h, hh, h_phi_1, b_h = _exp_integrator_terms(lam, lam_next, variant)
    x_next = _rows(torch.sqrt((1 - alpha_next.double()) / (1 - alpha.double())), x) * x \
        - _rows(torch.sqrt(alpha_next.double()) * h_phi_1, x) * x0
    second = order >= 2
    lam_prev = half_log_snr(torch.where(second, alpha_prev.double(), torch.full_like(alpha.double(), 0.5)))
    r = torch.where(second, (lam_prev - lam) / h, torch.ones_like(h))
    d1 = (x0_prev - x0) / _rows(r, x)
    return x_next - _rows(torch.where(second, torch.sqrt(alpha_next.double()) * b_h * 0.5, torch.zeros_like(h)), x) * d1


@dataclass(frozen=True)
class Sampler:
    """A sampler's per-sample step (see the module doc for the contract)."""

    name: str
    needs_noise: bool  # draws one noise tensor per image for every step but the last

    def init_state(self, x: torch.Tensor) -> State:
        return {}

    def step(self, x, x0, v, alpha, alpha_next, state: State, noise, last) -> tuple[torch.Tensor, State]:
        raise NotImplementedError


class Ancestral(Sampler):
    def step(self, x, x0, v, alpha, alpha_next, state, noise, last):
        return ancestral_step(x, x0, v, _rows(alpha, x), _rows(alpha_next, x), noise), state


class DDIM(Sampler):
    def step(self, x, x0, v, alpha, alpha_next, state, noise, last):
        return ddim_step(x, x0, _rows(alpha, x), _rows(alpha_next, x)), state


class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M), multistep: the state keeps each image's previous x0 and step size in lambda
    (`h_prev == 0`: no history yet, so the first step is first order); the step that lands on the
    lowest taken step is first order too (diffusers' `lower_order_final`), which keeps few-step
    sampling stable. With `needs_noise`, the SDE variant."""

    def init_state(self, x):
        return {"x0_prev": torch.zeros_like(x, dtype=torch.float32), "h_prev": torch.zeros(x.shape[0], device=x.device)}

    def step(self, x, x0, v, alpha, alpha_next, state, noise, last):
        first_order = last.to(device=x.device, dtype=torch.bool)
        x_next, h = dpmpp_2m_step(
            x, x0, alpha.to(x.device), alpha_next.to(x.device), state["x0_prev"], state["h_prev"].to(x.device),
            first_order, noise if self.needs_noise else None,
        )
        return x_next, {"x0_prev": x0.float(), "h_prev": h}


@dataclass(frozen=True)
class UniPC(Sampler):
    """UniPC (Zhao et al. 2023), order 2, data prediction, as diffusers' UniPCMultistepScheduler
    (prediction type "sample", solver_order=2, lower_order_final) with `variant` its solver_type:
    "bh2" (diffusers' default) or "bh1" (B(h) = h, which the paper advises for very few steps and
    which measures best on the demo model). At each step the corrector first
    re-takes the previous step with the new x0 (free: no extra network evaluation), then the
    predictor steps on. The state keeps each image's corrected previous sample, its two previous x0
    and cumulative alphas, and the order of its previous step (0: no history yet); the step that
    lands on the lowest taken step is first order."""

    variant: str = "bh2"

    def init_state(self, x):
        zeros, batch = torch.zeros_like(x, dtype=torch.float32), x.shape[0]
        return {"x_prev": zeros, "x0_prev": zeros.clone(), "x0_prev2": zeros.clone(),
                "alpha_prev": torch.full((batch,), 0.5, dtype=torch.float64, device=x.device),
                "alpha_prev2": torch.full((batch,), 0.5, dtype=torch.float64, device=x.device),
                "order_prev": torch.zeros(batch, dtype=torch.long, device=x.device)}

    def step(self, x, x0, v, alpha, alpha_next, state, noise, last):
        alpha, alpha_next = alpha.to(x.device).double(), alpha_next.to(x.device).double()
        alpha_prev, order_prev = state["alpha_prev"].to(x.device), state["order_prev"].to(x.device)
        x0 = x0.float()
        corrected = unipc_corrector(state["x_prev"], state["x0_prev"], state["x0_prev2"], x0, alpha_prev,
                                    state["alpha_prev2"].to(x.device), alpha, order_prev, self.variant)
        x = torch.where(_rows(order_prev >= 1, x).bool(), corrected.to(x.dtype), x)
        order = torch.where((order_prev >= 1) & ~last.to(device=x.device, dtype=torch.bool), 2, 1)
        x_next = unipc_predictor(x, x0, state["x0_prev"], alpha, alpha_prev, alpha_next, order, self.variant)
        return x_next.to(torch.float32), {
            "x_prev": x.float(), "x0_prev": x0, "x0_prev2": state["x0_prev"], "alpha_prev": alpha,
            "alpha_prev2": alpha_prev, "order_prev": order,
        }


SAMPLERS: dict[str, Sampler] = {
    "ancestral": Ancestral("ancestral", needs_noise=True),
    "ddim": DDIM("ddim", needs_noise=False),
    "dpmpp_2m": DPMSolverPP2M("dpmpp_2m", needs_noise=False),
    "dpmpp_2m_sde": DPMSolverPP2M("dpmpp_2m_sde", needs_noise=True),
    "unipc": UniPC("unipc", needs_noise=False, variant="bh2"),
    "unipc_bh1": UniPC("unipc_bh1", needs_noise=False, variant="bh1"),
}
assert tuple(SAMPLERS) == SAMPLER_NAMES, "names.SamplerName and SAMPLERS must list the same samplers"
assert {n for n, s in SAMPLERS.items() if s.needs_noise} == set(NOISY_SAMPLERS), "names.NOISY_SAMPLERS is out of date"


# -- the plain loop -----------------------------------------------------------------------------------
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


def sample(
    sampler: Sampler | str,
    denoise: Denoise,
    x: torch.Tensor,
    timesteps: Iterable[int],
    schedule: Schedule,
    noise: Sequence[torch.Tensor] | NoiseSource | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Run `sampler` over respaced `timesteps` (any order; used from the highest down).

    `x` is the start noise at the highest taken step. `noise` gives the noise of each step but the
    last, consumed from the highest timestep down: a sequence of tensors (to replay a trajectory),
    a callable returning the next tensor, or None for `torch.randn_like`. Returns the final x0
    (unclipped), the plain conditional prediction at the lowest taken step.
    """
    sampler = SAMPLERS[sampler] if isinstance(sampler, str) else sampler
    steps = sorted(timesteps, reverse=True)
    next_noise = _noise_source(noise, x)
    x = x.float()
    batch = x.shape[0]
    alphas = schedule.alphas_cumprod.to(x.device)
    state = sampler.init_state(x)
    for i, (t, t_next) in enumerate(zip(steps, steps[1:])):
        x0, v = denoise(x, t, True)
        z = next_noise() if sampler.needs_noise else None
        last = torch.full((batch,), i == len(steps) - 2, dtype=torch.bool, device=x.device)
        x, state = sampler.step(x, x0, v, alphas[t].expand(batch), alphas[t_next].expand(batch), state, z, last)
        _report(callback, i + 1, len(steps), t, x, x0)
    x0, _ = denoise(x, steps[-1], False)
    _report(callback, len(steps), len(steps), steps[-1], x0, x0)
    return x0


sample_ancestral = partial(sample, SAMPLERS["ancestral"])
sample_ancestral.__doc__ = "The paper's ancestral sampler with learned variance: `sample('ancestral', ...)`."
sample_ddim = partial(sample, SAMPLERS["ddim"])
sample_ddim.__doc__ = "Deterministic DDIM (eta = 0) on the same x0 predictions; `noise` is accepted and unused."
sample_dpmpp_2m = partial(sample, SAMPLERS["dpmpp_2m"])
sample_dpmpp_2m.__doc__ = "DPM-Solver++(2M) (deterministic, multistep, x0 form): `sample('dpmpp_2m', ...)`."
