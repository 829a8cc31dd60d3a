"""Active health checks of upstreams, run by the supervisor every `health_interval` seconds.

nginx's passive checks (`max_fails`/`fail_timeout`) only learn from real requests, and retry a dead upstream
every `fail_timeout`. The active check connects to each upstream (`GET /v1/models`, 3 s): after
`health_fails` failed probes in a row the upstream is rendered `down` in nginx's configuration, and one good
probe brings it back. Only connection failures and timeouts count: an upstream that answers, whatever the
status, is alive. State lives in `health.json` (0600) under the data dir, beside the generations it shapes.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import requests

from manager.store import write_atomic

if TYPE_CHECKING:
    from manager.context import Bastion

PROBE_TIMEOUT = 3.0


def load(bastion: Bastion) -> dict[str, dict[str, Any]]:
    """url -> {"fails", "down", "checked"}; empty when never checked."""
    try:
        return json.loads((bastion.dirs.root / "health.json").read_text())
    except (OSError, ValueError):
        return {}


def down_urls(bastion: Bastion) -> set[str]:
    return {url for url, state in load(bastion).items() if state.get("down")}


def probe(url: str, api_key: str | None, verify: bool | str) -> bool:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        requests.get(url + "/v1/models", headers=headers, timeout=PROBE_TIMEOUT, verify=verify)
    except (requests.RequestException, OSError):  # OSError: e.g. a missing CA bundle
        return False
    return True


def check(bastion: Bastion) -> list[str]:
    """Probe every upstream once; re-apply nginx when one went down or came back. Returns the changes."""
    settings = bastion.settings()
    previous = load(bastion)
    state: dict[str, dict[str, Any]] = {}
    changes: list[str] = []
    for pool in bastion.store.table("pools").all():
        verify = (settings["ca_bundle"] or True) if pool.get("tls_verify", True) else False
        for upstream in pool["upstreams"]:
            url = upstream["url"]
            was = previous.get(url, {"fails": 0, "down": False})
            fails = 0 if probe(url, pool.get("api_key"), verify) else was["fails"] + 1
            down = fails >= settings["health_fails"]
            if down != was["down"]:
                changes.append(f"upstream {url} of pool {pool['name']} is {'down' if down else 'up again'}")
            state[url] = {"fails": fails, "down": down, "checked": time.time()}
    path = bastion.dirs.root / "health.json"
    if not changes:
        write_atomic(path, json.dumps(state, sort_keys=True).encode())
        return changes
    before = path.read_bytes() if path.exists() else None
    write_atomic(path, json.dumps(state, sort_keys=True).encode())
    try:
        result = bastion.apply("health check")
    except Exception:  # keep the old state, so the next check tries (and audits) again
        if before is None:
            path.unlink(missing_ok=True)
        else:
            write_atomic(path, before)
        raise
    for change in changes:
        bastion.audit.record("health check", f"{change} (generation {result.generation})")
    return changes
