"""The chat page: `/` and its files under `/ui/`, static files shipped in the package
(`static/`: plain HTML, CSS and JavaScript, and the vendored libraries in `static/vendor/`).

The page talks to the same server (`/props`, `/v1/chat/completions`), so it needs no CORS; it
is public (no secret in it) and asks for the API key when the API answers 401. Every file goes
out with the headers a local page should send: a Content-Security-Policy that runs only the
page's own scripts (no inline script, no `eval`) and lets it connect only to its own origin,
no framing, no MIME sniffing, no referrer. `serve --no-webui` leaves the routes out (a 404).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from localmix.frontends.server.common import ApiError

STATIC = Path(__file__).with_name("static")
PREFIX = "/ui/"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-cache",  # revalidated (ETag): a new version of localmix shows its new page
}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
         ".md": "text/plain; charset=utf-8", ".json": "application/json"}


def is_page(path: str) -> bool:
    """Whether `path` is the page or one of its files (public even behind --api-key)."""
    return path == "/" or path.startswith(PREFIX)


def files() -> dict[str, Path]:
    """The files the page may load, by their name under /ui/ (`app.js`, `vendor/marked.umd.js`)."""
    return {p.relative_to(STATIC).as_posix(): p for p in sorted(STATIC.rglob("*"))
            if p.is_file() and (p.suffix in TYPES or p.name.startswith("LICENSE"))}


def router() -> APIRouter:
    page = APIRouter()
    served = files()  # read once: only what the package ships, never a path built from the request

    def send(name: str) -> FileResponse:
        path = served.get(name)
        if path is None:
            raise ApiError(404, f"no file {PREFIX}{name}", code="not_found")
        return FileResponse(path, media_type=TYPES.get(path.suffix, "text/plain; charset=utf-8"), headers=HEADERS)

    @page.get("/", include_in_schema=False)
    async def index():
        return send("index.html")

    @page.get(PREFIX + "{name:path}", include_in_schema=False)
    async def asset(name: str):
        return send(name)

    return page
