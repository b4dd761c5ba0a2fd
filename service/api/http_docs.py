"""The API's documentation pages without internet: /docs (Swagger UI) and /redoc load
their JavaScript and CSS from this server, not from a CDN.

FastAPI's own pages point at cdn.jsdelivr.net and fastapi.tiangolo.com, so in an
air-gapped cluster they render blank. The assets come from the ``fastapi-offline``
package (swagger-ui-dist and the ReDoc bundle, kept current by its maintainer), served
under :data:`ASSETS_PREFIX` from a fixed list of files.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Final

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, HTMLResponse

DOCS_ROUTE: Final = "/docs"
OAUTH2_REDIRECT_ROUTE: Final = "/docs/oauth2-redirect"
REDOC_ROUTE: Final = "/redoc"
ASSETS_PREFIX: Final = "/docs/assets/"
# name -> media type; anything else under the prefix is a 404
ASSETS: Final[dict[str, str]] = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
# Swagger UI would otherwise send the document to validator.swagger.io for a badge.
_SWAGGER_PARAMETERS: Final = {"validatorUrl": None}


def assets_directory() -> Path:
    """Where the installed ``fastapi-offline`` keeps the swagger-ui-dist and ReDoc files."""
    return Path(str(files("fastapi_offline") / "static"))


def add_offline_docs(app: FastAPI, openapi_url: str = "/openapi.json") -> None:
    """Serve /docs, its OAuth2 redirect page and /redoc on ``app`` (created with
    ``docs_url=None, redoc_url=None``), every asset from :data:`ASSETS_PREFIX`."""
    directory = assets_directory()
    missing = [name for name in ASSETS if not (directory / name).is_file()]
    if missing:  # a fastapi-offline release that moved its files: fail at start-up
        raise RuntimeError(f"fastapi-offline lacks {missing} in {directory}: pin a version")

    def asset(request: Request, name: str) -> str:
        return f"{request.scope.get('root_path', '').rstrip('/')}{ASSETS_PREFIX}{name}"

    @app.get(DOCS_ROUTE, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=asset(request, "swagger-ui-bundle.js"),
            swagger_css_url=asset(request, "swagger-ui.css"),
            swagger_favicon_url=asset(request, "favicon.png"),
            oauth2_redirect_url=root + OAUTH2_REDIRECT_ROUTE,
            swagger_ui_parameters=_SWAGGER_PARAMETERS,
        )

    @app.get(OAUTH2_REDIRECT_ROUTE, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_ROUTE, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=asset(request, "redoc.standalone.js"),
            redoc_favicon_url=asset(request, "favicon.png"),
            with_google_fonts=False,
        )

    @app.get(ASSETS_PREFIX + "{name}", include_in_schema=False)
    async def docs_asset(name: str) -> FileResponse:
        media_type = ASSETS.get(name)
        if media_type is None:
            raise HTTPException(404, f"no documentation asset {name!r}")
        return FileResponse(
            directory / name,
            media_type=media_type,
            headers={"Cache-Control": "public, max-age=86400"},
        )
