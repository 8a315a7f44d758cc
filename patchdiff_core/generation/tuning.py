"""Tune a model's few-step schedule: `patchdiff tune-timesteps` (see `diffusion.timestep_search`).

The error of a schedule is the mean squared difference (pixels in [-1, 1], clipped as the saved
images are) between what the sampler makes with it and the probability-flow ODE solved to
convergence (`dpmpp_2m` with `reference_steps` steps) from the same start noise and labels. On the
demo model this error ranks the spacings as the Fréchet distance does (README, "Few-step sampling").
The tuning images are seeded apart from anything a benchmark measures with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from patchdiff_core.diffusion.respacing import format_explicit, resolve_timesteps
from patchdiff_core.diffusion.samplers import SAMPLERS, sample
from patchdiff_core.diffusion.timestep_search import SearchResult, search_timesteps
from patchdiff_core.generation.pipeline import ImageNoise, SamplingModel

REFERENCE_SAMPLER = "dpmpp_2m"
# dpmpp_2m 100 is within 2e-6 (mean squared, [-1, 1] pixels) of dpmpp_2m 200 on the demo model,
# and a 5-step schedule's error is ~1e-3: 200 steps make the reference's own error negligible.
REFERENCE_STEPS = 200
TUNING_SEED = 20_241_127


@dataclass
class Tuning:
    sampler: str
    guidance: float
    num_images: int
    seed: int
    search: SearchResult

    @property
    def spec(self) -> str:
        """The tuned schedule as a `timesteps` spec ('t:...')."""
        return format_explicit(self.search.timesteps)


class ScheduleError:
    """The error of a schedule for `sampler` on fixed images: callable with a list of timesteps."""

    def __init__(
        self, model: SamplingModel, sampler: str, num_images: int, seed: int = TUNING_SEED, guidance: float = 1.0,
        batch_size: int = 64, reference_steps: int = REFERENCE_STEPS,
    ):
        if sampler not in SAMPLERS or SAMPLERS[sampler].needs_noise:
            raise ValueError(f"timesteps can be tuned for a deterministic sampler, not {sampler!r}")
        self.model, self.sampler = model, sampler
        classes, res = model.config.num_classes, model.config.res
        batches = [range(s, min(s + batch_size, num_images)) for s in range(0, num_images, batch_size)]
        # Per batch, built once (the search evaluates hundreds of schedules): its denoiser (labels
        # cycling through the classes) and its start noise, image i's own as in `generate`.
        self.denoisers = [
            model.denoiser(
                None if classes <= 1 else torch.tensor([i % classes for i in b], dtype=torch.long, device=model.device),
                guidance,
            )
            for b in batches
        ]
        self.starts = [ImageNoise(seed, b, (3, res, res), model.device)() for b in batches]
        self.reference = self._run(REFERENCE_SAMPLER, resolve_timesteps(str(reference_steps), model.config.beta_max))

    def _run(self, sampler: str, timesteps: list[int]) -> list[torch.Tensor]:
        # Deterministic samplers draw no noise after the start, so `sample` gets none.
        return [
            sample(sampler, denoise, x_t, timesteps, self.model.schedule).clamp(-1.0, 1.0)
            for denoise, x_t in zip(self.denoisers, self.starts)
        ]

    def __call__(self, timesteps: list[int]) -> float:
        total = sum(float(((x - ref) ** 2).sum()) for x, ref in zip(self._run(self.sampler, timesteps), self.reference))
        return total / sum(ref.numel() for ref in self.reference)


def tune_timesteps(
    model: SamplingModel, sampler: str, starts: Sequence[str], num_images: int = 160, seed: int = TUNING_SEED,
    guidance: float = 1.0, batch_size: int = 64, on_improve: Callable[[list[int], float], None] | None = None,
) -> list[Tuning]:
    """Search from each start spec (e.g. '5' or 'karras5'; all with the same number of steps) on the
    same tuning images, the highest step fixed; one result per start, in order."""
    schedules = []
    for start in starts:
        try:
            schedules.append(resolve_timesteps(start, model.config.beta_max))
        except ValueError as exc:
            raise ValueError(f"start {start!r}: {exc}") from None
    if len({len(s) for s in schedules}) > 1:
        raise ValueError(f"the start schedules have different numbers of steps: {[len(s) for s in schedules]}")
    error = ScheduleError(model, sampler, num_images, seed, guidance, batch_size)  # the reference, once
    return [
        Tuning(sampler, guidance, num_images, seed, search_timesteps(error, steps, on_improve=on_improve))
        for steps in schedules
    ]
