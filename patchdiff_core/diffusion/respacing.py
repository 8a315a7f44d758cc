"""ADM's timestep respacing, the seed's "modified stride" and the parsing of a `--timesteps` spec.

Torch-free: the API validates a request's `timesteps` with the same function the sampler uses.
"""

from __future__ import annotations

NUM_TIMESTEPS = 1000
# The seed's `--modified_stride` (ADM's LSUN spacing): 250 steps, denser near t = 0.
MODIFIED_STRIDE = "90,60,60,20,20"


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int]) -> list[int]:
    """Return the taken timesteps, ascending, as ADM's `space_timesteps` chooses them.

    `section_counts` is an int or "N" (N evenly spread steps), "ddimN" (an integer stride that gives
    exactly N steps), or a list / comma-separated string of per-section counts.
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            desired = _parse_count(spec[len("ddim"):], spec)
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = [_parse_count(part, spec) for part in spec.split(",")]
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
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"invalid timestep spec {spec!r}: expected 'N', 'ddimN' or 'N1,N2,...'") from None


def resolve_timesteps(spec: str | int) -> list[int]:
    """The taken steps for a user-facing spec (at least 2)."""
    steps = space_timesteps(NUM_TIMESTEPS, spec)
    if len(steps) < 2:
        raise ValueError("sampling needs at least 2 timesteps")
    return steps
