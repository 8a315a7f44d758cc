"""Sample quality of the class-conditional digits demo model, per sampler setting.

Usage::

    python benchmarks/digits_quality.py                          # weights/digits.safetensors, 50 per class
    python benchmarks/digits_quality.py --weights /tmp/digits_dev.safetensors --per-class 10 --threads 1
    python benchmarks/digits_quality.py --settings ancestral:250:1.0,ddim:20:1.5 --json

For every setting (sampler:timesteps:guidance) it generates `--per-class` images of each of the ten
classes, always from the same seed (image i's noise depends only on the seed and i, so every setting
starts from the same noise and a rerun gives the same images), and reports:

- accuracy: the share of images that a classifier trained on the *real* 8x8 scikit-learn digits
  assigns to the requested label, overall and per class. Generated 32x32 grey images are brought back
  to the classifier's domain by averaging the three channels, area (box) downsampling to 8x8 and
  mapping 0..255 to sklearn's 0..16 scale. The classifier (an RBF SVC, gamma=0.001) is fitted on a
  stratified 75% split; its held-out accuracy on the other 25%, and on those held-out digits after the
  same 8 -> 32 -> 8 round trip as the training data, is printed as the ceiling.
- diversity: per class, the mean pairwise L2 distance between generated images (at 8x8, 0..16 scale)
  divided by the same statistic for all real digits of that class, averaged over classes. 1.0 = as
  diverse as the real data, near 0 = mode collapse. Pure noise scores well above 1, so read it
  together with the accuracy. The real digits are taken through the same 8 -> 32 -> 8 round trip as
  the model's training images (the round trip alone blurs them to about 0.8 of the raw digits'
  distances; see `build_reference`).
- time: the wall time of `generate` for the setting's 10 x per-class images.

The "real digits" row applies the same measurements to the held-out real digits (after the round trip).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from patchdiff_core.diffusion.names import SAMPLER_NAMES

NUM_CLASSES = 10
DIGIT_RES = 8
DIGIT_MAX = 16.0  # sklearn's digits are counts 0..16 of set pixels in 4x4 blocks
DEFAULT_SETTINGS = ",".join(
    f"{sampler}:{steps}:{guidance}"
    for sampler, steps in [("ancestral", "250"), ("ancestral", "50"), ("ddim", "50"), ("ddim", "20")]
    for guidance in ("1.0", "1.5")
)


# --- pure functions (no model needed; tested in tests/test_digits_quality.py) ---------------------


def to_digit_scale(images: np.ndarray) -> np.ndarray:
    """[N,R,R,3] or [N,R,R] uint8 images -> [N,64] float in sklearn's 0..16 scale (channel mean, area downsampling)."""
    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 4:
        x = x.mean(axis=-1)
    n, h, w = x.shape
    if h != w or h % DIGIT_RES:
        raise ValueError(f"images must be square with a side divisible by {DIGIT_RES}, got {h}x{w}")
    f = h // DIGIT_RES
    x = x.reshape(n, DIGIT_RES, f, DIGIT_RES, f).mean(axis=(2, 4))  # = PIL BOX for an integer factor
    return (x / 255.0 * DIGIT_MAX).reshape(n, DIGIT_RES * DIGIT_RES)


def real_digits_uint8(res: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The project's training images (`digits_dataset(res)`) as [N,res,res,3] uint8, with labels."""
    from patchdiff_core.training.data import digits_dataset

    x, y, _ = digits_dataset(res)
    pixels = np.rint((x.permute(0, 2, 3, 1).numpy() + 1.0) * 127.5)  # exact inverse of uint8/127.5 - 1
    return pixels.clip(0, 255).astype(np.uint8), y.numpy()


@dataclass
class Reference:
    """The classifier and the real-data statistics the generated images are compared with."""

    classifier: object
    data: np.ndarray  # [N,64] the real 8x8 digits, 0..16
    round_trip: np.ndarray  # [N,64] the same after 8 -> 32 (the training images) -> 8
    labels: np.ndarray  # [N]
    test_index: np.ndarray  # indices of the held-out split
    held_out_accuracy: float
    mean_distance: dict[int, float]  # per class: mean pairwise L2 distance of `round_trip`

    def predict(self, x8: np.ndarray) -> np.ndarray:
        return self.classifier.predict(x8)


def mean_pairwise_distance(x: np.ndarray) -> float:
    """Mean L2 distance over all unordered pairs of rows of `x` ([n,d], n >= 2)."""
    from scipy.spatial.distance import pdist

    if len(x) < 2:
        raise ValueError("need at least two samples for a pairwise distance")
    return float(pdist(np.asarray(x, dtype=np.float64)).mean())


def diversity(x8: np.ndarray, labels: np.ndarray, reference: dict[int, float]) -> tuple[float, dict[int, float]]:
    """Per class: mean pairwise distance of `x8` over that of the real class; returns (mean over classes, per class)."""
    labels = np.asarray(labels)
    per_class = {
        int(c): mean_pairwise_distance(x8[labels == c]) / reference[int(c)]
        for c in np.unique(labels)
        if (labels == c).sum() >= 2
    }
    return float(np.mean(list(per_class.values()))), per_class


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> tuple[float, dict[int, float]]:
    """Overall share of `predicted == labels`, and the share per requested label."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    hits = predicted == labels
    return float(hits.mean()), {int(c): float(hits[labels == c].mean()) for c in np.unique(labels)}


def build_reference(seed: int = 0) -> Reference:
    """Fit the SVC on a stratified 75% of the real 8x8 digits; held-out accuracy on the rest.

    The diversity reference is the real digits after the 32 px round trip, not the raw 8x8 ones: the
    bicubic upscaling and box downscaling blur them, which alone shrinks pairwise distances to about
    0.8 of the raw digits', so a model that reproduced its training images exactly would score 0.8
    against the raw digits and 1.0 against these.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    digits = load_digits()
    data, labels = digits.data.astype(np.float64), digits.target
    train, test = train_test_split(np.arange(len(labels)), test_size=0.25, stratify=labels, random_state=seed)
    classifier = SVC(gamma=0.001).fit(data[train], labels[train])
    held_out = float((classifier.predict(data[test]) == labels[test]).mean())
    images, image_labels = real_digits_uint8(32)
    assert np.array_equal(image_labels, labels)
    round_trip = to_digit_scale(images)
    distances = {c: mean_pairwise_distance(round_trip[labels == c]) for c in range(NUM_CLASSES)}
    return Reference(classifier, data, round_trip, labels, np.sort(test), held_out, distances)


# --- settings and measurement --------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    sampler: str
    timesteps: str
    guidance: float

    @property
    def label(self) -> str:
        return f"{self.sampler} {self.timesteps}, w={self.guidance}"


def parse_settings(text: str) -> list[Setting]:
    """"ancestral:250:1.0,ddim:20:1.5" -> settings (timesteps as `--timesteps` takes them: 250, ddim50, ...)."""
    settings = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split(":")
        if len(parts) != 3:
            raise ValueError(f"setting {item!r}: expected sampler:timesteps:guidance")
        sampler, steps, guidance = parts
        if sampler not in SAMPLER_NAMES:
            raise ValueError(f"setting {item!r}: sampler must be one of {', '.join(SAMPLER_NAMES)}")
        settings.append(Setting(sampler, steps, float(guidance)))
    if not settings:
        raise ValueError("no settings given")
    return settings


@dataclass
class Row:
    setting: str
    sampler: str
    timesteps: str
    guidance: float | None
    steps: int
    images: int
    accuracy: float
    per_class: dict[int, float]
    diversity: float
    wall_s: float


def measure(name: str, x8: np.ndarray, labels: np.ndarray, ref: Reference, **extra) -> Row:
    acc, per_class = accuracy(ref.predict(x8), labels)
    div, _ = diversity(x8, labels, ref.mean_distance)
    return Row(setting=name, accuracy=acc, per_class=per_class, diversity=div, images=len(labels), **extra)


def real_row(ref: Reference) -> Row:
    """The held-out real digits after the 8 -> 32 (as in training) -> 8 round trip."""
    test = ref.test_index
    return measure(
        "real digits (held-out, 32 px round trip)",
        ref.round_trip[test],
        ref.labels[test],
        ref,
        sampler="-",
        timesteps="-",
        guidance=None,
        steps=0,
        wall_s=0.0,
    )


def run_setting(model, setting: Setting, per_class: int, seed: int, batch_size: int, ref: Reference) -> Row:
    from patchdiff_core.generation.pipeline import generate
    from patchdiff_core.generation.spec import GenerationSpec

    labels = [c for c in range(NUM_CLASSES) for _ in range(per_class)]
    spec = GenerationSpec(
        model=model.name,
        num_images=len(labels),
        class_labels=labels,
        timesteps=setting.timesteps,
        sampler=setting.sampler,
        guidance=setting.guidance,
        seed=seed,
    )
    start = time.perf_counter()
    out = generate(model, spec, batch_size=batch_size)
    wall = time.perf_counter() - start
    return measure(
        setting.label,
        to_digit_scale(out.images),
        np.asarray(out.labels),
        ref,
        sampler=setting.sampler,
        timesteps=setting.timesteps,
        guidance=setting.guidance,
        steps=len(out.timesteps),
        wall_s=wall,
    )


# --- output --------------------------------------------------------------------------------------


def render_markdown(info: dict[str, str], rows: list[Row]) -> str:
    lines = [f"- {k}: {v}" for k, v in info.items()]
    header = ["setting", "steps", "acc"] + [str(c) for c in range(NUM_CLASSES)] + ["diversity", "time (s)"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["--:"] * (len(header) - 1)) + "|"]
    for r in rows:
        cells = [r.setting, str(r.steps) if r.steps else "-", f"{r.accuracy:.3f}"]
        cells += [f"{r.per_class.get(c, float('nan')):.2f}" for c in range(NUM_CLASSES)]
        cells += [f"{r.diversity:.2f}", f"{r.wall_s:.1f}" if r.steps else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", type=Path, nargs="+", metavar="PATH", help="model file(s), instead of a registered model")
    src.add_argument("--model", default="digits", help="registered model name (default: digits)")
    p.add_argument("--weights-dir", type=Path, default=Path("weights"), help="where --model's files are (default: weights)")
    p.add_argument("--per-class", type=int, default=50, help="images per class and setting (default: 50)")
    p.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"sampler:timesteps:guidance,... (default: {DEFAULT_SETTINGS})")
    p.add_argument("--seed", type=int, default=0, help="generation seed, the same for every setting (default: 0)")
    p.add_argument("--batch-size", type=int, default=50, help="images per sampling batch (default: 50)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the CPU (default: torch's)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of Markdown")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.per_class < 2:
        raise SystemExit("--per-class must be at least 2 (diversity needs pairs)")
    try:
        settings = parse_settings(args.settings)
    except ValueError as exc:
        raise SystemExit(f"--settings: {exc}") from None

    import torch

    from patchdiff_core.errors import PatchdiffError
    from patchdiff_core.generation.pipeline import SamplingModel

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.weights:
            model = SamplingModel.load(weights=args.weights, device=args.device)
        else:
            model = SamplingModel.load(name=args.model, weights_dir=args.weights_dir, device=args.device)
    except PatchdiffError as exc:
        raise SystemExit(str(exc)) from None
    if model.config.num_classes != NUM_CLASSES or model.config.res % DIGIT_RES:
        raise SystemExit(f"{model.name}: not a 10-class digits model (classes {model.config.num_classes}, res {model.config.res})")

    ref = build_reference()
    rows = [real_row(ref)]
    for setting in settings:
        print(f"{setting.label} ...", file=sys.stderr, flush=True)
        rows.append(run_setting(model, setting, args.per_class, args.seed, args.batch_size, ref))
        print(f"  acc {rows[-1].accuracy:.3f}, diversity {rows[-1].diversity:.2f}, {rows[-1].wall_s:.1f} s", file=sys.stderr)

    info = {
        "model": f"{model.name} ({', '.join(s[:12] for s in model.sha256)})",
        "images": f"{args.per_class} per class and setting, seed {args.seed}, batch {args.batch_size}",
        "device": f"{model.device} {model.precision}, torch threads {torch.get_num_threads()}",
        "classifier": f"SVC(gamma=0.001) on real 8x8 digits, held-out accuracy {ref.held_out_accuracy:.4f} "
        f"({len(ref.test_index)} digits)",
    }
    if args.json:
        print(json.dumps({"info": info, "held_out_accuracy": ref.held_out_accuracy, "rows": [asdict(r) for r in rows]}))
    else:
        print(render_markdown(info, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
