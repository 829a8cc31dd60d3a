"""Builds the gate's snapshot (keys, pools, routes) from the store and publishes it atomically (0600)."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from manager import cidr_groups
from manager.store import write_atomic

if TYPE_CHECKING:
    from manager.context import Bastion


def pool_models(pool: dict[str, Any]) -> list[str]:
    """What a pool serves: its configured list, else what discovery last found on its upstreams."""
    return list(pool.get("models") or pool.get("discovered_models") or [])


def build(bastion: Bastion) -> dict[str, Any]:
    store = bastion.store
    keys = []
    for k in store.table("keys").all():
        if k.get("revoked_at"):
            continue
        allow, deny = cidr_groups.rules(bastion, k.get("cidr_groups", []))
        keys.append({
            "id": k["id"],
            "digest": k["digest"],
            "name": k["name"],
            "enabled": k["enabled"],
            "expires": k.get("expires"),
            "models": k.get("models", []),
            "endpoints": k.get("endpoints", []),
            "rpm": k.get("rpm", 0),
            "cidrs": list(dict.fromkeys([*k.get("cidrs", []), *allow])),
            "deny_cidrs": deny,
        })
    pools = [{"name": p["name"], "models": pool_models(p)} for p in store.table("pools").all() if p["upstreams"]]
    routes = [{"model": r["model"], "pools": r["pools"]} for r in store.table("routes").all()]
    return {
        "generation": time.time_ns(),
        "keys": keys,
        "pools": pools,
        "routes": routes,
        "default_pool": bastion.settings()["default_pool"],
    }


def publish(bastion: Bastion) -> None:
    write_atomic(bastion.dirs.snapshot, json.dumps(build(bastion)).encode())
