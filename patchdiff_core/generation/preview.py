"""Live previews: the job's grid as the sampler currently predicts it, as a small PNG.

A patched model predicts x0 at every step, so a preview costs a downscale on the device (to the size
each image has in the preview grid, `shrink_for_preview`), a small device-to-host copy, a grid and a
PNG encode; the worker (`worker/runner.py`) makes one at most every `preview_every_steps` steps and
every `preview_min_interval_s` seconds, so a 256-image job does not flood its viewers (or the worker).
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from patchdiff_core.generation.images import make_grid


def preview_png(images: np.ndarray, max_side: int = 256) -> bytes:
    """[N,H,W,3] uint8 -> the grid as PNG bytes, downscaled (never enlarged) to fit `max_side`."""
    grid = Image.fromarray(make_grid(images))
    scale = max_side / max(grid.size)
    if scale < 1:
        grid = grid.resize((max(1, round(grid.width * scale)), max(1, round(grid.height * scale))), Image.BILINEAR)
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG", compress_level=1)  # speed over size: it is sent once and replaced
    return buffer.getvalue()


def preview_side(num_images: int, res: int, max_side: int = 256) -> int:
    """The side of each image in a preview grid of `num_images` that fits `max_side` (2-pixel gaps),
    never larger than `res`."""
    columns = math.ceil(math.sqrt(num_images))
    return max(1, min(res, (max_side - 2) // columns - 2))


def shrink_for_preview(x0: torch.Tensor, num_images: int, max_side: int = 256) -> torch.Tensor:
    """[B,3,R,R] x0 at its `preview_side`, done on x0's device, so only the small copy moves."""
    side = preview_side(num_images, x0.shape[-1], max_side)
    if x0.shape[-1] == side:
        return x0
    return F.interpolate(x0.float(), size=(side, side), mode="area")
