import numpy as np
import pytest
import torch

from patchdiff_core.diffusion.samplers import dynamic_threshold, split_denoiser
from patchdiff_core.generation.pipeline import SamplingModel, generate
from patchdiff_core.generation.spec import GenerationSpec, random_labels


@pytest.fixture(scope="module")
def tiny(tiny_model_file):
    return SamplingModel.load(weights=[tiny_model_file], device="cpu")


def _spec(**kw):
    base = dict(model="tiny", num_images=5, timesteps="12", guidance=1.5, seed=1234)
    return GenerationSpec(**{**base, **kw})


@pytest.mark.parametrize(
    "sampler, timesteps", [("ancestral", "12"), ("ddim", "12"), ("dpmpp_2m", "logsnr8"), ("dpmpp_2m_sde", "karras8"), ("unipc", "8"), ("unipc_bh1", "6")]
)
def test_image_i_does_not_depend_on_batching(tiny, sampler, timesteps):
    spec = _spec(sampler=sampler, timesteps=timesteps)
    whole = generate(tiny, spec, batch_size=5)
    for batch_size in (1, 2, 3):
        split = generate(tiny, spec, batch_size=batch_size)
        assert split.labels == whole.labels
        # Batched convolutions may round differently; allow at most one grey level of difference.
        assert np.abs(split.images.astype(int) - whole.images).max() <= 1
    # A request for the first 3 images gives the same first 3 images.
    first = generate(tiny, spec.model_copy(update={"num_images": 3}), batch_size=2)
    assert np.abs(first.images.astype(int) - whole.images[:3]).max() <= 1


def test_different_seeds_give_different_images(tiny):
    a = generate(tiny, _spec(seed=1), batch_size=5).images
    b = generate(tiny, _spec(seed=2), batch_size=5).images
    assert np.abs(a.astype(int) - b).mean() > 5


def test_random_labels_come_from_the_seed():
    assert random_labels(7, 20, 10) == random_labels(7, 20, 10)
    assert random_labels(7, 5, 10) == random_labels(7, 20, 10)[:5]
    assert random_labels(7, 20, 10) != random_labels(8, 20, 10)
    assert all(0 <= label < 10 for label in random_labels(3, 200, 10))


def test_callback_sees_every_step_of_every_batch(tiny):
    seen = []
    generate(tiny, _spec(num_images=3, timesteps="5"), batch_size=2, callback=seen.append)
    assert [s["step"] for s in seen] == list(range(1, 11))
    assert all(s["total"] == 10 for s in seen)
    assert {tuple(s["x0"].shape) for s in seen} == {(2, 3, 16, 16), (1, 3, 16, 16)}


def test_explicit_labels_condition_the_model(tiny):
    a = generate(tiny, _spec(class_labels=[0] * 5), batch_size=5).images
    b = generate(tiny, _spec(class_labels=[9] * 5), batch_size=5).images
    assert np.abs(a.astype(int) - b).mean() > 1


def test_dynamic_threshold_nearest_rank_percentile():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=g) * 3
    out = dynamic_threshold(x)
    flat = x.abs().flatten(1).numpy()
    n = flat.shape[1]
    s = np.maximum(np.sort(flat, axis=1)[:, int(np.round((n - 1) * 0.995))], 1.0)
    expected = np.clip(x.numpy(), -s[:, None, None, None], s[:, None, None, None]) / s[:, None, None, None]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6)
    assert out.abs().max() <= 1.0
    small = torch.rand(2, 3, 4, 4, generator=g) * 0.5  # below 1: s = 1, nothing changes
    assert torch.equal(dynamic_threshold(small), small)


def test_split_denoiser_switches_by_timestep():
    calls = []

    def make(tag):
        return lambda x, t, guided=True: calls.append((tag, t, guided)) or (x, x)

    denoise = split_denoiser(make("low"), make("high"), switch_t=396)
    x = torch.zeros(1)
    for t in (999, 396, 395, 0):
        denoise(x, t, True)
    assert calls == [("high", 999, True), ("high", 396, True), ("low", 395, True), ("low", 0, True)]


def test_imagenet_switch_is_timestep_396():
    from patchdiff_core.diffusion.schedule import Schedule
    from patchdiff_core.generation.registry import IMAGENET_SPLIT_SNR

    assert Schedule.linear(0.02).timestep_for_snr(IMAGENET_SPLIT_SNR) == 396


def test_split_pair_loads_and_samples(tiny_model_file):
    pair = SamplingModel.load(weights=[tiny_model_file, tiny_model_file], device="cpu")
    assert pair.switch_t == 396 and len(pair.networks) == 2
    out = generate(pair, _spec(num_images=2, timesteps="6"), batch_size=2)
    assert out.images.shape == (2, 16, 16, 3)


def test_manifest_sha256_is_checked(tmp_path, tiny_model_file):
    import json

    from service_harness import write_weights_dir

    from patchdiff_core.errors import CheckpointError
    from patchdiff_core.model.checkpoint import file_sha256

    root = write_weights_dir(tmp_path, tiny_model_file, "tiny")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["models"][0]["sha256"] = [file_sha256(tiny_model_file)]
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert SamplingModel.load("tiny", weights_dir=root).sha256 == manifest["models"][0]["sha256"]
    manifest["models"][0]["sha256"] = ["0" * 64]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="differs from the manifest"):
        SamplingModel.load("tiny", weights_dir=root)
