"""Operator settings kept in the store, with their defaults and validators."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from authsvc.anonymous import DEFAULT_RPM as DEFAULT_UNAUTHENTICATED_RPM
from manager import capacity, cidr_groups, cors, custom_config
from manager import validation as v
from manager.certs import checks as cert_checks

if TYPE_CHECKING:
    from manager.context import Bastion

ADMIN_BODY_LIMIT_KB = 256  # management API bodies; nginx enforces it (a clean 413), Flask checks it again

DEFAULTS: dict[str, Any] = {
    "public_listen": "127.0.0.1:8080",
    "admin_listen": "127.0.0.1:8081",
    "server_name": None,
    "public_cidr_groups": [],
    "admin_cidr_groups": ["private"],
    "metrics_cidr_groups": ["private"],  # who may read /metrics without a sign-in or the metrics token
    "trusted_proxies": [],
    "body_limit_mb": 16,
    "read_timeout": 600,
    "connect_timeout": 5,
    "max_fails": 3,
    "fail_timeout": 10,
    "max_streams": 5000,  # concurrent streams nginx makes room for (manager/capacity.py)
    "default_pool": None,
    "auto_models": [],  # what "model": "auto" resolves to: the first with a live pool (keys with allow_auto)
    "discovery_interval": 60,
    "health_interval": 10,
    "health_fails": 2,
    "custom_config": "",
    "ca_bundle": "/etc/ssl/certs/ca-certificates.crt",
    "usage_retention_days": 90,  # raw records; rollups by span below (0 keeps everything)
    "usage_minute_retention_days": 14,
    "usage_hour_retention_days": 400,
    "usage_day_retention_days": 0,
    "log_max_mb": 100,
    "bruteforce_max_failures": 20,
    "bruteforce_window": 60,
    "bruteforce_block": 60,
    "bruteforce_max_block": 3600,
    "bruteforce_exempt_cidr_groups": [],
    # requests without a valid key, per address (IPv4, or IPv6 /64) a minute; 0: no limit
    "unauthenticated_rpm": DEFAULT_UNAUTHENTICATED_RPM,
    # /chat/completions, /models... as aliases of the /v1 paths (authsvc/routes.py)
    "openai_paths_without_v1": True,
    # browsers (manager/cors.py): off while cors_origins is empty
    "cors_origins": [],
    "cors_methods": list(cors.DEFAULT_METHODS),
    "cors_headers": ["*"],
    "cors_credentials": False,
    # certificates (docs/certificates.md); the listeners are stored now, nginx serves them with the TLS work
    "http_listen": None,
    "https_listen": None,
    "https_public_port": None,  # the port clients reach HTTPS on, when it differs (containers, port forwards)
    "acme_server": "https://acme-v02.api.letsencrypt.org/directory",
    "acme_email": None,
    "acme_ca_bundle": None,
    "acme_key_type": "ecdsa",
    "dns_propagation_seconds": 10,
    "hsts": False,
    # {model: {"input": USD per 1M prompt tokens, "output": USD per 1M completion tokens}}: costs in summaries
    "model_prices": {},
}


MAX_PRICED_MODELS = 1000
MAX_PRICE = 1_000_000.0  # USD per 1M tokens


def model_prices(field: str, value: Any) -> dict[str, dict[str, float]]:
    """{model: {"input": price, "output": price}}, prices in USD per 1M tokens (0 to 1,000,000), exact model
    names as the usage records hold them; both prices required so that no cost is silently half counted."""
    if not isinstance(value, dict):
        raise v.ValidationError(field, 'must be an object like {"llama3.1:8b": {"input": 0.1, "output": 0.2}}')
    if len(value) > MAX_PRICED_MODELS:
        raise v.ValidationError(field, f"at most {MAX_PRICED_MODELS} models")
    out = {}
    for model, price in value.items():
        v.model(field, model)
        name = f"{field}.{model}"
        if not isinstance(price, dict):
            raise v.ValidationError(name, 'must be an object {"input": USD per 1M tokens, "output": USD per 1M tokens}')
        for part in price:
            if part not in ("input", "output"):
                raise v.ValidationError(f"{name}.{part}", "is not a known field (input, output)")
        for part in ("input", "output"):
            if part not in price:
                raise v.ValidationError(f"{name}.{part}", "is required (USD per 1M tokens)")
        out[model] = {part: v.number(f"{name}.{part}", price[part], 0, MAX_PRICE) for part in ("input", "output")}
    return out


LISTENERS = ("public_listen", "admin_listen", "http_listen", "https_listen")

def auto_models(field: str, value: Any) -> list[str]:
    """The models `"model": "auto"` may stand for, in order: exact names (no globs), never `auto` itself."""
    names = v.models(field, value, max_items=100)
    for i, name in enumerate(names):
        if name == "auto":
            raise v.ValidationError(f"{field}[{i}]", "cannot be `auto` itself")
    return names


def _day_retention(field: str, days: int) -> int:
    """Month quotas add up the day rollups of the calendar month so far: they must be kept that long."""
    if 0 < days < 31:
        raise v.ValidationError(field, "must be 0 (keep) or at least 31: month quotas read the day rollups of "
                                       "the whole month")
    return days


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
    "max_streams": lambda f, x: capacity.check(f, v.integer(f, x, 100, 1_000_000)),
    "default_pool": lambda f, x: None if x in (None, "") else v.name(f, x),
    "auto_models": auto_models,
    "discovery_interval": lambda f, x: v.integer(f, x, 5, 86400),
    "health_interval": lambda f, x: v.integer(f, x, 0, 3600),
    "health_fails": lambda f, x: v.integer(f, x, 1, 20),
    "custom_config": custom_config.validate,
    "ca_bundle": lambda f, x: v.file_path(f, x),
    "usage_retention_days": lambda f, x: v.integer(f, x, 0, 36500),
    "usage_minute_retention_days": lambda f, x: v.integer(f, x, 0, 36500),
    "usage_hour_retention_days": lambda f, x: v.integer(f, x, 0, 36500),
    "usage_day_retention_days": lambda f, x: _day_retention(f, v.integer(f, x, 0, 36500)),
    "log_max_mb": lambda f, x: v.integer(f, x, 0, 100_000),
    "bruteforce_max_failures": lambda f, x: v.integer(f, x, 0, 1_000_000),
    "bruteforce_window": lambda f, x: v.integer(f, x, 1, 86400),
    "bruteforce_block": lambda f, x: v.integer(f, x, 1, 86400),
    "bruteforce_max_block": lambda f, x: v.integer(f, x, 1, 30 * 86400),
    "http_listen": cert_checks.nullable(v.listen),
    "https_listen": cert_checks.nullable(v.listen),
    "https_public_port": cert_checks.nullable(lambda f, x: v.integer(f, x, 1, 65535)),
    "acme_server": cert_checks.acme_url,
    "acme_email": cert_checks.email,
    "acme_ca_bundle": cert_checks.nullable(v.file_path),
    "acme_key_type": lambda f, x: v.choice(f, x, ("ecdsa", "rsa")),
    "dns_propagation_seconds": lambda f, x: v.integer(f, x, 0, 3600),
    "hsts": v.boolean,
    "model_prices": model_prices,
    "unauthenticated_rpm": lambda f, x: v.integer(f, x, 0, 1_000_000),
    "openai_paths_without_v1": v.boolean,
    **cors.VALIDATORS,
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
    # custom servers keep off Bastion's listeners: checked when either side changes
    if {"custom_config", "admin_listen", "public_listen", "http_listen", "https_listen"} & out.keys():
        merged = {**bastion.settings(), **out}
        custom_config.validate("custom_config", merged["custom_config"], custom_config.listener_ports(merged))
    if set(LISTENERS) & out.keys():  # the ACME/TLS listeners never share an address with another listener
        merged = {**bastion.settings(), **out}
        for i, key in enumerate(LISTENERS[2:], start=2):
            for other in LISTENERS[:i]:
                if merged[key] and merged[key] == merged[other]:
                    raise v.ValidationError(key, f"{merged[key]} is already the address of {other}")
    if set(cors.VALIDATORS) & out.keys():
        cors.check({**bastion.settings(), **out}, out.keys())
    if out.get("default_pool") and not bastion.store.find("pools", name=out["default_pool"]):
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
