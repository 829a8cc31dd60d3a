"""/api/v1/pools (with their upstreams) and /api/v1/routes."""

from __future__ import annotations

from flask import jsonify, request

from manager import pools as pools_mod
from manager import traffic
from manager import validation as v
from manager.api.base import (
    BOOL,
    INT,
    NULLABLE_INT,
    NULLABLE_NUM,
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

bp = ApiBlueprint("pools", __name__, url_prefix="/api/v1/pools")
routes_bp = ApiBlueprint("routes", __name__, url_prefix="/api/v1/routes")

UPSTREAM = obj(["url"], url=STR, weight=INT, backup=BOOL, down=BOOL)
UPSTREAM_IN = {"oneOf": [STR, UPSTREAM]}
# retries inside the pool, timeouts, WebSocket pass-through, model-aware balancing (manager/traffic.py)
TRAFFIC = {"retries": INT, "retry_timeout": INT,
           "retry_statuses": {"type": "array", "items": {"type": "integer", "enum": list(traffic.RETRY_STATUSES)}},
           "connect_timeout": NULLABLE_INT, "read_timeout": NULLABLE_INT, "websocket": BOOL,
           "model_aware": BOOL}
# as shown: with the last health check (health unknown until the first; error e.g. a refused API key)
UPSTREAM_STATUS = obj(["url"], url=STR, weight=INT, backup=BOOL, down=BOOL,
                      health={"type": "string", "enum": ["up", "down", "unknown"]}, error=NULLABLE_STR,
                      error_since=NULLABLE_NUM, checked_at=NULLABLE_NUM)
POOL_FIELDS = {"upstreams": {"type": "array", "items": UPSTREAM_IN, "minItems": 1},
               "api_key": {"type": ["string", "null"]}, "models": STR_LIST,
               "method": {"type": "string", "enum": list(v.BALANCING_METHODS)}, "tls_verify": BOOL,
               "include_usage": BOOL, "passthrough": STR_LIST,
               "aliases": {"type": "object", "additionalProperties": STR}, **TRAFFIC,
               "api_kinds": {"type": ["array", "null"], "items": {"type": "string", "enum": ["openai", "ollama"]}}}
POOL = obj(name=STR, method=STR, upstreams={"type": "array", "items": UPSTREAM_STATUS}, models=STR_LIST,
           discovered_models=STR_LIST, discovered_at=NULLABLE_NUM, created_at=NUM, api_key_set=BOOL,
           tls_verify=BOOL, include_usage=BOOL, passthrough=STR_LIST,
           aliases={"type": "object", "additionalProperties": STR},
           discovery_error=NULLABLE_STR, discovery_error_since=NULLABLE_NUM,
           **TRAFFIC, api_kinds=STR_LIST, detected_api_kinds={"type": ["array", "null"], "items": STR},
           effective_api_kinds=STR_LIST, ollama_version=NULLABLE_STR,
           model_details={"type": "object", "additionalProperties": {
               "type": "object", "additionalProperties": {"type": "object"}}})
ROUTE = obj(["model", "pools"], model=STR, pools=STR_LIST,
            mode={"type": "string", "enum": list(traffic.ROUTE_MODES)})


@bp.op("GET", "", "List pools", response={"type": "array", "items": POOL})
def list_pools():
    return jsonify(pools_mod.all_pools(bastion()))


@bp.op("POST", "", "Create a pool (models discovered from the upstreams when not given)",
       body=obj(["name", "upstreams"], name=STR, **POOL_FIELDS), response=POOL, status=201)
def create_pool():
    body = fields(json_body(), {"name", *POOL_FIELDS}, {"name", "upstreams"})
    return jsonify(pools_mod.add(bastion(), body.pop("name"), body.pop("upstreams"), author(), **body)), 201


@bp.op("GET", "/<name>", "One pool", response=POOL)
def get_pool(name: str):
    return jsonify(pools_mod.get(bastion(), name))


@bp.op("PATCH", "/<name>", "Change a pool (applies nginx config)", body=obj(**POOL_FIELDS), response=POOL)
def update_pool(name: str):
    return jsonify(pools_mod.update(bastion(), name, author(), **fields(json_body(), set(POOL_FIELDS))))


@bp.op("DELETE", "/<name>", "Remove a pool (refused while a route uses it)", response=obj(success=BOOL))
def remove_pool(name: str):
    pools_mod.remove(bastion(), name, author())
    return jsonify(success=True)


@bp.op("POST", "/<name>/refresh", "Ask the upstreams now which models they serve", response=POOL)
def refresh_pool(name: str):
    pools_mod.get(bastion(), name)
    pools_mod.refresh_discovered(bastion(), only=name)
    return jsonify(pools_mod.get(bastion(), name))


@bp.op("GET", "/<name>/upstreams", "A pool's upstreams", response={"type": "array", "items": UPSTREAM_STATUS})
def list_upstreams(name: str):
    return jsonify(pools_mod.get(bastion(), name)["upstreams"])


@bp.op("POST", "/<name>/upstreams", "Add an upstream to a pool", body=UPSTREAM, response=POOL, status=201)
def add_upstream(name: str):
    upstream = fields(json_body(), {"url", "weight", "backup"}, {"url"})
    return jsonify(pools_mod.add_upstream(bastion(), name, upstream, author())), 201


@bp.op("DELETE", "/<name>/upstreams", "Remove the upstream with this URL", query={"url": STR}, response=POOL)
def remove_upstream(name: str):
    url = request.args.get("url")
    if not url:
        raise v.ValidationError("url", "is required (the upstream's URL)")
    return jsonify(pools_mod.remove_upstream(bastion(), name, url, author()))


@routes_bp.op("GET", "", "List routes (model or glob → pools)", response={"type": "array", "items": ROUTE})
def list_routes():
    return jsonify(pools_mod.all_routes(bastion()))


@routes_bp.op("POST", "", "Create or replace the route for a model", body=ROUTE, response=ROUTE)
def set_route():
    body = fields(json_body(), {"model", "pools", "mode"}, {"model", "pools"})
    return jsonify(pools_mod.set_route(bastion(), body["model"], body["pools"], author(),
                                       mode=body.get("mode", "fallback")))


@routes_bp.op("DELETE", "/<path:model>", "Remove the route for a model", response=obj(success=BOOL))
def remove_route(model: str):
    pools_mod.remove_route(bastion(), model, author())
    return jsonify(success=True)
