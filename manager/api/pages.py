"""The admin web page (static files from frontend/)."""

from flask import send_from_directory

from frontend import FRONTEND_DIR
from manager.api.base import ApiBlueprint

bp = ApiBlueprint("pages", __name__)


@bp.op("GET", "/", "The admin page", public=True, response={"type": "string"})
def index():
    return send_from_directory(FRONTEND_DIR, "index.html")
