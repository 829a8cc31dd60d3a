"""Validation of everything a certificate operation passes to certbot or writes to disk.

Each function returns the normalised value or raises `ValidationError` naming the field; the values that pass
are made of letters, digits and a few punctuation characters only, never a shell or nginx metacharacter.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit

from manager import validation as v

MAX_DOMAINS = 100  # Let's Encrypt's limit of names per certificate
CERT_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?$")
EMAIL_LOCAL_RE = re.compile(r"^[A-Za-z0-9._+-]{1,64}$")
URL_PATH_RE = re.compile(r"^(/[A-Za-z0-9._~-]*)*$")


def domain(field: str, value: Any, *, wildcard: bool = False) -> str:
    """A DNS name for a certificate (IDNA, returned as lowercase ASCII): at least two labels, no IP address;
    `*.name` only with `wildcard` (DNS-01)."""
    value = v.require_str(field, value).strip()
    prefix = ""
    if value.startswith("*."):
        if not wildcard:
            raise v.ValidationError(field, f"{value!r}: wildcard names need the dns-01 challenge")
        prefix, value = "*.", value[2:]
    if "*" in value:
        raise v.ValidationError(field, f"{value!r}: '*' is allowed only as the whole first label (*.example.com)")
    if _is_ip(value):
        raise v.ValidationError(field, f"{value!r}: IP addresses are not supported; give a DNS name")
    name = v.hostname(field, value)
    if "." not in name:
        raise v.ValidationError(field, f"{value!r} must be a fully qualified name like www.example.com")
    return prefix + name


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
        return True
    except ValueError:
        return False


def domains(field: str, value: Any, *, wildcard: bool = False) -> list[str]:
    """A non-empty list of certificate names (repeats dropped)."""
    names = v.string_list(field, value, lambda f, x: domain(f, x, wildcard=wildcard), max_items=MAX_DOMAINS)
    if not names:
        raise v.ValidationError(field, "give at least one domain")
    return names


def cert_name(field: str, value: Any) -> str:
    """A certificate's name (certbot's --cert-name, a directory name): a-z 0-9 . -"""
    value = v.require_str(field, value)
    if not CERT_NAME_RE.fullmatch(value) or ".." in value:
        raise v.ValidationError(field, "must be 1-253 characters of a-z, 0-9, '.' or '-' (like www.example.com)")
    return value


def default_name(names: list[str]) -> str:
    """The name of a certificate for `names`: its first name, a wildcard's without the `*.`."""
    return names[0].removeprefix("*.")


def email(field: str, value: Any) -> str | None:
    """An e-mail address for the ACME account (None/"" for none)."""
    if value in (None, ""):
        return None
    value = v.require_str(field, value).strip()
    local, sep, host = value.rpartition("@")
    if not sep or not EMAIL_LOCAL_RE.fullmatch(local) or local.startswith("."):
        raise v.ValidationError(field, "must be an e-mail address like admin@example.com")
    try:
        return f"{local}@{domain(field, host)}"
    except v.ValidationError:
        raise v.ValidationError(field, "must be an e-mail address like admin@example.com") from None


def acme_url(field: str, value: Any) -> str:
    """An ACME directory URL: https://host[:port]/path, no credentials, query or fragment."""
    value = v.require_str(field, value).strip()
    parts = urlsplit(value)
    if parts.scheme != "https":
        raise v.ValidationError(field, "must be an https URL (the ACME server's directory)")
    if parts.username or parts.password or parts.query or parts.fragment or not parts.hostname:
        raise v.ValidationError(field, "must be https://host[:port]/path with no credentials, query or fragment")
    if not URL_PATH_RE.fullmatch(parts.path):
        raise v.ValidationError(field, "the path may hold letters, digits and / . _ ~ - only")
    try:
        port = parts.port
    except ValueError:
        raise v.ValidationError(field, "port must be a number between 1 and 65535") from None
    host = v.hostname(field, parts.hostname)
    netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
    return f"https://{netloc}{parts.path}"


def nullable(check):
    """`check` for a setting that may be off (None or "")."""
    return lambda f, x: None if x in (None, "") else check(f, x)
