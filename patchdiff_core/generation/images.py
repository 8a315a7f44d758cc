"""From model outputs to pixels and files: uint8 conversion, grids, PNG bytes, npz for FID tools."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(x0: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] in about [-1,1] -> [B,H,W,3] uint8: clip, (x+1)·127.5, truncate (as the original)."""
    pixels = (x0.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5
    return pixels.permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)


def make_grid(images: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile [N,H,W,3] images into one picture, ceil(sqrt(N)) columns by default, black gaps."""
    n, h, w, ch = images.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, ch), np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[top : top + h, left : left + w] = image
    return grid


def png_bytes(image: np.ndarray) -> bytes:
    """Deterministic PNG encoding: the same pixels always give the same bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def write_outputs(images: np.ndarray, labels: list[int] | None, out: Path, action: str) -> list[Path]:
    """Write a generation as `grid` (one PNG), `folder` (one PNG per image) or `npz` (arr_0, arr_1)."""
    if action == "grid":
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(png_bytes(make_grid(images)))
        return [out]
    if action == "folder":
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"{i:05d}.png" for i in range(len(images))]
        for path, image in zip(paths, images):
            path.write_bytes(png_bytes(image))
        return paths
    if action == "npz":
        out.parent.mkdir(parents=True, exist_ok=True)
        # arr_0 = images, arr_1 = labels: the layout of the seed's FID output and of ADM's evaluator.
        with open(out, "wb") as f:  # a file object: numpy would otherwise append ".npz" to the name
            np.savez(f, images, np.asarray(labels if labels is not None else [], dtype=np.int64))
        return [out]
    raise ValueError(f"unknown action {action!r}")
