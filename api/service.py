"""What the routes do, kept out of the routes: request checking and job views."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Collection, Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path

from patchdiff_core.generation.registry import ModelEntry, SamplingDefaults, all_models
from patchdiff_core.generation.spec import GenerationSpec, SpecError, check_spec, new_seed, random_labels
from patchdiff_core.model.config import ModelConfig
from patchdiff_core.service.records import JobRecord, job_cost, result_links
from patchdiff_core.service.settings import Settings

from .schemas import GenerateRequest, JobView, Links, ModelView, Progress, Timings


class NotServed(Exception):
    """An installed model that no live worker serves now: its workers may come back (503)."""


def build_spec(
    req: GenerateRequest, settings: Settings, served: dict[str, dict],
    known: Mapping[str, ModelEntry] | Collection[str] = frozenset(), announced: AbstractSet[str] = frozenset(),
) -> tuple[GenerationSpec, int]:
    """Check a request against the limits in settings and the model it names; fill in defaults.
    Returns the spec and its cost (`job_cost`).

    `served`: what live workers serve; `known`: the models of this server's registry (names, or
    `all_models`' entries); `announced`: models some worker has announced, live or not. A model that
    no live worker serves is a 503 (`NotServed`) only while retrying can work: it is installed (its
    files are in this server's weights directory, or a worker announced it; the API's image carries
    no weights). Otherwise it is a 422 naming `model`, with how to install it."""
    name = req.model or settings.default_model
    if name not in served:
        raise _unavailable(name, settings, served, known, announced)
    info = served[name]
    config = ModelConfig.model_validate(info["config"])
    defaults = SamplingDefaults.model_validate(info.get("defaults") or {})
    if req.num_images > settings.max_images_per_job:
        raise SpecError("num_images", f"at most {settings.max_images_per_job} images per job")
    sampler = req.sampler or defaults.sampler
    if sampler not in settings.allowed_samplers:
        raise SpecError("sampler", f"sampler {sampler!r} is not allowed here; allowed: {settings.allowed_samplers}")
    guidance = defaults.guidance if req.guidance is None else req.guidance
    if config.num_classes <= 1 and req.guidance is None:
        guidance = 1.0
    if not settings.min_guidance <= guidance <= settings.max_guidance:
        raise SpecError("guidance", f"guidance must be between {settings.min_guidance} and {settings.max_guidance}")
    labels = req.class_labels
    label_field = "class_labels"
    if req.class_label is not None:
        labels, label_field = [req.class_label] * req.num_images, "class_label"
    seed = new_seed() if req.seed is None else req.seed
    if labels is None and config.num_classes > 1:
        labels = random_labels(seed, req.num_images, config.num_classes)  # reported back, as accepted
    try:
        spec = GenerationSpec(
            model=name,
            num_images=req.num_images,
            class_labels=labels,
            timesteps=req.timesteps or defaults.timesteps,
            sampler=sampler,
            guidance=guidance,
            seed=seed,
        )
        steps = check_spec(spec, config.num_classes, settings.max_timesteps, beta_max=config.beta_max)
    except SpecError as exc:
        if exc.field == "class_labels":
            exc.field = label_field  # the field the client used
        raise
    cost = job_cost(spec, len(steps))
    if cost > settings.max_job_cost:
        raise SpecError("num_images", f"the job costs {cost} units (images × steps × 2 if guided), "
                                         f"over the limit of {settings.max_job_cost} per job")
    return spec, cost


def _unavailable(name: str, settings: Settings, served: dict[str, dict],
                 known: Mapping[str, ModelEntry] | Collection[str], announced: AbstractSet[str]) -> Exception:
    if name in announced:
        return NotServed(f"no live worker serves model {name!r} now")
    entries = known if isinstance(known, Mapping) else all_models(settings.weights_dir)
    entry = entries.get(name) if name in known else None
    if entry is not None and entry.installed(settings.weights_dir):
        return NotServed(f"no live worker serves model {name!r} now")
    if entry is not None:
        return SpecError("model", not_installed_message(entry, settings.weights_dir))
    models = ", ".join(sorted({*served, *known, *announced})) or "none"
    return SpecError("model", f"unknown model {name!r}; the models here: {models} (GET /models)")


def not_installed_message(entry: ModelEntry, weights_dir: Path) -> str:
    """What the CLI says of a model without weights, with the command that installs them."""
    missing = [f for f in entry.files if not (weights_dir / f).is_file()] or entry.files
    sources = ["ema_weights.h5"] if len(missing) == 1 else [f"{Path(f).stem}.h5" for f in missing]  # a pair: two files
    commands = " and ".join(f"`patchdiff convert {h5} weights/{f} --model {entry.name}`" for h5, f in zip(sources, missing))
    return (f"model {entry.name!r} is known but not installed: its weights ({', '.join(missing)}) are neither in this "
            f"server's weights directory nor on any worker. Convert the authors' checkpoint with {commands} in a "
            f"worker's weights directory, and start the worker with PATCHDIFF_WORKER_MODELS={entry.name}")


def request_fingerprint(req: GenerateRequest) -> str:
    """The request as the client sent it (a retry without a seed must match the first attempt)."""
    body = req.model_dump_json(exclude={"idempotency_key"})
    return hashlib.sha256(body.encode()).hexdigest()


def job_view(record: JobRecord, base_url: str) -> JobView:
    from .webhook import webhook_view  # here: api.webhook imports this module

    now = time.time()
    job_url = f"{base_url}/jobs/{record.id}"
    links = Links(self=job_url)
    if record.status == "finished":
        links = Links(self=job_url, **result_links(record.id, record.num_results, base_url))
    start, end = record.started_at, record.finished_at
    return JobView(
        id=record.id,
        status=record.status,
        # A queued job that a worker has already taken from its queue (it is starting) is next: 0.
        queue_position=(record.queue_position or 0) if record.status == "queued" else None,
        progress=Progress(step=record.step, total=record.total, images_done=record.images_done,
                          fraction=round(record.step / record.total, 4) if record.total else 0.0),
        timings=Timings(
            created_at=record.created_at,
            started_at=start,
            finished_at=end,
            queued_s=round((start or end or now) - record.created_at, 3),
            run_s=round((end or now) - start, 3) if start else None,
        ),
        request=record.spec,
        error=record.error,
        attempts=record.attempts,
        worker=record.worker,
        cancel_requested=record.cancel_requested,
        links=links,
        webhook=webhook_view(record),
    )


def model_views(known: dict[str, ModelEntry], served: dict[str, dict], weights_dir: Path) -> list[ModelView]:
    """Every model this server knows of, plus any other that a live worker serves."""
    views = []
    for name in [*known, *sorted(set(served) - set(known))]:
        info = served.get(name, {})
        if name in known:
            entry = known[name]
            config, classes, defaults = entry.config, entry.class_names(), entry.defaults
            description, installed = entry.description, entry.installed(weights_dir) or name in served
        else:
            config = ModelConfig.model_validate(info["config"])
            classes, defaults = info.get("classes") or [], SamplingDefaults.model_validate(info.get("defaults") or {})
            description, installed = "served by a worker", True
        views.append(ModelView(
            name=name, description=description, resolution=config.res, patch_size=config.patch_size,
            num_classes=config.num_classes, classes=classes, defaults=defaults,
            parameters=info.get("parameters"), installed=installed, served=name in served,
        ))
    return views
