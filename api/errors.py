"""Request errors that say what to do: a body sent without a JSON content type is a 415 naming the
header to send, an unknown field names the nearest valid one, and every error can be encoded
whatever the input held (non-finite numbers, bytes that are not UTF-8)."""

from __future__ import annotations

import difflib
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel

JSON_HEADER = "content-type: application/json"


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_error)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 with messages that name the fix, or a 415 for a body that was not sent as JSON."""
    if isinstance(exc.body, (bytes, bytearray)):
        # FastAPI hands the raw bytes to validation when the content type is not JSON (its own
        # answer then reads "Input should be a valid dictionary or object").
        sent = request.headers.get("content-type")
        return JSONResponse(status_code=415, content={"detail": (
            f"send the body as JSON with the header `{JSON_HEADER}` "
            f"({'no content-type was sent' if sent is None else f'got content-type: {sent[:100]}'})")})
    fields = _body_fields(request)
    errors = [_explained(error, fields) for error in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(_finite(errors))})


def _body_fields(request: Request) -> list[str]:
    """The field names of the route's JSON body model (none for routes without one)."""
    route = request.scope.get("route")
    field = route.body_field if isinstance(route, APIRoute) else None
    model = getattr(field, "field_info", None) and field.field_info.annotation
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [info.alias or name for name, info in model.model_fields.items()]
    return []


def _explained(error: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    loc = tuple(error.get("loc", ()))
    if error.get("type") == "extra_forbidden" and len(loc) == 2 and loc[0] == "body" and fields:
        return {**error, "msg": unknown_field_message(str(loc[1]), fields)}
    if error.get("type") in ("int_type", "float_type") and isinstance(error.get("input"), (str, bool)):
        sent = "a string" if isinstance(error["input"], str) else "a boolean"
        return {**error, "msg": f"{error['msg']} (a JSON number, not {sent})"}
    if error.get("type") == "missing" and loc == ("body",):
        return {**error, "msg": f"a JSON object is required (`{{}}` takes every default), sent with `{JSON_HEADER}`"}
    return error


def unknown_field_message(name: str, fields: list[str]) -> str:
    """'unknown field `num_image`; did you mean `num_images`?', or the list of fields if none is near."""
    by_folded = {f.lower().replace("_", ""): f for f in fields}
    near = difflib.get_close_matches(name.lower().replace("_", ""), list(by_folded), n=1, cutoff=0.6)
    if near:
        return f"unknown field `{name}`; did you mean `{by_folded[near[0]]}`?"
    return f"unknown field `{name}`; the fields are: {', '.join(fields)}"


def _finite(value: Any) -> Any:
    """JSON cannot carry NaN or ±Infinity, nor bytes that are not UTF-8: name them as text in error
    details (FastAPI's own encoder would fail on those and answer 500)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
