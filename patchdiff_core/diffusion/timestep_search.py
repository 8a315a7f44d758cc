"""Search the taken timesteps of a few-step sampler: the schedule that brings its result closest to
the converged ODE solution from the same noise.

At 5 network evaluations the choice of steps matters as much as the solver (on the demo model the
error of `unipc_bh1` 5 falls 2.6× between evenly spread and searched steps), and the best
steps depend on the model, so they are searched per model (as "Learning to Discretize Denoising
Diffusion ODEs", Tong et al. 2024, and "Align Your Steps", Sabour et al. 2024, do with other
objectives). The objective is any function of a schedule; `patchdiff_core.generation.tuning`
supplies the one used: the mean squared error against a many-step ODE solution.

The search is a pattern search on integers (compass search, Kolda et al. 2003): try moving each free
step, and each run of neighbouring free steps together, by ±delta; keep any move that lowers the
error; halve delta when none does. The runs matter: the error's valleys run diagonally (steps that
want to move together, keeping their gaps), where moving one step at a time climbs a wall and stops.
Written here rather than taken from scipy because its optimisers work on continuous parameters, and
timesteps are integers: rounding inside Nelder-Mead gives flat plateaus on which it stops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from patchdiff_core.diffusion.respacing import NUM_TIMESTEPS

DEFAULT_DELTAS = (128, 64, 32, 16, 8, 4, 2, 1)


@dataclass
class SearchResult:
    timesteps: list[int]  # ascending
    error: float
    start: list[int]
    start_error: float
    evaluations: int  # distinct schedules whose error was computed
    history: list[tuple[int, list[int], float]] = field(default_factory=list)  # (delta, best, error) per delta


def valid_schedule(steps: Sequence[int]) -> bool:
    return all(a < b for a, b in zip(steps, steps[1:])) and steps[0] >= 0 and steps[-1] < NUM_TIMESTEPS


def search_timesteps(
    error: Callable[[list[int]], float],
    start: Sequence[int],
    deltas: Sequence[int] = DEFAULT_DELTAS,
    fix_top: bool = True,
    max_evaluations: int = 1000,
    on_improve: Callable[[list[int], float], None] | None = None,
) -> SearchResult:
    """Minimise `error(steps)` over ascending integer schedules of `len(start)` steps in 0..999.

    `start` (ascending, distinct) is the first schedule. With `fix_top` the highest step stays where
    it is (the start noise is drawn for it: moving it down would start from noise that the model
    sees as too noisy). Every schedule is evaluated at most once; the search stops after
    `max_evaluations` of them.
    """
    current = sorted(int(t) for t in start)
    if len(current) < 2 or not valid_schedule(current):
        raise ValueError(f"the start schedule must be at least 2 distinct steps in 0..{NUM_TIMESTEPS - 1}, got {list(start)}")
    cache: dict[tuple[int, ...], float] = {}

    def cost(steps: list[int]) -> float:
        key = tuple(steps)
        if key not in cache:
            cache[key] = float(error(list(steps)))
        return cache[key]

    best = start_error = cost(current)
    history = []
    n_free = len(current) - 1 if fix_top else len(current)
    # Single steps first, then runs of 2, 3, ... neighbouring steps, each moved as one.
    runs = [range(i, i + length) for length in range(1, n_free + 1) for i in range(n_free - length + 1)]
    for delta in deltas:
        improved = True
        while improved and len(cache) < max_evaluations:
            improved = False
            for run in runs:
                for move in (-delta, delta):
                    candidate = list(current)
                    for i in run:
                        candidate[i] += move
                    if not valid_schedule(candidate) or len(cache) >= max_evaluations:
                        continue
                    value = cost(candidate)
                    if value < best:
                        best, current, improved = value, candidate, True
                        if on_improve is not None:
                            on_improve(current, best)
        history.append((delta, list(current), best))
    return SearchResult(current, best, sorted(int(t) for t in start), start_error, len(cache), history)
