"""MkDocs hook: the table of every 4xx answer of the API, generated from its OpenAPI schema.

docs/guide/errors.md holds the line `<!-- generated: api-errors -->`; this hook replaces it with one
row per (status, route) that the schema documents: the cause is the route's own description of that
answer, the fix comes from WHAT_TO_DO below. The schema is built in-process (no Redis needed). A 4xx
that the API starts to give without a fix written here fails the build, and so does a route-specific
fix for an answer the schema no longer lists: the table cannot drift from the API.
"""

from __future__ import annotations

MARKER = "<!-- generated: api-errors -->"
PAGE = "guide/errors.md"

# What a client should do, per status; (status, "METHOD /path") entries override it for one route.
WHAT_TO_DO: dict[int | tuple[int, str], str] = {
    400: "Send the body as UTF-8 encoded JSON.",
    401: "Send one of the server's keys as `X-API-Key: KEY` (or `Authorization: Bearer KEY`).",
    403: "Use a key that may see this resource.",
    404: "Check the job id, and that the job was made with the same API key; a job's record and "
         "results are deleted `PATCHDIFF_JOB_TTL_S` after it ended.",
    (404, "GET /jobs/{job_id}/grid.png"): "Wait until the job is `finished` (poll `GET /jobs/{id}` or "
                                          "watch `GET /jobs/{id}/events`), then fetch it.",
    (404, "GET /jobs/{job_id}/images/{index}.png"): "Wait until the job is `finished`; images are "
                                                    "numbered from 0 to `num_images` - 1.",
    (404, "GET /jobs/{job_id}/preview.png"): "Wait for the first `progress` event that carries a preview.",
    405: "Use the method the route documents.",
    409: "Nothing to retry: read the job's status.",
    (409, "POST /generate"): "Send a new `idempotency_key` for a new request; the same key with the same "
                             "body returns the first job.",
    413: "Send a smaller body (at most `PATCHDIFF_MAX_BODY_BYTES`, 1 MiB by default).",
    415: "Send the body as JSON with the header `content-type: application/json`.",
    422: "Read `detail[].loc` (the field) and `detail[].msg` (what is wrong), fix that field and send "
         "again. Limits are in `GET /models` (per model) and on the [settings page](settings.md).",
    429: "Wait `Retry-After` seconds, then retry.",
    (429, "POST /generate"): "Wait `Retry-After` seconds, then retry; the message says which limit "
                             "(submissions per minute, or the queued work of this key, this model or "
                             "everyone).",
    (429, "GET /jobs/{job_id}/events"): "Wait `Retry-After` seconds, or poll `GET /jobs/{id}` instead.",
}
# FastAPI's own description of its validation answer says nothing about the cause.
GENERIC_422 = {"Validation Error", "Unprocessable Entity", "Unprocessable Content"}
CAUSE_422 = ("a field or parameter is missing, of the wrong type or out of range (checked against the "
             "schema, the settings' limits and the model)")


def openapi_schema() -> dict:
    from api.main import create_app
    from patchdiff_core.service.settings import Settings

    # The URL is never dialled: building the schema touches no Redis.
    return create_app(Settings(redis_url="redis://127.0.0.1:1/0")).openapi()


def client_errors(schema: dict) -> list[tuple[int, str, str]]:
    """(status, "METHOD /path", description) of every documented 4xx, by status then route."""
    rows = []
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for status, response in operation.get("responses", {}).items():
                if status.startswith("4"):
                    rows.append((int(status), f"{method.upper()} {path}", response.get("description", "")))
    return sorted(rows)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def errors_markdown(schema: dict | None = None) -> str:
    rows = client_errors(schema or openapi_schema())
    seen = {(status, route) for status, route, _ in rows}
    stale = [key for key in WHAT_TO_DO if isinstance(key, tuple) and key not in seen]
    missing = sorted({status for status, route, _ in rows if status not in WHAT_TO_DO})
    if stale or missing:
        raise ValueError(f"docs/hooks/api_errors_page.py: WHAT_TO_DO lacks a fix for {missing} "
                         f"or names answers the API no longer gives: {stale}")
    # One row per (status, cause, fix): the routes that answer alike share it.
    merged: dict[tuple[int, str, str], list[str]] = {}
    for status, route, description in rows:
        cause = CAUSE_422 if status == 422 and description in GENERIC_422 else description
        fix = WHAT_TO_DO.get((status, route), WHAT_TO_DO[status])
        merged.setdefault((status, cause, fix), []).append(route)
    out = ["| status | routes | cause | what to do |", "|---|---|---|---|"]
    for (status, cause, fix), routes in merged.items():
        listed = "<br>".join(f"`{route}`" for route in routes)
        out.append(f"| **{status}** | {listed} | {_cell(cause)} | {_cell(fix)} |")
    return "\n".join(out) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    from mkdocs.exceptions import PluginError

    if MARKER not in markdown:
        raise PluginError(f"{PAGE} must hold the line {MARKER} (the generated table goes there)")
    try:
        return markdown.replace(MARKER, errors_markdown())
    except ValueError as exc:
        raise PluginError(str(exc)) from None
