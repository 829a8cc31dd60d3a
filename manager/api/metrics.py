"""GET /metrics (Prometheus) on the admin listener, and the metrics token under /api/v1/metrics/token.

Prometheus cannot sign in, so /metrics is public as a route and checks its readers itself (manager/metrics.py):
a signed-in user (cookie or bearer JWT, any role), the metrics token as a bearer token, or an address inside
`metrics_cidr_groups`. nginx has already admitted the address through `admin_cidr_groups`.
"""

from __future__ import annotations

from flask import Response, jsonify, request

from manager import auth
from manager import metrics as metrics_mod
from manager.api.base import (
    BOOL,
    NULLABLE_NUM,
    STR,
    ApiBlueprint,
    author,
    bastion,
    client_ip,
    error_response,
    obj,
)

bp = ApiBlueprint("metrics", __name__, tag="metrics")
token_bp = ApiBlueprint("metrics_token", __name__, url_prefix="/api/v1/metrics", tag="metrics")
REFUSED = ("sign in, send the metrics token as a bearer token (bastion metrics token), or scrape from an address "
           "in metrics_cidr_groups")


def _check_reader() -> None:
    """Return when the caller may read /metrics, else raise AuthError (401: credentials would help)."""
    b = bastion()
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else ""
    if token.startswith(metrics_mod.TOKEN_PREFIX):
        if metrics_mod.token_matches(b, token):
            return
        raise auth.AuthError(401, "wrong or revoked metrics token")
    if token:
        auth.verify(b, token, via_cookie=False, csrf=None, unsafe_method=False)
        return
    if auth.SESSION_COOKIE in request.cookies:
        auth.verify(b, request.cookies[auth.SESSION_COOKIE], via_cookie=True, csrf=None, unsafe_method=False)
        return
    if metrics_mod.address_admitted(b, client_ip()):
        return
    raise auth.AuthError(401, f"your address {client_ip()} may not read /metrics without credentials: {REFUSED}")


@bp.op("GET", "/metrics", "Prometheus metrics (text format 0.0.4); needs a sign-in, the metrics token or an "
       "address in metrics_cidr_groups", public=True, media="text/plain", response={"type": "string"})
def metrics():
    try:
        _check_reader()
    except auth.AuthError as e:
        challenge = {"WWW-Authenticate": 'Bearer realm="bastion-metrics"'} if e.status == 401 else None
        return error_response(e.status, e.message, headers=challenge)
    return Response(metrics_mod.render(bastion()), content_type=metrics_mod.CONTENT_TYPE,
                    headers={"Cache-Control": "no-store"})


TOKEN_INFO = obj(set=BOOL, created_at=NULLABLE_NUM)


@token_bp.op("GET", "/token", "Whether a metrics token is set, and since when", response=TOKEN_INFO)
def token_status():
    return jsonify(metrics_mod.token_info(bastion()))


@token_bp.op("POST", "/token", "Create the metrics token (replaces the previous one); shown once", status=201,
             response=obj(token=STR, created_at=NULLABLE_NUM))
def token_create():
    token = metrics_mod.create_token(bastion(), author())
    return jsonify(token=token, created_at=metrics_mod.token_info(bastion())["created_at"]), 201


@token_bp.op("DELETE", "/token", "Revoke the metrics token", response=obj(success=BOOL, revoked=BOOL))
def token_revoke():
    return jsonify(success=True, revoked=metrics_mod.revoke_token(bastion(), author()))
