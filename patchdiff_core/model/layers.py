"""Building blocks of the patched U-Net, in PyTorch, numerically matching the original Keras layers.

Every module registers its parameters in the order Keras created its variables, so that
`named_parameters()` lists them in the same order as `ema_weights.h5` (see `keras_h5.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from patchdiff_core.model.config import HEAD_CHANNELS, NORM_GROUPS

# tensorflow-addons' GroupNormalization default; PyTorch's 1e-5 gives visibly different numbers.
NORM_EPS = 1e-3


def group_norm(channels: int, affine: bool = True) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, channels, eps=NORM_EPS, affine=affine)


def conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


def sinusoidal_frequencies(dim: int) -> torch.Tensor:
    half = dim // 2
    return torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))


def timestep_encoding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] timesteps -> [B, dim]: sin of every frequency, then cos (float32)."""
    args = t.float()[:, None] * sinusoidal_frequencies(dim).to(t.device)[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def positional_encoding_2d(res: int, dim: int) -> torch.Tensor:
    """[1, dim, res, res]: first dim/2 channels vary with the column, the last dim/2 with the row."""
    omega = 64.0 / res  # the original stretches wavelengths so every patched resolution looks alike
    angles = torch.arange(res, dtype=torch.float32)[:, None] * sinusoidal_frequencies(dim)[None, :]
    emb = torch.sin(angles * omega)  # [res, dim/2]
    by_column = emb.t()[:, None, :].expand(-1, res, -1)
    by_row = emb.t()[:, :, None].expand(-1, -1, res)
    return torch.cat([by_column, by_row], dim=0)[None]


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, 3, R, R] -> [B, 3p², R/p, R/p], channels laid out (row in patch, column in patch, colour)."""
    if p == 1:
        return x
    b, ch, h, w = x.shape
    x = x.reshape(b, ch, h // p, p, w // p, p).permute(0, 3, 5, 1, 2, 4)
    return x.reshape(b, p * p * ch, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Exact inverse of `patchify`."""
    if p == 1:
        return x
    b, cp, h, w = x.shape
    ch = cp // (p * p)
    x = x.reshape(b, p, p, ch, h, w).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(b, ch, h * p, w * p)


class ResBlock(nn.Module):
    """ADM residual block with scale/shift conditioning; optionally the class-gated (`se`) variant.

    Plain: the conditioning vector gives (scale, shift). Gated: scale/shift come from the time
    embedding only and the branch is multiplied by sigmoid(Dense(class embedding) + 2).
    """

    def __init__(self, cin: int, cout: int, emb_dim: int, class_dim: int | None = None, shortcut: bool = False):
        super().__init__()
        self.in_norm = group_norm(cin)
        self.in_conv = conv3x3(cin, cout)
        self.class_proj = nn.Linear(class_dim, cout) if class_dim else None
        self.emb_proj = nn.Linear(emb_dim, 2 * cout)
        self.out_norm = group_norm(cout, affine=False)
        self.out_conv = conv3x3(cout, cout)
        # Keras applies a Dense to NHWC, which is a 1x1 convolution in NCHW.
        self.skip = nn.Conv2d(cin, cout, 1) if shortcut else None
        if self.skip is None and cin != cout:
            raise ValueError(f"a block without shortcut cannot change channels ({cin} -> {cout})")

    def forward(self, x: torch.Tensor, temb: torch.Tensor, cemb: torch.Tensor | None) -> torch.Tensor:
        h = self.in_conv(F.silu(self.in_norm(x)))
        scale, shift = self.emb_proj(temb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        h = self.out_conv(F.silu(h))
        if self.class_proj is not None:
            h = h * torch.sigmoid(self.class_proj(cemb) + 2.0)[:, :, None, None]
        return (x if self.skip is None else self.skip(x)) + h


class Attention(nn.Module):
    """Self-attention over all positions, 64-channel heads, fused q|k|v projection."""

    def __init__(self, channels: int):
        super().__init__()
        self.heads = channels // HEAD_CHANNELS
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, temb=None, cemb=None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, L, C]
        qkv = self.qkv(tokens).reshape(b, h * w, 3, self.heads, HEAD_CHANNELS).permute(2, 0, 3, 1, 4)
        # The original scales q and k by 64^-1/4 each: together SDPA's default 1/sqrt(64).
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        out = self.proj(out.transpose(1, 2).reshape(b, h * w, c))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with TensorFlow "SAME" padding (0 before, 1 after on even sizes)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2)

    def forward(self, x: torch.Tensor, temb=None, cemb=None) -> torch.Tensor:
        pad_h, pad_w = (1 if n % 2 == 0 else 2 for n in x.shape[-2:])
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = conv3x3(cin, cout)

    def forward(self, x: torch.Tensor, temb=None, cemb=None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """A sequence of layers that each take (x, temb, cemb)."""

    def forward(self, x: torch.Tensor, temb: torch.Tensor, cemb: torch.Tensor | None) -> torch.Tensor:
        for layer in self:
            x = layer(x, temb, cemb)
        return x
