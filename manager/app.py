"""The Flask management app: `create_app(config)` builds one per data dir (tests get their own)."""

from __future__ import annotations

from typing import Any

from flask import Flask, current_app, jsonify

from manager.context import Bastion
from manager.datadir import DataDir
from manager.errors import Conflict, NotFound, ValidationError


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__, static_folder=None)
    app.config.from_mapping(DATA_DIR="./data", NGINX=None, MAX_CONTENT_LENGTH=1 << 20)
    app.config.from_prefixed_env("BASTION")
    app.config.update(config or {})
    app.extensions["bastion"] = Bastion(DataDir.at(app.config["DATA_DIR"]), app.config["NGINX"])

    from manager.api import health, pages

    app.register_blueprint(health.bp)
    app.register_blueprint(pages.bp)

    @app.errorhandler(ValidationError)
    def bad_input(e: ValidationError):
        return jsonify(error={"message": e.message, "field": e.field}), 400

    @app.errorhandler(Conflict)
    def conflict(e: Conflict):
        return jsonify(error={"message": e.message, "field": e.field}), 409

    @app.errorhandler(NotFound)
    def not_found(e: NotFound):
        return jsonify(error={"message": str(e)}), 404

    return app


def bastion() -> Bastion:
    """The `Bastion` of the app handling the current request."""
    return current_app.extensions["bastion"]
