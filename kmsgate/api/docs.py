"""The API documentation pages, `/docs` (Swagger UI) and `/redoc`, served without a network:
their scripts and styles come from the installed fastapi-offline package, not from a CDN."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse

ASSETS_URL = "/docs-assets"
TITLE = "kmsgate API"


def _assets_dir() -> Path:
    return Path(fastapi_offline.__file__).resolve().parent / "static"


def _urls(request: Request) -> tuple[str, str]:
    """(the assets' base URL, the OpenAPI document's URL) as this request reaches them."""
    root = str(request.scope.get("root_path", ""))
    return f"{root}{ASSETS_URL}", f"{root}{request.app.openapi_url}"


async def swagger_ui(request: Request) -> HTMLResponse:
    assets, openapi_url = _urls(request)
    return get_swagger_ui_html(
        openapi_url=openapi_url,
        title=TITLE,
        swagger_js_url=f"{assets}/swagger-ui-bundle.js",
        swagger_css_url=f"{assets}/swagger-ui.css",
        swagger_favicon_url=f"{assets}/favicon.png",
    )


async def redoc(request: Request) -> HTMLResponse:
    assets, openapi_url = _urls(request)
    return get_redoc_html(
        openapi_url=openapi_url,
        title=TITLE,
        redoc_js_url=f"{assets}/redoc.standalone.js",
        redoc_favicon_url=f"{assets}/favicon.png",
        with_google_fonts=False,
    )


def install_docs(app: FastAPI) -> None:
    """Serve `/docs`, `/redoc` and their assets on `app` (created with docs_url=None and
    redoc_url=None). The handlers are module functions: nothing here holds on to `app`."""
    app.mount(ASSETS_URL, StaticFiles(directory=_assets_dir()), name="docs-assets")
    app.add_api_route("/docs", swagger_ui, methods=["GET"], include_in_schema=False)
    app.add_api_route("/redoc", redoc, methods=["GET"], include_in_schema=False)
