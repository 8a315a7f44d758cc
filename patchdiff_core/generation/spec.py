"""What to generate: the one request shape shared by `patchdiff sample`, the API and the worker.

Torch-free. Image i of a request seeded s depends only on (s, i) and the settings, never on how
the request was batched (`image_seed`, `random_labels`).
"""

from __future__ import annotations

import secrets

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from patchdiff_core.diffusion.names import SamplerName
from patchdiff_core.diffusion.respacing import DEFAULT_BETA_MAX, resolve_timesteps


class GenerationSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    num_images: int = Field(ge=1)
    # None: random labels drawn from the seed (class-conditional models); otherwise one per image.
    class_labels: list[int] | None = None
    timesteps: str = "250"
    sampler: SamplerName = "ancestral"
    guidance: float = 1.0
    seed: int = Field(ge=0, lt=2**63)


def new_seed() -> int:
    return secrets.randbelow(2**31)


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index`'s own noise generator."""
    return int(np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1, np.uint64)[0])


def random_labels(seed: int, num_images: int, num_classes: int) -> list[int]:
    """Per-image random labels from the request seed (also independent of batching)."""
    return [
        int(np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i, 1))).integers(num_classes))
        for i in range(num_images)
    ]


def resolve_labels(spec: GenerationSpec, num_classes: int) -> list[int] | None:
    """The label of every image, or None for an unconditional model."""
    if num_classes <= 1:
        if spec.class_labels:
            raise ValueError("class labels given for an unconditional model")
        return None
    if spec.class_labels is None:
        return random_labels(spec.seed, spec.num_images, num_classes)
    if len(spec.class_labels) != spec.num_images:
        raise ValueError(f"{len(spec.class_labels)} class labels for {spec.num_images} images")
    for label in spec.class_labels:
        if not 0 <= label < num_classes:
            raise ValueError(f"class label {label} out of range 0..{num_classes - 1}")
    return list(spec.class_labels)


class SpecError(ValueError):
    """A request that does not fit its model; `field` names the offending request field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def check_spec(
    spec: GenerationSpec, num_classes: int, max_timesteps: int = 1000, beta_max: float = DEFAULT_BETA_MAX
) -> list[int]:
    """Check a request against its model; return the taken timesteps. Raises `SpecError`.

    `beta_max` is the model's schedule (`ModelConfig.beta_max`), which the 'logsnrN' and 'karrasN'
    spacings depend on.
    """
    try:
        steps = resolve_timesteps(spec.timesteps, beta_max)
    except ValueError as exc:
        raise SpecError("timesteps", str(exc)) from None
    if len(steps) > max_timesteps:
        raise SpecError("timesteps", f"{len(steps)} steps exceed the limit of {max_timesteps}")
    if spec.guidance != 1.0 and num_classes <= 1:
        raise SpecError("guidance", f"guidance {spec.guidance} needs a class-conditional model; {spec.model} is unconditional")
    if spec.guidance < 1.0:
        raise SpecError("guidance", "guidance must be at least 1.0 (1.0 = no guidance)")
    try:
        resolve_labels(spec, num_classes)
    except ValueError as exc:
        raise SpecError("class_labels", str(exc)) from None
    return steps
