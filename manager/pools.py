"""Upstream pools (named groups of upstream servers) and routes (model → pools).

A pool's status is shown with it: per upstream the health checks' verdict and last problem (health.json), and
for a pool without a configured model list the last discovery problem (discovery.json). Both are runtime state
kept beside the store, not in it, so they never enter configuration history or rollbacks.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from authsvc import routes
from authsvc.aliases import AUTO
from authsvc.files import write_atomic
from manager import discovery, health, metering, traffic
from manager import validation as v
from manager.errors import Conflict, NotFound

if TYPE_CHECKING:
    from manager.context import Bastion

log = logging.getLogger(__name__)
METHODS_WITHOUT_BACKUP = ("hash", "random_two")  # nginx refuses `backup` with these balancers


def upstream(field: str, value: Any) -> dict[str, Any]:
    """An upstream given as a URL string or as {url, weight, backup}."""
    if isinstance(value, str):
        value = {"url": value}
    if not isinstance(value, dict):
        raise v.ValidationError(field, "must be a URL or an object with url, weight, backup")
    unknown = set(value) - {"url", "weight", "backup", "down"}  # `down` is read-only (health checks): ignored
    if unknown:
        raise v.ValidationError(f"{field}.{sorted(unknown)[0]}", "is not an upstream field")
    return {
        "url": v.upstream_url(f"{field}.url", value.get("url")),
        "weight": v.integer(f"{field}.weight", value.get("weight", 1), 1, 100),
        "backup": v.boolean(f"{field}.backup", value.get("backup", False)),
    }


def passthrough_paths(field: str, value: Any) -> list[str]:
    """Extra upstream paths the pool serves through Bastion (authsvc/routes.py says what is allowed)."""
    def path(name: str, item: Any) -> str:
        try:
            return routes.passthrough_path(item)
        except ValueError as e:
            raise v.ValidationError(name, str(e)) from None
    return v.string_list(field, value, path, max_items=routes.MAX_PASSTHROUGH)


MAX_ALIASES = 500


def alias_map(field: str, value: Any) -> dict[str, str]:
    """Model aliases of a pool: {public name: upstream model name}, exact names (no globs)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise v.ValidationError(field, "must be an object mapping public model names to upstream model names")
    if len(value) > MAX_ALIASES:
        raise v.ValidationError(field, f"at most {MAX_ALIASES} aliases")
    out: dict[str, str] = {}
    for public, target in value.items():
        name = v.model(field, public)
        if name == AUTO:
            raise v.ValidationError(f"{field}.{name}", "`auto` cannot be an alias (it is resolved per key)")
        out[name] = v.model(f"{field}.{name}", target)
        if out[name] == name:
            raise v.ValidationError(f"{field}.{name}", "an alias cannot name itself")
    return out


def check_aliases(bastion: Bastion, pool: dict[str, Any]) -> None:
    """An alias must not shadow a name the pool lists itself, and needs nginx's njs module (which rewrites the
    request body and the answer): without it aliases are refused here rather than sent upstream unknown."""
    for name in pool.get("aliases") or {}:
        if name in pool["models"]:
            raise v.ValidationError(f"aliases.{name}", "is also in the pool's models list; remove it there or pick "
                                    "another public name")
    if pool.get("aliases") and not metering.body_edits(bastion):
        raise v.ValidationError("aliases", "model aliases need nginx's njs module (libnginx-mod-http-js), which "
                                "is unavailable or turned off (BASTION_NJS_MODULE=off)")


def check_pool(pool: dict[str, Any]) -> None:
    """Rules that span fields of one pool."""
    schemes = {u["url"].split(":", 1)[0] for u in pool["upstreams"]}
    if len(schemes) > 1:
        raise v.ValidationError("upstreams", "all upstreams of a pool must use the same scheme (http or https)")
    if pool["method"] in METHODS_WITHOUT_BACKUP and any(u["backup"] for u in pool["upstreams"]):
        raise v.ValidationError("upstreams", f"backup upstreams cannot be used with method {pool['method']}")
    hosts = {urlsplit(u["url"]).hostname for u in pool["upstreams"]}
    if schemes == {"https"} and len(hosts) > 1:
        raise v.ValidationError("upstreams", "the upstreams of an https pool must share one hostname (Host and SNI)")
    urls = [u["url"] for u in pool["upstreams"]]
    if len(set(urls)) != len(urls):
        raise v.ValidationError("upstreams", "the same upstream URL is listed twice")


def checked_kinds(field: str, value: Any) -> list[str]:
    """The APIs a pool speaks, when the operator says so: a list of `openai` and/or `ollama` ([] = detect)."""
    if value is None:
        return []
    kinds = v.string_list(field, value, lambda f, x: v.choice(f, x, discovery.KINDS), max_items=10)
    return [k for k in discovery.KINDS if k in kinds]  # one order, whatever order was given


def effective_kinds(pool: dict[str, Any], found: dict[str, Any] | None) -> list[str]:
    """What the gate routes by: the configured kinds, else those discovery detected, else (never detected,
    e.g. every upstream down so far) both, so an undetected pool is not cut off."""
    return list(pool.get("api_kinds") or (found or {}).get("kinds") or discovery.KINDS)


def _find(bastion: Bastion, name: str) -> dict[str, Any]:
    record = bastion.store.find("pools", name=name)
    if record is None:
        raise NotFound("pool", name)
    return record


def public(pool: dict[str, Any], checks: dict[str, dict[str, Any]], discoveries: dict[str, dict[str, Any]]
           ) -> dict[str, Any]:
    """A pool as shown, with its status (`checks`: health.load(), `discoveries`: discovery_state()). The
    upstream API key is never echoed back."""
    out = {k: x for k, x in pool.items() if k != "api_key"}
    out["api_key_set"] = bool(pool.get("api_key"))
    out["include_usage"] = pool.get("include_usage", True)  # pools older than the switch have it on
    out["passthrough"] = pool.get("passthrough", [])
    out.update(traffic.of(pool))
    out["aliases"] = pool.get("aliases") or {}
    out["upstreams"] = [upstream_status(u, checks.get(u["url"]), pool["name"]) for u in pool["upstreams"]]
    out["api_kinds"] = pool.get("api_kinds") or []
    state = discoveries.get(pool["name"], {})
    out["detected_api_kinds"] = state.get("kinds")
    out["effective_api_kinds"] = effective_kinds(pool, state)
    out["ollama_version"] = state.get("version")
    found = {} if pool["models"] else state
    out["discovery_error"] = found.get("error")
    out["discovery_error_since"] = found.get("error_since")
    return out


def upstream_status(up: dict[str, Any], check: dict[str, Any] | None, pool_name: str) -> dict[str, Any]:
    """An upstream with its last health check: `health` up/down (unknown before the first check), `error`
    (also for a live upstream, e.g. a refused API key) and since when."""
    check = check or {}
    down = bool(check.get("down"))
    problem = check.get("problems", {}).get(pool_name, {})
    return {**up, "down": down, "health": ("down" if down else "up") if check else "unknown",
            "error": problem.get("error"), "error_since": problem.get("error_since"),
            "checked_at": check.get("checked")}


def all_pools(bastion: Bastion) -> list[dict[str, Any]]:
    checks, discoveries = health.load(bastion), discovery_state(bastion)
    return [public(p, checks, discoveries) for p in bastion.store.all("pools")]


def get(bastion: Bastion, name: str) -> dict[str, Any]:
    return public(_find(bastion, name), health.load(bastion), discovery_state(bastion))


def discovery_state(bastion: Bastion) -> dict[str, dict[str, Any]]:
    """pool name -> {"error", "error_since", "checked"} of its last model discovery, with what it found
    (kept from the last discovery that found anything): "kinds" (APIs the upstreams answered), "version"
    (lowest Ollama version) and "info" (per kind, model -> details the upstreams report)."""
    try:
        return json.loads((bastion.dirs.root / "discovery.json").read_text())
    except (OSError, ValueError):
        return {}


def record_discovery(bastion: Bastion, found: dict[str, discovery.Discovery]) -> dict[str, dict[str, Any]]:
    """Keep each pool's last discovery problem (None: it went well) with the time it began, and what it found
    (a discovery that found nothing keeps what the last one found). The gate's snapshot carries the kinds,
    versions and model details, so it is published again when they changed."""
    now = time.time()
    with bastion.store.transaction():  # the supervisor and the manager both discover
        known = {p["name"] for p in bastion.store.all("pools")}
        state = {name: s for name, s in discovery_state(bastion).items() if name in known}
        facts_changed = False
        for name, result in found.items():
            was = state.get(name, {})
            error = result.error
            if error != was.get("error"):
                log.log(logging.WARNING if error else logging.INFO, "model discovery for pool %s: %s",
                        name, error or "works again")
            facts = {"kinds": was.get("kinds"), "version": was.get("version"), "info": was.get("info", {})}
            if result.kinds:
                facts = {"kinds": list(result.kinds), "version": result.version, "info": result.info}
            facts_changed |= any(facts[k] != was.get(k, {} if k == "info" else None) for k in facts)
            state[name] = {"error": error, "error_since": health.problem_since(was, error, now), "checked": now,
                           **facts}
        write_atomic(bastion.dirs.root / "discovery.json", json.dumps(state, sort_keys=True).encode())
        if facts_changed:
            bastion.publish_snapshot()
    return state


def add(bastion: Bastion, name: str, upstreams: list[Any], author: str = "cli", *, api_key: str | None = None,
        models: list[str] | None = None, method: str = "round_robin", tls_verify: bool = True,
        include_usage: bool = True, aliases: dict[str, str] | None = None, api_kinds: list[str] | None = None,
        passthrough: list[str] | None = None, **traffic_fields: Any) -> dict[str, Any]:
    """Create a pool and apply the nginx config. Models are discovered from the upstreams when not given;
    `traffic_fields`: retries, timeouts, websocket (manager/traffic.py)."""
    unknown = set(traffic_fields) - set(traffic.POOL_FIELDS)
    if unknown:
        raise v.ValidationError(sorted(unknown)[0], "is not a pool field")
    if not isinstance(upstreams, list) or not upstreams:
        raise v.ValidationError("upstreams", "give at least one upstream URL")
    pool = {
        "name": v.name("name", name),
        "method": v.choice("method", method, v.BALANCING_METHODS),
        "upstreams": [upstream(f"upstreams[{i}]", u) for i, u in enumerate(upstreams)],
        "api_key": v.secret("api_key", api_key) if api_key else None,
        "models": v.models("models", models) if models else [],
        "tls_verify": v.boolean("tls_verify", tls_verify),
        "include_usage": v.boolean("include_usage", include_usage),
        "passthrough": passthrough_paths("passthrough", passthrough or []),
        "aliases": alias_map("aliases", aliases),
        "api_kinds": checked_kinds("api_kinds", api_kinds),
        "discovered_models": [],
        "discovered_at": None,
        "created_at": time.time(),
        **traffic.pool_fields(traffic_fields, defaults=True),
    }
    check_pool(pool)
    check_aliases(bastion, pool)
    # asked also for a pool with configured models: the APIs it speaks and its models' details
    found = discovery.discover_pool_models(pool, bastion.settings()["ca_bundle"])
    if not pool["models"]:
        pool["discovered_models"] = found.models or []
        pool["discovered_at"] = time.time()
    with bastion.change(author, f"add pool {pool['name']}", nginx=True):
        if bastion.store.find("pools", name=pool["name"]):
            raise Conflict("name", f"a pool named {pool['name']!r} already exists")
        bastion.store.insert("pools", pool)
    return public(pool, {}, record_discovery(bastion, {pool["name"]: found}))


def update(bastion: Bastion, name: str, author: str = "cli", **fields: Any) -> dict[str, Any]:
    """Change method, api_key, models, tls_verify, include_usage, aliases, api_kinds, traffic settings
    (manager/traffic.py) or the whole upstream list of a pool."""
    unknown = set(fields) - {"method", "api_key", "models", "upstreams", "tls_verify", "include_usage", "aliases",
                             "api_kinds",
                             "passthrough",
                             *traffic.POOL_FIELDS}
    if unknown:
        raise v.ValidationError(sorted(unknown)[0], "is not a pool field")
    with bastion.change(author, f"update pool {name} ({', '.join(sorted(fields))})", nginx=True):
        pool = _find(bastion, name)
        if "method" in fields:
            pool["method"] = v.choice("method", fields["method"], v.BALANCING_METHODS)
        if "api_key" in fields:
            pool["api_key"] = v.secret("api_key", fields["api_key"]) if fields["api_key"] else None
        if "models" in fields:
            pool["models"] = v.models("models", fields["models"] or [])
        if "tls_verify" in fields:
            pool["tls_verify"] = v.boolean("tls_verify", fields["tls_verify"])
        if "include_usage" in fields:
            pool["include_usage"] = v.boolean("include_usage", fields["include_usage"])
        if "passthrough" in fields:
            pool["passthrough"] = passthrough_paths("passthrough", fields["passthrough"] or [])
        if "aliases" in fields:
            pool["aliases"] = alias_map("aliases", fields["aliases"])
        if "api_kinds" in fields:
            pool["api_kinds"] = checked_kinds("api_kinds", fields["api_kinds"])
        if "upstreams" in fields:
            ups = fields["upstreams"]
            if not isinstance(ups, list) or not ups:
                raise v.ValidationError("upstreams", "give at least one upstream URL")
            pool["upstreams"] = [upstream(f"upstreams[{i}]", u) for i, u in enumerate(ups)]
        pool.update(traffic.pool_fields(fields, defaults=False))
        check_pool(pool)
        if {"aliases", "models"} & fields.keys():
            check_aliases(bastion, pool)
        bastion.store.update("pools", pool, name=name)
    if "models" in fields and not pool["models"]:  # back to discovery: ask the upstreams now
        refresh_discovered(bastion, only=name)
    return get(bastion, name)


def add_upstream(bastion: Bastion, name: str, value: Any, author: str = "cli") -> dict[str, Any]:
    """Append one upstream (read and written under one lock, so concurrent edits are never lost)."""
    with bastion.change(author, f"add upstream to pool {name}", nginx=True):
        pool = _find(bastion, name)
        pool["upstreams"].append(upstream(f"upstreams[{len(pool['upstreams'])}]", value))
        check_pool(pool)
        bastion.store.update("pools", pool, name=name)
    return get(bastion, name)


def remove_upstream(bastion: Bastion, name: str, url: Any, author: str = "cli") -> dict[str, Any]:
    normalised = v.upstream_url("url", url)
    with bastion.change(author, f"remove upstream {normalised} from pool {name}", nginx=True):
        pool = _find(bastion, name)
        remaining = [u for u in pool["upstreams"] if u["url"] != normalised]
        if len(remaining) == len(pool["upstreams"]):
            raise NotFound("upstream", f"{normalised} in pool {name}")
        if not remaining:
            raise Conflict("url", "a pool needs at least one upstream; remove the pool instead")
        bastion.store.update("pools", {"upstreams": remaining}, name=name)
    return get(bastion, name)


def remove(bastion: Bastion, name: str, author: str = "cli") -> None:
    with bastion.change(author, f"remove pool {name}", nginx=True):
        _find(bastion, name)
        users = [r["model"] for r in bastion.store.all("routes") if name in r["pools"]]
        if users:
            raise Conflict("name", f"pool {name!r} is used by the routes for {', '.join(users)}; remove them first")
        bastion.store.remove("pools", name=name)
        if bastion.store.get_setting("default_pool") == name:
            bastion.store.update_settings(default_pool=None)


def refresh_discovered(bastion: Bastion, only: str | None = None) -> list[str]:
    """Ask the upstreams what they speak and serve; returns the pools whose discovered models changed (only
    pools without a model list take them). Each pool's problem, if any, is recorded for its status; a pool
    that got no list keeps its old one."""
    discovered: dict[str, list[str]] = {}
    results: dict[str, discovery.Discovery] = {}
    ca_bundle = bastion.settings()["ca_bundle"]
    for pool in bastion.store.all("pools"):
        if only and pool["name"] != only:
            continue
        found = results[pool["name"]] = discovery.discover_pool_models(pool, ca_bundle)
        if pool.get("models"):
            continue
        if found.models is not None and found.models != pool.get("discovered_models"):
            discovered[pool["name"]] = found.models
    if discovered:  # one change for all pools: one store write and one snapshot, however many pools changed
        summary = "; ".join(f"pool {name}: {', '.join(models)}" for name, models in discovered.items())

        def set_models(doc: dict[str, Any]) -> None:
            doc.update(discovered_models=discovered[doc["name"]], discovered_at=time.time())

        with bastion.change("discovery", f"models discovered for {summary}"):
            bastion.store.update("pools", set_models, name=set(discovered))
    if results:
        record_discovery(bastion, results)
    return list(discovered)


# Routes: explicit model → pools mappings, checked before the pools' own model lists.

def all_routes(bastion: Bastion) -> list[dict[str, Any]]:
    return [{"mode": "fallback", **r} for r in bastion.store.all("routes")]  # older routes: fallback


def set_route(bastion: Bastion, model: str, pools: list[str], author: str = "cli",
              mode: str = "fallback") -> dict[str, Any]:
    """`mode`: fallback (the pools in order, the next when one fails before answering) or balance (each
    request starts at the next pool in turn, then falls back across the others)."""
    route = {"model": v.model("model", model, allow_glob=True), "pools": v.string_list("pools", pools, v.name),
             "mode": traffic.route_mode("mode", mode)}
    if not route["pools"]:
        raise v.ValidationError("pools", "give at least one pool")
    traffic.check_route_pools(route["pools"])
    with bastion.change(author, f"route {route['model']} to {', '.join(route['pools'])}"):
        known = {p["name"] for p in bastion.store.all("pools")}
        for i, p in enumerate(route["pools"]):
            if p not in known:
                raise v.ValidationError(f"pools[{i}]", f"unknown pool {p!r}")
        bastion.store.upsert("routes", route, model=route["model"])
    return route


def remove_route(bastion: Bastion, model: str, author: str = "cli") -> None:
    with bastion.change(author, f"remove route {model}"):
        if not bastion.store.remove("routes", model=model):
            raise NotFound("route", model)
