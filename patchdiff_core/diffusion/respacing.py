"""ADM's timestep respacing, the seed's "modified stride", few-step spacings and the parsing of a
`--timesteps` spec.

Torch-free: the API validates a request's `timesteps` with the same function the sampler uses.

Spec forms: 'N' (N evenly spread steps), 'ddimN' (integer stride), 'N1,N2,...' (ADM sections), and
for few-step solvers 'logsnrN' (uniform in log-SNR, DPM-Solver's spacing), 'karrasN' (Karras et
al.'s rho = 7 spacing of the noise level sigma = sqrt((1 - alpha) / alpha)) and 't:T1,T2,...' (the
taken timesteps themselves, as diffusers' `timesteps=` argument: for a schedule searched per model,
see `timestep_search`). 'logsnrN' and 'karrasN' depend on the noise schedule, so they take the
model's `beta_max` (0.02 for most models, 0.025 for ffhq); they run from t = 0 to t = 999, like the
ADM forms.

Every count and step is ASCII digits: no sign, underscore, inner space or other script's digits,
in every form (spaces around the whole spec are ignored); the CLI, the API and the worker share this
one parser.
"""

from __future__ import annotations

import re

import numpy as np

NUM_TIMESTEPS = 1000
SPEC_FORMS = "'N', 'ddimN', 'logsnrN', 'karrasN', 'N1,N2,...' (ADM sections) or 't:T1,T2,...' (the taken steps)"
EXPLICIT_PREFIX = "t:"
DEFAULT_BETA_MAX = 0.02
KARRAS_RHO = 7.0
# The seed's `--modified_stride` (ADM's LSUN spacing): 250 steps, denser near t = 0.
MODIFIED_STRIDE = "90,60,60,20,20"
# A count or a step is ASCII digits and nothing else. Python's int() also takes a sign, underscores,
# surrounding whitespace and every Unicode decimal digit ('٥', '५', '５'), none of which a spec
# documents (and `\d` matches those digits too, unless re.ASCII), so the class is spelled out.
_DIGITS = re.compile(r"[0-9]+")
_LIST = re.compile(r"[0-9]+(?:,[0-9]+)*")
_OUTER_SPACE = " \t\r\n"  # ASCII only: str.strip() would also take Unicode spaces


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int]) -> list[int]:
    """Return the taken timesteps, ascending, as ADM's `space_timesteps` chooses them.

    `section_counts` is an int or "N" (N evenly spread steps), "ddimN" (an integer stride that gives
    exactly N steps), or a list / comma-separated string of per-section counts.
    """
    if isinstance(section_counts, bool):  # an int to Python; ValueError as for every bad spec (a 422)
        raise ValueError(f"invalid timestep spec {section_counts!r}: expected {SPEC_FORMS}")
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        spec = section_counts.strip(_OUTER_SPACE)
        if spec.startswith("ddim"):
            desired = _parse_count(spec[len("ddim"):], spec)
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = _parse_list(spec, spec)
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1:
            raise ValueError(f"section {i} asks for {count} steps; each section needs at least 1")
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # As the original: accumulate the float stride and round each partial sum. Rounding
        # `frac_stride * k` instead picks other steps for 278 of the counts 2..1000 (e.g. 21, 23, 31).
        cur_idx = 0.0
        for _ in range(count):
            steps.append(start + round(cur_idx))
            cur_idx += frac_stride
        start += size
    return sorted(set(steps))


def _parse_count(text: str, spec: str) -> int:
    if not _DIGITS.fullmatch(text):
        raise ValueError(f"invalid timestep spec {spec!r}: expected {SPEC_FORMS}, "
                         "with counts in ASCII digits (no sign, space or underscore)")
    return int(text)


def _parse_list(text: str, spec: str, example: str = "'90,60,60,20,20'") -> list[int]:
    """Comma-separated ASCII integers, nothing else (no spaces, signs or underscores)."""
    if not _LIST.fullmatch(text):
        raise ValueError(f"invalid timestep spec {spec!r}: expected {SPEC_FORMS}; a list is comma-separated "
                         f"integers in ASCII digits with no spaces, signs or underscores, e.g. {example}")
    return [int(part) for part in text.split(",")]


def log_snr_table(beta_max: float = DEFAULT_BETA_MAX, num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
    """log(alpha / (1 - alpha)) of every timestep of the linear schedule (float64; decreasing in t)."""
    alphas_cumprod = np.cumprod(1.0 - np.linspace(1e-4, beta_max, num_timesteps, dtype=np.float64))
    return np.log(alphas_cumprod) - np.log1p(-alphas_cumprod)


def _nearest_distinct(table: np.ndarray, targets: np.ndarray) -> list[int]:
    """For each target (ascending in t), the timestep whose `table` value (decreasing in t) is
    nearest; where two targets fall on one timestep (dense targets near t = 0), later ones move up
    to the next free timestep, so that exactly len(targets) distinct steps come back."""
    n = len(table)
    picks = [int(np.argmin(np.abs(table - v))) for v in targets]
    for i in range(1, len(picks)):
        picks[i] = max(picks[i], picks[i - 1] + 1)
    picks[-1] = min(picks[-1], n - 1)
    for i in range(len(picks) - 2, -1, -1):  # and back down from the top, if the bumps overran it
        picks[i] = min(picks[i], picks[i + 1] - 1)
    return picks


def few_step_timesteps(kind: str, count: int, beta_max: float = DEFAULT_BETA_MAX) -> list[int]:
    """`count` distinct timesteps from 0 to 999, uniform in log-SNR ('logsnr') or Karras ('karras')."""
    if not 2 <= count <= NUM_TIMESTEPS:
        raise ValueError(f"{kind}{count}: the count must be between 2 and {NUM_TIMESTEPS}")
    table = log_snr_table(beta_max)
    lo, hi = table[-1], table[0]  # log-SNR at t = 999 and at t = 0
    if kind == "logsnr":
        targets = np.linspace(hi, lo, count)
    elif kind == "karras":
        # sigma = exp(-log_snr / 2); interpolate sigma^(1/rho) from sigma_min (t = 0) to sigma_max.
        inv = 1.0 / KARRAS_RHO
        s_min, s_max = np.exp(-hi / 2), np.exp(-lo / 2)
        sigmas = (s_min**inv + np.linspace(0.0, 1.0, count) * (s_max**inv - s_min**inv)) ** KARRAS_RHO
        targets = -2.0 * np.log(sigmas)
        targets[0], targets[-1] = hi, lo  # exact ends, whatever the rounding
    else:
        raise ValueError(f"unknown spacing {kind!r}")
    return _nearest_distinct(table, targets)


FEW_STEP_SPACINGS = ("logsnr", "karras")


def explicit_timesteps(spec: str) -> list[int]:
    """'t:T1,T2,...' -> the taken steps, ascending: distinct, each in 0..999, given in any order
    (`resolve_timesteps` checks that there are at least 2, as for every form)."""
    steps = _parse_list(spec.strip(_OUTER_SPACE)[len(EXPLICIT_PREFIX):], spec, example="'t:0,300,999'")
    if len(set(steps)) != len(steps):
        raise ValueError(f"timestep spec {spec!r} repeats a step")
    if min(steps) < 0 or max(steps) >= NUM_TIMESTEPS:
        raise ValueError(f"timestep spec {spec!r}: every step must be in 0..{NUM_TIMESTEPS - 1}")
    return sorted(steps)


def format_explicit(steps: list[int]) -> str:
    """The 't:...' spec of the given taken steps (ascending), which `resolve_timesteps` reads back."""
    return EXPLICIT_PREFIX + ",".join(str(t) for t in sorted(steps))


def resolve_timesteps(spec: str | int, beta_max: float = DEFAULT_BETA_MAX) -> list[int]:
    """The taken steps for a user-facing spec: distinct integers in 0..999, ascending, at least 2.

    `beta_max` (the model's schedule) matters only for the 'logsnrN' and 'karrasN' forms.
    """
    text = spec.strip(_OUTER_SPACE) if isinstance(spec, str) else spec
    kind = next((k for k in FEW_STEP_SPACINGS if isinstance(text, str) and text.startswith(k)), None)
    if isinstance(text, str) and text.startswith(EXPLICIT_PREFIX):
        steps = explicit_timesteps(text)
    elif kind is not None:
        steps = few_step_timesteps(kind, _parse_count(text[len(kind):], text), beta_max)
    else:
        steps = space_timesteps(NUM_TIMESTEPS, spec)
    if len(steps) < 2:
        raise ValueError("sampling needs at least 2 timesteps")
    if len(set(steps)) != len(steps) or steps != sorted(steps) or steps[0] < 0 or steps[-1] >= NUM_TIMESTEPS:
        raise ValueError(f"timestep spec {spec!r} gives invalid steps")  # cannot happen: a guard, not a path
    return steps
