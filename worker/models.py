"""The models a worker process keeps loaded (on CUDA in fp16, or on the CPU in fp32) across jobs."""

from __future__ import annotations

import logging

from patchdiff_core.errors import PatchdiffError
from patchdiff_core.generation.pipeline import SamplingModel
from patchdiff_core.service.settings import Settings

log = logging.getLogger(__name__)


class ModelCache:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.models: dict[str, SamplingModel] = {}

    def load_all(self) -> None:
        for name in self.settings.served_models:
            self.get(name)

    def get(self, name: str) -> SamplingModel:
        if name not in self.models:
            if name not in self.settings.served_models:
                raise PatchdiffError(f"this worker does not serve model {name!r}")
            log.info("loading model %s", name)
            self.models[name] = SamplingModel.load(
                name, weights_dir=self.settings.weights_dir, device=self.settings.device
            )
        return self.models[name]

    def describe(self) -> dict[str, dict]:
        """What the API needs to validate requests and list models, as published to Redis."""
        return {
            name: {
                "name": name,
                "config": m.config.model_dump(),
                "classes": m.classes,
                "defaults": m.defaults.model_dump(),
                "sha256": m.sha256,
                "parameters": sum(p.numel() for net in m.networks for p in net.parameters()),
                "device": str(m.device),
                "precision": m.precision,
            }
            for name, m in self.models.items()
        }
