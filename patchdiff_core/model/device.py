"""Where and in which precision a network runs: the one resolution of `--device` / `--precision`
for sampling and training."""

from __future__ import annotations

import torch

from patchdiff_core.errors import PatchdiffError

# None: plain float32; otherwise the autocast dtype.
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise PatchdiffError(f"--device {device}: no CUDA device is available")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise PatchdiffError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return resolved


def resolve_precision(precision: str, device: torch.device, cuda_default: str = "fp16") -> str:
    """"auto" is `cuda_default` on CUDA (fp16 to sample; training passes bf16) and fp32 on the CPU."""
    if precision == "auto":
        return cuda_default if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise PatchdiffError(f"unknown precision {precision!r}; choose fp32, fp16 or bf16")
    if precision == "fp16" and device.type != "cuda":
        raise PatchdiffError("fp16 needs CUDA; use fp32 or bf16 on the CPU")
    return precision
