"""Builds the gate's snapshot (pools, routes, CIDR groups) from the store and publishes it atomically (0600).

Keys are not in it: the gate reads them incrementally from the key store (manager.keystore), so a key change
costs neither a snapshot rebuild here nor a reparse there. The gate resolves each key's `cidr_groups` with the
groups published here.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from authsvc.files import write_atomic
from authsvc.snapshot import STATUS_FILE, model_variants
from manager import balancing, cidr_groups, generations, health, metering
from manager import pools as pools_mod

if TYPE_CHECKING:
    from manager.context import Bastion


def pool_models(pool: dict[str, Any]) -> list[str]:
    """What a pool serves: its configured list, else what discovery last found on its upstreams."""
    return list(pool.get("models") or pool.get("discovered_models") or [])


def api_facts(pool: dict[str, Any], found: dict[str, Any] | None) -> dict[str, Any]:
    """The APIs a pool speaks, for routing (authsvc/model_lists.py), with what its upstreams report about the
    models it serves: the details of other models are left out, so the snapshot grows only with what is
    routed. `created`: the pool's creation, shown for models whose upstream gives no date."""
    kinds = pools_mod.effective_kinds(pool, found)
    info = (found or {}).get("info") or {}
    served = set(pool_models(pool))
    out: dict[str, Any] = {"kinds": kinds, "created": int(pool.get("created_at") or 0)}
    for kind in kinds:
        details = {m: d for m, d in (info.get(kind) or {}).items() if d and any(x in served for x in model_variants(m))}
        if details:
            out[kind] = details
    if (found or {}).get("version") and "ollama" in kinds:
        out["version"] = found["version"]
    return out


def model_aware(pool: dict[str, Any], down: set[str]) -> dict[str, Any]:
    """The upstreams the gate picks among in a model-aware pool (manager/balancing.py); nothing otherwise, so
    other pools' snapshots stay as they were."""
    view = balancing.gate_view(pool, down)
    return {"balance": view} if view else {}


def build(bastion: Bastion, only_pools: set[str] | None = None) -> dict[str, Any]:
    """The gate's view; `only_pools` limits pools (and routes to them) to those nginx has right now."""
    store = bastion.store
    found = pools_mod.discovery_state(bastion)
    # while nginx changes, WebSocket only where the live generation has the location for it too
    websocket = None if only_pools is None else generations.live_websocket_pools(bastion.dirs)
    down = health.down_urls(bastion)  # read once: a pool is live while one of its upstreams is not down
    pools = [{"name": p["name"], "models": pool_models(p), "include_usage": p.get("include_usage", True),
              "passthrough": p.get("passthrough") or [],
              "websocket": p.get("websocket", False) and (websocket is None or p["name"] in websocket),
              "aliases": p.get("aliases") or {}, "live": any(u["url"] not in down for u in p["upstreams"]),
              **api_facts(p, found.get(p["name"])), **model_aware(p, down)}
             for p in store.all("pools")
             if p["upstreams"] and (only_pools is None or p["name"] in only_pools)]
    names = {p["name"] for p in pools}
    routes = [{"model": r["model"], "pools": [p for p in r["pools"] if p in names],
               "mode": r.get("mode", "fallback")} for r in store.all("routes")]
    settings = bastion.settings()
    default_pool = settings["default_pool"]
    return {
        "cidr_groups": {g["name"]: {"allow": g["allow"], "deny": g["deny"]} for g in cidr_groups.all_groups(bastion)},
        "pools": pools,
        "routes": [r for r in routes if r["pools"]],
        "default_pool": default_pool if default_pool in names else None,
        "bruteforce": bruteforce_policy(bastion, settings),
        "unauthenticated_rpm": settings["unauthenticated_rpm"],
        "auto_models": settings["auto_models"],
        "body_edits": metering.body_edits(bastion),
    }


def bruteforce_policy(bastion: Bastion, settings: dict[str, Any]) -> dict[str, Any]:
    """The gate's brute-force settings (authsvc.bruteforce.Policy), exempt CIDR groups resolved to networks."""
    groups = settings["bruteforce_exempt_cidr_groups"]
    exempt, exempt_deny = cidr_groups.rules(bastion, groups) if groups else ([], [])
    return {"max_failures": settings["bruteforce_max_failures"], "window": settings["bruteforce_window"],
            "block": settings["bruteforce_block"], "max_block": settings["bruteforce_max_block"],
            "exempt": exempt, "exempt_deny": exempt_deny}


def publish(bastion: Bastion, only_pools: set[str] | None = None) -> None:
    data = json.dumps(build(bastion, only_pools), sort_keys=True).encode()
    path = bastion.dirs.snapshot
    if not path.exists() or path.read_bytes() != data:  # unchanged: spare the gate a rebuild
        write_atomic(path, data)


SNAPSHOT_UNREADABLE = "snapshot.json unreadable"


def gate_problems(bastion: Bastion) -> list[str]:
    """What keeps the gate from taking changes in, as it last reported (nothing when it cannot be told)."""
    try:
        status = json.loads((bastion.dirs.run / STATUS_FILE).read_bytes())
    except (OSError, ValueError):
        return []
    return [f"{what}: {status[field]}" for field, what in (("snapshot_problem", SNAPSHOT_UNREADABLE),
                                                            ("keys_problem", "key store unreadable"),
                                                            ("quotas_problem", "quota figures unreadable"),
                                                            ("running_problem", "ollama-ps.json unreadable"))
            if isinstance(status, dict) and status.get(field)]


def edit_problems(bastion: Bastion) -> list[str]:
    """What is configured but cannot work because nginx cannot edit request bodies (njs unavailable): model
    aliases, keys' default models and `auto` (their requests get 503 body_edit_unavailable)."""
    if metering.body_edits(bastion):
        return []
    problems = [f"pool {p['name']} has model aliases, which need njs (unavailable): requests for them get 503"
                for p in bastion.store.all("pools") if p.get("aliases")]
    keys = bastion.keystore.count_editing()
    if keys:
        problems.append(f"{keys} key(s) have a default model or allow_auto, which need njs (unavailable): those "
                        "requests get 503")
    return problems
