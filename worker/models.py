"""The models a worker process keeps loaded across jobs (on CUDA at each model's measured precision,
fp16 by default; on the CPU in fp32), and their compilation in the background."""

from __future__ import annotations

import logging

import torch

from patchdiff_core.errors import PatchdiffError
from patchdiff_core.generation.compiled import Compilation, use_compile_cache
from patchdiff_core.generation.pipeline import SamplingModel
from patchdiff_core.service.settings import Settings

log = logging.getLogger(__name__)


class ModelCache:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.models: dict[str, SamplingModel] = {}
        self.compilation: Compilation | None = None

    def load_all(self) -> None:
        for name in self.settings.served_models:
            self.get(name)

    def get(self, name: str) -> SamplingModel:
        if name not in self.models:
            if name not in self.settings.served_models:
                raise PatchdiffError(f"this worker does not serve model {name!r}")
            log.info("loading model %s", name)
            model = SamplingModel.load(name, weights_dir=self.settings.weights_dir, device=self.settings.device)
            if model.device.type == "cuda" and model.precision == "fp32" and not torch.backends.cuda.matmul.allow_tf32:
                # Served fp32 on CUDA means TF32 tensor cores (cuDNN's convolutions use them by default).
                log.info("%s is served in fp32: TF32 matmuls allowed", name)
                torch.backends.cuda.matmul.allow_tf32 = True
            self.models[name] = model
        return self.models[name]

    def start_compiling(self, max_rows: dict[str, int]) -> Compilation | None:
        """Compile the loaded models' row buckets in a background thread (`PATCHDIFF_ENGINE_COMPILE`;
        "auto": on CUDA only), keeping the compiled code in `PATCHDIFF_COMPILE_CACHE_DIR`. The models
        serve eagerly meanwhile, each bucket switching to compiled code as it is ready."""
        targets = []
        for name, model in self.models.items():
            model_targets = model.compile_targets(max_rows[name], self.settings.engine_compile)
            if model_targets:
                log.info("compiling %s in the background (%s, buckets %s)", name, self.settings.engine_compile,
                         model_targets[0].forward.sizes)
            targets += model_targets
        if not targets:
            return None
        use_compile_cache(self.settings.compile_cache_dir, targets[0].device)
        self.compilation = Compilation(targets).start(exit_guard=True)
        return self.compilation

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
