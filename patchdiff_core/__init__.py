"""patchdiff: Patch Diffusion (Luhman & Luhman, 2022) in PyTorch.

Torch-free modules (config, respacing, registry, settings, spec, store) import without torch so the
API can use them; the names below that need torch are imported on first use.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "model.config",
    "PatchedUNet": "model.unet",
    "load_model": "model.checkpoint",
    "save_model": "model.checkpoint",
    "Schedule": "diffusion.schedule",
    "make_denoiser": "diffusion.samplers",
    "split_denoiser": "diffusion.samplers",
    "sample_ancestral": "diffusion.samplers",
    "sample_ddim": "diffusion.samplers",
    "sample_dpmpp_2m": "diffusion.samplers",
    "space_timesteps": "diffusion.respacing",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
