"""What the routes do, kept out of the routes: request checking and job views."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from patchdiff_core.generation.registry import ModelEntry, SamplingDefaults
from patchdiff_core.generation.spec import GenerationSpec, SpecError, check_spec, new_seed, random_labels
from patchdiff_core.model.config import ModelConfig
from patchdiff_core.service.jobs import JobRecord, JobStore, job_cost
from patchdiff_core.service.settings import Settings

from .schemas import GenerateRequest, JobView, Links, ModelView, Progress, Timings


class NotServed(Exception):
    """A model this server knows, but no live worker serves it now: try again later (503)."""


def build_spec(
    req: GenerateRequest, settings: Settings, served: dict[str, dict], known: set[str] = frozenset()
) -> tuple[GenerationSpec, int]:
    """Check a request against the limits in settings and the model it names; fill in defaults.
    Returns the spec and its cost (`job_cost`)."""
    name = req.model or settings.default_model
    if name not in served:
        if name in known or not served:
            raise NotServed(f"no live worker serves model {name!r} now")
        available = ", ".join(sorted(served))
        raise SpecError("model", f"model {name!r} is not served by any live worker; available: {available}")
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


def request_fingerprint(req: GenerateRequest) -> str:
    """The request as the client sent it (a retry without a seed must match the first attempt)."""
    body = req.model_dump_json(exclude={"idempotency_key"})
    return hashlib.sha256(body.encode()).hexdigest()


def job_view(record: JobRecord, jobs: JobStore, base_url: str) -> JobView:
    from .webhook import webhook_view  # here: api.webhook imports this module

    now = time.time()
    job_url = f"{base_url}/jobs/{record.id}"
    links = Links(self=job_url)
    if record.status == "finished":
        links = Links(
            self=job_url,
            grid=f"{job_url}/grid.png",
            images=[f"{job_url}/images/{i}.png" for i in range(record.num_results)],
            record=f"{job_url}/record.json",
        )
    start = record.started_at
    end = record.finished_at
    return JobView(
        id=record.id,
        status=record.status,
        # A queued job that a worker has already taken off the RQ list (it is starting) is next: 0.
        queue_position=(jobs.queue_position(record) or 0) if record.status == "queued" else None,
        progress=Progress(
            step=record.step, total=record.total, fraction=round(record.step / record.total, 4) if record.total else 0.0
        ),
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
        webhook=webhook_view(record, jobs.redis),
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
