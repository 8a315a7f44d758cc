"""The `patchdiff` command line. Each subcommand parses its arguments and calls the library.

User errors (bad argument, unknown model, missing or wrong weights file) print one line on stderr
and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from patchdiff_core.diffusion.names import NOISY_SAMPLERS, SAMPLER_NAMES
from patchdiff_core.diffusion.respacing import SPEC_FORMS
from patchdiff_core.errors import PatchdiffError
from patchdiff_core.service.settings import get_settings

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError("must be between 0 and 2^63-1")
    return value


def cmd_models(args: argparse.Namespace) -> None:
    from patchdiff_core.generation.registry import all_models

    weights_dir = get_settings().weights_dir
    rows = []
    for entry in all_models(weights_dir).values():
        params = _count_params(entry.config)
        nets = f" x{len(entry.files)}" if len(entry.files) > 1 else ""
        rows.append(
            (
                entry.name,
                f"{entry.config.res}px P={entry.config.patch_size}",
                str(entry.config.num_classes or "-"),
                f"{params / 1e6:.1f}M{nets}",
                "yes" if entry.installed(weights_dir) else "no",
                entry.description,
            )
        )
    header = ("name", "resolution", "classes", "params", "installed", "description")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    print(f"\nweights directory: {weights_dir}")


def _count_params(config) -> int:
    import torch

    from patchdiff_core.model.unet import PatchedUNet

    with torch.device("meta"):
        return sum(p.numel() for p in PatchedUNet(config).parameters())


def cmd_convert(args: argparse.Namespace) -> None:
    from patchdiff_core.generation.registry import get_model
    from patchdiff_core.model.checkpoint import convert_h5
    from patchdiff_core.model.config import ModelConfig

    if (args.model is None) == (args.config is None):
        raise PatchdiffError("give exactly one of --model NAME or --config CONFIG.json")
    if args.config is not None:
        try:
            config = ModelConfig.from_file(args.config)
        except (OSError, ValueError) as exc:
            raise PatchdiffError(f"{args.config}: {exc}") from None
        meta = {"model": args.name or Path(args.output).stem}
    else:
        try:
            entry = get_model(args.model, get_settings().weights_dir)
        except KeyError as exc:
            raise PatchdiffError(exc.args[0]) from None
        config = entry.config
        meta = {"model": entry.name}
    if not Path(args.input).is_file():
        raise PatchdiffError(f"{args.input}: no such file")
    model = convert_h5(args.input, args.output, config, meta)
    print(f"wrote {args.output} ({sum(p.numel() for p in model.parameters()):,} parameters)")


def _load_sampling_model(args: argparse.Namespace):
    """The model of `--model` / `--weights` (default: the settings' default model), on `--device` in `--precision`."""
    from patchdiff_core.generation.pipeline import SamplingModel

    settings = get_settings()
    name = args.model or (None if args.weights else settings.default_model)
    return SamplingModel.load(name, args.weights, settings.weights_dir, args.device or settings.device, args.precision or "auto")


def cmd_sample(args: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm

    from patchdiff_core.diffusion.respacing import MODIFIED_STRIDE
    from patchdiff_core.generation.images import write_outputs
    from patchdiff_core.generation.pipeline import generate
    from patchdiff_core.generation.spec import GenerationSpec, SpecError, check_spec, new_seed

    model = _load_sampling_model(args)
    seed = new_seed() if args.seed is None else args.seed
    labels = args.class_label
    if labels is not None:
        labels = [labels[i % len(labels)] for i in range(args.num_images)]
    try:
        spec = GenerationSpec(
            model=model.name,
            num_images=args.num_images,
            class_labels=labels,
            timesteps=MODIFIED_STRIDE if args.modified_stride else (args.timesteps or model.defaults.timesteps),
            sampler=args.sampler or model.defaults.sampler,
            guidance=model.defaults.guidance if args.guidance is None else args.guidance,
            seed=seed,
        )
    except ValueError as exc:
        raise PatchdiffError(str(exc).splitlines()[0]) from None
    try:
        check_spec(spec, model.config.num_classes, beta_max=model.config.beta_max)
    except SpecError as exc:
        raise PatchdiffError(f"--{_FLAG.get(exc.field, exc.field)}: {exc}") from None
    out = Path(args.out or {"grid": "samples.png", "folder": "samples", "npz": "samples.npz"}[args.action])
    print(f"{model.name}: {spec.num_images} images, seed {seed}, {model.device} {model.precision}", file=sys.stderr)
    with tqdm(total=None, unit="step", disable=args.quiet) as bar:

        def progress(info: dict) -> None:
            bar.total = info["total"]
            bar.update(info["step"] - bar.n)

        with torch.inference_mode():
            result = generate(model, spec, args.batch_size, progress)
    paths = write_outputs(result.images, result.labels, out, args.action)
    print(f"wrote {out}" + (f" ({len(paths)} images)" if args.action == "folder" else ""))


def cmd_train(args: argparse.Namespace) -> None:
    import shlex

    import torch
    from tqdm import tqdm

    from patchdiff_core.generation.registry import get_model
    from patchdiff_core.model.config import ModelConfig
    from patchdiff_core.model.device import resolve_device
    from patchdiff_core.training.config import TrainConfig
    from patchdiff_core.training.data import load_dataset
    from patchdiff_core.training.train import Trainer

    if (args.model is None) == (args.config is None):
        raise PatchdiffError("give exactly one of --model NAME or --config CONFIG.json")
    try:
        model_config = (
            get_model(args.model, get_settings().weights_dir).config
            if args.model
            else ModelConfig.from_file(args.config)
        )
    except (KeyError, OSError, ValueError) as exc:
        raise PatchdiffError(str(exc).splitlines()[0]) from None
    device = resolve_device(args.device or "auto")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = TrainConfig(
            model=model_config, data=args.data, class_folders=args.class_folders, batch_size=args.batch_size,
            steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps, ema_rate=args.ema_rate,
            ema_every=args.ema_every, label_dropout=args.label_dropout, min_snr=args.min_snr,
            max_snr=args.max_snr, seed=args.seed, precision=args.precision,
        )
        images, labels, classes = load_dataset(args.data, model_config.res, args.class_folders)
    except ValueError as exc:
        raise PatchdiffError(str(exc).splitlines()[0]) from None
    if model_config.conditional and len(classes) != model_config.num_classes:
        raise PatchdiffError(f"the data has {len(classes)} classes but the model {model_config.num_classes}")
    trainer = Trainer(config, images, labels, args.run_dir, device)
    try:
        resumed = trainer.load_checkpoint()
    except ValueError as exc:
        raise PatchdiffError(str(exc)) from None
    print(f"{'resuming at step ' + str(trainer.step) if resumed else 'new run'} in {args.run_dir}: "
          f"{sum(p.numel() for p in trainer.model.parameters()):,} parameters, {len(images)} images, "
          f"timesteps {trainer.t_range[0]}..{trainer.t_range[1]}, {device}", file=sys.stderr)
    with tqdm(total=config.steps, initial=trainer.step, unit="step", disable=args.quiet) as bar:

        def on_log(entry: dict) -> None:
            bar.update(entry["step"] - bar.n)
            bar.set_postfix(loss=f"{entry['loss']:.1f}", simple=f"{entry['l_simple']:.1f}")

        trainer.run(save_every=args.save_every, log_every=args.log_every, on_log=on_log)
    if args.export:
        command = "patchdiff " + shlex.join(args.argv)
        trainer.export(args.export, args.name or Path(args.export).stem, classes or None, command=command)
        print(f"wrote {args.export} (EMA weights, step {trainer.step})")


def cmd_serve(args: argparse.Namespace) -> None:
    from patchdiff_core.service.serve import serve

    settings = get_settings()
    if args.port:
        settings = settings.model_copy(update={"api_port": args.port})
        os.environ["PATCHDIFF_API_PORT"] = str(args.port)
    raise SystemExit(serve(settings, workers=args.workers))


def cmd_worker(args: argparse.Namespace) -> None:
    from worker.main import run_worker

    run_worker(burst=args.burst)


def cmd_generate(args: argparse.Namespace) -> None:
    """Submit to a running service, follow its progress, download the grid."""
    import httpx
    from tqdm import tqdm

    from patchdiff_core.service.client import PatchdiffClient, ServiceError

    request = {
        "model": args.model, "num_images": args.num_images, "timesteps": args.timesteps,
        "sampler": args.sampler, "guidance": args.guidance, "seed": args.seed,
    }
    if args.class_label and len(args.class_label) == 1:
        request["class_label"] = args.class_label[0]
    elif args.class_label:
        request["class_labels"] = [args.class_label[i % len(args.class_label)] for i in range(args.num_images)]
    api_key = args.api_key or os.environ.get("PATCHDIFF_API_KEY")
    try:
        with PatchdiffClient(args.server, api_key) as client:
            job = client.submit(**request)
            print(f"job {job['id']} (seed {job['request']['seed']})", file=sys.stderr)
            with tqdm(total=None, unit="step", disable=args.quiet) as bar:

                def progress(status: dict) -> None:
                    total = status["progress"]["total"]
                    if total:
                        bar.total = total
                        bar.update(status["progress"]["step"] - bar.n)
                    bar.set_postfix_str(status["status"])

                job = client.wait(job["id"], progress, poll_s=args.poll)
            if job["status"] != "finished":
                raise PatchdiffError(f"job {job['id']} {job['status']}: {job.get('error')}")
            Path(args.out).write_bytes(client.grid(job["id"]))
    except ServiceError as exc:
        raise PatchdiffError(str(exc)) from None
    except httpx.TransportError as exc:
        raise PatchdiffError(f"cannot reach {args.server}: {exc}") from None
    print(f"wrote {args.out}")


def cmd_tune_timesteps(args: argparse.Namespace) -> None:
    from patchdiff_core.diffusion.respacing import resolve_timesteps
    from patchdiff_core.generation.tuning import tune_timesteps

    starts = args.start or [str(args.steps)]
    for start in starts:  # before loading anything: a typo should not cost a reference run
        try:
            count = len(resolve_timesteps(start))
        except ValueError as exc:
            raise PatchdiffError(f"--start {start}: {exc}") from None
        if count != args.steps:
            raise PatchdiffError(f"--start {start}: gives {count} steps, not --steps {args.steps}")
    if args.guidance < 1.0:
        raise PatchdiffError("--guidance: must be at least 1.0 (1.0 = no guidance)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = _load_sampling_model(args)
    if args.guidance != 1.0 and model.config.num_classes <= 1:
        raise PatchdiffError(f"--guidance: {model.name} is unconditional")
    print(f"{model.name}: {args.sampler}, {args.num_images} images, {model.device} {model.precision}", file=sys.stderr)

    def report(steps: list[int], error: float) -> None:
        if not args.quiet:
            print(f"  {steps}: {error:.3g}", file=sys.stderr)

    tunings = tune_timesteps(
        model, args.sampler, starts, args.num_images, guidance=args.guidance, batch_size=args.batch_size, on_improve=report
    )
    for start, tuning in zip(starts, tunings):
        result = tuning.search
        print(f"from {start} {result.start}: error {result.start_error:.3g} -> {result.error:.3g} "
              f"({result.evaluations} schedules tried)", file=sys.stderr)
    print(min(tunings, key=lambda t: t.search.error).spec)


_FLAG = {"class_labels": "class-label", "timesteps": "timesteps", "guidance": "guidance"}


def _default(function: str, name: str):
    """The default of a library function's parameter (`module:function` or `module:Class.method`),
    so that the CLI states no default of its own. Read from the module's source, not imported:
    building the parser must not import torch (`patchdiff generate` and `serve` need none)."""
    import ast
    import importlib.util

    module, _, path = function.partition(":")
    tree = ast.parse(open(importlib.util.find_spec(module).origin, encoding="utf-8").read())
    for part in path.split("."):
        tree = next(node for node in tree.body if getattr(node, "name", None) == part)
    args = tree.args
    positional = args.posonlyargs + args.args
    defaults = dict(zip([a.arg for a in positional][len(positional) - len(args.defaults):], args.defaults))
    defaults |= {a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None}
    return ast.literal_eval(defaults[name])


def _train_default(name: str):
    """`patchdiff train`'s defaults are TrainConfig's: written once."""
    from patchdiff_core.training.config import TrainConfig

    return TrainConfig.model_fields[name].default


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="patchdiff", description="Patch Diffusion: sample, convert, train and serve.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("models", help="list known models, their sizes and whether weights are installed")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("convert", help="convert the authors' Keras ema_weights.h5 to safetensors")
    p.add_argument("input", help="ema_weights.h5")
    p.add_argument("output", help="OUT.safetensors")
    p.add_argument("--model", help="a registry model whose config the file has")
    p.add_argument("--config", help="a config.json in the original constructor's argument names")
    p.add_argument("--name", help="model name stored in the file (with --config; default: output stem)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("sample", help="generate images")
    p.add_argument("--model", help="registry model name (default: PATCHDIFF_DEFAULT_MODEL)")
    p.add_argument("--weights", action="append", type=Path, help="model file(s) anywhere; twice for a split pair")
    p.add_argument("--num-images", type=_positive, default=16)
    p.add_argument("--out", help="output path (default samples.png / samples/ / samples.npz)")
    p.add_argument("--action", choices=["grid", "folder", "npz"], default="grid")
    p.add_argument("--batch-size", type=_positive, default=_default("patchdiff_core.generation.pipeline:generate", "batch_size"))
    p.add_argument("--timesteps", help=f"respacing: {SPEC_FORMS} (default: the model's)")
    p.add_argument("--sampler", choices=SAMPLER_NAMES)
    p.add_argument("--modified-stride", action="store_true", help="the seed's 90,60,60,20,20 spacing")
    p.add_argument("--guidance", type=float, help="classifier-free guidance weight (1.0 = none)")
    p.add_argument("--class-label", type=int, action="append", help="repeatable; default: random from the seed")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--seed", type=_seed)
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("train", help="train (or resume) a model; export its EMA weights")
    p.add_argument("--data", default="digits", help="'digits' (built in) or a folder of PNG/JPEG images")
    p.add_argument("--class-folders", action="store_true", help="class = sub-folder name")
    p.add_argument("--model", help="train a registry model's architecture")
    p.add_argument("--config", help="architecture as a config.json (original argument names)")
    p.add_argument("--run-dir", required=True, type=Path, help="checkpoints and loss log; resumed if present")
    p.add_argument("--steps", type=_positive, default=_train_default("steps"))
    p.add_argument("--batch-size", type=_positive, default=_train_default("batch_size"))
    p.add_argument("--lr", type=float, default=_train_default("lr"))
    p.add_argument("--warmup-steps", type=int, default=_train_default("warmup_steps"))
    p.add_argument("--ema-rate", type=float, default=_train_default("ema_rate"))
    p.add_argument("--ema-every", type=_positive, default=_train_default("ema_every"))
    p.add_argument("--label-dropout", type=float, default=_train_default("label_dropout"))
    p.add_argument("--min-snr", type=float, help="train only timesteps with SNR >= this (low-noise network)")
    p.add_argument("--max-snr", type=float, help="train only timesteps with SNR < this (high-noise network)")
    p.add_argument("--seed", type=int, default=_train_default("seed"))
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=_train_default("precision"))
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=_positive, help="CPU threads for torch")
    p.add_argument("--save-every", type=_positive, default=1000)
    p.add_argument("--log-every", type=_positive, default=50)
    p.add_argument("--export", type=Path, help="write the EMA weights here when done (safetensors)")
    p.add_argument("--name", help="model name stored in the exported file (default: its stem)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "tune-timesteps",
        help="search a model's few-step schedule (the steps that bring a sampler closest to the converged ODE)",
        description="Prints the best schedule as a --timesteps spec ('t:...'), which the CLI, the API and a "
        "manifest's defaults take.",
    )
    p.add_argument("--model", help="registry model name (default: PATCHDIFF_DEFAULT_MODEL)")
    p.add_argument("--weights", action="append", type=Path, help="model file(s) anywhere; twice for a split pair")
    p.add_argument("--sampler", choices=[n for n in SAMPLER_NAMES if n not in NOISY_SAMPLERS], default="unipc_bh1")
    p.add_argument("--steps", type=_positive, default=5, help="network evaluations (taken steps; default 5)")
    p.add_argument("--start", action="append", help="a start schedule spec (repeatable; default: evenly spread --steps)")
    tune = "patchdiff_core.generation.tuning:tune_timesteps"
    p.add_argument("--num-images", type=_positive, default=_default(tune, "num_images"), help="tuning images (default %(default)s)")
    p.add_argument("--batch-size", type=_positive, default=_default(tune, "batch_size"))
    p.add_argument("--guidance", type=float, default=_default(tune, "guidance"))
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=_positive, help="CPU threads for torch")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_tune_timesteps)

    p = sub.add_parser("serve", help="start the whole service: (embedded) Redis, API and workers")
    p.add_argument("--workers", type=_positive, default=_default("patchdiff_core.service.serve:serve", "workers"))
    p.add_argument("--port", type=int, help="API port (default PATCHDIFF_API_PORT or 8000)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run one worker (needs PATCHDIFF_REDIS_URL)")
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("generate", help="generate through a running service and download the grid")
    p.add_argument("--server", default=os.environ.get("PATCHDIFF_SERVER", "http://127.0.0.1:8000"))
    p.add_argument("--api-key", help="or PATCHDIFF_API_KEY")
    p.add_argument("--model")
    p.add_argument("--num-images", type=_positive, default=16)
    p.add_argument("--class-label", type=int, action="append")
    p.add_argument("--timesteps")
    p.add_argument("--sampler", choices=SAMPLER_NAMES)
    p.add_argument("--guidance", type=float)
    p.add_argument("--seed", type=_seed)
    p.add_argument("--out", default="grid.png")
    p.add_argument("--poll", type=float, default=_default("patchdiff_core.service.client:PatchdiffClient.wait", "poll_s"),
                   help="seconds between status polls")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # recorded in exported models
    try:
        args.func(args)
    except PatchdiffError as exc:
        print(f"patchdiff {args.command}: error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


if __name__ == "__main__":
    main()
