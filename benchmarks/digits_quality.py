"""Sample quality of the class-conditional digits demo model, per sampler setting.

Usage::

    python benchmarks/digits_quality.py --threads 1 --plot docs/digits_quality.png   # the README's table
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
- Fréchet distance (FD), at the model's full 32x32 resolution: FID's formula in the feature space of
  a small classifier trained on real digits (`FeatureNet`: scikit-learn's MLPClassifier, 1024 grey
  pixels -> 256 -> 64 ReLU units -> 10 classes, trained in seconds on a stratified half of the real
  32x32 training images; the features are its last hidden layer). Generated images (channel mean)
  are compared with the other, held-out half. `FD / ref` is FD relative to the reference of the same
  guidance in the same run (same seeds): the ancestral setting with the most steps (ancestral-250).
- precision / recall (Kynkäänniemi et al. 2019, k = 3) in the same feature space: the share of
  generated images inside the real manifold (fidelity) and of real images inside the generated one
  (coverage).
- NFE: network evaluations per image, S for S taken steps without guidance, 2 (S - 1) + 1 with
  guidance (the last step is the plain conditional pass).
- time: the wall time of `generate` for the setting's 10 x per-class images.

The "real digits" row applies the same measurements to held-out real digits: accuracy and diversity
on the SVC's held-out quarter (after the round trip), FD / precision / recall between the two
stratified halves of the FD reference half (the real-vs-real floor). FD's small-sample bias grows
with 1/n1 + 1/n2: two halves of about 450 carry the same bias as the default 300 generated images
against the 899 reference images, so the floor is on the same footing as the generated rows.
`--plot docs/digits_quality.png` draws FD against NFE.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from patchdiff_core.diffusion.names import SAMPLER_NAMES

NUM_CLASSES = 10
DIGIT_RES = 8
DIGIT_MAX = 16.0  # sklearn's digits are counts 0..16 of set pixels in 4x4 blocks
# A searched 5-step schedule of `unipc_bh1` for the demo model: `patchdiff tune-timesteps --model
# digits --steps 5` on a CPU (160 images). The model's default (weights/manifest.json) was searched
# on a GPU with 1000 images; benchmarks/gpu_quality.sh measures both (README, "Searched schedules").
SEARCHED_5 = "t:217,461,607,734,999"
# The steps-vs-quality table in the README: the reference first, then the few-step settings.
DEFAULT_SETTINGS = ",".join(
    ["ancestral:250:1.0", f"unipc_bh1:{SEARCHED_5}:1.0", "unipc_bh1:10:1.0", "unipc_bh1:5:1.0", "unipc:10:1.0"]
    + ["unipc:5:1.0", "dpmpp_2m:10:1.0"]
    + ["dpmpp_2m:5:1.0", "ddim:10:1.0"]
    + ["ddim:5:1.0", "ancestral:10:1.0", "unipc:20:1.0", "dpmpp_2m:20:1.0", "ddim:20:1.0", "unipc:karras10:1.0"]
    + ["unipc:logsnr10:1.0", "dpmpp_2m:karras10:1.0", "dpmpp_2m:logsnr10:1.0", "dpmpp_2m_sde:10:1.0"]
    + ["ancestral:50:1.0", "dpmpp_2m:100:1.0"]  # the old default; the ODE's own limit (converged)
    + ["ancestral:100:1.5", "ancestral:50:1.5", "ddim:10:1.5", "dpmpp_2m:10:1.5", "unipc:10:1.5", "unipc:5:1.5"]
    + ["unipc_bh1:10:1.5", "unipc_bh1:5:1.5", f"unipc_bh1:{SEARCHED_5}:1.5"]
    + ["dpmpp_2m:5:1.5"]
)
FEATURE_SEED = 0


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


def to_feature_input(images: np.ndarray) -> np.ndarray:
    """[N,R,R,3] or [N,R,R] uint8 -> [N,R*R] grey in 0..1 at full resolution (the FD network's input)."""
    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 4:
        x = x.mean(axis=-1)
    return x.reshape(len(x), -1) / 255.0


class FeatureNet:
    """A small MLP classifier of real 32x32 digits whose last hidden layer is the FD feature space."""

    HIDDEN = (256, 64)

    def __init__(self, images: np.ndarray, labels: np.ndarray, seed: int = FEATURE_SEED):
        from sklearn.neural_network import MLPClassifier

        self.net = MLPClassifier(hidden_layer_sizes=self.HIDDEN, max_iter=400, random_state=seed)
        self.net.fit(to_feature_input(images), labels)
        # Units that never fire on real digits add zero-variance dimensions (a singular covariance).
        self.active = self._hidden(images).max(axis=0) > 0

    def _hidden(self, images: np.ndarray) -> np.ndarray:
        h = to_feature_input(images)
        for w, b in zip(self.net.coefs_[:-1], self.net.intercepts_[:-1]):
            h = np.maximum(h @ w + b, 0.0)  # the hidden layers (ReLU), without the output layer
        return h

    def features(self, images: np.ndarray) -> np.ndarray:
        return self._hidden(images)[:, self.active]

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float((self.net.predict(to_feature_input(images)) == labels).mean())


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
    feature_net: FeatureNet | None = None  # trained on the real 32x32 images of `fd_train_index`
    fd_train_index: np.ndarray | None = None
    fd_reference: np.ndarray | None = None  # features of the held-out half (indices `fd_reference_index`)
    fd_reference_index: np.ndarray | None = None
    feature_net_accuracy: float = float("nan")  # on the held-out half

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


def build_reference(seed: int = 0, features: bool = True) -> Reference:
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
    ref = Reference(classifier, data, round_trip, labels, np.sort(test), held_out, distances)
    if features:
        fd_train, fd_ref = train_test_split(np.arange(len(labels)), test_size=0.5, stratify=labels, random_state=seed)
        fd_train, fd_ref = np.sort(fd_train), np.sort(fd_ref)
        ref.feature_net = FeatureNet(images[fd_train], labels[fd_train])
        ref.fd_train_index, ref.fd_reference_index = fd_train, fd_ref
        ref.fd_reference = ref.feature_net.features(images[fd_ref])
        ref.feature_net_accuracy = ref.feature_net.accuracy(images[fd_ref], labels[fd_ref])
    return ref


# --- settings and measurement --------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    sampler: str
    timesteps: str
    guidance: float

    @property
    def label(self) -> str:
        return f"{self.sampler} {self.timesteps}, w={self.guidance}"


_SETTING = re.compile(r"\s*([^:,\s]+):(t:[0-9,]+|[^:,]+):([^:,]+)\s*(?:,|$)")


def parse_settings(text: str) -> list[Setting]:
    """"ancestral:250:1.0,ddim:20:1.5" -> settings (timesteps as `--timesteps` takes them: 250, ddim50,
    karras10, or an explicit list such as t:0,300,999, whose commas stay with the list)."""
    settings, pos = [], 0
    while pos < len(text.rstrip()):
        match = _SETTING.match(text, pos)
        if match is None:
            item = text[pos:].split(",")[0].strip()
            raise ValueError(f"setting {item!r}: expected sampler:timesteps:guidance")
        sampler, steps, guidance = match.groups()
        if sampler not in SAMPLER_NAMES:
            raise ValueError(f"setting {match.group(0).strip(' ,')!r}: sampler must be one of {', '.join(SAMPLER_NAMES)}")
        try:
            settings.append(Setting(sampler, steps.rstrip(","), float(guidance)))
        except ValueError:
            raise ValueError(f"setting {match.group(0).strip(' ,')!r}: the guidance must be a number") from None
        pos = match.end()
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
    nfe: int = 0
    fd: float = float("nan")
    precision: float = float("nan")
    recall: float = float("nan")
    fd_ratio: float = float("nan")  # FD / FD of the ancestral setting with the most steps, same guidance


def network_evaluations(steps: int, guidance: float) -> int:
    """Per image: one pass per taken step, two (batched) for every guided step but the plain last one."""
    return steps if guidance == 1.0 else 2 * (steps - 1) + 1


def measure(name: str, x8: np.ndarray, labels: np.ndarray, ref: Reference, **extra) -> Row:
    acc, per_class = accuracy(ref.predict(x8), labels)
    div, _ = diversity(x8, labels, ref.mean_distance)
    return Row(setting=name, accuracy=acc, per_class=per_class, diversity=div, images=len(labels), **extra)


def distribution_scores(features: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    metrics = _load_metrics()
    precision, recall = metrics.precision_recall(reference, features)
    return {"fd": metrics.frechet_distance(features, reference), "precision": precision, "recall": recall}


def real_row(ref: Reference) -> Row:
    """Accuracy / diversity: the SVC's held-out digits after the 8 -> 32 (as in training) -> 8 round
    trip. FD / precision / recall: one stratified half of the FD reference against the other."""
    test = ref.test_index
    row = measure(
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
    if ref.fd_reference is not None:
        from sklearn.model_selection import train_test_split

        idx = np.arange(len(ref.fd_reference))
        a, b = train_test_split(idx, test_size=0.5, stratify=ref.labels[ref.fd_reference_index], random_state=0)
        for key, value in distribution_scores(ref.fd_reference[a], ref.fd_reference[b]).items():
            setattr(row, key, value)
    return row


def _load_metrics():
    """`distribution_metrics.py` from this directory (benchmarks/ is not a package)."""
    import importlib.util

    name = "patchdiff_benchmarks_distribution_metrics"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("distribution_metrics.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def add_ratios(rows: list[Row]) -> None:
    """FD relative to the reference of the same guidance in the same run (same seeds): the ancestral
    setting with the most steps (ancestral-250 in the default table)."""
    base: dict[float, Row] = {}
    for r in rows:
        if r.sampler == "ancestral" and r.steps > getattr(base.get(r.guidance), "steps", 0):
            base[r.guidance] = r
    for r in rows:
        if r.guidance in base and r.steps:
            r.fd_ratio = r.fd / base[r.guidance].fd


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
    extra = {}
    if ref.feature_net is not None:
        extra = distribution_scores(ref.feature_net.features(out.images), ref.fd_reference)
    return measure(
        setting.label,
        to_digit_scale(out.images),
        np.asarray(out.labels),
        ref,
        sampler=setting.sampler,
        timesteps=setting.timesteps,
        guidance=setting.guidance,
        steps=len(out.timesteps),
        nfe=network_evaluations(len(out.timesteps), setting.guidance),
        wall_s=wall,
        **extra,
    )


# --- output --------------------------------------------------------------------------------------


def render_markdown(info: dict[str, str], rows: list[Row]) -> str:
    lines = [f"- {k}: {v}" for k, v in info.items()]
    header = ["setting", "NFE", "FD", "FD / ref", "precision", "recall", "acc", "lowest class", "diversity", "time (s)"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["--:"] * (len(header) - 1)) + "|"]
    for r in rows:
        cells = [
            r.setting,
            str(r.nfe) if r.steps else "-",
            f"{r.fd:.2f}",
            f"{r.fd_ratio:.2f}" if r.fd_ratio == r.fd_ratio else "-",
            f"{r.precision:.3f}",
            f"{r.recall:.3f}",
            f"{r.accuracy:.3f}",
            f"{min(r.per_class.values()):.2f}",
            f"{r.diversity:.2f}",
            f"{r.wall_s:.1f}" if r.steps else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[Row], floor: float | None, path: Path, title: str = "") -> None:
    """FD against network evaluations: a colour per sampler, a marker per spacing, dashed with guidance.
    `floor` (the real-vs-real FD) is drawn only when its small-sample bias matches the rows'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def spacing(t: str) -> str:
        if t.startswith("t:"):
            return "searched"  # an explicit list: here, one from `patchdiff tune-timesteps`
        return "".join(ch for ch in t if not ch.isdigit()) or "uniform"

    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.steps:
            groups.setdefault((r.sampler, spacing(r.timesteps), r.guidance), []).append(r)
    colours = dict(zip(SAMPLER_NAMES, plt.get_cmap("tab10").colors))
    markers = {"uniform": "o", "karras": "s", "logsnr": "^", "ddim": "D", "searched": "*"}
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    for (sampler, sp, guidance), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r.nfe)
        ax.plot(
            [r.nfe for r in rs], [r.fd for r in rs], marker=markers.get(sp, "x"), color=colours.get(sampler),
            linestyle="-" if guidance == 1.0 else "--", label=f"{sampler} ({sp}), w={guidance}",
        )
    if floor is not None:
        ax.axhline(floor, color="grey", linewidth=0.8, linestyle=":", label="real vs real (floor)")
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per image")
    ax.set_ylabel("Fréchet distance (MLP features, 32×32)")
    ax.set_title(title or "digits demo: quality against sampling cost (same seeds)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", type=Path, nargs="+", metavar="PATH", help="model file(s), instead of a registered model")
    src.add_argument("--model", default="digits", help="registered model name (default: digits)")
    p.add_argument("--weights-dir", type=Path, default=Path("weights"), help="where --model's files are (default: weights)")
    p.add_argument("--per-class", type=int, default=30, help="images per class and setting (default: 30)")
    p.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"sampler:timesteps:guidance,... (default: {DEFAULT_SETTINGS})")
    p.add_argument("--seed", type=int, default=0, help="generation seed, the same for every setting (default: 0)")
    p.add_argument("--batch-size", type=int, default=50, help="images per sampling batch (default: 50)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the CPU (default: torch's)")
    p.add_argument("--precision", default="fp32", help="fp32, fp16, bf16 (default: fp32, so CPU and GPU compare)")
    p.add_argument("--plot", type=Path, help="write FD against network evaluations as a PNG here")
    p.add_argument("--json", action="store_true", help="one JSON object instead of Markdown")
    p.add_argument("--json-out", type=Path, help="also write the JSON object here (for digits_quality_seeds.py)")
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
            model = SamplingModel.load(weights=args.weights, device=args.device, precision=args.precision)
        else:
            model = SamplingModel.load(
                name=args.model, weights_dir=args.weights_dir, device=args.device, precision=args.precision
            )
    except PatchdiffError as exc:
        raise SystemExit(str(exc)) from None
    if model.config.num_classes != NUM_CLASSES or model.config.res % DIGIT_RES:
        raise SystemExit(f"{model.name}: not a 10-class digits model (classes {model.config.num_classes}, res {model.config.res})")

    ref = build_reference()
    rows = [real_row(ref)]
    print(f"real vs real: FD {rows[0].fd:.2f}, P {rows[0].precision:.3f}, R {rows[0].recall:.3f}", file=sys.stderr)
    for setting in settings:
        print(f"{setting.label} ...", file=sys.stderr, flush=True)
        rows.append(run_setting(model, setting, args.per_class, args.seed, args.batch_size, ref))
        r = rows[-1]
        print(f"  FD {r.fd:.2f}, P {r.precision:.3f}, R {r.recall:.3f}, acc {r.accuracy:.3f}, diversity "
              f"{r.diversity:.2f}, {r.wall_s:.1f} s", file=sys.stderr, flush=True)
    add_ratios(rows)

    info = {
        "model": f"{model.name} ({', '.join(s[:12] for s in model.sha256)})",
        "images": f"{args.per_class} per class and setting, seed {args.seed}, batch {args.batch_size}",
        "device": f"{model.device} {model.precision}, torch threads {torch.get_num_threads()}",
        "classifier": f"SVC(gamma=0.001) on real 8x8 digits, held-out accuracy {ref.held_out_accuracy:.4f} "
        f"({len(ref.test_index)} digits)",
        "FD features": f"MLPClassifier{FeatureNet.HIDDEN} on {len(ref.fd_train_index)} real 32x32 digits, last hidden "
        f"layer; held-out accuracy {ref.feature_net_accuracy:.4f}; reference: the other {len(ref.fd_reference_index)}",
    }
    if args.plot:
        # The floor's halves (~450 vs ~450 images) carry the same FD bias as 300 generated images
        # against the 899 reference ones: with more images per setting the rows' bias is smaller.
        floor = rows[0].fd if args.per_class * NUM_CLASSES == 300 else None
        plot(rows, floor, args.plot, f"digits demo: FD against sampling cost ({args.per_class * NUM_CLASSES} "
             f"images per setting, seed {args.seed}, {model.device.type})")
    result = {"info": info, "seed": args.seed, "held_out_accuracy": ref.held_out_accuracy, "rows": [asdict(r) for r in rows]}
    if args.json_out:
        args.json_out.write_text(json.dumps(result))
    if args.json:
        print(json.dumps(result))
    else:
        print(render_markdown(info, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
