"""Operator settings kept in the store, with their defaults and validators."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from manager import cidr_groups
from manager import validation as v

if TYPE_CHECKING:
    from manager.context import Bastion

MAX_CUSTOM_CONFIG = 64 * 1024
ADMIN_BODY_LIMIT_KB = 256  # management API bodies; nginx enforces it (a clean 413), Flask checks it again

DEFAULTS: dict[str, Any] = {
    "public_listen": "127.0.0.1:8080",
    "admin_listen": "127.0.0.1:8081",
    "server_name": None,
    "public_cidr_groups": [],
    "admin_cidr_groups": ["private"],
    "trusted_proxies": [],
    "body_limit_mb": 16,
    "read_timeout": 600,
    "connect_timeout": 5,
    "max_fails": 3,
    "fail_timeout": 10,
    "default_pool": None,
    "discovery_interval": 60,
    "custom_config": "",
}


def custom_config(field: str, value: Any) -> str:
    """Extra nginx `server` blocks from an admin: size-limited text; `nginx -t` and the reload check judge it."""
    value = v.require_str(field, value)
    if len(value) > MAX_CUSTOM_CONFIG:
        raise v.ValidationError(field, f"must be at most {MAX_CUSTOM_CONFIG} characters")
    if "\x00" in value:
        raise v.ValidationError(field, "must not contain NUL characters")
    return value


VALIDATORS = {
    "public_listen": v.listen,
    "admin_listen": v.listen,
    "server_name": lambda f, x: None if x in (None, "") else v.hostname(f, v.require_str(f, x)),
    "trusted_proxies": v.cidrs,
    "body_limit_mb": lambda f, x: v.integer(f, x, 1, 1024),
    "read_timeout": lambda f, x: v.integer(f, x, 1, 86400),
    "connect_timeout": lambda f, x: v.integer(f, x, 1, 300),
    "max_fails": lambda f, x: v.integer(f, x, 0, 100),
    "fail_timeout": lambda f, x: v.integer(f, x, 1, 3600),
    "default_pool": lambda f, x: None if x in (None, "") else v.name(f, x),
    "discovery_interval": lambda f, x: v.integer(f, x, 5, 86400),
    "custom_config": custom_config,
}


def effective(stored: dict[str, Any]) -> dict[str, Any]:
    return {**DEFAULTS, **{k: val for k, val in stored.items() if k in DEFAULTS}}


def validate(bastion: Bastion, values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if key in cidr_groups.ATTACH_SETTINGS:
            out[key] = cidr_groups.names(bastion, key, value)
        elif key in VALIDATORS:
            out[key] = VALIDATORS[key](key, value)
        else:
            raise v.ValidationError(key, "is not a known setting")
    if out.get("default_pool") and not bastion.store.table("pools").search(
            lambda p: p["name"] == out["default_pool"]):
        raise v.ValidationError("default_pool", f"unknown pool {out['default_pool']!r}")
    return out


def update(bastion: Bastion, values: dict[str, Any], author: str = "cli") -> dict[str, Any]:
    """Validate and store settings, then apply the nginx config (rolled back with the store if nginx refuses)."""
    checked = validate(bastion, values)
    summary = ", ".join(f"{k}={json.dumps(x)}" for k, x in checked.items() if k != "custom_config")
    if "custom_config" in checked:
        summary = ", ".join(filter(None, [summary, "custom_config"]))
    with bastion.change(author, f"set {summary}", nginx=True):
        bastion.store.update_settings(**checked)
    return bastion.settings()
