"""Step-level continuous batching: the images of many requests advance together, one forward pass per
network per iteration, each image at its own timestep.

The unit is an **image in flight** (`ImageInFlight`): its request, its index there, its own noise
generator (the per-image seed of `spec.image_seed`), label, guidance weight, sampler, the request's
taken timesteps and its position in them, its current x and its sampler state (e.g. a multistep
history). Every `step()`:

1. **chooses** up to `max_rows` network rows per model (a guided image costs two: its conditional
   and "no label" rows), round-robin over the requests in arrival order, so that every request holds
   its share and a new small request gets rows at the very next step. Within a request, images
   already running come first (the furthest along first), then new ones start. Images that were not
   chosen keep their x and state and simply wait a step (this is how a large request yields to small
   ones without losing work);
2. runs **one forward pass per network** over the chosen rows (per-sample t, labels and "no label"
   rows in one batch), mixes guidance and dynamic thresholding per image (`guided_x0`), and at an
   image's lowest taken step keeps the plain conditional pass as its result, as the original;
3. moves every other chosen image one step with its sampler's per-sample `step` (grouped by sampler;
   the same `Sampler.step` that the plain `sample()` loop calls, so the math exists once).

Pictures do not depend on the company an image keeps: image i of a request draws the same noise in
the same order as in `pipeline.generate`, so it matches `patchdiff sample` to within batched
floating-point rounding (the tests allow one grey level, as across batch sizes).

Failures stay with their request: every tensor an image needs (its start noise included) is drawn
request by request, and a batched iteration that raises is retried request by request, so only
the requests that fail on their own are failed. A CUDA out-of-memory error anywhere in a step halves
the model's `max_rows` and retries the iteration (the pictures do not change). A finished image's
result is a copy of its row, so that it does not keep its step's whole batch alive.

Torch-level and Redis-free: the worker (`worker/runner.py`) feeds it jobs from the queue and
publishes what `step()` reports; the tests drive it directly.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from patchdiff_core.diffusion.samplers import SAMPLERS, Sampler, guided_x0
from patchdiff_core.generation.images import to_uint8
from patchdiff_core.generation.pipeline import SamplingModel, image_noise
from patchdiff_core.generation.spec import GenerationSpec, check_spec, resolve_labels

log = logging.getLogger(__name__)

NoiseSource = Callable[[], torch.Tensor]  # the next noise draw of one image, [3, R, R]
ImageHook = Callable[["RequestInFlight", int, torch.Tensor, torch.Tensor], None]


@dataclass(eq=False)
class ImageInFlight:
    request: "RequestInFlight"
    index: int
    noise: NoiseSource | None = None  # its own generator's draws (made when it starts)
    x: torch.Tensor | None = None  # [3, R, R] float32, at timestep request.steps[position] (None: not drawn yet)
    state: dict[str, torch.Tensor] | None = None  # the sampler's per-image memory, without the batch dimension
    position: int = 0  # how many of the request's taken steps are done
    x0: torch.Tensor | None = None  # the latest x0 prediction (for previews)
    next_noise: torch.Tensor | None = None  # drawn for the coming step, kept if that step is retried

    @property
    def t(self) -> int:
        return self.request.steps[self.position]

    @property
    def final(self) -> bool:
        """At the lowest taken step: the plain conditional pass gives the result."""
        return self.position == len(self.request.steps) - 1

    @property
    def rows(self) -> int:
        return 2 if self.request.guided and not self.final else 1


@dataclass(eq=False)
class RequestInFlight:
    id: str
    model: SamplingModel
    spec: GenerationSpec
    steps: list[int]  # taken timesteps, highest first
    labels: list[int] | None
    sampler: Sampler
    noise_for: Callable[[int], NoiseSource]
    arrival: int
    pending: deque[int] = field(default_factory=deque)  # image indices not started yet
    running: list[ImageInFlight] = field(default_factory=list)
    results: dict[int, torch.Tensor] = field(default_factory=dict)  # index -> final x0 [3, R, R]
    image_steps: int = 0  # network evaluations done, counted per image (a guided pair counts once)

    @property
    def guided(self) -> bool:
        return self.spec.guidance != 1.0

    @property
    def total_steps(self) -> int:
        return self.spec.num_images * len(self.steps)

    @property
    def done(self) -> bool:
        return len(self.results) == self.spec.num_images

    def x0_images(self) -> torch.Tensor:
        """Final x0 of every image, [N, 3, R, R], in index order (once done)."""
        return torch.stack([self.results[i] for i in range(self.spec.num_images)])


@dataclass
class StepReport:
    """What one `step()` did, for the caller to publish."""

    advanced: list[RequestInFlight] = field(default_factory=list)  # requests that moved this step
    finished: list[RequestInFlight] = field(default_factory=list)  # all images done: results ready
    failed: list[tuple[RequestInFlight, str]] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  # network rows run per model
    seconds: float = 0.0


class BatchEngine:
    def __init__(self, models: dict[str, SamplingModel], max_rows: dict[str, int], on_image_step: ImageHook | None = None):
        missing = set(models) - set(max_rows)
        if missing:
            raise ValueError(f"no max_rows for {sorted(missing)}")
        self.models = models
        self.max_rows = {name: max(1, int(n)) for name, n in max_rows.items()}
        self.on_image_step = on_image_step
        # Each model's cumulative alphas on its device, once (not copied again at every step).
        self.alphas = {name: m.schedule.alphas_cumprod.to(m.device) for name, m in models.items()}
        self.requests: dict[str, RequestInFlight] = {}
        self._arrivals = itertools.count()

    # -- requests ------------------------------------------------------------------------------
    def add(self, request_id: str, spec: GenerationSpec, noise_for: Callable[[int], NoiseSource] | None = None) -> RequestInFlight:
        """Admit a request; its images start at the next steps, as rows become free.

        `noise_for(i)` gives image i's noise source (its first draw is x_T); by default the image's
        own generator seeded from (spec.seed, i), exactly as `pipeline.generate` draws it.
        """
        if request_id in self.requests:
            raise ValueError(f"request {request_id} is already in flight")
        model = self.models.get(spec.model)
        if model is None:
            raise ValueError(f"this engine does not serve model {spec.model!r}")
        steps = sorted(check_spec(spec, model.config.num_classes, beta_max=model.config.beta_max), reverse=True)
        res = model.config.res
        if noise_for is None:
            def noise_for(i: int) -> NoiseSource:
                return image_noise(spec.seed, i, (3, res, res), model.device)
        request = RequestInFlight(
            id=request_id, model=model, spec=spec, steps=steps,
            labels=resolve_labels(spec, model.config.num_classes), sampler=SAMPLERS[spec.sampler],
            noise_for=noise_for, arrival=next(self._arrivals), pending=deque(range(spec.num_images)),
        )
        self.requests[request_id] = request
        return request

    def remove(self, request_id: str) -> RequestInFlight | None:
        """Drop a request (cancelled, failed, handed back): its images leave before the next step."""
        return self.requests.pop(request_id, None)

    @property
    def idle(self) -> bool:
        return not self.requests

    def images_in_flight(self) -> int:
        return sum(len(r.running) for r in self.requests.values())

    # -- one iteration -------------------------------------------------------------------------
    def step(self) -> StepReport:
        started = time.perf_counter()
        report = StepReport()
        for name, model in self.models.items():
            chosen = self._choose(name)
            if not chosen:
                continue
            try:
                chosen = self._prepare(chosen, report)
                if not chosen:
                    continue
                self._advance(model, chosen)
            except torch.cuda.OutOfMemoryError:
                self._shrink(name, chosen, report)
                continue
            except Exception:  # noqa: BLE001 - find the request(s) at fault, spare the others
                log.exception("a batched step of %s failed; retrying request by request", name)
                self._advance_one_by_one(model, chosen, report)
            else:
                report.rows[name] = sum(image.rows for image in chosen)
            self._collect(chosen, report)
        report.seconds = time.perf_counter() - started
        return report

    def _choose(self, model_name: str) -> list[ImageInFlight]:
        """Round-robin over the model's requests (oldest first), one image per request per round,
        until `max_rows` rows are taken: running images first (furthest along first), then new ones."""
        requests = sorted((r for r in self.requests.values() if r.spec.model == model_name), key=lambda r: r.arrival)
        candidates = {r.id: _candidates(r) for r in requests}
        budget, chosen = self.max_rows[model_name], []
        while requests:
            progressed = False
            for r in list(requests):
                image = next(candidates[r.id], None)
                if image is None:
                    requests.remove(r)
                    continue
                if image.rows > budget and chosen:  # no room left for this one this step
                    requests.remove(r)
                    continue
                chosen.append(image)
                budget -= image.rows
                progressed = True
                if budget <= 0:
                    return chosen
            if not progressed:
                break
        return chosen

    def _prepare(self, images: list[ImageInFlight], report: StepReport) -> list[ImageInFlight]:
        """Every tensor the chosen images need before the network runs: the start noise x_T (and
        the sampler's initial state) of images that start now, and the coming step's noise of the
        others. Drawn before anything is computed, and kept if the step is retried, so each draw
        advances an image's own generator exactly once. A request whose draw fails fails alone; an
        out-of-memory error is raised, so that the step shrinks its batch like any other."""
        broken: set[str] = set()
        for request, group in _group(images, lambda image: image.request).items():
            try:
                for image in group:
                    if image.noise is None:
                        image.noise = request.noise_for(image.index)
                    if image.x is None:
                        image.x = image.noise().float()
                    if image.state is None:
                        image.state = {k: s[0] for k, s in request.sampler.init_state(image.x[None]).items()}
                    if not image.final and request.sampler.needs_noise and image.next_noise is None:
                        image.next_noise = image.noise().float()
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - a broken noise source fails its request only
                log.exception("request %s: drawing its noise failed", request.id)
                broken.add(request.id)
                self.remove(request.id)
                report.failed.append((request, f"internal error: {type(exc).__name__}: {exc}"))
        return [image for image in images if image.request.id not in broken]

    def _advance(self, model: SamplingModel, images: list[ImageInFlight]) -> None:
        """One network evaluation for `images` (mixed requests, timesteps, samplers), then one
        sampler step for each image that is not at its last step. Nothing changes until all is
        computed, so a failed call can be retried."""
        x0, v = self._predict(model, images)
        moving = [i for i, image in enumerate(images) if not image.final]
        alphas = self.alphas[images[0].request.spec.model]  # all images of one call share the model
        updates = {}
        for sampler_name, rows in _group(moving, lambda i: images[i].request.sampler.name).items():
            sampler = SAMPLERS[sampler_name]
            group = [images[i] for i in rows]
            t = torch.tensor([image.t for image in group], device=model.device)
            t_next = torch.tensor([image.request.steps[image.position + 1] for image in group], device=model.device)
            last = torch.tensor([image.position + 2 == len(image.request.steps) for image in group], device=model.device)
            noise = torch.stack([image.next_noise for image in group]) if sampler.needs_noise else None
            state = {k: torch.stack([image.state[k] for image in group]) for k in group[0].state}
            x = torch.stack([image.x for image in group])
            idx = torch.tensor(rows, device=model.device)
            x_next, state = sampler.step(x, x0[idx], v[idx], alphas[t], alphas[t_next], state, noise, last)
            for j, image in enumerate(group):
                updates[image] = (x_next[j], {k: s[j] for k, s in state.items()})
        for image, (x, state) in updates.items():
            image.x, image.state, image.next_noise = x, state, None
        for i, image in enumerate(images):
            image.x0 = x0[i]
            if image.final:
                # A copy: a view would keep this step's whole batch of x0 alive until the job ends.
                image.request.results[image.index] = x0[i].clone()
            else:
                image.position += 1
            image.request.image_steps += 1
            if self.on_image_step is not None:
                self.on_image_step(image.request, image.index, image.x, x0[i])

    def _predict(self, model: SamplingModel, images: list[ImageInFlight]) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 (guided and thresholded where asked, plain at the last step) and v for every image."""
        n = len(images)
        x0 = torch.empty((n, 3, model.config.res, model.config.res), device=model.device)
        v = torch.empty_like(x0)
        for net_index, rows in _group(range(n), lambda i: model.network_for(images[i].t)).items():
            forward = model.forwards[net_index]
            group = [images[i] for i in rows]
            guided = [j for j, image in enumerate(group) if image.rows == 2]
            x = torch.stack([image.x for image in group])
            t = torch.tensor([image.t for image in group], dtype=torch.long, device=model.device)
            y = None
            if model.config.conditional:
                y = torch.tensor([image.request.labels[image.index] for image in group], device=model.device)
            if guided:  # the "no label" rows of the guided images, in the same batch
                g = torch.tensor(guided, device=model.device)
                x, t = torch.cat([x, x[g]]), torch.cat([t, t[g]])
                y = torch.cat([y, torch.full((len(guided),), model.networks[net_index].null_label, device=model.device)])
            pred_x0, pred_v = forward(x, t, y)
            cond = pred_x0[: len(group)].clone()
            if guided:
                g = torch.tensor(guided, device=model.device)
                weights = torch.tensor([group[j].request.spec.guidance for j in guided], device=model.device)
                cond[g] = guided_x0(cond[g], pred_x0[len(group):], weights)
            index = torch.tensor(rows, device=model.device)
            x0[index], v[index] = cond, pred_v[: len(group)]
        return x0, v

    def _advance_one_by_one(self, model: SamplingModel, images: list[ImageInFlight], report: StepReport) -> None:
        for request, group in _group(images, lambda image: image.request).items():
            try:
                self._advance(model, group)
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                log.exception("request %s failed", request.id)
                self.remove(request.id)
                report.failed.append((request, f"internal error: {type(exc).__name__}: {exc}"))

    def _shrink(self, name: str, images: list[ImageInFlight], report: StepReport) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.max_rows[name] > 1:
            self.max_rows[name] = max(1, self.max_rows[name] // 2)
            log.warning("%s: CUDA out of memory; at most %d rows per forward from now on", name, self.max_rows[name])
            return
        for request in {image.request for image in images}:
            self.remove(request.id)
            report.failed.append((request, "CUDA out of memory with a batch of one image"))

    def _collect(self, images: list[ImageInFlight], report: StepReport) -> None:
        failed = {r.id for r, _ in report.failed}
        for request in {image.request: None for image in images}:
            if request.id in failed or request.id not in self.requests:
                continue
            request.running = [image for image in request.running if image.index not in request.results]
            report.advanced.append(request)
            if request.done:
                self.remove(request.id)
                report.finished.append(request)


def _candidates(request: RequestInFlight):
    """Images of a request in the order they should get rows: running (furthest first), then new
    ones (bookkeeping only: their tensors are drawn by `_prepare`, where a failure is contained)."""
    yield from sorted(request.running, key=lambda image: -image.position)
    while request.pending:
        image = ImageInFlight(request, request.pending.popleft())
        request.running.append(image)
        yield image


def _group(items, key) -> dict:
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def images_uint8(request: RequestInFlight) -> np.ndarray:
    """The finished request's pictures, [N, R, R, 3] uint8, as `pipeline.generate` makes them."""
    return to_uint8(request.x0_images())
