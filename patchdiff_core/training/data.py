"""Training data as in-memory tensors: the built-in `digits` set, or a folder of images.

Both return (images [N,3,R,R] float32 in [-1, 1], labels [N] int64, class names).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def digits_dataset(res: int = 32) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), upscaled to res x res grey RGB."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [
        np.asarray(Image.fromarray((d / 16.0 * 255).astype(np.uint8)).resize((res, res), Image.BICUBIC))
        for d in digits.images
    ]
    x = torch.from_numpy(np.stack(images)).float().div(127.5).sub(1.0)
    x = x[:, None].expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(digits.target).long(), [str(i) for i in range(10)]


def _load_square(path: Path, res: int) -> np.ndarray:
    """Centre-crop to a square, then resize to res x res RGB."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((res, res), Image.BICUBIC)
        return np.asarray(img)


def folder_dataset(root: str | Path, res: int, class_folders: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """PNG/JPEG files under `root` (recursively); with `class_folders`, class = first sub-folder name."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"{root}: no PNG or JPEG images found")
    classes: list[str] = []
    labels = np.zeros(len(files), dtype=np.int64)
    if class_folders:
        names = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "" for p in files]
        if "" in names:
            raise ValueError(f"{root}: with class folders every image must sit in a sub-folder")
        classes = sorted(set(names))
        labels = np.array([classes.index(n) for n in names], dtype=np.int64)
    x = torch.from_numpy(np.stack([_load_square(p, res) for p in files])).permute(0, 3, 1, 2)
    return x.float().div(127.5).sub(1.0).contiguous(), torch.from_numpy(labels), classes


def load_dataset(name_or_path: str, res: int, class_folders: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    if name_or_path == "digits":
        return digits_dataset(res)
    return folder_dataset(name_or_path, res, class_folders)
