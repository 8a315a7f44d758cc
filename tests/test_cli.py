"""`patchdiff` commands: outputs, and one clear line with exit status 2 for every user error."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from patchdiff_core.cli import main


def run(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def assert_user_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_sample_grid_folder_npz(capsys, tmp_path, tiny_model_file):
    common = ["sample", "--weights", str(tiny_model_file), "--num-images", "3", "--timesteps", "4", "--seed", "5", "--quiet"]
    code, _, _ = run(capsys, *common, "--out", str(tmp_path / "g.png"))
    assert code == 0
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (2 * 18 + 2, 2 * 18 + 2, 3)
    assert run(capsys, *common, "--action", "folder", "--out", str(tmp_path / "imgs"))[0] == 0
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert run(capsys, *common, "--action", "npz", "--out", str(tmp_path / "s.npz"), "--class-label", "4")[0] == 0
    data = np.load(tmp_path / "s.npz")
    assert data["arr_0"].shape == (3, 16, 16, 3) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].tolist() == [4, 4, 4]
    # The three outputs of one request are the same pixels: the grid's cells, the folder's files and
    # the npz of the same request (here with the labels the folder run drew from the seed).
    folder = np.stack([np.asarray(Image.open(tmp_path / "imgs" / f"0000{i}.png")) for i in range(3)])
    assert folder.shape == (3, 16, 16, 3)
    for i, (top, left) in enumerate([(2, 2), (2, 20), (20, 2)]):
        assert np.array_equal(grid[top : top + 16, left : left + 16], folder[i])
    assert run(capsys, *common, "--action", "npz", "--out", str(tmp_path / "r.npz"))[0] == 0
    assert np.array_equal(np.load(tmp_path / "r.npz")["arr_0"], folder)
    assert not np.array_equal(data["arr_0"], folder)  # other labels, other pictures


def test_same_seed_same_bytes(capsys, tmp_path, tiny_model_file):
    args = ["sample", "--weights", str(tiny_model_file), "--num-images", "2", "--timesteps", "4", "--seed", "9", "--quiet"]
    run(capsys, *args, "--out", str(tmp_path / "a.png"))
    run(capsys, *args, "--out", str(tmp_path / "b.png"))
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    # Another batch size: the same pictures, up to the rounding of batched convolutions.
    run(capsys, *args, "--out", str(tmp_path / "c.png"), "--batch-size", "1")
    a, c = (np.asarray(Image.open(tmp_path / n), dtype=int) for n in ("a.png", "c.png"))
    assert np.abs(a - c).max() <= 1
    # Another seed: other pictures (so the equality above says something about the seed).
    other = [*args[:args.index("--seed")], "--seed", "10", "--quiet"]
    run(capsys, *other, "--out", str(tmp_path / "d.png"))
    d = np.asarray(Image.open(tmp_path / "d.png"), dtype=int)
    assert a.shape == d.shape and np.abs(a - d).mean() > 10


@pytest.mark.parametrize("sampler, timesteps", [("dpmpp_2m", "karras5"), ("dpmpp_2m_sde", "logsnr5"), ("unipc", "5"), ("unipc_bh1", "5")])
def test_sample_with_a_few_step_sampler(capsys, tmp_path, tiny_model_file, sampler, timesteps):
    args = ["sample", "--weights", str(tiny_model_file), "--num-images", "2", "--seed", "3", "--quiet"]
    code, _, _ = run(capsys, *args, "--sampler", sampler, "--timesteps", timesteps, "--out", str(tmp_path / "a.png"))
    assert code == 0
    run(capsys, *args, "--sampler", "ddim", "--timesteps", timesteps, "--out", str(tmp_path / "b.png"))
    a, b = (np.asarray(Image.open(tmp_path / n), dtype=int) for n in ("a.png", "b.png"))
    assert a.shape == b.shape and np.abs(a - b).max() > 0  # the sampler really was another one


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--model", "no_such_model"], ["unknown model 'no_such_model'"]),
        (["--model", "church_p4"], ["not installed"]),
        (["--weights", "/nonexistent/model.safetensors"], ["no such"]),
        (["--guidance", "2.0", "--weights", "{uncond}"], ["--guidance", "unconditional"]),
        (["--class-label", "10", "--weights", "{tiny}"], ["--class-label", "out of range"]),
        (["--class-label", "-1", "--weights", "{tiny}"], ["--class-label", "out of range"]),
        (["--timesteps", "1", "--weights", "{tiny}"], ["--timesteps"]),
        (["--timesteps", "5000", "--weights", "{tiny}"], ["--timesteps", "5000"]),
        (["--timesteps", "fast", "--weights", "{tiny}"], ["--timesteps", "fast"]),
        (["--timesteps", "karras1", "--sampler", "dpmpp_2m", "--weights", "{tiny}"], ["--timesteps", "karras1"]),
        (["--sampler", "euler", "--weights", "{tiny}"], ["--sampler"]),
        (["--weights", "{garbage}"], ["not a safetensors checkpoint"]),
        (["--num-images", "0", "--weights", "{tiny}"], ["--num-images"]),
        (["--action", "gif", "--weights", "{tiny}"], ["--action"]),
        (["--precision", "fp16", "--device", "cpu", "--weights", "{tiny}"], ["fp16 needs CUDA"]),
        (["--seed", "-3", "--weights", "{tiny}"], ["--seed"]),
    ],
)
def test_sample_user_errors(capsys, tmp_path, tiny_model_file, golden_uncond_file, args, needles):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"definitely not a model")
    subst = {"{tiny}": str(tiny_model_file), "{uncond}": str(golden_uncond_file), "{garbage}": str(garbage)}
    args = [subst.get(a, a) for a in args]
    code, _, err = run(capsys, "sample", "--num-images", "1", "--out", str(tmp_path / "x.png"), "--quiet", *args)
    assert_user_error(code, err, *needles)


@pytest.fixture
def golden_uncond_file(tmp_path):
    from conftest import FIXTURES

    from patchdiff_core.model.checkpoint import convert_h5
    from patchdiff_core.model.config import ModelConfig

    out = tmp_path / "uncond.safetensors"
    convert_h5(FIXTURES / "uncond_p2" / "ema_weights.h5", out, ModelConfig.from_file(FIXTURES / "uncond_p2" / "config.json"))
    return out


def test_convert_with_config_and_model(capsys, tmp_path, golden):
    out = tmp_path / "m.safetensors"
    code, stdout, _ = run(capsys, "convert", str(golden.h5), str(out), "--config", str(golden.dir / "config.json"))
    assert code == 0 and out.is_file() and "parameters" in stdout
    code, _, err = run(capsys, "convert", str(golden.h5), str(out), "--model", "church_p4")
    assert_user_error(code, err, "has shape", "but the config expects")
    code, _, err = run(capsys, "convert", str(golden.h5), str(out))
    assert_user_error(code, err, "--model", "--config")
    code, _, err = run(capsys, "convert", str(tmp_path / "missing.h5"), str(out), "--config", str(golden.dir / "config.json"))
    assert_user_error(code, err, "no such file")


def test_models_lists_released_configs(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0
    for name in ("church_p2", "church_p4", "church_p8", "imagenet", "ffhq"):
        assert name in out
    assert "121.4M" in out  # church_p4


def test_console_script_exit_code():
    proc = subprocess.run(
        [sys.executable, "-m", "patchdiff_core.cli", "sample", "--model", "nope", "--quiet"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown model" in proc.stderr
