"""The sampler names: the one list that the CLI, the API schema, the settings and the samplers share.

Torch-free (the API validates requests with it). `patchdiff_core.diffusion.samplers.SAMPLERS` has
exactly these keys (a test checks it).
"""

from __future__ import annotations

from typing import Literal, get_args

SamplerName = Literal["ancestral", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "unipc_bh1"]
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)
# The samplers that draw fresh noise at every step (`Sampler.needs_noise`); the others solve the ODE,
# so their result is a function of the start noise alone (what `patchdiff tune-timesteps` needs).
NOISY_SAMPLERS: tuple[str, ...] = ("ancestral", "dpmpp_2m_sde")
