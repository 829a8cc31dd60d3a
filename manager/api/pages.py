"""The admin web page (static files from frontend/)."""

from flask import Blueprint, send_from_directory

from frontend import FRONTEND_DIR

bp = Blueprint("pages", __name__)


@bp.get("/")
def index():
    return send_from_directory(FRONTEND_DIR, "index.html")
