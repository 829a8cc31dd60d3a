"""The admin web page (static files from frontend/): `/` and `/admin` serve the shell, `/ui/...` its modules.

The page is plain ES modules and CSS (no build step); the API under /api/v1 is its only back end. The files are
public (the sign-in form needs them); everything they show comes from signed-in API calls. A strict CSP keeps
any markup that slipped into the page from running (the modules never use innerHTML for data).
"""

from __future__ import annotations

from flask import send_from_directory
from werkzeug.exceptions import NotFound

from frontend import FRONTEND_DIR
from manager.api.base import ApiBlueprint

bp = ApiBlueprint("pages", __name__)
ASSETS = (".js", ".css", ".svg", ".txt")
# connect-src allows http(s) so the chat playground can reach the public listener (another origin)
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self' http: https:; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")


def _secured(response):
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    return response


@bp.op("GET", "/", "The admin page", public=True, response={"type": "string"}, media="text/html")
def index():
    response = send_from_directory(FRONTEND_DIR, "index.html")
    response.headers["Cache-Control"] = "no-cache"
    return _secured(response)


@bp.op("GET", "/admin", "The admin page (where llm-proxy users look for it)", public=True,
       response={"type": "string"}, media="text/html")
def admin_page():
    return index()


@bp.op("GET", "/admin/", "The admin page, with the trailing slash people type", public=True,
       response={"type": "string"}, media="text/html")
def admin_page_slash():
    return index()


@bp.op("GET", "/ui/<path:path>", "A module, stylesheet or image of the admin page", public=True,
       response={"type": "string"}, media="text/javascript")
def asset(path: str):
    """A module, stylesheet or vendored file of the page; nothing else from the package directory."""
    if not path.endswith(ASSETS):
        raise NotFound()
    response = send_from_directory(FRONTEND_DIR, path)
    response.headers["Cache-Control"] = "no-cache"  # revalidated (ETag): an upgrade is seen at once
    return _secured(response)
