"""The web console at /console: a page that shows a tenant's jobs live, runs a
model from a form, and lets an admin operate the pools; served by the API
itself, talking to it only through the public REST API and event streams.

Plain JavaScript and CSS in `static/`, about a thousand lines, no build step
and no CDN: the console must work offline (the API may run where nothing else
is reachable) and ship inside the Python package. What it needs (a router,
a form made from a JSON schema, an SSE reader, a small SVG chart) is short
enough that a framework would be more code to vendor than to write, and
every npm package would bring a build step with it. Choosing again with a
bigger console in mind, a vendored htmx or Preact build would be the first
candidates.

Why fetch() and not EventSource for the streams: the event routes take the
key only in the Authorization header (a key in a URL is refused, api/params.py)
and an EventSource cannot send a header; console.js reads the stream with
fetch() and parses it itself, resuming with Last-Event-ID as EventSource would.

The key stays in the browser: it is kept in sessionStorage (gone with the
tab), sent only in the Authorization header, and `/console#key=...` signs in
from the URL's fragment, which a browser never sends, and is cleared at once.
Every answer here carries a Content-Security-Policy that allows this origin
only (plus blob: images made from outputs the page fetched, and the storage's
origin where outputs are presigned S3 URLs): no inline script, no other host.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from flask import Blueprint, Response, abort, current_app, send_from_directory

from api.context import ctx

STATIC = Path(__file__).parent / "static"
# The only files served: nothing else under static/ is reachable by name.
ASSETS = {"console.js": "text/javascript", "console.css": "text/css"}

bp = Blueprint("console", __name__)


def storage_origin() -> str:
    """The origin presigned output URLs point at ("" for local storage, whose
    outputs the API serves itself): images there may be shown as they are."""
    found = current_app.extensions.get("genq_console_origin")
    if found is None:
        # Read once from a URL the storage presigns (no request is made): the host it names.
        url = ctx().storage.presigned_url("jobs/0/0.png")
        parsed = urlparse(url) if url else None
        found = f"{parsed.scheme}://{parsed.netloc}" if parsed and parsed.netloc else ""
        current_app.extensions["genq_console_origin"] = found
    return found


def policy() -> str:
    media = " ".join(filter(None, ("'self' blob:", storage_origin())))
    return ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
            f"img-src {media} data:; media-src {media}; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'none'")


def secured(resp: Response) -> Response:
    resp.headers["Content-Security-Policy"] = policy()
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["X-Frame-Options"] = "DENY"
    # Small files, changed with the package: always revalidated (ETag), never stale.
    resp.headers["Cache-Control"] = "no-cache"
    return resp


@bp.get("/console")
@bp.get("/console/<path:page>")
def page(page: str = ""):
    """The one page; console.js draws the view the path names (jobs, a job,
    run, gallery, fine-tunes, operators), so a reload or a shared link works."""
    return secured(send_from_directory(STATIC, "index.html", mimetype="text/html"))


@bp.get("/console/assets/<name>")
def asset(name: str):
    if name not in ASSETS:
        abort(404)
    return secured(send_from_directory(STATIC, name, mimetype=ASSETS[name]))
