"""DPM-Solver++(2M) and UniPC: order of convergence on Gaussian data (exact ODE solution known),
agreement with diffusers' independent implementations, and the per-sample step contract a batching
engine relies on."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import needs
import torch

from patchdiff_core.diffusion.respacing import resolve_timesteps
from patchdiff_core.diffusion.samplers import SAMPLERS, sample
from patchdiff_core.diffusion.schedule import Schedule

DATA_STD = 0.5  # x0 ~ N(0, DATA_STD^2 I)


def gaussian_x0(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The exact denoiser E[x0 | x_t] for Gaussian data: sqrt(a) s^2 / (a s^2 + 1 - a) x."""
    a = alpha.double().view(-1, *([1] * (x.ndim - 1)))
    return (a.sqrt() * DATA_STD**2 / (a * DATA_STD**2 + 1 - a)) * x


def marginal_std(alpha: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(alpha.double() * DATA_STD**2 + 1 - alpha.double())


def solve(name: str, x: torch.Tensor, alphas: list[float]) -> torch.Tensor:
    """Run a sampler's `step` over cumulative alphas (noisy to clean) with the exact denoiser."""
    sampler = SAMPLERS[name]
    state = sampler.init_state(x)
    batch = x.shape[0]
    for i, (a, a_next) in enumerate(zip(alphas, alphas[1:])):
        alpha, alpha_next = torch.full((batch,), a, dtype=torch.float64), torch.full((batch,), a_next, dtype=torch.float64)
        last = torch.full((batch,), i == len(alphas) - 2)
        x, state = sampler.step(x, gaussian_x0(x, alpha), None, alpha, alpha_next, state, None, last)
    return x


def alphas_uniform_in_lambda(steps: int, lam_start: float = -4.0, lam_end: float = 3.0) -> list[float]:
    # lambda = log(sqrt(a) / sqrt(1 - a))  =>  a = sigmoid(2 lambda)
    return [1 / (1 + math.exp(-2 * lam)) for lam in np.linspace(lam_start, lam_end, steps + 1)]


@pytest.mark.parametrize("name, order", [("ddim", 1), ("dpmpp_2m", 2)])
def test_error_falls_at_the_solvers_order(name, order):
    """Along the probability-flow ODE of Gaussian data, x_t / std(x_t) is constant, so the exact
    endpoint is known; halving the step must divide the error by about 2^order."""
    g = torch.Generator().manual_seed(0)
    x_start = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    errors = []
    for steps in (20, 40, 80, 160, 320):
        alphas = alphas_uniform_in_lambda(steps)
        exact = x_start * marginal_std(torch.tensor(alphas[-1])) / marginal_std(torch.tensor(alphas[0]))
        got = solve(name, x_start * 1.0, alphas)
        errors.append(((got - exact).norm() / exact.norm()).item())
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    # (At 10-20 steps the error terms of 2M partly cancel, so the rate settles from 40 steps on.)
    assert all(abs(r - order) < 0.15 for r in rates[1:]), (errors, rates)


@pytest.mark.parametrize("name", ["unipc", "unipc_bh1"])
def test_unipc_is_at_least_second_order_and_beats_dpmpp_2m(name):
    """UniPC-2 (predictor + free corrector): the error falls at least at order 2 (its lower-order final
    step caps it there; float32 states floor it near 1e-6 beyond 80 steps) and, once the steps are
    small (40 and 80 here), stays below DPM-Solver++(2M)'s."""
    g = torch.Generator().manual_seed(0)
    x_start = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    errors = {name: [], "dpmpp_2m": []}
    for steps in (20, 40, 80):
        alphas = alphas_uniform_in_lambda(steps)
        exact = x_start * marginal_std(torch.tensor(alphas[-1])) / marginal_std(torch.tensor(alphas[0]))
        for solver in errors:
            errors[solver].append(((solve(solver, x_start * 1.0, alphas) - exact).norm() / exact.norm()).item())
    rates = [math.log2(a / b) for a, b in zip(errors[name], errors[name][1:])]
    assert all(r > 1.8 for r in rates), (errors, rates)
    assert all(u < d for u, d in zip(errors[name][1:], errors["dpmpp_2m"][1:])), errors


def _exact_denoiser(schedule: Schedule):
    def denoise(x, t, guided=True):
        alpha = schedule.alphas_cumprod[t].expand(x.shape[0])
        return gaussian_x0(x, alpha).float(), torch.zeros_like(x)

    return denoise


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_sde"])
@pytest.mark.parametrize("spec", ["10", "logsnr10", "karras20"])
def test_matches_diffusers(name, spec):
    """The same trajectory as diffusers' DPMSolverMultistepScheduler (prediction type "sample",
    second-order multistep, lower order at the final step; "sde-dpmsolver++" with the same noise for
    the SDE variant) on the same betas and timesteps."""
    diffusers = needs("diffusers")
    schedule = Schedule.linear(0.02)
    steps = sorted(resolve_timesteps(spec), reverse=True)
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        trained_betas=schedule.betas.double().numpy(),
        prediction_type="sample",
        algorithm_type="sde-dpmsolver++" if name == "dpmpp_2m_sde" else "dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,  # (diffusers does this only below 15 steps,
        euler_at_final=True,  # this at every count, as ours: the `last` step is first order)
        final_sigmas_type="sigma_min",  # the last step lands on t = 0, as ours
        thresholding=False,
    )
    # Ours takes S timesteps including t = 0 (the last update lands there); diffusers takes the
    # S - 1 timesteps it starts steps from and ends at sigma_min = sigma(t = 0).
    scheduler.set_timesteps(timesteps=steps[:-1])
    assert [int(t) for t in scheduler.timesteps] == steps[:-1]

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=g)
    noise = list(torch.randn(len(steps) - 1, 4, 3, 8, 8, generator=g))
    denoise = _exact_denoiser(schedule)
    theirs = x.clone()
    for t, z in zip(steps[:-1], noise):
        model_output, _ = denoise(theirs, int(t))
        theirs = scheduler.step(model_output, int(t), theirs, variance_noise=z).prev_sample
    ours = []
    sample(name, denoise, x, steps, schedule, noise=noise, callback=lambda info: ours.append(info["x"]))
    # The callback's x after S - 1 steps is the sample at t = 0 (the final entry is the last x0).
    err = ((ours[-2] - theirs).norm() / theirs.norm()).item()
    assert err < 1e-5, err
    # Another sampler (DDIM) is clearly told apart by the same comparison.
    ddim = []
    sample("ddim", denoise, x, steps, schedule, callback=lambda info: ddim.append(info["x"]))
    assert ((ddim[-2] - theirs).norm() / theirs.norm()).item() > 1e-3


@pytest.mark.parametrize("name, solver_type", [("unipc", "bh2"), ("unipc_bh1", "bh1")])
@pytest.mark.parametrize("spec", ["10", "5", "logsnr10", "karras20", "3"])
def test_unipc_matches_diffusers(spec, name, solver_type):
    """The same trajectory as diffusers' UniPCMultistepScheduler (prediction type "sample", bh2 or
    bh1, second order, lower order at the final step) on the same betas and timesteps."""
    diffusers = needs("diffusers")
    schedule = Schedule.linear(0.02)
    steps = sorted(resolve_timesteps(spec), reverse=True)
    scheduler = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, trained_betas=schedule.betas.double().numpy(), prediction_type="sample",
        predict_x0=True, solver_order=2, solver_type=solver_type, lower_order_final=True, final_sigmas_type="sigma_min",
        thresholding=False,
    )
    # diffusers' UniPC takes no custom timesteps: set its schedule by hand, as set_timesteps would for
    # these steps (sigma = sqrt((1 - alpha) / alpha) at each, then the last one, where ours lands).
    scheduler.set_timesteps(len(steps) - 1)
    alphas = schedule.alphas_cumprod.double()
    sigmas = ((1 - alphas) / alphas).sqrt()
    scheduler.timesteps = torch.tensor(steps[:-1], dtype=torch.int64)
    scheduler.sigmas = torch.cat([sigmas[steps[:-1]], sigmas[steps[-1:]]]).float()

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=g)
    denoise = _exact_denoiser(schedule)
    theirs = x.clone()
    for t in steps[:-1]:
        model_output, _ = denoise(theirs, int(t))
        theirs = scheduler.step(model_output, int(t), theirs).prev_sample
    ours, dpm = [], []
    sample(name, denoise, x, steps, schedule, callback=lambda info: ours.append(info["x"]))
    assert ((ours[-2] - theirs).norm() / theirs.norm()).item() < 1e-5
    # DPM-Solver++(2M), a close relative, is told apart by the same comparison (but 3 steps: one
    # first-order step, one lower-order final: both are DDIM there).
    sample("dpmpp_2m", denoise, x, steps, schedule, callback=lambda info: dpm.append(info["x"]))
    assert ((dpm[-2] - theirs).norm() / theirs.norm()).item() > (1e-5 if spec == "3" else 1e-3)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_sde", "unipc", "unipc_bh1"])
def test_rows_are_independent_and_states_stack(name):
    """A batching engine stacks the states of images at different positions: stepping the stacked
    rows must give each image what stepping it alone gives."""
    sampler = SAMPLERS[name]
    schedule = Schedule.linear(0.02)
    alphas = schedule.alphas_cumprod
    steps = sorted(resolve_timesteps("logsnr8"), reverse=True)
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(2, 3, 8, 8, generator=g)
    noises = torch.randn(len(steps), 2, 3, 8, 8, generator=g)

    def run(x, state, k, noise):
        """Image at position k (0-based) of the steps: one step from steps[k] to steps[k+1]."""
        batch = x.shape[0]
        alpha, alpha_next = alphas[steps[k]].expand(batch), alphas[steps[k + 1]].expand(batch)
        last = torch.full((batch,), k == len(steps) - 2)
        return sampler.step(x, gaussian_x0(x, alpha).float(), None, alpha, alpha_next, state, noise, last)

    # Image 0 has taken three steps (it has history), image 1 none; image 0's next step is a
    # second-order one, image 1's a first-order one; and image 0 is at a different timestep.
    x0_img, s0 = xs[:1], sampler.init_state(xs[:1])
    for k in range(3):
        x0_img, s0 = run(x0_img, s0, k, noises[k, :1])
    x1_img, s1 = xs[1:], sampler.init_state(xs[1:])
    alone = [run(x0_img, s0, 3, noises[3, :1]), run(x1_img, s1, 0, noises[0, 1:])]

    stacked_state = {key: torch.cat([s0[key], s1[key]]) for key in s0}
    x = torch.cat([x0_img, x1_img])
    alpha = torch.stack([alphas[steps[3]], alphas[steps[0]]])
    alpha_next = torch.stack([alphas[steps[4]], alphas[steps[1]]])
    noise = torch.cat([noises[3, :1], noises[0, 1:]])
    x_next, state = sampler.step(
        x, gaussian_x0(x, alpha).float(), None, alpha, alpha_next, stacked_state, noise, torch.tensor([False, False])
    )
    for row, (want_x, want_state) in enumerate(alone):
        torch.testing.assert_close(x_next[row : row + 1], want_x, rtol=1e-6, atol=1e-6)
        for key in state:
            assert state[key].shape[0] == 2  # every state tensor has the batch dimension first
            torch.testing.assert_close(state[key][row : row + 1], want_state[key], rtol=1e-6, atol=1e-6)
    # Image 0's step really used its history: a fresh state gives another result.
    fresh, _ = run(x0_img, sampler.init_state(x0_img), 3, noises[3, :1])
    assert (fresh - alone[0][0]).abs().max() > 1e-3


def test_first_step_and_last_step_are_ddim():
    """No history (h_prev = 0) or the lower-order final step: the ODE update is exactly DDIM's."""
    schedule = Schedule.linear(0.02)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, 8, 8, generator=g)
    alpha, alpha_next = schedule.alphas_cumprod[[999, 500, 40]], schedule.alphas_cumprod[[800, 300, 0]]
    x0 = gaussian_x0(x, alpha).float()
    ddim, _ = SAMPLERS["ddim"].step(x, x0, None, alpha, alpha_next, {}, None, torch.tensor([False] * 3))
    dpm = SAMPLERS["dpmpp_2m"]
    first, _ = dpm.step(x, x0, None, alpha, alpha_next, dpm.init_state(x), None, torch.tensor([False] * 3))
    history = {"x0_prev": torch.randn(3, 3, 8, 8, generator=g), "h_prev": torch.tensor([0.3, 0.3, 0.3])}
    final, _ = dpm.step(x, x0, None, alpha, alpha_next, history, None, torch.tensor([True] * 3))
    second, _ = dpm.step(x, x0, None, alpha, alpha_next, history, None, torch.tensor([False] * 3))
    torch.testing.assert_close(first, ddim, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, ddim, rtol=1e-5, atol=1e-5)
    assert (second - ddim).abs().max() > 1e-2
    unipc = SAMPLERS["unipc"]
    first, _ = unipc.step(x, x0, None, alpha, alpha_next, unipc.init_state(x), None, torch.tensor([False] * 3))
    torch.testing.assert_close(first, ddim, rtol=1e-5, atol=1e-5)
