"""/api/v1/cidr-groups, /api/v1/users and /api/v1/settings."""

from __future__ import annotations

from flask import g, jsonify

from manager import cidr_groups, custom_config, users
from manager import settings as settings_mod
from manager.api.base import (
    BOOL,
    INT,
    NULLABLE_STR,
    NUM,
    STR,
    STR_LIST,
    ApiBlueprint,
    author,
    bastion,
    fields,
    json_body,
    obj,
)

groups_bp = ApiBlueprint("cidr_groups", __name__, url_prefix="/api/v1/cidr-groups", tag="cidr-groups")
users_bp = ApiBlueprint("users", __name__, url_prefix="/api/v1/users")
settings_bp = ApiBlueprint("settings", __name__, url_prefix="/api/v1/settings")

GROUP = obj(name=STR, allow=STR_LIST, deny=STR_LIST, builtin=BOOL)
GROUP["additionalProperties"] = True
USER = obj(username=STR, role=STR, created_at=NUM)
PRICE = {"type": "number", "minimum": 0, "maximum": settings_mod.MAX_PRICE}
MODEL_PRICES = {"type": "object", "maxProperties": settings_mod.MAX_PRICED_MODELS,
                "additionalProperties": obj(["input", "output"], input=PRICE, output=PRICE)}
SETTINGS = obj(public_listen=STR, admin_listen=STR, server_name=NULLABLE_STR, public_cidr_groups=STR_LIST,
               admin_cidr_groups=STR_LIST, trusted_proxies=STR_LIST, body_limit_mb=INT, read_timeout=INT,
               connect_timeout=INT, max_fails=INT, fail_timeout=INT, max_streams=INT, default_pool=NULLABLE_STR,
               discovery_interval=INT, health_interval=INT, health_fails=INT, custom_config=STR, ca_bundle=STR,
               usage_retention_days=INT, usage_minute_retention_days=INT,
               usage_hour_retention_days=INT, usage_day_retention_days=INT, log_max_mb=INT,
               bruteforce_max_failures=INT, bruteforce_window=INT, bruteforce_block=INT, bruteforce_max_block=INT,
               bruteforce_exempt_cidr_groups=STR_LIST, metrics_cidr_groups=STR_LIST,
               http_listen=NULLABLE_STR, https_listen=NULLABLE_STR,
               https_public_port={"type": ["integer", "null"]}, acme_server=STR, acme_email=NULLABLE_STR,
               acme_ca_bundle=NULLABLE_STR, acme_key_type={"type": "string", "enum": ["ecdsa", "rsa"]},
               dns_propagation_seconds=INT, hsts=BOOL, model_prices=MODEL_PRICES, auto_models=STR_LIST,
               unauthenticated_rpm=INT, openai_paths_without_v1=BOOL, cors_origins=STR_LIST, cors_methods=STR_LIST,
               cors_headers=STR_LIST, cors_credentials=BOOL)


@groups_bp.op("GET", "", "List CIDR groups", response={"type": "array", "items": GROUP})
def list_groups():
    return jsonify(cidr_groups.all_groups(bastion()))


@groups_bp.op("POST", "", "Create a CIDR group", body=obj(["name"], name=STR, allow=STR_LIST, deny=STR_LIST),
              response=GROUP, status=201)
def create_group():
    body = fields(json_body(), {"name", "allow", "deny"}, {"name"})
    return jsonify(cidr_groups.create(bastion(), body["name"], body.get("allow"), body.get("deny"), author())), 201


@groups_bp.op("GET", "/<name>", "One CIDR group", response=GROUP)
def get_group(name: str):
    return jsonify(cidr_groups.get(bastion(), name))


@groups_bp.op("PATCH", "/<name>", "Change a CIDR group (applies nginx config)",
              body=obj(allow=STR_LIST, deny=STR_LIST), response=GROUP)
def update_group(name: str):
    body = fields(json_body(), {"allow", "deny"})
    return jsonify(cidr_groups.update(bastion(), name, body.get("allow"), body.get("deny"), author()))


@groups_bp.op("DELETE", "/<name>", "Remove a CIDR group (refused while attached)", response=obj(success=BOOL))
def remove_group(name: str):
    cidr_groups.remove(bastion(), name, author())
    return jsonify(success=True)


@users_bp.op("GET", "", "List admin users", response={"type": "array", "items": USER})
def list_users():
    return jsonify(users.all_users(bastion()))


@users_bp.op("POST", "", "Create a user", body=obj(["username", "password"], username=STR, password=STR,
                                                   role={"type": "string", "enum": list(users.ROLES)}),
             response=USER, status=201)
def create_user():
    body = fields(json_body(), {"username", "password", "role"}, {"username", "password"})
    return jsonify(users.create(bastion(), body["username"], body["password"], body.get("role", "viewer"),
                                author())), 201


@users_bp.op("GET", "/<username>", "One user", response=USER)
def get_user(username: str):
    return jsonify(users.get(bastion(), username))


@users_bp.op("PATCH", "/<username>", "Change role or password (signs the user out everywhere)",
             body=obj(password=STR, role={"type": "string", "enum": list(users.ROLES)}), response=USER)
def update_user(username: str):
    return jsonify(users.update(bastion(), username, author(), **fields(json_body(), {"password", "role"})))


@users_bp.op("DELETE", "/<username>", "Remove a user (never the last admin)", response=obj(success=BOOL))
def remove_user(username: str):
    users.remove(bastion(), username, author())
    return jsonify(success=True)


@settings_bp.op("GET", "", "All settings with their effective values", response=SETTINGS)
def get_settings():
    return jsonify(_shown(bastion().settings()))


@settings_bp.op("PATCH", "", "Change settings (applies nginx config; rolled back if nginx refuses)",
                body={**SETTINGS, "minProperties": 1}, response=SETTINGS)
def update_settings():
    return jsonify(_shown(settings_mod.update(bastion(), json_body(), author())))


def _shown(values: dict) -> dict:
    """Settings as answered: admins read the custom config as they wrote it (to edit it), viewers with every
    header value and URL credential masked."""
    if g.identity.role == "admin":
        return values
    return {**values, "custom_config": custom_config.mask(values["custom_config"])}
