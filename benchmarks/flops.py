"""Parameters and forward-pass FLOPs of the released patched U-Nets, and the paper's cost claim.

Usage::

    python benchmarks/flops.py            # Markdown tables (the default, same as --markdown)
    python benchmarks/flops.py --json     # the same numbers as JSON

FLOPs are what `torch.utils.flop_counter.FlopCounterMode` counts: convolutions, matmuls and
attention, at 2 FLOPs per multiply-add (checked at run time, see `flops_per_multiply_add`); group
norms, activations, bias adds, softmax and upsampling are not counted. The networks are built on the
meta device, so no weights are allocated and the whole run takes a few seconds.

The paper's claim (Luhman & Luhman 2022): a U-Net run on P×P patches of a 256×256 image costs about
what the same U-Net costs on a 64×64 image at P=1. `compare_patching` checks that on the church_p4
network and also shows what the same network would cost on the 256×256 pixels directly.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from patchdiff_core.generation.registry import RELEASED
from patchdiff_core.model.config import ModelConfig
from patchdiff_core.model.unet import PatchedUNet

aten = torch.ops.aten


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# FlopCounterMode has no formula for the fused CPU attention kernel, so with real CPU tensors it
# silently counts attention as 0 FLOPs. On the meta device SDPA decomposes into bmm and is counted;
# this mapping makes real CPU tensors count the same.
_CUSTOM_FORMULAS = {}
if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CUSTOM_FORMULAS[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flop


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=_CUSTOM_FORMULAS)


def flops_per_multiply_add() -> int:
    """How many FLOPs the counter books for one multiply-add (a 1×1 @ 1×1 matmul)."""
    with torch.device("meta"):
        a = torch.empty(1, 1)
    with flop_counter() as counter:
        torch.mm(a, a)
    return counter.get_total_flops()


@dataclass(frozen=True)
class Cost:
    params: int
    flops_per_image: int  # one forward pass, as FlopCounterMode counts
    attention_flops_per_image: int  # of which QKᵀ and AV (not the q|k|v and output projections)

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gflops(self) -> float:
        return self.flops_per_image / 1e9


def model_inputs(cfg: ModelConfig, batch: int, device: torch.device | str):
    x = torch.zeros(batch, 3, cfg.res, cfg.res, device=device)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device) if cfg.conditional else None
    return x, t, y


def count(cfg: ModelConfig, batch: int = 1, device: str = "meta") -> Cost:
    """Parameters and FLOPs per image of one forward pass of `PatchedUNet(cfg)`.

    `device="meta"` (the default) allocates nothing; "cpu" runs the network for real (slow for the
    big configs) and must give the same count.
    """
    with torch.device(device):
        model = PatchedUNet(cfg).eval()
    x, t, y = model_inputs(cfg, batch, device)
    with torch.no_grad(), flop_counter() as counter:
        model(x, t, y)
    params = sum(p.numel() for p in model.parameters())
    total = counter.get_total_flops()
    # The model's only batched matmuls are attention's: SDPA itself, or its bmm decomposition on meta.
    attention = sum(
        n for op, n in counter.get_flop_counts()["Global"].items() if "bmm" in str(op) or "attention" in str(op)
    )
    return Cost(params=params, flops_per_image=total // batch, attention_flops_per_image=attention // batch)


@dataclass(frozen=True)
class ReleasedRow:
    name: str
    res: int
    patch_size: int
    patched_res: int
    networks: int
    params: int
    flops_per_image: int
    attention_flops_per_image: int


def released_rows(entries=None, device: str = "meta") -> list[ReleasedRow]:
    rows = []
    for entry in entries if entries is not None else RELEASED:
        cost = count(entry.config, device=device)
        rows.append(
            ReleasedRow(
                name=entry.name,
                res=entry.config.res,
                patch_size=entry.config.patch_size,
                patched_res=entry.config.patched_res,
                networks=len(entry.files),
                params=cost.params,
                flops_per_image=cost.flops_per_image,
                attention_flops_per_image=cost.attention_flops_per_image,
            )
        )
    return rows


def derive(cfg: ModelConfig, **update) -> ModelConfig:
    """A validated variant of `cfg` (model_copy(update=...) would skip validation)."""
    return ModelConfig(**{**cfg.model_dump(), **update})


@dataclass(frozen=True)
class ComparisonRow:
    label: str
    res: int
    patch_size: int
    patched_res: int
    attn_resos: list[int]
    params: int
    flops_per_image: int
    attention_flops_per_image: int
    ratio: float  # this row's FLOPs / the reference (first) row's FLOPs


def patching_variants(cfg: ModelConfig) -> list[tuple[str, ModelConfig]]:
    """The patched network, the same network at P=1 on res/P pixels, and at P=1 on res pixels.

    `attn_resos` are patched resolutions: at res/P and P=1 the U-Net levels have the same sizes as
    the patched network's, so they stay; at res and P=1 every level is P times larger, so they are
    multiplied by P to keep attention at the same levels.
    """
    p = cfg.patch_size
    small = derive(cfg, res=cfg.res // p, patch_size=1)
    full = derive(cfg, res=cfg.res, patch_size=1, attn_resos=[r * p for r in cfg.attn_resos])
    return [
        (f"P={p} on {cfg.res}×{cfg.res} (released)", cfg),
        (f"P=1 on {small.res}×{small.res}, same network", small),
        (f"P=1 on {full.res}×{full.res}, same network, attention ×{p}", full),
    ]


def compare_patching(cfg: ModelConfig, device: str = "meta") -> list[ComparisonRow]:
    rows: list[ComparisonRow] = []
    reference = None
    for label, variant in patching_variants(cfg):
        cost = count(variant, device=device)
        reference = reference or cost.flops_per_image
        rows.append(
            ComparisonRow(
                label=label,
                res=variant.res,
                patch_size=variant.patch_size,
                patched_res=variant.patched_res,
                attn_resos=list(variant.attn_resos),
                params=cost.params,
                flops_per_image=cost.flops_per_image,
                attention_flops_per_image=cost.attention_flops_per_image,
                ratio=cost.flops_per_image / reference,
            )
        )
    return rows


def _flops_note(per_mac: int) -> str:
    mac = "a multiply-add counts as 2 FLOPs" if per_mac == 2 else f"a multiply-add counts as {per_mac} FLOP(s)"
    return (
        f"FLOPs as torch.utils.flop_counter.FlopCounterMode counts them ({mac}; convolutions, matmuls and "
        "attention only: norms, activations, bias adds, softmax and upsampling are not counted), one forward "
        "pass, per image."
    )


def render_markdown(rows: list[ReleasedRow], comparisons: dict[str, list[ComparisonRow]], per_mac: int) -> str:
    gflops_col = "GFLOPs/image (1 MAC = 2 FLOPs)" if per_mac == 2 else f"GFLOPs/image (1 MAC = {per_mac} FLOPs)"
    lines = [
        "## Released models",
        "",
        _flops_note(per_mac),
        "",
        f"| model | resolution | patch size | patched res | params (M) | {gflops_col} | of which QKᵀ, AV |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = r.name if r.networks == 1 else f"{r.name} (×{r.networks} networks, same config; per network)"
        lines.append(
            f"| {name} | {r.res}×{r.res} | {r.patch_size} | {r.patched_res}×{r.patched_res} "
            f"| {r.params / 1e6:.2f} | {r.flops_per_image / 1e9:.2f} | {r.attention_flops_per_image / 1e9:.2f} |"
        )
    for name, comp in comparisons.items():
        ref = comp[0]
        lines += [
            "",
            f"## Paper's claim: patching a {ref.res}×{ref.res} image at P={ref.patch_size} costs about what "
            f"{ref.patched_res}×{ref.patched_res} costs at P=1 ({name} network)",
            "",
            "Same c, n_blocks and c_mult in every row. `attn_resos` are patched resolutions: at "
            f"{comp[1].res}×{comp[1].res}, P=1 the levels have the patched network's sizes, so they are kept; at "
            f"{comp[2].res}×{comp[2].res}, P=1 every level is {ref.patch_size}× larger, so they are multiplied by "
            f"{ref.patch_size} to keep attention at the same U-Net levels.",
            "",
            f"| network | resolution | patch size | U-Net top level | attn_resos | params (M) | {gflops_col} "
            "| of which QKᵀ, AV | ratio to patched |",
            "|---|---:|---:|---:|---|---:|---:|---:|---:|",
        ]
        for c in comp:
            lines.append(
                f"| {c.label} | {c.res}×{c.res} | {c.patch_size} | {c.patched_res}×{c.patched_res} "
                f"| {c.attn_resos} | {c.params / 1e6:.2f} | {c.flops_per_image / 1e9:.2f} "
                f"| {c.attention_flops_per_image / 1e9:.2f} | {c.ratio:.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="Markdown tables (default)")
    fmt.add_argument("--json", action="store_true", help="JSON instead of Markdown")
    parser.add_argument(
        "--compare",
        nargs="*",
        default=["church_p4"],
        metavar="MODEL",
        help="released models whose network to compare at P=1 (default: church_p4)",
    )
    parser.add_argument(
        "--device",
        default="meta",
        help="device the networks are counted on: meta (default, allocates nothing) or cpu (runs them)",
    )
    args = parser.parse_args(argv)

    by_name = {e.name: e for e in RELEASED}
    unknown = [n for n in args.compare if n not in by_name]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; released: {', '.join(by_name)}")

    per_mac = flops_per_multiply_add()
    rows = released_rows(device=args.device)
    comparisons = {n: compare_patching(by_name[n].config, device=args.device) for n in args.compare}
    if args.json:
        out = {
            "flops_per_multiply_add": per_mac,
            "torch": torch.__version__,
            "released": [asdict(r) for r in rows],
            "comparisons": {n: [asdict(c) for c in comp] for n, comp in comparisons.items()},
        }
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        print(render_markdown(rows, comparisons, per_mac))
    return 0


if __name__ == "__main__":
    sys.exit(main())
