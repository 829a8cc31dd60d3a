"""Operator settings kept in the store, with their defaults and validators."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from manager import validation as v

if TYPE_CHECKING:
    from manager.context import Bastion

DEFAULTS: dict[str, Any] = {
    "public_listen": "127.0.0.1:8080",
    "admin_listen": "127.0.0.1:8081",
    # loopback and private ranges may reach the admin listener
    "admin_cidrs": ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"],
    "body_limit_mb": 16,
    "read_timeout": 600,
    "connect_timeout": 5,
    "max_fails": 3,
    "fail_timeout": 10,
    "default_pool": None,
    "discovery_interval": 60,
}

VALIDATORS = {
    "public_listen": v.listen,
    "admin_listen": v.listen,
    "admin_cidrs": v.cidrs,
    "body_limit_mb": lambda f, x: v.integer(f, x, 1, 1024),
    "read_timeout": lambda f, x: v.integer(f, x, 1, 86400),
    "connect_timeout": lambda f, x: v.integer(f, x, 1, 300),
    "max_fails": lambda f, x: v.integer(f, x, 0, 100),
    "fail_timeout": lambda f, x: v.integer(f, x, 1, 3600),
    "default_pool": lambda f, x: None if x in (None, "") else v.name(f, x),
    "discovery_interval": lambda f, x: v.integer(f, x, 5, 86400),
}


def effective(stored: dict[str, Any]) -> dict[str, Any]:
    return {**DEFAULTS, **{k: val for k, val in stored.items() if k in DEFAULTS}}


def validate(values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if key not in VALIDATORS:
            raise v.ValidationError(key, "is not a known setting")
        out[key] = VALIDATORS[key](key, value)
    return out


def update(bastion: Bastion, values: dict[str, Any], author: str = "cli") -> dict[str, Any]:
    """Validate and store settings, then apply the nginx config (rolled back with the store if nginx refuses)."""
    checked = validate(values)
    with bastion.change(author, nginx=True):
        bastion.store.update_settings(**checked)
    return bastion.settings()
