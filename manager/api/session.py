"""llm-proxy's sign-in routes: POST /auth/login (cookie), /auth/logout, /auth/token (bearer JWT)."""

from __future__ import annotations

from flask import g, jsonify, make_response, request

from manager import auth
from manager.api.base import BOOL, INT, STR, ApiBlueprint, bastion, client_ip, fields, json_body, obj

bp = ApiBlueprint("session", __name__, url_prefix="/auth", tag="auth")
CREDENTIALS = obj(["username", "password"], username=STR, password=STR)


def _credentials() -> dict:
    body = fields(json_body(), {"username", "password"}, {"username", "password"})
    return auth.login(bastion(), body["username"], body["password"], client_ip())


@bp.op("POST", "/login", "Sign in; sets an HttpOnly session cookie and a CSRF cookie", body=CREDENTIALS,
       response=obj(success=BOOL, username=STR, role=STR, csrfToken=STR), public=True)
def login():
    user = _credentials()
    token, claims = auth.issue(bastion(), user, "session")
    response = make_response(jsonify(success=True, username=user["username"], role=user["role"],
                                     csrfToken=claims["csrf"]))
    secure = request.is_secure or request.headers.get("X-Forwarded-Proto") == "https"
    response.set_cookie(auth.SESSION_COOKIE, token, max_age=auth.TOKEN_TTL, httponly=True, samesite="Strict",
                        secure=secure, path="/")
    # readable by the page so it can echo it in X-CSRF-Token (double submit)
    response.set_cookie(auth.CSRF_COOKIE, claims["csrf"], max_age=auth.TOKEN_TTL, httponly=False,
                        samesite="Strict", secure=secure, path="/")
    return response


@bp.op("POST", "/logout", "Sign out: the session or token stops working at once", response=obj(success=BOOL),
       admin=False)
def logout():
    auth.revoke(bastion(), g.identity)
    response = make_response(jsonify(success=True))
    response.delete_cookie(auth.SESSION_COOKIE, path="/")
    response.delete_cookie(auth.CSRF_COOKIE, path="/")
    return response


@bp.op("GET", "/me", "Who is signed in (the page's role-aware view; the session cookie itself is HttpOnly)",
       response=obj(username=STR, role=STR, expiresAt=INT, via_cookie=BOOL))
def me():
    identity = g.identity
    return jsonify(username=identity.username, role=identity.role, expiresAt=int(identity.exp),
                   via_cookie=identity.via_cookie)


@bp.op("POST", "/token", "Get a bearer JWT for scripts", body=CREDENTIALS,
       response=obj(token=STR, expiresAt=INT), public=True)
def token():
    user = _credentials()
    jwt_token, claims = auth.issue(bastion(), user, "api")
    return jsonify(token=jwt_token, expiresAt=claims["exp"])
