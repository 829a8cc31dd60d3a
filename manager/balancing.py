"""Model- and load-aware balancing inside a pool (docs/decisions.md, decision 38): what nginx and the gate get.

For a pool with `model_aware` on and at least two primary (non-backup) upstreams, nginx gets one more upstream
block per primary upstream i, `pool_<name>__<i>`, in which upstream i's servers are the primaries and every other
server of the pool a backup. The gate names i in `X-Bastion-Upstream: <pool>:<i>` (authsvc/balance.py); the pool
location maps that header, captured at the first hop, to the block (anything else, a fallback pool's hop
included, to the pool's own block), so nginx still fails over to the pool's other upstreams before the first
byte, with the pool's retries, timeouts and TLS settings. Servers the health checks marked down stay down in
every block.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def choices(pool: Mapping[str, Any]) -> list[int]:
    """The upstreams (by index) the gate may pick in `pool`: none unless it is model-aware with two or more
    primary upstreams (a backup upstream stays a backup in every block)."""
    if not pool.get("model_aware"):
        return []
    primary = [i for i, up in enumerate(pool["upstreams"]) if not up.get("backup")]
    return primary if len(primary) > 1 else []


def blocks(pool: Mapping[str, Any], servers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One upstream block per choice: `servers` (render.pool_view's, each with its upstream's index) with the
    chosen upstream's servers primary and all others backup."""
    return [{"index": i, "servers": [{**s, "backup": s["upstream"] != i} for s in servers]}
            for i in choices(pool)]


def gate_view(pool: Mapping[str, Any], down: set[str]) -> list[dict[str, Any]] | None:
    """The upstreams the gate chooses among (index = position in the pool, as nginx's blocks are named):
    URL (the key of the load data, manager/running.py) and whether the health checks hold it live."""
    picks = choices(pool)
    if not picks:
        return None
    return [{"index": i, "url": pool["upstreams"][i]["url"], "live": pool["upstreams"][i]["url"] not in down}
            for i in picks]
