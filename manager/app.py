"""The Flask management app: `create_app(config)` builds one per data dir (tests get their own).

Every route needs a signed-in user unless it is declared `public`; reading needs any role, changing needs
`admin` (a few routes such as logout accept any role). Errors are JSON everywhere, naming the field.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, current_app, g, request
from werkzeug.exceptions import HTTPException

from manager import admin_guard, auth
from manager.api.base import bastion, client_ip, error_response
from manager.apply import ConfigTestFailed, ReloadFailed
from manager.context import Bastion
from manager.datadir import DataDir
from manager.errors import Conflict, NotFound, ValidationError
from manager.nginx import NginxError
from manager.settings import ADMIN_BODY_LIMIT_KB
from manager.store import StoreCorrupt

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__, static_folder=None)
    app.config.from_mapping(DATA_DIR="./data", NGINX=None, MAX_CONTENT_LENGTH=ADMIN_BODY_LIMIT_KB * 1024)
    app.config.from_prefixed_env("BASTION")
    app.config.update(config or {})
    app.json.sort_keys = False
    app.extensions["bastion"] = Bastion(DataDir.at(app.config["DATA_DIR"]), app.config["NGINX"])

    from manager.api import BLUEPRINTS

    for bp in BLUEPRINTS:
        app.register_blueprint(bp)
    app.before_request(name_requester)
    app.before_request(authenticate)
    app.teardown_request(forget_requester)
    register_error_handlers(app)
    return app


def name_requester() -> None:
    """Who asks, for the admin self-lockout guard (manager/admin_guard.py). `force` comes as the query parameter
    `?force=true` or as a JSON body field (taken out of the body by `json_body()`)."""
    force = {"true": True, "1": True, "false": False, "0": False}.get(request.args.get("force", "false").lower())
    if force is None:
        raise ValidationError("force", "must be true or false")
    # nginx sends the connecting address before X-Forwarded-For processing (trusted_proxies) as X-Bastion-Peer
    peer = request.headers.get("X-Bastion-Peer") or client_ip()
    g.requester_token = admin_guard.requester.set(
        admin_guard.Requester(peer, request.headers.get("X-Forwarded-For", ""), force))


def forget_requester(_error: BaseException | None = None) -> None:
    if (token := g.pop("requester_token", None)) is not None:
        admin_guard.requester.reset(token)


def authenticate() -> None:
    view = current_app.view_functions.get(request.endpoint or "")
    if view is None or getattr(view, "public", False):
        return
    token, via_cookie = None, False
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        token = header[7:].strip()
    elif auth.SESSION_COOKIE in request.cookies:
        token, via_cookie = request.cookies[auth.SESSION_COOKIE], True
    if not token:
        raise auth.AuthError(401, "sign in first: POST /auth/login (cookie) or /auth/token (bearer)")
    needs_admin = getattr(view, "needs_admin", request.method not in SAFE_METHODS)
    acts = needs_admin or request.method not in SAFE_METHODS
    g.identity = auth.verify(bastion(), token, via_cookie=via_cookie, csrf=request.headers.get(auth.CSRF_HEADER),
                             unsafe_method=acts)
    if needs_admin and g.identity.role != "admin":
        raise auth.AuthError(403, "this needs the admin role; your role is viewer")


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ValidationError)
    def bad_input(e: ValidationError):
        return error_response(400, f"{e.field}: {e.message}", e.field)

    @app.errorhandler(Conflict)
    def conflict(e: Conflict):
        return error_response(409, f"{e.field}: {e.message}", e.field)

    @app.errorhandler(admin_guard.SelfLockout)
    def self_lockout(e: admin_guard.SelfLockout):
        return error_response(409, e.message, e.field)

    @app.errorhandler(NotFound)
    def not_found(e: NotFound):
        return error_response(404, str(e))

    @app.errorhandler(auth.AuthError)
    def auth_error(e: auth.AuthError):
        headers = {"Retry-After": str(int(e.retry_after) + 1)} if e.retry_after else None
        return error_response(e.status, e.message, headers=headers)

    @app.errorhandler(ConfigTestFailed)
    @app.errorhandler(ReloadFailed)
    @app.errorhandler(NginxError)
    def nginx_refused(e: NginxError):
        # nginx's own words go back to the caller; the previous configuration is still live
        status = 422 if isinstance(e, ConfigTestFailed | ReloadFailed) else 500
        return error_response(status, str(e), extra={"nginx": e.output})

    @app.errorhandler(StoreCorrupt)
    def store_unreadable(e: StoreCorrupt):
        # the data plane keeps serving its last good configuration; only management waits for the repair
        current_app.logger.error("%s", e)
        return error_response(503, f"the configuration store cannot be read: {e}", headers={"Retry-After": "10"})

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return error_response(e.code or 500, e.description or e.name)
