"""The new samplers and spacings where requests are checked: the API's `build_spec` (torch-free), the
settings' allowed list and the beta_max that the 'logsnrN' / 'karrasN' spacings follow."""

from __future__ import annotations

import pytest

from api.schemas import GenerateRequest
from api.service import build_spec
from patchdiff_core.diffusion.names import SAMPLER_NAMES
from patchdiff_core.diffusion.respacing import resolve_timesteps
from patchdiff_core.generation.spec import GenerationSpec, SpecError, check_spec
from patchdiff_core.service.settings import Settings

CONFIG = {"res": 32, "c": 64, "n_blocks": 2, "attn_resos": [4], "c_mult": [1, 2, 2], "num_classes": 10, "patch_size": 4}


def _served(beta_max: float = 0.02) -> dict:
    return {"digits": {"config": {**CONFIG, "beta_max": beta_max}, "defaults": {}}}


def test_new_samplers_are_named_everywhere():
    assert {"dpmpp_2m", "dpmpp_2m_sde", "unipc", "unipc_bh1"} <= set(SAMPLER_NAMES)
    assert {"dpmpp_2m", "dpmpp_2m_sde", "unipc", "unipc_bh1"} <= set(Settings().allowed_samplers)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde", "unipc", "unipc_bh1"])
@pytest.mark.parametrize("timesteps", ["logsnr10", "karras5", "10", "t:126,361,516,686,999"])
def test_api_accepts_few_step_requests(sampler, timesteps):
    req = GenerateRequest(model="digits", num_images=2, sampler=sampler, timesteps=timesteps, seed=1)
    spec, _cost = build_spec(req, Settings(), _served())
    assert (spec.sampler, spec.timesteps) == (sampler, timesteps)


@pytest.mark.parametrize("timesteps", ["logsnr1", "karras1001", "logsnrx", "karras", "t:5", "t:5,5", "t:0,1000", "t:x"])
def test_api_rejects_bad_few_step_specs(timesteps):
    req = GenerateRequest(model="digits", num_images=1, sampler="dpmpp_2m", timesteps=timesteps, seed=1)
    with pytest.raises(SpecError) as info:
        build_spec(req, Settings(), _served())
    assert info.value.field == "timesteps"


def test_settings_can_disallow_a_sampler():
    req = GenerateRequest(model="digits", num_images=1, sampler="dpmpp_2m_sde", seed=1)
    with pytest.raises(SpecError) as info:
        build_spec(req, Settings(allowed_samplers="ancestral,dpmpp_2m"), _served())
    assert info.value.field == "sampler"


def test_check_spec_uses_the_models_beta_max():
    spec = GenerationSpec(model="ffhq", num_images=1, timesteps="logsnr10", sampler="dpmpp_2m", seed=0)
    assert check_spec(spec, 1, beta_max=0.025) == resolve_timesteps("logsnr10", 0.025)
    assert check_spec(spec, 1, beta_max=0.025) != check_spec(spec, 1)
    with pytest.raises(SpecError):
        check_spec(spec.model_copy(update={"timesteps": "logsnr20"}), 1, max_timesteps=10)
