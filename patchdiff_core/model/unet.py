"""The patched U-Net of Luhman & Luhman: an ADM-style U-Net run on P×P patches folded into channels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from patchdiff_core.model.config import ModelConfig
from patchdiff_core.model.layers import (
    Attention,
    Downsample,
    EmbedSequential,
    ResBlock,
    Upsample,
    conv3x3,
    group_norm,
    patchify,
    positional_encoding_2d,
    timestep_encoding,
    unpatchify,
)


class PatchedUNet(nn.Module):
    """forward(x [B,3,R,R] in [-1,1], t [B] int64 in 0..999, y [B] int64 or None) -> (x0, v).

    `x0` is the prediction of the clean image (the original calls it the mean output) and `v` ∈ (0, 1)
    interpolates the log-variance between β and b̃ (its "var" output); both [B,3,R,R] float32. For class-conditional models `y = num_classes` means "no label"
    (and `y=None` means that for the whole batch).

    Submodules are created in the order the original Keras model created its layers: the order of
    `named_parameters()` is the order of the weights in the authors' `ema_weights.h5`.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        c, temb_dim = cfg.c, cfg.time_dim
        out_ch = 3 * cfg.patch_size**2
        class_dim = None
        if cfg.conditional:
            # Gated blocks read the label through their own projection (width c); otherwise the
            # label embedding is added to the time embedding and must share its width.
            self.label_emb = nn.Embedding(cfg.num_classes + 1, c if cfg.gated else temb_dim)
            class_dim = c if cfg.gated else None
        self.time_mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.SiLU(), nn.Linear(4 * c, temb_dim), nn.SiLU())
        self.stem = conv3x3(out_ch, c)
        self.register_buffer("pos_emb", positional_encoding_2d(cfg.patched_res, c), persistent=False)

        def block(cin: int, cout: int, res: int, shortcut: bool = False) -> list[nn.Module]:
            layers: list[nn.Module] = [ResBlock(cin, cout, temb_dim, class_dim, shortcut)]
            if res in cfg.attn_resos:
                layers.append(Attention(cout))
            return layers

        levels = len(cfg.c_mult)
        blocks = cfg.blocks_per_level
        skip_widths = [c]
        self.encoder = nn.ModuleList()
        width = c
        for level in range(levels):
            res = cfg.level_res(level)
            for _ in range(blocks[level]):
                self.encoder.append(EmbedSequential(*block(width, cfg.width(level), res)))
                width = cfg.width(level)
                skip_widths.append(width)
            if level != levels - 1:
                self.encoder.append(EmbedSequential(Downsample(width, cfg.width(level + 1))))
                width = cfg.width(level + 1)
                skip_widths.append(width)

        self.middle = nn.ModuleList(
            [
                EmbedSequential(ResBlock(width, width, temb_dim, class_dim)),
                EmbedSequential(Attention(width)),
                EmbedSequential(ResBlock(width, width, temb_dim, class_dim)),
            ]
        )

        self.decoder = nn.ModuleList()
        for level in reversed(range(levels)):
            res = cfg.level_res(level)
            for i in range(blocks[level] + 1):
                layers = block(width + skip_widths.pop(), cfg.width(level), res, shortcut=True)
                width = cfg.width(level)
                if level and i == blocks[level]:
                    layers.append(Upsample(width, cfg.width(level - 1)))
                    width = cfg.width(level - 1)
                self.decoder.append(EmbedSequential(*layers))

        self.mean_head = nn.Sequential(group_norm(c), nn.SiLU(), conv3x3(c, out_ch))
        self.var_emb = nn.Linear(temb_dim, 2 * c)
        self.var_head = nn.Sequential(conv3x3(2 * c, c), nn.SiLU(), conv3x3(c, out_ch), nn.Sigmoid())

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        temb = self.time_mlp(timestep_encoding(t, cfg.c))
        cond, cemb = temb, None  # what the blocks see; the variance head sees temb alone
        if cfg.conditional:
            if y is None:
                y = torch.full_like(t, self.null_label)
            label = self.label_emb(y)
            if cfg.gated:
                cemb = label
            else:
                cond = temb + label

        h = self.stem(patchify(x, cfg.patch_size)) + self.pos_emb.to(x.dtype)
        stem_out = h
        skips = [h]
        for layer in self.encoder:
            h = layer(h, cond, cemb)
            skips.append(h)
        for layer in self.middle:
            h = layer(h, cond, cemb)
        for layer in self.decoder:
            h = layer(torch.cat([h, skips.pop()], dim=1), cond, cemb)

        x0 = self.mean_head(h)  # head names kept: they are the checkpoints' tensor names
        # The variance head sees the stem output and the final features but must not train them:
        # its loss reaches only the head and the time embedding, as in the original.
        features = torch.cat([stem_out, h], dim=1).detach()
        v = self.var_head(features + self.var_emb(F.silu(temb))[:, :, None, None])
        p = cfg.patch_size
        return unpatchify(x0, p).float(), unpatchify(v, p).float()
