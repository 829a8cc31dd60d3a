"""Admin authentication: JWTs (cookie sessions with CSRF, bearer tokens for scripts), logout, lockout.

- A token carries the user's `token_version`; changing the password or role bumps it, which ends every session.
- Logout puts the token's `jti` on a deny list until the token would have expired anyway.
- Sign-in failures and the deny list live in manager/logins.py (`auth.sqlite3` plus memory), apart from the
  configuration, so a full disk never stops a sign-in or a lockout.
- Cookie sessions also carry a CSRF secret: state-changing requests must echo it in `X-CSRF-Token`
  (double submit: the page reads it from the non-HttpOnly `csrf_token` cookie).
- Failed logins are counted per user and per client IP; after `MAX_FAILURES` in a row the subject is locked
  out for a period that doubles with each further lockout (1 min, 2 min, ... at most 1 h).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt

from manager import users
from manager.logins import LockedOut

if TYPE_CHECKING:
    from manager.context import Bastion

SESSION_COOKIE = "auth_token"  # the llm-proxy cookie name
CSRF_COOKIE = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
TOKEN_TTL = 24 * 3600
ALGORITHM = "HS256"


class AuthError(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True)
class Identity:
    username: str
    role: str
    jti: str
    exp: float
    via_cookie: bool


def jwt_secret(bastion: Bastion) -> bytes:
    return bastion.dirs.jwt_secret.read_bytes().strip()  # created by DataDir.ensure()


def issue(bastion: Bastion, user: dict[str, Any], kind: str) -> tuple[str, dict[str, Any]]:
    now = int(time.time())
    claims = {"sub": user["username"], "uid": user.get("uid", ""), "role": user["role"],
              "ver": user.get("token_version", 0), "kind": kind,
              "iat": now, "exp": now + TOKEN_TTL, "jti": secrets.token_hex(12)}
    if kind == "session":
        claims["csrf"] = secrets.token_urlsafe(24)
    return jwt.encode(claims, jwt_secret(bastion), algorithm=ALGORITHM), claims


def verify(bastion: Bastion, token: str, *, via_cookie: bool, csrf: str | None, unsafe_method: bool) -> Identity:
    """Check signature, expiry, user, token version, deny list and (cookie + unsafe method) CSRF."""
    try:
        claims = jwt.decode(token, jwt_secret(bastion), algorithms=[ALGORITHM],
                            options={"require": ["exp", "iat", "sub", "jti"]})
    except jwt.PyJWTError as e:
        raise AuthError(401, f"invalid or expired token ({e})") from None
    user = users.find(bastion, claims["sub"])
    # `uid` is new for every user: a token of a deleted user never works for a new one of the same name
    if user is None or user.get("uid", "") != claims.get("uid") or user.get("token_version", 0) != claims.get("ver"):
        raise AuthError(401, "this session is no longer valid; log in again")
    if bastion.logins.is_revoked(claims["jti"]):
        raise AuthError(401, "this session was logged out; log in again")
    if via_cookie and unsafe_method and (not csrf or not secrets.compare_digest(csrf, claims.get("csrf", ""))):
        raise AuthError(403, f"missing or wrong {CSRF_HEADER} header for a cookie session")
    return Identity(user["username"], user["role"], claims["jti"], claims["exp"], via_cookie)


def revoke(bastion: Bastion, identity: Identity) -> None:
    bastion.logins.revoke(identity.jti, identity.exp)


def login(bastion: Bastion, username: Any, password: Any, client_ip: str) -> dict[str, Any]:
    """Return the user or raise AuthError (401 wrong credentials, 429 locked out).

    Failures count per client IP and per existing user (so made-up names cannot grow the state); a run of
    failures is forgotten after `FAILURE_WINDOW` seconds without another one. Nothing is written before the
    password check (see manager/logins.py)."""
    known_user = isinstance(username, str) and users.find(bastion, username) is not None
    subjects = [f"ip:{client_ip}"] + ([f"user:{username}"] if known_user else [])
    try:
        with bastion.logins.attempt(subjects) as attempt:
            user = users.authenticate(bastion, username, password)
            attempt.succeeded = user is not None
    except LockedOut as e:
        raise AuthError(429, str(e), retry_after=e.retry_after) from None
    if user is None:
        raise AuthError(401, "wrong username or password")
    return user


def unlock(bastion: Bastion, subject: str | None = None) -> int:
    """Clear login lockouts (all, or one `user:NAME` / `ip:ADDR`); returns how many were cleared."""
    cleared = bastion.logins.unlock(subject)
    bastion.audit.record("cli", f"unlock logins ({subject or 'all'})")
    return cleared
