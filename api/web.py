"""The web page at `/` and the API docs at `/docs` and `/redoc`, all served by this process: no CDN.

The page's files are in `api/static/`; the Swagger UI and ReDoc assets come from the
`fastapi-offline` package (it ships exactly those files, kept in step with FastAPI's defaults).
Files are looked up in fixed tables by name, so no request path ever reaches the filesystem.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

PAGE_DIR = Path(__file__).resolve().parent / "static"
DOCS_DIR = Path(str(files("fastapi_offline") / "static"))

PAGE_FILES = {
    "app.js": "text/javascript",
    "app.css": "text/css",
}
DOCS_FILES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}

# Nothing on these pages may load from elsewhere; the CSP makes the browser enforce it (ReDoc's
# footer would otherwise fetch the Redocly logo from its CDN). Inline scripts: Swagger UI's and
# ReDoc's start-up snippets.
PAGE_CSP = "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'"
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'")

# The page and the docs need no API key: they only load the public API, which asks for one.
router = APIRouter(include_in_schema=False)


def _file(directory: Path, table: dict[str, str], name: str) -> FileResponse:
    if name not in table:
        raise HTTPException(status_code=404, detail="no such file")
    return FileResponse(directory / name, media_type=table[name], headers={"Cache-Control": "public, max-age=3600"})


@router.get("/", response_class=HTMLResponse)
def page() -> FileResponse:
    return FileResponse(PAGE_DIR / "index.html", media_type="text/html",
                        headers={"Cache-Control": "no-cache", "Content-Security-Policy": PAGE_CSP})


@router.get("/static/{name}")
def page_asset(name: str) -> FileResponse:
    return _file(PAGE_DIR, PAGE_FILES, name)


@router.get("/static/docs/{name}")
def docs_asset(name: str) -> FileResponse:
    return _file(DOCS_DIR, DOCS_FILES, name)


def _root(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


@router.get("/docs", response_class=HTMLResponse)
def swagger_ui(request: Request) -> HTMLResponse:
    root = _root(request)
    html = get_swagger_ui_html(
        openapi_url=root + request.app.openapi_url, title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}/static/docs/swagger-ui-bundle.js", swagger_css_url=f"{root}/static/docs/swagger-ui.css",
        swagger_favicon_url=f"{root}/static/docs/favicon.png",
    )
    html.headers["Content-Security-Policy"] = DOCS_CSP
    return html


@router.get("/redoc", response_class=HTMLResponse)
def redoc(request: Request) -> HTMLResponse:
    root = _root(request)
    html = get_redoc_html(
        openapi_url=root + request.app.openapi_url, title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}/static/docs/redoc.standalone.js",
        redoc_favicon_url=f"{root}/static/docs/favicon.png", with_google_fonts=False,
    )
    html.headers["Content-Security-Policy"] = DOCS_CSP
    return html
