"""The few-step schedule search (`diffusion.timestep_search`), the explicit 't:' spec that carries
its result, and `patchdiff tune-timesteps` end to end on a tiny model."""

import numpy as np
import pytest
import torch

from patchdiff_core.cli import main
from patchdiff_core.diffusion.respacing import format_explicit, resolve_timesteps
from patchdiff_core.diffusion.timestep_search import search_timesteps
from patchdiff_core.generation.pipeline import SamplingModel
from patchdiff_core.generation.tuning import ScheduleError


def test_explicit_spec_round_trips_and_sorts():
    assert resolve_timesteps("t:999,0,500") == [0, 500, 999]
    assert resolve_timesteps(" t:126,361,516,686,999 ") == [126, 361, 516, 686, 999]
    assert resolve_timesteps(format_explicit([999, 5, 40])) == [5, 40, 999]
    assert format_explicit([999, 5, 40]) == "t:5,40,999"


@pytest.mark.parametrize("spec, needle", [
    ("t:", "comma-separated integers"), ("t:5", "at least 2"), ("t:1,1", "repeats"), ("t:-1,5", "0..999"),
    ("t:1,1000", "0..999"), ("t:a,b", "comma-separated integers"), ("t:1,,5", "comma-separated integers"),
])
def test_explicit_spec_errors(spec, needle):
    with pytest.raises(ValueError, match=needle):
        resolve_timesteps(spec)


def test_search_finds_the_minimum_of_a_separable_bowl():
    target = [37, 290, 611, 999]

    def error(steps):
        return float(sum((a - b) ** 2 for a, b in zip(steps, target)))

    result = search_timesteps(error, [0, 333, 666, 999])
    assert result.timesteps == target and result.error == 0.0
    assert result.start == [0, 333, 666, 999] and result.start_error == error([0, 333, 666, 999])
    assert [h[0] for h in result.history] == [128, 64, 32, 16, 8, 4, 2, 1]
    assert all(b[2] >= a[2] for a, b in zip(result.history[1:], result.history))  # never gets worse


def test_search_keeps_the_top_step_and_the_order():
    seen = []

    def error(steps):
        seen.append(list(steps))
        return float(-steps[0])  # pushes the lowest step as high as it may go

    result = search_timesteps(error, [0, 500, 998])
    assert all(s[-1] == 998 and s == sorted(set(s)) for s in seen)
    assert result.timesteps == [996, 997, 998]  # the lower steps climb (together) until the fixed top stops them
    free_top = search_timesteps(lambda s: float(-s[-1]), [0, 500, 900], fix_top=False)
    assert free_top.timesteps[-1] == 999


def test_search_follows_a_diagonal_valley():
    # The gap between the two lower steps must stay 100 (any single-step move costs far more than it
    # gains), while the pair as a whole should sit at 300/400: only moving them together gets there.
    def error(steps):
        return 1e6 * (steps[1] - steps[0] - 100) ** 2 + (steps[0] - 300) ** 2

    result = search_timesteps(error, [0, 100, 999])
    assert result.timesteps == [300, 400, 999] and result.error == 0.0


def test_search_evaluates_each_schedule_once_and_stops_at_the_budget():
    calls = []

    def error(steps):
        calls.append(tuple(steps))
        return float(np.sum(np.abs(np.asarray(steps) - [100, 200, 999])))

    result = search_timesteps(error, [0, 500, 999])
    assert len(calls) == len(set(calls)) == result.evaluations
    capped = search_timesteps(error, [0, 500, 999], max_evaluations=5)
    assert capped.evaluations == 5 and capped.error < capped.start_error


@pytest.mark.parametrize("start", [[5], [3, 3], [-1, 4], [0, 1000]])
def test_search_rejects_bad_starts(start):
    with pytest.raises(ValueError, match="start schedule"):
        search_timesteps(lambda s: 0.0, start)


def test_schedule_error_is_zero_for_the_reference_and_falls_with_more_steps(tiny_model_file):
    torch.manual_seed(0)
    model = SamplingModel.load(weights=[tiny_model_file], device="cpu", precision="fp32")
    error = ScheduleError(model, "dpmpp_2m", num_images=6, seed=4, batch_size=4, reference_steps=40)
    assert len(error.reference) == 2 and error.reference[0].shape[0] == 4
    assert error(resolve_timesteps("40")) == 0.0  # the reference itself (same noise, same steps)
    assert error(resolve_timesteps("20")) < error(resolve_timesteps("5"))
    with pytest.raises(ValueError, match="deterministic"):
        ScheduleError(model, "ancestral", num_images=2)


def test_tune_timesteps_cli_prints_a_spec_that_sampling_takes(capsys, tmp_path, tiny_model_file):
    argv = ["tune-timesteps", "--weights", str(tiny_model_file), "--sampler", "unipc_bh1", "--steps", "3",
            "--num-images", "4", "--start", "3", "--start", "karras3", "--threads", "1", "--quiet"]
    main(argv)
    out, err = capsys.readouterr()
    spec = out.strip().splitlines()[-1]
    steps = resolve_timesteps(spec)
    assert spec.startswith("t:") and len(steps) == 3 and steps[-1] == 999
    # One line per start: its error before and after; the printed schedule is the better end point.
    lines = [line for line in err.splitlines() if line.startswith("from ")]
    assert len(lines) == 2 and all("->" in line for line in lines)
    finals = [float(line.rsplit("-> ", 1)[1].split()[0]) for line in lines]
    starts = [float(line.split("error ", 1)[1].split(" ->")[0]) for line in lines]
    assert all(f <= s for f, s in zip(finals, starts))
    main(["sample", "--weights", str(tiny_model_file), "--num-images", "2", "--seed", "1", "--quiet",
          "--sampler", "unipc_bh1", "--timesteps", spec, "--out", str(tmp_path / "tuned.png")])
    assert (tmp_path / "tuned.png").stat().st_size > 0


@pytest.mark.parametrize("args, needle", [
    (["--sampler", "ancestral"], "--sampler"),
    (["--steps", "4", "--start", "karras5"], "not --steps 4"),
    (["--start", "fast"], "--start fast"),
    (["--guidance", "0.5"], "--guidance"),
])
def test_tune_timesteps_cli_errors(capsys, tiny_model_file, args, needle):
    with pytest.raises(SystemExit) as exc:
        main(["tune-timesteps", "--weights", str(tiny_model_file), "--num-images", "2", "--quiet", *args])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_tune_timesteps_checks_its_starts_before_any_sampling(tiny_model_file):
    from patchdiff_core.generation.tuning import tune_timesteps

    model = SamplingModel.load(weights=[tiny_model_file], device="cpu", precision="fp32")
    with pytest.raises(ValueError, match="different numbers of steps"):
        tune_timesteps(model, "ddim", ["3", "4"])
    with pytest.raises(ValueError, match="start 'fast'"):
        tune_timesteps(model, "ddim", ["fast"])
