"""Training: the paper's hybrid loss, Adam with linear warm-up, EMA, classifier-free label dropout.

A run lives in one directory: `checkpoint.safetensors` (model, EMA, optimiser state, RNG state),
`checkpoint.json` (step and the run's settings) and `loss_log.jsonl`. Resuming restores all of
it, so an interrupted run continues with the same losses as one that never stopped (on CPU).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from patchdiff_core.diffusion.losses import hybrid_loss
from patchdiff_core.diffusion.schedule import Schedule
from patchdiff_core.generation.registry import SamplingDefaults
from patchdiff_core.model.checkpoint import save_model
from patchdiff_core.model.device import PRECISIONS, resolve_precision
from patchdiff_core.model.unet import PatchedUNet
from patchdiff_core.training.config import TrainConfig

CHECKPOINT = "checkpoint.safetensors"
STATE = "checkpoint.json"
LOSS_LOG = "loss_log.jsonl"


def timestep_range(schedule: Schedule, min_snr: float | None, max_snr: float | None) -> tuple[int, int]:
    """Inclusive [lo, hi] of timesteps with min_snr <= SNR < max_snr (SNR falls as t grows)."""
    snr = schedule.snr()
    allowed = torch.ones_like(snr, dtype=torch.bool)
    if min_snr is not None:
        allowed &= snr >= min_snr
    if max_snr is not None:
        allowed &= snr < max_snr
    ts = allowed.nonzero().flatten()
    if len(ts) == 0:
        raise ValueError(f"no timestep has an SNR in [{min_snr}, {max_snr})")
    return int(ts[0]), int(ts[-1])


def drop_labels(labels: torch.Tensor, p: float, null_label: int, generator: torch.Generator) -> torch.Tensor:
    """Replace a fraction p of labels by the "no label" index (classifier-free guidance training)."""
    drop = torch.rand(labels.shape, generator=generator) < p
    return torch.where(drop, torch.full_like(labels, null_label), labels)


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        images: torch.Tensor,
        labels: torch.Tensor,
        run_dir: str | Path,
        device: str | torch.device = "cpu",
    ):
        self.config = config
        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        self.images, self.labels = images, labels
        self.generator = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)  # parameter initialisation
        self.model = PatchedUNet(config.model).to(self.device).train()
        self.ema = PatchedUNet(config.model).to(self.device).eval().requires_grad_(False)
        self.ema.load_state_dict(self.model.state_dict())
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, betas=config.adam_betas)
        self.schedule = Schedule.linear(config.model.beta_max)
        self.t_range = timestep_range(self.schedule, config.min_snr, config.max_snr)
        self.step = 0
        # bf16 for training on CUDA: fp16's range needs loss scaling, bf16's does not.
        self.autocast_dtype = PRECISIONS[resolve_precision(config.precision, self.device, cuda_default="bf16")]

    # -- one optimisation step ------------------------------------------------------------
    def batch(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        cfg, g = self.config, self.generator
        idx = torch.randint(len(self.images), (cfg.batch_size,), generator=g)
        x0 = self.images[idx]
        y = None
        if cfg.model.conditional:
            y = drop_labels(self.labels[idx], cfg.label_dropout, cfg.model.num_classes, g)
        lo, hi = self.t_range
        t = torch.randint(lo, hi + 1, (cfg.batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        return x0, y, t, eps

    def loss(self, x0, y, t, eps) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self.schedule.alphas_cumprod[t].view(-1, 1, 1, 1).to(self.device)
        x0, t, eps = x0.to(self.device), t.to(self.device), eps.to(self.device)
        y = y.to(self.device) if y is not None else None
        xt = alpha.sqrt() * x0 + (1 - alpha).sqrt() * eps
        if self.autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                pred_x0, v = self.model(xt, t, y)
        else:
            pred_x0, v = self.model(xt, t, y)
        return hybrid_loss(x0, pred_x0, v, t, self.schedule)

    def train_step(self) -> dict[str, float]:
        cfg = self.config
        lr = cfg.lr * min(1.0, (self.step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        l_simple, l_vlb = self.loss(*self.batch())
        self.optimizer.zero_grad(set_to_none=True)
        (l_simple + l_vlb).backward()
        self.optimizer.step()
        self.step += 1
        if self.step % cfg.ema_every == 0:
            self.update_ema()
        l_simple, l_vlb = l_simple.item(), l_vlb.item()
        return {"step": self.step, "loss": l_simple + l_vlb, "l_simple": l_simple, "l_vlb": l_vlb, "lr": lr}

    @torch.no_grad()
    def update_ema(self) -> None:
        rate = self.config.ema_rate
        for ema, p in zip(self.ema.parameters(), self.model.parameters()):
            ema.lerp_(p, 1.0 - rate)

    # -- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        optim = self.optimizer.state_dict()
        for index, state in optim["state"].items():
            for key, value in state.items():
                tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
        tensors["rng"] = self.generator.get_state()
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        # Write then rename: a crash mid-save leaves the previous checkpoint intact.
        tmp = self.run_dir / (CHECKPOINT + ".tmp")
        save_file(tensors, str(tmp))
        state = {"step": self.step, "config": json.loads(self.config.model_dump_json()), "param_groups": optim["param_groups"]}
        (self.run_dir / (STATE + ".tmp")).write_text(json.dumps(state, indent=1))
        tmp.replace(self.run_dir / CHECKPOINT)
        (self.run_dir / (STATE + ".tmp")).replace(self.run_dir / STATE)

    def load_checkpoint(self) -> bool:
        if not (self.run_dir / CHECKPOINT).is_file():
            return False
        state = json.loads((self.run_dir / STATE).read_text())
        saved = TrainConfig.model_validate(state["config"])
        if saved.model_dump(exclude={"steps"}) != self.config.model_dump(exclude={"steps"}):
            raise ValueError(f"{self.run_dir} holds a run with other settings; use a new --run-dir")
        tensors = load_file(str(self.run_dir / CHECKPOINT))
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        optim_state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                optim_state.setdefault(int(index), {})[name] = value.to(self.device) if name != "step" else value
        self.optimizer.load_state_dict({"state": optim_state, "param_groups": state["param_groups"]})
        self.generator.set_state(tensors["rng"])
        self.step = state["step"]
        # Steps logged after the last checkpoint will be run again: drop them from the log.
        log = self.run_dir / LOSS_LOG
        if log.is_file():
            kept = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            log.write_text("".join(line + "\n" for line in kept))
        return True

    def export(self, path: str | Path, name: str, classes: list[str] | None = None,
               defaults: SamplingDefaults | None = None, command: str | None = None) -> None:
        """Write the EMA weights as a model file that `patchdiff sample` and the service load."""
        meta = {"model": name, "trained_steps": str(self.step)}
        if classes:
            meta["classes"] = json.dumps(classes)
        if defaults:
            meta["defaults"] = defaults.model_dump_json()
        if command:
            meta["training_command"] = command
        save_model(self.ema, path, meta)

    def run(self, save_every: int = 1000, log_every: int = 50,
            on_log: Callable[[dict], None] | None = None) -> None:
        """Train until `config.steps`, saving every `save_every` steps and at the end."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = (self.run_dir / LOSS_LOG).open("a")
        window: list[dict] = []
        started = time.perf_counter()
        try:
            while self.step < self.config.steps:
                window.append(self.train_step())
                if self.step % log_every == 0 or self.step == self.config.steps:
                    entry = {
                        "step": self.step,
                        **{k: sum(w[k] for w in window) / len(window) for k in ("loss", "l_simple", "l_vlb")},
                        "lr": window[-1]["lr"],
                        "elapsed_s": round(time.perf_counter() - started, 1),
                    }
                    log.write(json.dumps(entry) + "\n")
                    log.flush()
                    window.clear()
                    if on_log:
                        on_log(entry)
                if self.step % save_every == 0 or self.step == self.config.steps:
                    self.save_checkpoint()
        finally:
            log.close()
