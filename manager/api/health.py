"""GET /api/v1/health: is the stack up and which nginx generation is live."""

from flask import Blueprint, jsonify

from manager import generations
from manager.app import bastion

bp = Blueprint("health", __name__, url_prefix="/api/v1")


@bp.get("/health")
def health():
    b = bastion()
    return jsonify(status="ok", generation=generations.live(b.dirs), nginx_running=b.nginx.master_pid() is not None)
