"""A network forward through `torch.compile`, for the batching engine (opt-in: `PATCHDIFF_ENGINE_COMPILE`).

The engine's row count changes from one step to the next (jobs arrive, finish, guided images take
two rows), and a compiled graph (more so a CUDA graph) is specialised to one batch size. So rows
are padded up to the next of a few fixed sizes (powers of two from `MIN_BUCKET` up to the engine's
`max_rows`), each compiled once, at warm-up or on first use. Padding rows repeat the last real row
and are sliced off; every row of a U-Net forward is independent of the others, so the real rows
see the same computation as unpadded (up to the reordering of floating-point sums that any batch
size change brings, as in eager mode).

Why: on an H200 (benchmarks/results/gpu_check.md) compiling lifted a 256 px church-sized network
from 1,054 to 2,914 images/s at batch 64, and CUDA graphs the 32 px demo model from 5,839 to 46,558.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from patchdiff_core.diffusion.samplers import network_forward
from patchdiff_core.model.unet import PatchedUNet

log = logging.getLogger(__name__)

MIN_BUCKET = 8
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def buckets(max_rows: int) -> list[int]:
    """The padded batch sizes: powers of two from MIN_BUCKET, then `max_rows` itself."""
    sizes, size = [], MIN_BUCKET
    while size < max_rows:
        sizes.append(size)
        size *= 2
    return sizes + [max_rows]


class CompiledForward:
    """`forward(x, t, y)` like `network_forward`'s, through one compiled network, rows padded to a bucket."""

    def __init__(self, net: PatchedUNet, dtype: torch.dtype | None, channels_last: bool, max_rows: int, mode: str):
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode {mode!r}: expected one of {COMPILE_MODES}")
        self.mode = mode
        self.sizes = buckets(max_rows)
        self.compiled_forward = network_forward(torch.compile(net, mode=mode, dynamic=False), dtype, channels_last)
        self.eager_forward = network_forward(net, dtype, channels_last)

    def bucket(self, rows: int) -> int | None:
        return next((size for size in self.sizes if size >= rows), None)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = x.shape[0]
        size = self.bucket(rows)
        if size is None:  # more rows than the largest bucket (max_rows raised after compiling): eager
            return self.eager_forward(x, t, y)
        if size > rows:
            pad = size - rows
            x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
            t = torch.cat([t, t[-1:].expand(pad)])
            y = None if y is None else torch.cat([y, y[-1:].expand(pad)])
        x0, v = self.compiled_forward(x, t, y)
        # Cloned: a CUDA graph's outputs live in memory that its next replay overwrites.
        return x0[:rows].clone(), v[:rows].clone()

    def warm_up(self, device: torch.device, res: int, conditional: bool) -> None:
        """Compile every bucket now (a worker does this before it takes jobs)."""
        for size in self.sizes:
            started = time.perf_counter()
            x = torch.zeros(size, 3, res, res, device=device)
            t = torch.full((size,), 500, dtype=torch.long, device=device)
            y = torch.zeros(size, dtype=torch.long, device=device) if conditional else None
            with torch.inference_mode():
                for _ in range(2 if self.mode == "reduce-overhead" else 1):  # CUDA graphs record on a later call
                    self(x, t, y)
            log.info("compiled %d rows (%s) in %.1f s", size, self.mode, time.perf_counter() - started)


def compile_forwards(networks: list[PatchedUNet], dtype: torch.dtype | None, channels_last: bool, max_rows: int,
                     mode: str) -> list[Callable]:
    return [CompiledForward(net, dtype, channels_last, max_rows, mode) for net in networks]
