"""The documented error answers of the routes, so that the OpenAPI schema lists every status code a
route can give and no code it cannot (`tests/test_api_contract.py` checks both directions)."""

from __future__ import annotations

from typing import Optional

from fastapi import FastAPI
from fastapi.routing import APIRoute

from .schemas import ErrorBody

ERR = {"model": ErrorBody}
AUTH_ERRORS = {401: {**ERR, "description": "missing or invalid API key (only when API keys are configured)"},
               503: {**ERR, "description": "Redis unavailable; retry after Retry-After"}}
JOB_ERRORS = {**AUTH_ERRORS, 404: {**ERR, "description": "no such job visible to this key"}}
PNG = {"content": {"image/png": {}}, "description": "the PNG"}


def _can_fail_validation(route: APIRoute) -> bool:
    """Whether any request could fail this route's parameter validation (FastAPI's 422): a body, a
    required query/header/cookie parameter, a constrained one, or one that is not plain text. Path
    parameters are always present once the route matched."""
    if route.body_field is not None:
        return True
    dependants = [route.dependant]
    while dependants:
        dependant = dependants.pop()
        if dependant.body_params:
            return True
        params = [(p, True) for p in dependant.path_params]
        params += [(p, False) for p in dependant.query_params + dependant.header_params + dependant.cookie_params]
        for field, in_path in params:
            info = field.field_info
            if info.metadata or (not in_path and info.is_required()) or info.annotation not in (str, Optional[str]):
                return True
        dependants.extend(dependant.dependencies)
    return False


def use_exact_openapi(app: FastAPI) -> None:
    """FastAPI documents a 422 for every route with any parameter; drop it where no request can
    cause one (a route whose only parameter is a free-text job id answers 404, not 422)."""
    fastapi_openapi = app.openapi  # FastAPI's own generator; it caches the schema in app.openapi_schema

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = fastapi_openapi()
            for route in app.routes:
                if isinstance(route, APIRoute) and route.include_in_schema and not _can_fail_validation(route):
                    for method in route.methods:
                        operation = schema["paths"].get(route.path_format, {}).get(method.lower())
                        if operation is not None:
                            operation["responses"].pop("422", None)
        return app.openapi_schema

    app.openapi = openapi
