"""Admin users: scrypt password hashes, roles (admin changes things, viewer only reads)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from typing import TYPE_CHECKING, Any

from manager import environment
from manager import validation as v
from manager.errors import Conflict, NotFound

if TYPE_CHECKING:
    from manager.context import Bastion

ROLES = ("admin", "viewer")
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MIN_PASSWORD = 8


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        _, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


# A hash to check against when the user does not exist, so timing does not reveal valid usernames.
_DUMMY_HASH = hash_password(secrets.token_hex(8))


def password(field: str, value: Any) -> str:
    value = v.require_str(field, value)
    if not MIN_PASSWORD <= len(value) <= 256:
        raise v.ValidationError(field, f"must be {MIN_PASSWORD} to 256 characters")
    return value


def public(user: dict[str, Any]) -> dict[str, Any]:
    return {"username": user["username"], "role": user["role"], "created_at": user["created_at"]}


def find(bastion: Bastion, username: str) -> dict[str, Any] | None:
    return bastion.store.find("users", username=username)


def _get(bastion: Bastion, username: str) -> dict[str, Any]:
    user = find(bastion, username)
    if user is None:
        raise NotFound("user", username)
    return user


def get(bastion: Bastion, username: str) -> dict[str, Any]:
    return public(_get(bastion, username))


def all_users(bastion: Bastion) -> list[dict[str, Any]]:
    return [public(u) for u in bastion.store.all("users")]


def create(bastion: Bastion, username: Any, password_: Any, role: Any = "viewer",
           author: str = "cli") -> dict[str, Any]:
    user = {
        "username": v.label("username", username),
        "password_hash": hash_password(password("password", password_)),
        "role": v.choice("role", role, ROLES),
        "uid": secrets.token_hex(8),
        "token_version": 0,
        "created_at": time.time(),
    }
    with bastion.change(author, f"create user {user['username']}"):
        if bastion.store.find("users", username=user["username"]):
            raise Conflict("username", f"user {user['username']!r} already exists")
        bastion.store.insert("users", user)
    return public(user)


def update(bastion: Bastion, username: str, author: str = "cli", **fields: Any) -> dict[str, Any]:
    """Change role and/or password; either signs the user out everywhere (token version bump)."""
    unknown = set(fields) - {"role", "password"}
    if unknown:
        raise v.ValidationError(sorted(unknown)[0], "is not a user field")
    values: dict[str, Any] = {}
    if "role" in fields:
        values["role"] = v.choice("role", fields["role"], ROLES)
    if "password" in fields:
        values["password_hash"] = hash_password(password("password", fields["password"]))
    with bastion.change(author, f"update user {username} ({', '.join(sorted(fields))})"):
        user = _get(bastion, username)
        if values.get("role") == "viewer" and user["role"] == "admin" and _admins(bastion) == 1:
            raise Conflict("role", "the last admin cannot become a viewer")
        values["token_version"] = user.get("token_version", 0) + 1
        bastion.store.update("users", values, username=username)
    return get(bastion, username)


def remove(bastion: Bastion, username: str, author: str = "cli") -> None:
    with bastion.change(author, f"remove user {username}"):
        user = _get(bastion, username)
        if user["role"] == "admin" and _admins(bastion) == 1:
            raise Conflict("username", "the last admin cannot be removed")
        bastion.store.remove("users", username=username)


def _admins(bastion: Bastion) -> int:
    return bastion.store.count("users", role="admin")


def authenticate(bastion: Bastion, username: str, password_: str) -> dict[str, Any] | None:
    user = find(bastion, username) if isinstance(username, str) else None
    stored = user["password_hash"] if user else _DUMMY_HASH
    ok = verify_password(password_ if isinstance(password_, str) else "", stored)
    return user if user and ok else None


def ensure_admin(bastion: Bastion) -> str | None:
    """On first start create `admin`; returns the generated password (None when set by env or not needed)."""
    if bastion.store.all("users"):
        return None
    given = environment.secret(environment.ADMIN_PASSWORD)  # the variable or the file BASTION_ADMIN_PASSWORD_FILE
    pw = given or secrets.token_urlsafe(15)
    create(bastion, "admin", pw, "admin", author="init")
    return None if given else pw
