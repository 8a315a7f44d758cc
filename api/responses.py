"""The documented answers of the routes, so that the OpenAPI schema lists every status code a route
can give and no code it cannot (`tests/test_api_contract.py` checks both directions), and so that a
generated client gets stable method names (`operation_id`) and PNG answers as bytes."""

from __future__ import annotations

from typing import Optional

from fastapi import FastAPI
from fastapi.routing import APIRoute

from .schemas import ErrorBody

ERR = {"model": ErrorBody}
AUTH_ERRORS = {401: {**ERR, "description": "missing or invalid API key (only when API keys are configured)"},
               503: {**ERR, "description": "Redis unavailable; retry after Retry-After"}}
JOB_ERRORS = {**AUTH_ERRORS, 404: {**ERR, "description": "no such job visible to this key"}}
# PNG bodies are binary strings: with no schema, a generated client's method returns nothing for
# them (openapi-python-client, which also needs `image/png` mapped to bytes in its
# `content_type_overrides`: tests/test_openapi_client.py).
BINARY = {"type": "string", "format": "binary"}
PNG = {"content": {"image/png": {"schema": BINARY}}, "description": "the PNG"}
UNSUPPORTED_MEDIA_TYPE = {"description": "the body was not sent as JSON: send `content-type: application/json`",
                          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}

INVALID = ("a parameter or field is invalid: each item of `detail` names it in `loc` and says why in `msg` "
           "(an unknown field names the nearest valid one)")


def operation_id(route: APIRoute) -> str:
    """A route's OpenAPI operation id: its function name (`generate`, `get_job`), the method names of
    a generated client. FastAPI's default adds the path and method (`get_job_jobs__job_id__get`)."""
    return route.name


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
    cause one (a route whose only parameter is a free-text job id answers 404, not 422). Add the 415
    of every route with a JSON body (`api.errors`), and give every PNG body its binary schema."""
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
            # Over the schema itself: included routers' routes are not all in `app.routes`.
            for operation in (op for ops in schema["paths"].values() for op in ops.values()):
                if "application/json" in operation.get("requestBody", {}).get("content", {}):
                    operation["responses"].setdefault("415", UNSUPPORTED_MEDIA_TYPE)
                invalid = operation["responses"].get("422")
                if invalid is not None and invalid.get("description") == "Validation Error":  # FastAPI's words
                    invalid["description"] = INVALID
                for response in operation["responses"].values():
                    png = response.get("content", {}).get("image/png")
                    if png is not None and not png.get("schema"):
                        png["schema"] = BINARY
        return app.openapi_schema

    app.openapi = openapi
