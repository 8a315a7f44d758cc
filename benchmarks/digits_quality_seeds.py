"""FD / ref of chosen settings across seeds, from `digits_quality.py --json-out` files.

Usage::

    python benchmarks/digits_quality.py --seed 0 --json-out /tmp/q0.json ...   # one run per seed
    python benchmarks/digits_quality_seeds.py /tmp/q0.json /tmp/q1.json /tmp/q2.json

One FD measurement moves by ±20% between seeds at 300 images (README, "Sample quality"), so a
setting is judged on several seeds: per seed its FD over the same run's ancestral reference (same
noise), then the worst seed and the pooled ratio (the sum of its FDs over the sum of the reference's).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def summarise(runs: list[dict]) -> list[dict]:
    """One entry per setting present in every run: NFE, per-seed ratios, worst, pooled. The ratios
    are the runs' own `fd_ratio` (digits_quality's `add_ratios`); the pooled one divides the sum of
    the setting's FDs by the sum of its references' (each FD / its ratio)."""
    seeds = [run["seed"] for run in runs]
    by_run = [{r["setting"]: r for r in run["rows"] if r["steps"]} for run in runs]
    out = []
    for name, first in by_run[0].items():
        if not all(name in rows for rows in by_run):
            continue
        fds = [rows[name]["fd"] for rows in by_run]
        ratios = [rows[name]["fd_ratio"] for rows in by_run]
        out.append({
            "setting": name, "nfe": first["nfe"], "seeds": seeds, "images": first["images"], "fd": fds,
            "ratio": ratios, "worst": max(ratios), "pooled": sum(fds) / sum(fd / r for fd, r in zip(fds, ratios)),
        })
    return out


def render(summary: list[dict]) -> str:
    seeds = summary[0]["seeds"]
    header = ["setting", "NFE", *[f"seed {s}" for s in seeds], "worst", "pooled"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["--:"] * (len(header) - 1)) + "|"]
    for s in summary:
        cells = [s["setting"], str(s["nfe"]), *[f"{fd:.2f} ({r:.2f}×)" for fd, r in zip(s["fd"], s["ratio"])],
                 f"{s['worst']:.2f}×", f"{s['pooled']:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="digits_quality.py --json-out files, one per seed")
    args = p.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.runs]
    summary = summarise(runs)
    if not summary:
        raise SystemExit("no setting is in every run")
    print(f"FD (FD / ancestral reference of the same run); {summary[0]['images']} images per setting and seed\n")
    print(render(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
