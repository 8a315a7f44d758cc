import torch
from conftest import nhwc_to_nchw, rel_err

from patchdiff_core import load_model
from patchdiff_core.model.layers import Downsample, patchify, unpatchify


def test_patchify_layout_and_inverse():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g)
    for p in (1, 2, 4, 8):
        patches = patchify(x, p)
        assert patches.shape == (2, 3 * p * p, 8 // p, 8 // p)
        assert torch.equal(unpatchify(patches, p), x)
    # Channel order inside a patch: (row in patch, column in patch, colour), as tf.image.extract_patches.
    patches = patchify(x, 2)
    assert torch.equal(patches[:, 0:3, 0, 0], x[:, :, 0, 0])
    assert torch.equal(patches[:, 3:6, 0, 0], x[:, :, 0, 1])
    assert torch.equal(patches[:, 6:9, 0, 0], x[:, :, 1, 0])


def test_downsample_uses_tensorflow_same_padding():
    down = Downsample(1, 1)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 0, 0] = 1.0  # picks the top-left tap of each window
        down.conv.bias.zero_()
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    # TF "SAME" on an even size pads only bottom/right, so the windows start at (0,0), (0,2)...
    assert down(x).flatten().tolist() == [0.0, 2.0, 8.0, 10.0]


def test_channels_last_and_bf16_autocast(golden):
    model = load_model(golden.h5)
    ref = golden.ref
    x = nhwc_to_nchw(ref["x"])
    t = torch.from_numpy(ref["t"]).long()
    y = torch.from_numpy(ref["y"]).long() if model.config.conditional else None
    with torch.no_grad():
        mean, var = model(x, t, y)
        cl_model = load_model(golden.h5).to(memory_format=torch.channels_last)
        cl_mean, cl_var = cl_model(x.contiguous(memory_format=torch.channels_last), t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf_mean, bf_var = model(x, t, y)
    assert rel_err(cl_mean.numpy(), mean.numpy()) < 1e-5 and rel_err(cl_var.numpy(), var.numpy()) < 1e-5
    assert bf_mean.dtype == torch.float32  # outputs come back in float32 for the sampler
    assert rel_err(bf_mean.numpy(), mean.numpy()) < 3e-2 and rel_err(bf_var.numpy(), var.numpy()) < 3e-2
