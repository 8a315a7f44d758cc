"""Load a model for sampling and turn a `GenerationSpec` into images: what the CLI and the worker share.

Both call `generate`, so a grid from the service is byte-identical to the grid `patchdiff sample`
writes for the same model, seed and settings.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from patchdiff_core.diffusion.samplers import Denoise, make_denoiser, network_forward, sample, split_denoiser
from patchdiff_core.diffusion.schedule import Schedule
from patchdiff_core.errors import CheckpointError, PatchdiffError
from patchdiff_core.generation.images import to_uint8
from patchdiff_core.generation.registry import ModelEntry, SamplingDefaults, get_model
from patchdiff_core.generation.spec import GenerationSpec, check_spec, image_seed, resolve_labels
from patchdiff_core.model.checkpoint import file_sha256, load_model, read_metadata
from patchdiff_core.model.config import ModelConfig
from patchdiff_core.model.device import PRECISIONS, resolve_device, resolve_precision
from patchdiff_core.model.unet import PatchedUNet

if TYPE_CHECKING:  # compiled.py imports torch.compile machinery only when a model is compiled
    from patchdiff_core.generation.compiled import Compilation, CompilePlan, CompileTarget


def image_noise(seed: int, index: int, shape: tuple[int, ...], device: torch.device) -> Callable[[], torch.Tensor]:
    """The noise source of image `index` of a request seeded `seed`: its own generator, seeded by
    (seed, index), so that the picture does not depend on which images share its batch."""
    generator = torch.Generator(device=device).manual_seed(image_seed(seed, index))
    return lambda: torch.randn(shape, generator=generator, device=device)


class ImageNoise:
    """The noise of a batch of images: one draw of each image's own source, stacked."""

    def __init__(self, seed: int, indices: range, shape: tuple[int, ...], device: torch.device):
        self.sources = [image_noise(seed, i, shape, device) for i in indices]

    def __call__(self) -> torch.Tensor:
        return torch.stack([draw() for draw in self.sources])


@dataclass
class Generation:
    images: np.ndarray  # [N, R, R, 3] uint8
    labels: list[int] | None
    timesteps: list[int]


@dataclass
class SamplingModel:
    """A model ready to sample: one network, or a low-/high-noise pair with its switch timestep."""

    name: str
    config: ModelConfig
    networks: list[PatchedUNet]
    schedule: Schedule
    device: torch.device
    precision: str
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    classes: list[str] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    switch_t: int | None = None

    @classmethod
    def load(
        cls,
        name: str | None = None,
        weights: list[Path] | None = None,
        weights_dir: Path | None = None,
        device: str = "auto",
        precision: str = "auto",
    ) -> "SamplingModel":
        """By registry name (files from `weights_dir`), by explicit files, or both (files win)."""
        entry = None
        if name is not None:
            try:
                entry = get_model(name, weights_dir or Path("weights"))
            except KeyError as exc:
                raise PatchdiffError(exc.args[0]) from None
        if weights:
            paths = [Path(w) for w in weights]
        elif entry is not None:
            paths = entry.paths(weights_dir or Path("weights"))
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise PatchdiffError(
                    f"weights for {name!r} are not installed (missing {missing[0]}); convert the authors' "
                    f"ema_weights.h5 with `patchdiff convert` or pass --weights"
                )
        else:
            raise PatchdiffError("give a model name or a weights file")
        for p in paths:
            if not p.is_file():
                raise PatchdiffError(f"{p}: no such weights file")
        if entry is not None and len(paths) != len(entry.files):
            raise PatchdiffError(f"{name} needs {len(entry.files)} weight files, got {len(paths)}")

        dev = resolve_device(device)
        prec = resolve_precision(precision, dev)  # a bad precision fails before the weights are read
        # Raw Keras files carry no config: they take the registry's.
        networks = [load_model(p, entry.config if entry and p.suffix == ".h5" else None, dev) for p in paths]
        config = networks[0].config
        if any(n.config != config for n in networks[1:]):
            raise CheckpointError("the two networks of a split pair have different configs")
        if dev.type == "cuda":
            networks = [n.to(memory_format=torch.channels_last) for n in networks]
        if entry is None:
            entry = _entry_from_file(paths[0], config)
        if precision == "auto":  # on CUDA: the precision measured best for this model (its registry entry), else fp16
            prec = resolve_precision(precision, dev, cuda_default=entry.cuda_precision or "fp16")
        digests = [file_sha256(p) for p in paths]
        if entry.sha256 and not weights and digests != entry.sha256:
            raise CheckpointError(
                f"{paths[0]}: sha256 {digests[0][:12]}... differs from the manifest's {entry.sha256[0][:12]}... "
                "(a changed or corrupted weights file)"
            )
        schedule = Schedule.linear(config.beta_max)
        switch_t = schedule.timestep_for_snr(entry.split_snr) if len(networks) == 2 else None
        return cls(
            name=entry.name,
            config=config,
            networks=networks,
            schedule=schedule,
            device=dev,
            precision=prec,
            defaults=entry.defaults,
            classes=entry.class_names(),
            sha256=digests,
            switch_t=switch_t,
        )

    @cached_property
    def forwards(self) -> list:
        """`forward(x, t, y)` of each network at this model's precision (what the batching engine calls)."""
        dtype, channels_last = PRECISIONS[self.precision], self.device.type == "cuda"
        return [network_forward(n, dtype, channels_last) for n in self.networks]

    def compile_targets(self, max_rows: int, setting: str = "auto",
                        plan: CompilePlan | None = None) -> list[CompileTarget]:
        """Serve `forwards` through torch.compile (`generation/compiled.py`): they run eagerly until a
        `Compilation` of the returned targets has compiled their row buckets, then compiled. `plan`
        (default: `compile_plan` for the setting, rows and device) says what to compile; no targets
        when it is None ("off", or "auto" on the CPU)."""
        from patchdiff_core.generation.compiled import CompiledForward, CompileTarget, compile_plan

        plan = plan or compile_plan(self.config, self.device, max_rows, setting)
        if plan is None:
            return []
        dtype, channels_last = PRECISIONS[self.precision], self.device.type == "cuda"
        forwards = [CompiledForward(net, dtype, channels_last, plan) for net in self.networks]
        self.forwards = forwards  # replaces the cached eager ones
        return [CompileTarget(self.name if len(forwards) == 1 else f"{self.name}[{i}]", forward, self.device,
                              self.config.res, self.config.conditional) for i, forward in enumerate(forwards)]

    def compile(self, max_rows: int, setting: str = "auto", background: bool = False,
                plan: CompilePlan | None = None) -> Compilation | None:
        """`compile_targets`, compiled now or (`background`) in a thread while the model serves eagerly."""
        from patchdiff_core.generation.compiled import Compilation

        targets = self.compile_targets(max_rows, setting, plan)
        if not targets:
            return None
        compilation = Compilation(targets)
        if background:
            return compilation.start()
        compilation.run()
        return compilation

    def network_for(self, t: int) -> int:
        """Which network samples timestep t: the high-noise one (index 1) from `switch_t` up."""
        return 1 if self.switch_t is not None and t >= self.switch_t else 0

    def denoiser(self, labels: torch.Tensor | None, guidance: float) -> Denoise:
        channels_last = self.device.type == "cuda"
        dtype = PRECISIONS[self.precision]
        denoisers = [make_denoiser(n, labels, guidance, dtype, channels_last) for n in self.networks]
        if len(denoisers) == 1:
            return denoisers[0]
        return split_denoiser(denoisers[0], denoisers[1], self.switch_t)


def _entry_from_file(path: Path, config: ModelConfig) -> ModelEntry:
    """Registry-like facts of a model known only by its file (name, classes, defaults in metadata)."""
    meta = read_metadata(path) if path.suffix != ".h5" else {}
    extra = {k: json.loads(meta[k]) for k in ("classes", "defaults") if k in meta}
    return ModelEntry.model_validate(
        {
            "name": meta.get("model") or path.stem,
            "description": f"model file {path.name}",
            "config": config,
            "files": [path.name],
            "split_snr": float(meta.get("split_snr", 0.25)),
            **extra,
        }
    )


ProgressCallback = Callable[[dict], None]


def generate(
    model: SamplingModel,
    spec: GenerationSpec,
    batch_size: int = 16,
    callback: ProgressCallback | None = None,
) -> Generation:
    """Sample `spec.num_images` images in batches; `callback` sees every step of every batch.

    The callback's dict has `step`/`total` counted over the whole request, plus the sampler's
    `t`, `x` and `x0` of the current batch and `start` (the index of its first image).
    """
    timesteps = check_spec(spec, model.config.num_classes, beta_max=model.config.beta_max)
    labels = resolve_labels(spec, model.config.num_classes)
    res = model.config.res
    starts = list(range(0, spec.num_images, batch_size))
    total = len(starts) * len(timesteps)
    images = []
    for b, start in enumerate(starts):
        indices = range(start, min(start + batch_size, spec.num_images))
        noise = ImageNoise(spec.seed, indices, (3, res, res), model.device)
        y = None
        if labels is not None:
            y = torch.tensor(labels[indices.start : indices.stop], dtype=torch.long, device=model.device)
        report = None
        if callback is not None:
            done = b * len(timesteps)

            def report(info: dict, done: int = done, start: int = start) -> None:
                callback({**info, "step": done + info["step"], "total": total, "start": start})

        x0 = sample(
            spec.sampler, model.denoiser(y, spec.guidance), noise(), timesteps, model.schedule, noise=noise, callback=report
        )
        images.append(to_uint8(x0))
    return Generation(np.concatenate(images), labels, timesteps)
