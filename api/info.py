"""What the server says about itself, with no API key:

- `GET /limits`: the request limits of this server, read from its settings (the page's form takes
  its bounds from here, so it never offers what the server refuses);
- `GET /autoscale`: the work waiting for the workers, per model, for an autoscaler."""

from __future__ import annotations

from fastapi import APIRouter

from .deps import Jobs, SettingsDep
from .responses import ERR
from .schemas import SEED_LIMIT, TIMESTEPS_MAX_LENGTH, Autoscale, Limits, ModelLoad

# Open like /healthz and /openapi.json: limits are part of the public contract, not of any tenant.
router = APIRouter(tags=["info"])


@router.get("/limits", response_model=Limits, responses={200: {"description": "this server's request limits"}})
async def get_limits(settings: SettingsDep) -> Limits:
    return Limits(
        max_images_per_job=settings.max_images_per_job,
        max_timesteps=settings.max_timesteps,
        timesteps_max_length=TIMESTEPS_MAX_LENGTH,
        min_guidance=settings.min_guidance,
        max_guidance=settings.max_guidance,
        allowed_samplers=settings.allowed_samplers,
        max_job_cost=settings.max_job_cost,
        max_seed=SEED_LIMIT - 1,
        submit_rate_per_minute=settings.submit_rate_per_minute,
    )


@router.get("/autoscale", response_model=Autoscale,
            responses={503: {**ERR, "description": "Redis unavailable; retry after Retry-After"}})
def autoscale(jobs: Jobs) -> Autoscale:
    """Outstanding work per model, for KEDA's `metrics-api` scaler (`valueLocation:
    models.<model>.outstanding_cost`): one small Redis round trip, whatever the number of jobs."""
    load = jobs.model_load()
    return Autoscale(outstanding_cost=sum(m["outstanding_cost"] for m in load.values()),
                     models={name: ModelLoad(**numbers) for name, numbers in load.items()})
