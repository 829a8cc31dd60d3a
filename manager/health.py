"""Active health checks of upstreams, run by the supervisor every `health_interval` seconds.

nginx's passive checks (`max_fails`/`fail_timeout`) only learn from real requests, and retry a dead upstream
every `fail_timeout`. The active check connects to each upstream (`GET /v1/models` through
manager.outbound: 3 s in all, no redirects, the answer's body is not read): after `health_fails` failed probes
in a row the upstream is rendered `down` in nginx's configuration, and one good probe brings it back. Only
connection failures, TLS failures and timeouts count: an upstream that answers, whatever the status, is alive.
Each upstream's last problem is kept with the time it began, also for a live one: a 401/403 says the pool's
API key is wrong or missing (nginx then answers clients 502 `upstream_auth_failed`). State lives in
`health.json` (0600) under the data dir, beside the generations it shapes.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from authsvc.files import write_atomic
from manager import outbound

if TYPE_CHECKING:
    from manager.context import Bastion

log = logging.getLogger(__name__)
PROBE_TIMEOUT = 3.0


def load(bastion: Bastion) -> dict[str, dict[str, Any]]:
    """url -> {"fails", "down", "checked", "problems": {pool: {"error", "error_since"}}}; empty when never
    checked."""
    try:
        return json.loads((bastion.dirs.root / "health.json").read_text())
    except (OSError, ValueError):
        return {}


def down_urls(bastion: Bastion) -> set[str]:
    return {url for url, state in load(bastion).items() if state.get("down")}


def problem_since(was: dict[str, Any], error: str | None, now: float) -> float | None:
    """When the current problem began: kept while the same problem goes on, None when there is none."""
    if not error:
        return None
    return (was.get("error_since") or now) if error == was.get("error") else now


def probe(url: str, api_key: str | None, verify: bool | str) -> tuple[bool, str | None]:
    """(alive, problem): any HTTP answer means alive; a refused key or a redirect is still a problem."""
    try:
        outbound.get(url + "/v1/models", api_key=api_key, verify=verify, deadline=PROBE_TIMEOUT, read_body=False)
    except outbound.OutboundError as e:
        if e.status is None:
            return False, str(e)
        problem = e.status in outbound.AUTH_STATUSES or 300 <= e.status < 400
        return True, str(e) if problem else None
    return True, None


def check(bastion: Bastion) -> list[str]:
    """Probe every upstream once; re-apply nginx when one went down or came back. Returns the changes."""
    settings = bastion.settings()
    previous = load(bastion)
    state: dict[str, dict[str, Any]] = {}
    changes: list[str] = []
    targets = [(pool, upstream["url"]) for pool in bastion.store.all("pools")
               for upstream in pool["upstreams"]]

    def probe_target(target: tuple[dict[str, Any], str]) -> tuple[bool, str | None]:
        pool, url = target
        verify = (settings["ca_bundle"] or True) if pool.get("tls_verify", True) else False
        return probe(url, pool.get("api_key"), verify)

    results = outbound.in_parallel(probe_target, targets)
    for (pool, url), (alive, error) in zip(targets, results, strict=True):
        was = previous.get(url, {"fails": 0, "down": False})
        fails = 0 if alive else was["fails"] + 1
        down = fails >= settings["health_fails"]
        if down != was["down"]:
            changes.append(f"upstream {url} of pool {pool['name']} is {'down' if down else 'up again'}")
        # the problem belongs to the pool: two pools may reach one server with different keys
        had = was.get("problems", {}).get(pool["name"], {})
        if error != had.get("error"):
            log.log(logging.WARNING if error else logging.INFO, "upstream %s of pool %s: %s",
                    url, pool["name"], error or "no problem any more")
        now = time.time()
        problems = state.get(url, {}).get("problems", {})
        if error:
            problems[pool["name"]] = {"error": error, "error_since": problem_since(had, error, now)}
        state[url] = {"fails": fails, "down": down, "checked": now, "problems": problems}
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
