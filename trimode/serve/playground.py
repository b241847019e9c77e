"""The playground page (`GET /`, `/playground`): static HTML / JS / CSS from `trimode/serve/static/`, and the
extra per-event fields it reads from the SSE stream.

The page is plain files with relative URLs (it works behind a path prefix) and no network beyond this server.
It needs no API key to load (it holds no data); its requests to `/v1/*` send the key typed into it.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse

from trimode.api import BlockState, Delta, TriMode

STATIC = Path(__file__).parent / "static"
FILES = {"playground.js": "text/javascript", "playground.css": "text/css"}
# The page loads only its own files and talks only to this server.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def add_playground(app: FastAPI) -> None:
    """Serve the page at `/` and `/playground`, its files under `/static/`."""

    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=HEADERS)

    app.add_api_route("/", page, methods=["GET", "HEAD"], include_in_schema=False)
    app.add_api_route("/playground", page, methods=["GET", "HEAD"], include_in_schema=False)

    @app.api_route("/playground/", methods=["GET", "HEAD"], include_in_schema=False)
    async def trailing_slash():
        return RedirectResponse("../playground")  # relative: right behind any path prefix

    for name, media_type in FILES.items():
        app.add_api_route(f"/static/{name}", _file(STATIC / name, media_type), methods=["GET", "HEAD"],
                          include_in_schema=False)


def _file(path: Path, media_type: str):
    async def serve():
        return FileResponse(path, media_type=media_type, headers=HEADERS)

    return serve


def event_fields(tm: TriMode, ev: Delta | BlockState) -> dict:
    """The per-choice `trimode` object of a streamed chunk. Committed text: its `token_ids`. A provisional
    block: each slot's text (`pieces`, None where masked; special tokens shown). Both: `forward_passes` (run so
    far) when the event carries it."""
    if isinstance(ev, Delta):
        out: dict = {"token_ids": ev.token_ids}
    else:
        out = {"pieces": [None if t is None or tm.tokenizer is None
                          else tm.tokenizer.decode([t], skip_special_tokens=False) for t in ev.token_ids]}
    forwards = getattr(ev, "forward_passes", None)  # not in trimode.api's events yet; passed on once it is
    if forwards is not None:
        out["forward_passes"] = forwards
    return out
