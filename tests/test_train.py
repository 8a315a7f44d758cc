"""Training: the objective, label dropout, loss going down, exact resume, export."""

import json
import math

import numpy as np
import pytest
import torch

from patchdiff_core.diffusion.losses import hybrid_loss
from patchdiff_core.diffusion.schedule import Schedule
from patchdiff_core.model.config import ModelConfig
from patchdiff_core.training.train import TrainConfig, Trainer, drop_labels, timestep_range

TINY = ModelConfig(res=16, c=32, n_blocks=1, attn_resos=[], c_mult=[1, 2], num_classes=3, patch_size=2)


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g) * 2 - 1, torch.randint(0, 3, (n,), generator=g)


def _config(**kw):
    return TrainConfig(**{"model": TINY, "batch_size": 8, "steps": 6, "lr": 1e-3, "warmup_steps": 2, **kw})


def test_loss_matches_hand_computation():
    """Both terms computed element by element in float64 from the formulas of the original code."""
    schedule = Schedule.linear(0.02)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 3, 2, 2, generator=g)
    pred = torch.randn(2, 3, 2, 2, generator=g)
    v = torch.rand(2, 3, 2, 2, generator=g)
    t = torch.tensor([0, 500])
    l_simple, l_vlb = hybrid_loss(x0, pred, v, t, schedule)

    expected_simple, expected_vlb = 0.0, 0.0
    for b in range(2):
        a = float(schedule.alphas_cumprod[t[b]])
        beta = float(schedule.betas[t[b]])
        bt = float(schedule.b_tilde[t[b]])
        sq = sum((float(pred[b].flatten()[i]) - float(x0[b].flatten()[i])) ** 2 for i in range(12))
        expected_simple += math.sqrt(a / (1 - a)) * sq / 2
        if t[b] > 0:
            for i in range(12):
                vi = float(v[b].flatten()[i])
                var = math.exp(vi * math.log(bt) + (1 - vi) * math.log(beta))
                diff = float(pred[b].flatten()[i]) - float(x0[b].flatten()[i])
                gamma = a * beta**2 / (var * (1 - beta) * (1 - a) ** 2)
                expected_vlb += 0.5 * (gamma * diff**2 + math.log(var / bt) + bt / var - 1)
    assert l_simple.item() == pytest.approx(expected_simple, rel=1e-5)
    assert l_vlb.item() == pytest.approx(expected_vlb, rel=1e-4)


def test_vlb_term_does_not_train_the_mean():
    schedule = Schedule.linear(0.02)
    pred = torch.randn(2, 3, 4, 4, requires_grad=True)
    v = torch.rand(2, 3, 4, 4, requires_grad=True)
    _, l_vlb = hybrid_loss(torch.randn(2, 3, 4, 4), pred, v, torch.tensor([10, 900]), schedule)
    l_vlb.backward()
    assert pred.grad is None and v.grad.abs().sum() > 0


def test_label_dropout_uses_the_no_label_index():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (20_000,), generator=g)
    dropped = drop_labels(labels, 0.1, 10, g)
    replaced = dropped != labels
    assert set(dropped[replaced].tolist()) == {10}
    assert 0.09 < replaced.float().mean().item() < 0.11
    assert torch.equal(dropped[~replaced], labels[~replaced])


def test_snr_range_splits_at_396():
    schedule = Schedule.linear(0.02)
    assert timestep_range(schedule, None, None) == (0, 999)
    assert timestep_range(schedule, 0.25, None) == (0, 395)  # low-noise network
    assert timestep_range(schedule, None, 0.25) == (396, 999)  # high-noise network


def test_training_reduces_the_loss_on_a_fixed_batch(tmp_path):
    torch.manual_seed(0)
    images, labels = _data(8)
    trainer = Trainer(_config(warmup_steps=0), images, labels, tmp_path)
    g = torch.Generator().manual_seed(5)
    t = torch.randint(50, 950, (8,), generator=g)
    eps = torch.randn(images.shape, generator=g)
    batch = (images, labels, t, eps)

    def fixed_loss():
        with torch.no_grad():
            return trainer.loss(*batch)[0].item()

    before = fixed_loss()
    for _ in range(25):
        l_simple, l_vlb = trainer.loss(*batch)
        trainer.optimizer.zero_grad()
        (l_simple + l_vlb).backward()
        trainer.optimizer.step()
    assert fixed_loss() < 0.5 * before


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    images, labels = _data()
    straight = Trainer(_config(), images, labels, tmp_path / "a")
    expected = [straight.train_step()["loss"] for _ in range(6)]

    first = Trainer(_config(steps=3), images, labels, tmp_path / "b")
    first.run(save_every=100, log_every=1)
    resumed = Trainer(_config(), images, labels, tmp_path / "b")  # a new process, in effect
    assert resumed.load_checkpoint() and resumed.step == 3
    resumed.run(save_every=100, log_every=1)
    logged = [json.loads(line)["loss"] for line in (tmp_path / "b" / "loss_log.jsonl").read_text().splitlines()]
    assert logged == pytest.approx(expected, rel=1e-6, abs=0)
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_resume_refuses_a_different_run(tmp_path):
    images, labels = _data()
    Trainer(_config(steps=1), images, labels, tmp_path).run(save_every=1)
    other = Trainer(_config(lr=5e-4), images, labels, tmp_path)
    with pytest.raises(ValueError, match="other settings"):
        other.load_checkpoint()


def test_cli_train_export_then_sample(tmp_path, capsys):
    from PIL import Image

    from patchdiff_core.cli import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY.model_dump(), "num_classes": 10, "res": 32, "patch_size": 4}))
    exported = tmp_path / "digits_small.safetensors"
    main(["train", "--config", str(config), "--run-dir", str(tmp_path / "run"), "--steps", "3", "--batch-size", "4",
          "--export", str(exported), "--quiet"])
    main(["sample", "--weights", str(exported), "--num-images", "2", "--timesteps", "3", "--seed", "1",
          "--class-label", "7", "--out", str(tmp_path / "g.png"), "--quiet"])
    assert np.asarray(Image.open(tmp_path / "g.png")).shape == (2 + 34, 2 * 34 + 2, 3)
    from patchdiff_core.model.checkpoint import read_metadata

    meta = read_metadata(exported)
    assert meta["model"] == "digits_small" and json.loads(meta["classes"]) == [str(i) for i in range(10)]
    assert meta["training_command"].startswith("patchdiff train")


def test_resume_drops_log_entries_after_the_checkpoint(tmp_path):
    images, labels = _data()
    trainer = Trainer(_config(steps=4), images, labels, tmp_path)
    trainer.run(save_every=2, log_every=1)
    with (tmp_path / "loss_log.jsonl").open("a") as log:  # as if a run died after step 4, before saving
        log.write(json.dumps({"step": 5, "loss": 1.0}) + "\n")
    resumed = Trainer(_config(steps=6), images, labels, tmp_path)
    resumed.load_checkpoint()
    resumed.run(save_every=2, log_every=1)
    steps = [json.loads(line)["step"] for line in (tmp_path / "loss_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
