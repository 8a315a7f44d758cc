"""Live previews: the job's grid as the sampler currently predicts it, as a small PNG.

A patched model predicts x0 at every step, so a preview costs a downscale on the device (to the size
each image has in the preview grid), a small device-to-host copy, a grid and a PNG encode; `JobPreview` makes one at most every `every_steps` steps and every
`min_interval_s` seconds, so a 256-image job does not flood its viewers (or the worker).
"""

from __future__ import annotations

import io
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from patchdiff_core.generation.images import make_grid, to_uint8


def preview_png(images: np.ndarray, max_side: int = 256) -> bytes:
    """[N,H,W,3] uint8 -> the grid as PNG bytes, downscaled (never enlarged) to fit `max_side`."""
    grid = Image.fromarray(make_grid(images))
    scale = max_side / max(grid.size)
    if scale < 1:
        grid = grid.resize((max(1, round(grid.width * scale)), max(1, round(grid.height * scale))), Image.BILINEAR)
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG", compress_level=1)  # speed over size: it is sent once and replaced
    return buffer.getvalue()


class JobPreview:
    """Follows one job's sampling and makes its preview PNG when one is due.

    Call `update(info)` from the sampling callback of `generate()` (`step`, `total`, `x0` of the
    current batch, `start` = index of its first image). Images of batches not started yet are black;
    images of finished batches keep their final prediction.
    """

    def __init__(self, num_images: int, res: int, every_steps: int = 10, min_interval_s: float = 1.0,
                 max_side: int = 256):
        # Each image at the size it gets in a grid that fits max_side (2-pixel gaps), never larger.
        columns = math.ceil(math.sqrt(num_images))
        self.side = max(1, min(res, (max_side - 2) // columns - 2))
        self.canvas = np.zeros((num_images, self.side, self.side, 3), np.uint8)
        self.every_steps, self.min_interval_s, self.max_side = every_steps, min_interval_s, max_side
        self.last_step = -math.inf
        self.last_time = -math.inf
        self.steps_per_batch: int | None = None
        self.previous_step = 0

    def update(self, info: dict) -> bytes | None:
        """The preview PNG if one is due at this step, else None."""
        step, total, x0, start = info["step"], info["total"], info["x0"], info.get("start", 0)
        if step < self.previous_step:  # generate() started over (a retry with a smaller batch)
            self.last_step, self.steps_per_batch = -math.inf, None
        self.previous_step = step
        if self.steps_per_batch is None:
            batches = math.ceil(len(self.canvas) / x0.shape[0]) if start == 0 else 1
            self.steps_per_batch = max(1, total // max(1, batches))
        batch_done = step % self.steps_per_batch == 0  # the batch's last step: keep its final images
        now = time.monotonic()
        due = step - self.last_step >= self.every_steps and now - self.last_time >= self.min_interval_s
        if not (due or batch_done):
            return None
        self.canvas[start : start + x0.shape[0]] = to_uint8(self._shrink(x0))
        if not due:
            return None  # copied for the grid only; the next due preview shows it
        self.last_step, self.last_time = step, now
        return preview_png(self.canvas, self.max_side)

    def _shrink(self, x0: torch.Tensor) -> torch.Tensor:
        if x0.shape[-1] == self.side:
            return x0
        return F.interpolate(x0.float(), size=(self.side, self.side), mode="area")  # on x0's device
