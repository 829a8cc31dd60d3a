"""CORS settings for browsers calling the public API: validation, and what the templates render from them.

nginx does all the work (nginx_templates/_http.j2 maps `$http_origin` to the allowed origin; the `edge_headers`
macro adds the headers to every answer; preflights get a 204 without a key). Off while `cors_origins` is empty.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from manager import validation as v

DEFAULT_METHODS = ["GET", "POST", "DELETE", "OPTIONS"]
METHOD_RE = re.compile(r"^[A-Z]{1,16}$")
HEADER_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
ORIGIN_CHARS_RE = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+$")
MAX_ORIGINS = 100
MAX_AGE = 7200  # seconds a browser may cache a preflight (Chromium caps it at 2 h)
# answer headers a page's script may read: its limits, the request id and the timings
EXPOSED = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
           "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
           "X-Request-ID", "Retry-After", "Server-Timing", "X-Process-Time")


def origin(field: str, value: Any) -> str:
    """An exact origin as browsers send it: scheme://host[:port], lowercase, no path; or `*` alone."""
    value = v.require_str(field, value).strip()
    if value == "*":
        return value
    if not ORIGIN_CHARS_RE.fullmatch(value):
        raise v.ValidationError(field, f"{value[:200]!r} must be an origin like https://app.example.com "
                                       "(scheme, host and optional port; no path, no trailing slash) or *")
    parts = urlsplit(value)
    try:
        port = parts.port
    except ValueError as e:
        raise v.ValidationError(field, f"{value!r} has a bad port") from e
    if parts.path or not parts.hostname:
        raise v.ValidationError(field, f"{value!r} must be an origin (no path, no trailing slash)")
    host = v.hostname(field, parts.hostname)
    host = f"[{host}]" if ":" in host else host
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}" + ("" if port in (None, default) else f":{port}")


def origins(field: str, value: Any) -> list[str]:
    out = v.string_list(field, value, origin, max_items=MAX_ORIGINS)
    if "*" in out and len(out) > 1:
        raise v.ValidationError(field, "* allows every origin: give it alone, or list exact origins")
    return out


def method(field: str, value: Any) -> str:
    value = v.require_str(field, value).strip().upper()
    if not METHOD_RE.fullmatch(value):
        raise v.ValidationError(field, f"{value[:50]!r} is not an HTTP method (like GET or POST)")
    return value


def header(field: str, value: Any) -> str:
    value = v.require_str(field, value).strip()
    if value != "*" and not HEADER_RE.fullmatch(value):
        raise v.ValidationError(field, f"{value[:80]!r} is not a header name (letters, digits and -) or *")
    return value


def headers(field: str, value: Any) -> list[str]:
    out = v.string_list(field, value, header, max_items=100)
    if "*" in out and len(out) > 1:
        raise v.ValidationError(field, "* (every header the browser asks for) must be given alone")
    return out


def check(merged: Mapping[str, Any], changed: Iterable[str]) -> None:
    """Rules across the CORS settings (browsers refuse credentials with a wildcard origin); the error names the
    setting being changed."""
    if merged["cors_credentials"] and "*" in merged["cors_origins"]:
        if "cors_credentials" in changed:
            raise v.ValidationError("cors_credentials", "cannot be true while cors_origins is *: list exact origins")
        raise v.ValidationError("cors_origins", "cannot be * while cors_credentials is true: list exact origins")


VALIDATORS = {
    "cors_origins": origins,
    "cors_methods": lambda f, x: v.string_list(f, x, method, max_items=20),
    "cors_headers": headers,
    "cors_credentials": v.boolean,
}


def view(settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the templates render: None when CORS is off."""
    if not settings["cors_origins"]:
        return None
    return {
        "any": list(settings["cors_origins"]) == ["*"],  # settings are frozen: tuples
        "origins": list(settings["cors_origins"]),
        "methods": ", ".join(settings["cors_methods"]),
        # `*`: echo what the preflight asks for (a literal `*` would not cover Authorization)
        "headers": None if list(settings["cors_headers"]) == ["*"] else ", ".join(settings["cors_headers"]),
        "credentials": bool(settings["cors_credentials"]),
        "expose": ", ".join(EXPOSED),
        "max_age": MAX_AGE,
    }
