"""The API key format, shared by the manager (which creates keys) and the gate (which checks them).

A key is `bst_<id>_<secret>`: the id finds the record without a scan, the secret is never stored. The store
keeps HMAC-SHA256(pepper, whole key); the pepper lives in a 0600 file, so a leaked store alone is useless.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

PREFIX = "bst"
KEY_RE = re.compile(r"^bst_([a-z0-9]{12})_([A-Za-z0-9]{40})$")
ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
SECRET_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def generate() -> tuple[str, str]:
    """Return (key id, full key)."""
    key_id = "".join(secrets.choice(ID_ALPHABET) for _ in range(12))
    secret = "".join(secrets.choice(SECRET_ALPHABET) for _ in range(40))
    return key_id, f"{PREFIX}_{key_id}_{secret}"


def key_id_of(token: str) -> str | None:
    """The id part of a well-formed key, else None."""
    m = KEY_RE.fullmatch(token)
    return m.group(1) if m else None


def digest(pepper: bytes, token: str) -> str:
    return hmac.new(pepper, token.encode(), hashlib.sha256).hexdigest()


def matches(pepper: bytes, token: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(pepper, token), stored_digest)


def mask(key_id: str) -> str:
    """How a key is shown after creation: enough to recognise it, nothing to use."""
    return f"{PREFIX}_{key_id}_****"
